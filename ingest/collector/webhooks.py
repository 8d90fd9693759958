"""Shopify-style webhooks: HMAC verification and the mapping of topics to storefront events.

Only the body is signed. What a stored event is made of (its id, its time,
its session) therefore comes from the body wherever it can; the headers
(``X-Shopify-Webhook-Id``, ``X-Shopify-Event-Id``, ``X-Shopify-Triggered-At``)
are kept in ``props`` for tracing and, for the triggered-at, checked against a
freshness window, but a replayer who changes them gets the same row.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

import orjson

from ingest.core.shopify import TOPIC_EVENT_TYPES, WEBHOOK_NAMESPACE, signature, webhook_event_id
from ingest.core.streams import STOREFRONT

__all__ = [
    "TOPIC_EVENT_TYPES",
    "WEBHOOK_NAMESPACE",
    "event_type",
    "parse_time",
    "storefront_fields",
    "verify",
    "webhook_event_id",
]


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Constant-time check of the signature header; False for any header that is not it.

    A signature is base64, so ASCII: anything else (an undecodable byte arrives
    as a lone surrogate) is wrong, and is refused before ``compare_digest``,
    which raises on non-ASCII text. Bytes are compared, never text.
    """
    if not header or not header.isascii():
        return False
    return hmac.compare_digest(signature(secret, body).encode(), header.encode())


def event_type(topic: str) -> str:
    """The storefront event type of a webhook topic (unknown topics keep their name)."""
    return TOPIC_EVENT_TYPES.get(topic, "shopify_" + topic.replace("/", "_")[:100])


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time (``Z`` allowed; no zone: UTC), None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _text(value: Any) -> str | None:
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
        return str(value)[:256]
    return None


def storefront_fields(
    topic: str,
    webhook_id: str,
    shop_domain: str,
    payload: dict[str, Any],
    triggered_at: str | None,
    *,
    body: bytes | None = None,
    shopify_event_id: str | None = None,
) -> dict[str, Any]:
    """The fields of the storefront event a webhook becomes (the payload kept in props).

    ``body`` is the signed bytes (None: the payload re-encoded), hashed into
    the event id of a payload without an object id and version. The event time
    is the payload's ``updated_at``, else its ``created_at``; only a payload
    with neither takes the (unsigned) ``triggered_at``, and its row is then
    marked as retimed (``props.client_ts``) so that the loaders keep one row
    of its event whatever times replays claim (migration 0006).
    """
    customer = payload.get("customer")
    customer_id = _text(customer.get("id")) if isinstance(customer, dict) else None
    token = (
        _text(payload.get("cart_token"))
        or _text(payload.get("checkout_token"))
        or _text(payload.get("token"))
    )
    event_id = webhook_event_id(
        shop_domain, topic, payload, orjson.dumps(payload) if body is None else body
    )
    props: dict[str, Any] = {
        "webhook_topic": topic,
        "webhook_id": webhook_id,
        "payload": payload,
    }
    if shopify_event_id:
        props["shopify_event_id"] = shopify_event_id
    value = payload.get("total_price") or payload.get("subtotal_price")
    if value is not None:
        props["value"] = value
    if isinstance(payload.get("currency"), str):
        props["currency"] = payload["currency"]
    ts = parse_time(payload.get("updated_at")) or parse_time(payload.get("created_at"))
    if ts is None:
        claimed = parse_time(triggered_at)
        ts = claimed
        props[STOREFRONT.original_time_key] = claimed.isoformat() if claimed else None
    return {
        "event_id": event_id,
        "event_type": event_type(topic),
        "anon_id": customer_id or token or "shopify",
        # Not the webhook id: a replay with a new one would be another session.
        "session_id": token or f"webhook:{event_id}",
        "ts": ts,
        "props": props,
    }
