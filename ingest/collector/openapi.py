"""The OpenAPI 3 document of the collector, built from the pydantic models it validates with."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel

from ingest import __version__
from ingest.collector.models import BehaviorBatch, StorefrontBatch

REF = "#/components/schemas/{model}"


class Rejection(BaseModel):
    """One refused event of a batch."""

    index: int
    reason: str


class BatchResult(BaseModel):
    """The answer to a batch: how many were accepted, and why the others weren't."""

    accepted: int
    rejected: list[Rejection]


class Error(BaseModel):
    """A refused request."""

    error: str


def _schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in (BehaviorBatch, StorefrontBatch, BatchResult, SegmentResult, Error):
        schema = model.model_json_schema(ref_template=REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "not a batch / not JSON / no valid event",
        401: "missing or unknown write key, or bad signature",
        403: "origin not allowed for this write key",
        404: "unknown message type",
        413: "over a size limit (named in the error)",
        415: "unsupported Content-Type or Content-Encoding",
        429: "rate limit exceeded (see Retry-After)",
        503: "broker and spool unavailable (see Retry-After)",
    }
    return {
        str(c): {
            "description": reasons[c],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        for c in codes
    }


def _batch(summary: str, batch: str, event: str) -> dict[str, Any]:
    body = {"oneOf": [_ref(batch), {"type": "array", "items": _ref(event)}]}
    return {
        "post": {
            "summary": summary,
            "parameters": [
                {
                    "name": "k",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "write key (sendBeacon can't set headers)",
                },
                {
                    "name": "X-Write-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body}, "text/plain": {"schema": body}},
            },
            "responses": {
                "200": {
                    "description": "accepted (some events may be rejected, with reasons)",
                    "content": {"application/json": {"schema": _ref("BatchResult")}},
                },
                **_errors(400, 401, 403, 413, 415, 429, 503),
            },
        }
    }


def _get(summary: str, media: str = "application/json") -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": summary, "content": {media: {"schema": {}}}}},
        }
    }


class SegmentResult(BaseModel):
    """The answer of the Segment API: Segment's ``success`` and our counts."""

    success: bool
    accepted: int
    rejected: list[Rejection]


def _segment(summary: str, body: dict[str, Any], typed: bool = False) -> dict[str, Any]:
    """One operation of the Segment tracking API (``ingest.collector.segment``)."""
    parameters: list[dict[str, Any]] = [
        {
            "name": "writeKey",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "write key (RudderStack's beacon)",
        },
        {
            "name": "X-Write-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "write key, or Jitsu's key:secret",
        },
        {
            "name": "Authorization",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "HTTP Basic with the write key as user name, empty password",
        },
    ]
    if typed:
        from ingest.collector import segment  # builds on the app module, which imports this one

        # The message types (another is a 404 with its reason).
        kinds = {"type": "string", "enum": list(segment.TYPES)}
        parameters.append({"name": "type", "in": "path", "required": True, "schema": kinds})
    return {
        "post": {
            "summary": summary,
            "parameters": parameters,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body}, "text/plain": {"schema": body}},
            },
            "responses": {
                "200": {
                    "description": "accepted (some messages may be rejected, with reasons)",
                    "content": {"application/json": {"schema": _ref("SegmentResult")}},
                },
                **_errors(400, 401, 403, 404, 413, 415, 429, 503),
            },
        }
    }


def _segment_paths() -> dict[str, Any]:
    # Imported here: segment builds on the app module, which imports this one.
    from ingest.collector import segment

    batch = {"type": "object", "required": ["batch"]}
    message = {"type": "object"}
    paths: dict[str, Any] = {
        path: _segment("A batch of Segment messages", batch) for path in segment.BATCH_PATHS
    }
    paths[segment.IMPORT_PATH] = _segment("Historical Segment messages (times kept)", batch)
    for path, kind in segment.message_paths().items():
        paths[path] = _segment(f"One Segment {kind} message", message)
    for path in segment.JITSU_PATHS:
        paths[path] = _segment("One Jitsu message of the path's type", message, typed=True)
    paths["/v1/projects/{writeKey}/settings"] = _get("analytics.js project settings")
    paths["/sourceConfig"] = _get("RudderStack JS SDK source configuration")
    return paths


def _snowplow_paths() -> dict[str, Any]:
    """Snowplow's tracker protocol (``ingest.collector.snowplow``) at its default paths."""
    from ingest.collector import snowplow

    payload = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "schema": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object"}},
        },
    }
    gif = {"content": {"image/gif": {"schema": {"type": "string", "format": "binary"}}}}
    return {
        snowplow.POST_PATH: {
            "post": {
                "summary": "Snowplow tracker protocol 2: a payload_data batch (appId: write key)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": payload},
                        "text/plain": {"schema": payload},
                    },
                },
                "responses": {
                    "200": {
                        "description": "accepted (some events may be rejected, with reasons)",
                        "content": {"application/json": {"schema": _ref("BatchResult")}},
                    },
                    **_errors(400, 401, 403, 413, 415, 429, 503),
                },
            }
        },
        snowplow.GET_PATH: {
            "get": {
                "summary": "Snowplow pixel: one event in the query string (aid: write key)",
                "parameters": [
                    {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                    for name in ("e", "aid", "eid", "url", "dtm", "stm", "duid", "sid")
                ],
                "responses": {
                    "200": {"description": "a 1x1 GIF, whether the event was taken or not", **gif},
                    "429": {"description": "rate limited (a GIF; see Retry-After)", **gif},
                    "503": {"description": "broker and spool unavailable (a GIF)", **gif},
                },
            }
        },
    }


def _posthog_paths() -> dict[str, Any]:
    """PostHog's capture API (``ingest.collector.posthog``)."""
    from ingest.collector import posthog

    body = {"oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}]}
    compression = {
        "name": "compression",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["gzip-js", "lz64", "base64"]},
    }
    data = {"name": "data", "in": "query", "required": False, "schema": {"type": "string"}}
    ok = {
        "200": {
            "description": "accepted (some events may be rejected, with reasons)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "204": {"description": "accepted (beacon=1)"},
        **_errors(400, 401, 403, 413, 415, 429, 503),
    }
    content = {media: {"schema": body} for media in ("application/json", "text/plain")} | {
        "application/x-www-form-urlencoded": {"schema": {"type": "object"}}
    }
    paths: dict[str, Any] = {}
    for path in posthog.CAPTURE_PATHS:
        paths[path] = {
            "post": {
                "summary": "PostHog capture: an event, a list, or a batch (gzip, lz64, base64)",
                "parameters": [compression],
                "requestBody": {"required": True, "content": content},
                "responses": ok,
            },
            "get": {
                "summary": "PostHog capture with data= (base64 or lz64 JSON)",
                "parameters": [compression, data],
                "responses": ok,
            },
        }
    config = _get("PostHog configuration: autocapture on, no flags, recording or surveys")
    for path in posthog.CONFIG_PATHS:
        paths[path] = {**config, "post": config["get"]}
    token = {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
    for path in posthog.REMOTE_CONFIG_PATHS:
        operation = _get("PostHog remote configuration")
        operation["get"]["parameters"] = [token]
        paths[path] = operation
    return paths


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once)."""
    webhook_headers = [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
        for name in (
            "X-Shopify-Hmac-Sha256",
            "X-Shopify-Shop-Domain",
            "X-Shopify-Topic",
            "X-Shopify-Webhook-Id",
        )
    ]
    return {
        "openapi": "3.0.3",
        "info": {"title": "eventpipe collector", "version": __version__},
        "paths": {
            "/v1/behavior": _batch("Browser behavior events", "BehaviorBatch", "BehaviorEvent"),
            "/v1/storefront": _batch("Storefront events", "StorefrontBatch", "StorefrontEvent"),
            "/v1/webhooks/shopify": {
                "post": {
                    "summary": "A Shopify webhook (orders, checkouts, carts)",
                    "parameters": webhook_headers,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "stored (a redelivery is stored once)",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(400, 401, 413, 415, 503),
                    },
                }
            },
            "/v1/openapi.json": _get("This document"),
            "/v1/beacon.js": _get("The browser beacon script", "application/javascript"),
            "/v1/beacon/config": {
                "get": {
                    "summary": "What the beacon of a write key must know first (consent_required)",
                    "parameters": [
                        {"name": "k", "in": "query", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {
                            "description": "the shop's beacon configuration",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/healthz": _get("The process is alive"),
            "/readyz": _get("Broker reachable and spool below its high-water mark"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            **_segment_paths(),
            **_snowplow_paths(),
            **_posthog_paths(),
        },
        "components": {"schemas": _schemas()},
    }
