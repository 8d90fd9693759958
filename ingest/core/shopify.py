"""The Shopify webhook contract the collector verifies and the load generator signs:
the signature, the topics we map, and the event id of a webhook."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Mapping
from typing import Any

# The namespace of webhook event ids (uuid5): redeliveries, and replays, of one
# webhook get the same event_id, so the loaders store them once.
WEBHOOK_NAMESPACE = uuid.UUID("5f0d3c3e-8a5e-4c43-9d0f-2f1c9e0b7a11")

TOPIC_EVENT_TYPES = {
    "orders/create": "purchase",
    "orders/paid": "order_paid",
    "checkouts/create": "begin_checkout",
    "checkouts/update": "checkout_update",
    "carts/create": "add_to_cart",
    "carts/update": "cart_update",
}


def signature(secret: str, body: bytes) -> str:
    """Shopify's ``X-Shopify-Hmac-Sha256``: base64 of HMAC-SHA256 of the raw body."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def _token(value: Any) -> str | None:
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
        return str(value)[:256]
    return None


def webhook_event_id(
    shop_domain: str, topic: str, payload: Mapping[str, Any], body: bytes
) -> uuid.UUID:
    """The event id of a webhook, from what its signature covers only.

    The HMAC covers the body, never the headers, so ``X-Shopify-Webhook-Id``
    and ``X-Shopify-Event-Id`` are whatever a replayer sends: an id made of
    them would let one captured ``orders/create`` become as many purchases as
    ids sent. The id is made of the shop, the topic and the object's id and
    version (``updated_at``, else ``created_at``) when the payload has both:
    Shopify's retries and its deliveries to other subscriptions (even of
    another API version, whose body differs) carry the same object and
    version. Any other payload is identified by the sha256 of its signed bytes.
    """
    object_id = _token(payload.get("id")) or _token(payload.get("token"))
    version = _token(payload.get("updated_at")) or _token(payload.get("created_at"))
    if object_id is not None and version is not None:
        name = f"{shop_domain}:{topic}:{object_id}@{version}"
    else:
        name = f"{shop_domain}:{topic}:sha256:{hashlib.sha256(body).hexdigest()}"
    return uuid.uuid5(WEBHOOK_NAMESPACE, name)
