"""The Shopify webhook contract the collector verifies and the load generator signs:
the signature, the topics we map, and the namespace of webhook event ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

# Redeliveries of one webhook (same X-Shopify-Webhook-Id) get the same event_id,
# so the loaders store them once.
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
