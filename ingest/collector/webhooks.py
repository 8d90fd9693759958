"""Shopify-style webhooks: HMAC verification and the mapping of topics to storefront events."""

from __future__ import annotations

import hmac
import uuid
from datetime import UTC, datetime
from typing import Any

from ingest.core.shopify import TOPIC_EVENT_TYPES, WEBHOOK_NAMESPACE, signature

__all__ = ["TOPIC_EVENT_TYPES", "WEBHOOK_NAMESPACE", "event_type", "storefront_fields", "verify"]


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


def _time(value: Any) -> datetime | None:
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
    topic: str, webhook_id: str, shop_domain: str, payload: dict[str, Any], triggered_at: str | None
) -> dict[str, Any]:
    """The fields of the storefront event a webhook becomes (the payload kept in props)."""
    customer = payload.get("customer")
    customer_id = _text(customer.get("id")) if isinstance(customer, dict) else None
    token = (
        _text(payload.get("cart_token"))
        or _text(payload.get("checkout_token"))
        or _text(payload.get("token"))
    )
    props: dict[str, Any] = {
        "webhook_topic": topic,
        "webhook_id": webhook_id,
        "payload": payload,
    }
    value = payload.get("total_price") or payload.get("subtotal_price")
    if value is not None:
        props["value"] = value
    if isinstance(payload.get("currency"), str):
        props["currency"] = payload["currency"]
    ts = _time(triggered_at) or _time(payload.get("updated_at")) or _time(payload.get("created_at"))
    return {
        "event_id": uuid.uuid5(WEBHOOK_NAMESPACE, f"{shop_domain}:{topic}:{webhook_id}"),
        "event_type": event_type(topic),
        "anon_id": customer_id or token or "shopify",
        "session_id": token or f"webhook:{webhook_id}"[:256],
        "ts": ts,
        "props": props,
    }
