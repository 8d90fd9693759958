"""The collector's HTTP application (aiohttp): read, authenticate, validate, enrich, deliver."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic
import structlog
from aiohttp import web

from ingest.collector import beacon, bots, native, openapi, webhooks
from ingest.collector.delivery import Delivery, Unavailable
from ingest.collector.enrich import (
    AssignedTimes,
    Received,
    behavior_fields_record,
    client_address,
    geoip_reader,
    storefront_fields_record,
    storefront_record,
    user_agent,
)
from ingest.collector.models import (
    BATCH_MODELS,
    STREAM_MODELS,
    BatchEnvelope,
    BehaviorBatch,
    BehaviorEvent,
    MappedEvent,
    StorefrontBatch,
    StorefrontEvent,
    has_nul,
)
from ingest.collector.ratelimit import RateLimiter
from ingest.core import metrics, records, streams
from ingest.core.headers import is_printable_ascii, printable_ascii, valid_text
from ingest.core.http import healthz, metrics_endpoint
from ingest.core.settings import Settings
from ingest.core.shops import Shop, ShopDirectory

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
DELIVERY = web.AppKey("delivery", Delivery)
SHOPS = web.AppKey("shops", ShopDirectory)
LIMITER = web.AppKey("limiter", RateLimiter)
TIMES = web.AppKey("times", AssignedTimes)
DECODE_SLOTS = web.AppKey("decode_slots", asyncio.Semaphore)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCEPTED_TYPES = {"", "application/json", "text/plain", "application/octet-stream"}


class Refused(Exception):
    """A request answered with a 4xx (or 503) and a reason; never a crash."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        # A reason may quote a header (a Content-Encoding, say) in any bytes: made valid
        # UTF-8 here, or encoding the JSON answer would fail and the refusal become a 500.
        reason = valid_text(reason)
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class Dropped(Refused):
    """A request from a bot for a shop whose bot_policy is ``drop``: answered 200 (a bot
    that is refused retries, or learns to look like a browser), nothing stored."""

    def __init__(self, reason: str) -> None:
        super().__init__(200, f"not stored: the client is a bot ({reason}), bot_policy drop")
        self.why = reason


def _screen(request: web.Request, shop: Shop) -> None:
    """Dropped when the request's User-Agent is a bot's and ``shop`` drops bots (counted
    by reason in ``eventpipe_bot_requests_dropped_total``)."""
    privacy = shop.privacy
    if (privacy.bot_policy or request.app[SETTINGS].bot_policy) != "drop":
        return
    why = bots.reason(user_agent(request), privacy.bot_deny_list)
    if why is not None:
        metrics.BOT_REQUESTS_DROPPED.labels(why).inc()
        raise Dropped(why)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _reason(exc: pydantic.ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


async def read_body(request: web.Request) -> bytes:
    """The request body, gunzipped if need be, within the configured limits."""
    return inflate(request, await read_raw(request))


async def read_raw(request: web.Request) -> bytes:
    """The body as sent (at most ``max_body_bytes``), its Content-Type checked."""
    settings = request.app[SETTINGS]
    media = request.content_type.lower() if request.headers.get("Content-Type") else ""
    if media not in ACCEPTED_TYPES:
        raise Refused(
            415, f"Content-Type {media} not accepted: send application/json or text/plain"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise Refused(413, f"body larger than max_body_bytes={settings.max_body_bytes}") from exc


def inflate(request: web.Request, raw: bytes) -> bytes:
    """``raw`` gunzipped when its Content-Encoding says so, at most ``max_decompressed_bytes``."""
    settings = request.app[SETTINGS]
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return raw
    if encoding != "gzip":
        raise Refused(415, f"Content-Encoding {encoding} not accepted: use gzip or none")
    limit = settings.max_decompressed_bytes
    inflater = zlib.decompressobj(wbits=31)
    try:
        # Inflate at most limit+1 bytes: a gzip bomb is refused, never inflated.
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise Refused(400, f"body is not valid gzip: {exc}") from exc
    if len(body) > limit or inflater.unconsumed_tail:
        raise Refused(413, f"body larger than max_decompressed_bytes={limit} once decompressed")
    if not inflater.eof:
        raise Refused(400, "gzip body is truncated")
    return body


def _check_values(body: bytes, limit: int) -> None:
    """413 when the JSON may hold more than ``limit`` values, before any is built.

    Every value but the first of a container follows a comma, every key a colon's
    partner, and each container opens with a bracket: their sum bounds the Python
    objects orjson would make (in C, a few ms for 4 MiB). ``[{},{},...]`` is 2 bytes
    an object on the wire but ~70 as Python objects, so the decoded size alone does
    not bound memory. Separators inside strings only over-count.
    """
    if len(body) <= limit:
        return  # fewer bytes than the limit: fewer values too
    count = body.count(b",") + body.count(b":") + body.count(b"{") + body.count(b"[")
    if count > limit:
        raise Refused(
            413, f"body holds more than max_json_values={limit} JSON values (about {count})"
        )


def check_count(events: int, settings: Settings) -> None:
    """A 413 for a batch of more than ``max_events_per_batch`` events (every route's rule:
    the native batches, Snowplow's payloads, PostHog's batches)."""
    if events > settings.max_events_per_batch:
        raise Refused(
            413,
            f"batch has {events} events, max_events_per_batch={settings.max_events_per_batch}",
        )


def _envelope(body: bytes) -> BatchEnvelope:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused(400, f"body is not JSON: {exc}") from exc
    if isinstance(data, list):
        data = {"events": data}
    try:
        return BatchEnvelope.model_validate(data)
    except pydantic.ValidationError as exc:
        raise Refused(400, f"body is not a batch: {_reason(exc)}") from exc


def _whole_batch(stream: str, body: bytes, settings: Settings) -> BatchEnvelope | None:
    """The batch validated in one pass from its JSON when every event in it is good.

    This is the path of almost every request: one call into pydantic-core for
    the whole body instead of a parse, then a validation per event. It is
    taken only when nothing needs an event's own check: the body is no larger
    than ``max_event_bytes`` (so no event can be), holds no escaped NUL, and
    every event validates. Otherwise None, and the per-event path decides
    event by event, with reasons.
    """
    if len(body) > settings.max_event_bytes or has_nul(body):
        return None
    try:
        model = BATCH_MODELS[stream]
        if body.lstrip()[:1] == b"[":  # a bare array of events
            return model.model_construct(events=_EVENT_LISTS[stream].validate_json(body))
        return model.model_validate_json(body)
    except pydantic.ValidationError:
        return None


def _given_key(request: web.Request) -> str | None:
    """The key of the query (``k``) or the ``X-Write-Key`` header; None when neither has one."""
    return request.query.get("k") or request.headers.get("X-Write-Key") or None


async def _authenticate(request: web.Request, key: str | None) -> Shop:
    """The shop of ``key`` (401 otherwise), its Origin checked (403), the request
    screened for bots by the shop's bot_policy (``Dropped``).

    Every ingest route (native, Segment, Snowplow, PostHog) finds its shops here, so
    the screen covers them all; Shopify's webhooks (server to server) find theirs
    by domain and are never screened."""
    # A key that is not printable ASCII (an undecodable header byte arrives as a lone
    # surrogate) cannot be a write key: a 401 without a database lookup.
    key = printable_ascii(key)
    shop = await request.app[SHOPS].by_write_key(key) if key else None
    if shop is None:
        raise Refused(
            401, "missing or unknown write key (query k, header X-Write-Key, or body write_key)"
        )
    origin = request.headers.get("Origin")
    if origin and not is_printable_ascii(origin):
        # Browsers send an origin's ASCII serialisation (RFC 6454; IDNs in punycode).
        raise Refused(400, "Origin header is not an origin (printable ASCII)")
    if origin and shop.allowed_origins is not None and origin not in shop.allowed_origins:
        raise Refused(403, f"origin {origin} is not allowed for this write key")
    _screen(request, shop)
    return shop


def client_identity(request: web.Request) -> str:
    """Whom the per-client rate limit counts: the client's whole IPv4 address or IPv6
    /64 (what one subscriber gets), the forwarded one behind ``trusted_proxies``."""
    address = client_address(request, request.app[SETTINGS])
    if address is None:
        return "unknown"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False).network_address)
    return str(address)


def _limited(wait: float) -> Refused:
    return Refused(
        429,
        "rate limit exceeded for this write key and client address",
        {"Retry-After": str(int(wait) + 1)},
    )


@contextlib.asynccontextmanager
async def _decode_slot(request: web.Request) -> AsyncIterator[None]:
    """One of ``decode_concurrency`` slots, held while a batch's decoded form is alive
    (parse, validation, enrichment and delivery); 503 after ``decode_wait_s`` without one."""
    slots = request.app[DECODE_SLOTS]
    try:
        # Only a wait needs its timeout: a timer armed for every request showed in
        # the profile (benchmarks/profile_collector.py); a free slot is taken at once.
        if slots.locked():
            async with asyncio.timeout(request.app[SETTINGS].decode_wait_s):
                await slots.acquire()
        else:
            await slots.acquire()
    except TimeoutError:
        metrics.EVENTS_REJECTED.labels("batch", "busy").inc()
        raise Refused(
            503, "collector busy decoding other batches, retry later", {"Retry-After": "1"}
        ) from None
    try:
        yield
    finally:
        slots.release()


Valid = BehaviorEvent | StorefrontEvent
_EVENT_LISTS: dict[str, pydantic.TypeAdapter[Any]] = {  # what a bare array body holds
    stream: pydantic.TypeAdapter(list[model])  # type: ignore[valid-type]
    for stream, model in STREAM_MODELS.items()
}


async def _accept_batch(request: web.Request, stream: str) -> web.Response:
    received_at = datetime.now(UTC)
    settings = request.app[SETTINGS]
    limiter = request.app[LIMITER]
    client = client_identity(request)
    given = _given_key(request)
    # A key in the query or a header is checked before the body is even read: an
    # unknown key costs a cached lookup, never a decode.
    shop = await _authenticate(request, given) if given is not None else None
    if given is not None and (wait := limiter.wait(given, client)) > 0:
        raise _limited(wait)  # refused before any decoding; nothing spent
    raw = await read_raw(request)
    async with _decode_slot(request):
        body = inflate(request, raw)
        _check_values(body, settings.max_json_values)
        envelope: BatchEnvelope | native.Batch = (
            native.decode(stream, body, settings)
            or _whole_batch(stream, body, settings)
            or _envelope(body)
        )
        del body  # a native.Batch holds it, for the reference path should it decline
        if shop is None:  # the key is in the body: known only now, the body bounded above
            shop = await _authenticate(request, envelope.write_key)
        key = printable_ascii(given or envelope.write_key) or ""
        if not envelope.events:
            return _json({"accepted": 0, "rejected": []})  # no event: no token spent
        check_count(len(envelope.events), settings)
        if (wait := limiter.take(key, client)) > 0:
            raise _limited(wait)
        return await _deliver_batch(request, stream, shop, envelope, received_at)


async def _deliver_batch(
    request: web.Request,
    stream: str,
    shop: Shop,
    envelope: BatchEnvelope | native.Batch,
    received_at: datetime,
) -> web.Response:
    settings = request.app[SETTINGS]
    rejected: list[dict[str, Any]] = []
    received = Received.of(request, settings, envelope.sent_at, received_at)
    fast = None
    if isinstance(envelope, native.Batch):
        fast = native.records(envelope, shop, received, settings.max_record_bytes)
        if fast is None:  # declined: the reference path decides, event by event
            body = envelope.body
            envelope = _whole_batch(stream, body, settings) or _envelope(body)
    if fast is not None:
        messages, accepted = fast, len(envelope.events)
    else:
        assert isinstance(envelope, BatchEnvelope)
        valid = _valid_events(stream, envelope, settings.max_event_bytes, rejected)
        messages, accepted = _records(
            stream, valid, shop, received, request.app[TIMES], rejected, settings.max_record_bytes
        )
    if messages:
        try:
            await request.app[DELIVERY].deliver(stream, settings.topic_for(stream), messages)
        except Unavailable as exc:
            log.error("batch refused: broker and spool unavailable", error=str(exc))
            raise Refused(
                503, "event broker unavailable, retry later", {"Retry-After": "5"}
            ) from exc
        metrics.EVENTS_ACCEPTED.labels(stream).inc(accepted)
    status = 200 if accepted or not rejected else 400
    if not accepted and any(r["reason"].startswith(_RECORD_TOO_LARGE) for r in rejected):
        status = 413  # nothing taken, and an event too large for Kafka among the refused
    return _json({"accepted": accepted, "rejected": rejected}, status)


def _valid_events(
    stream: str, envelope: BatchEnvelope, max_bytes: int, rejected: list[dict[str, Any]]
) -> list[tuple[int, Valid]]:
    """The batch's valid events with their places; the others go to ``rejected``."""
    if isinstance(envelope, BehaviorBatch | StorefrontBatch):
        return list(enumerate(envelope.events))  # validated whole by _whole_batch
    valid: list[tuple[int, Valid]] = []
    for index, raw in enumerate(envelope.events):
        try:
            valid.append((index, _validated(stream, raw, max_bytes)))
        except EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(stream, exc.kind).inc()
    return valid


_FIELDS_RECORDS = {
    streams.BEHAVIOR.name: behavior_fields_record,
    streams.STOREFRONT.name: storefront_fields_record,
}


def _records(
    stream: str,
    valid: Sequence[tuple[int, MappedEvent]],
    shop: Shop,
    received: Received,
    times: AssignedTimes,
    rejected: list[dict[str, Any]],
    max_record_bytes: int,
) -> tuple[list[tuple[bytes, bytes]], int]:
    """(Kafka records, events accepted): the events enriched, one record per session.

    Each event is a model of ``stream`` or, from a tracker protocol's fast path, its
    fields (``EventFields``, which become the record). An event refused here (a time
    the skew correction moves out of range, an integer beyond 64 bits) joins
    ``rejected``, kept in index order.
    """
    make = _FIELDS_RECORDS[stream]
    time_column = streams.STREAMS[stream].time_column
    view = received.of_shop(shop)  # once: every event of the call is the shop's
    sessions: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    late: list[dict[str, Any]] = []
    for index, event in valid:
        # A model's fields copied (shallow: nested values are shared with the model and
        # never mutated by enrichment); a fast path's dict is its own already.
        fields = event if type(event) is dict else vars(event).copy()
        given = (
            None if fields[time_column] else times.time_for(shop, fields["event_id"], received.at)
        )
        try:
            record = make(fields, shop, received, given, view)
        except (OverflowError, ValueError) as exc:
            late.append({"index": index, "reason": f"event cannot be stored: {exc}"})
            metrics.EVENTS_REJECTED.labels(stream, "unencodable").inc()
            continue
        sessions.setdefault(record["session_id"], []).append((index, record))
    messages: list[tuple[bytes, bytes]] = []
    for session, items in sessions.items():
        messages += _encode(f"{shop.id}:{session}".encode(), items, stream, late, max_record_bytes)
    if late:
        rejected += late
        rejected.sort(key=lambda r: int(r["index"]))
    return messages, len(valid) - len(late)


_RECORD_TOO_LARGE = "event larger than max_record_bytes"


def _encode(
    key: bytes,
    items: list[tuple[int, dict[str, Any]]],
    stream: str,
    rejected: list[dict[str, Any]],
    max_record_bytes: int,
) -> list[tuple[bytes, bytes]]:
    """The Kafka records of one session's records: usually one JSON array in one call.

    An event that cannot be encoded (an integer beyond 64 bits, say), or whose
    record alone would pass ``max_record_bytes`` (the broker would refuse it
    for good), is added to ``rejected`` and the others still go. A group too
    large for one record is cut into several by ``records.pack``.
    """
    limit = min(records.RECORD_BYTES, max_record_bytes - len(key))
    try:
        value = orjson.dumps([record for _, record in items])
    except (orjson.JSONEncodeError, TypeError, ValueError, OverflowError):
        value = b""
    if value and len(value) <= limit:
        return [(key, value)]
    encoded: list[bytes] = []
    for index, record in items:
        try:
            event = orjson.dumps(record)
        except (orjson.JSONEncodeError, TypeError, ValueError, OverflowError) as exc:
            reason = f"event cannot be encoded: {exc}"
            rejected.append({"index": index, "reason": reason})
            metrics.EVENTS_REJECTED.labels(stream, "unencodable").inc()
            continue
        if len(key) + len(event) + 2 > max_record_bytes:  # +2: the array's brackets
            reason = f"{_RECORD_TOO_LARGE}={max_record_bytes} once enriched"
            rejected.append({"index": index, "reason": reason})
            metrics.EVENTS_REJECTED.labels(stream, "too_large").inc()
            continue
        encoded.append(event)
    return records.pack(key, encoded, limit)


class EventRejected(Exception):
    """One event refused on its own: ``kind`` labels the metric, ``reason`` the answer
    (the native routes and every tracker protocol use it)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def validated(
    model: type[BehaviorEvent] | type[StorefrontEvent], values: dict[str, Any]
) -> BehaviorEvent | StorefrontEvent:
    """``values`` as the collector's ``model`` (EventRejected with the reason otherwise):
    how the tracker protocols turn a mapped event into what the native routes build."""
    try:
        return model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise EventRejected("invalid", _reason(exc)) from exc


def check_encoded(
    raw: Any, max_bytes: int, *, what: str = "event", limit: str = "max_event_bytes"
) -> None:
    """EventRejected unless ``raw`` encodes to JSON of at most ``max_bytes`` holding no
    NUL: the check of one event on its own, on every route and protocol (``what``
    and ``limit`` name the event and its setting in the reason)."""
    try:
        encoded = orjson.dumps(raw)
    except (orjson.JSONEncodeError, TypeError, ValueError, OverflowError) as exc:
        raise EventRejected("unencodable", f"{what} cannot be encoded: {exc}") from exc
    if len(encoded) > max_bytes:
        raise EventRejected("too_large", f"{what} larger than {limit}={max_bytes}")
    if has_nul(encoded):
        raise EventRejected("invalid", "text must not contain NUL (\\u0000)")


def _validated(stream: str, raw: Any, max_bytes: int) -> Valid:
    """One raw event, checked on its own; EventRejected with the reason when it is refused."""
    check_encoded(raw, max_bytes)
    try:
        return STREAM_MODELS[stream].model_validate(raw)
    except pydantic.ValidationError as exc:
        raise EventRejected("invalid", _reason(exc)) from exc


async def post_behavior(request: web.Request) -> web.Response:
    """``POST /v1/behavior``: a batch of behavior events, accepted one by one."""
    return await _accept_batch(request, streams.BEHAVIOR.name)


async def post_storefront(request: web.Request) -> web.Response:
    """``POST /v1/storefront``: a batch of storefront events, accepted one by one."""
    return await _accept_batch(request, streams.STOREFRONT.name)


async def post_shopify_webhook(request: web.Request) -> web.Response:
    """``POST /v1/webhooks/shopify``: one signed Shopify webhook, stored as a storefront event."""
    received_at = datetime.now(UTC)
    body = await read_body(request)
    headers = request.headers
    # Shopify's headers are ASCII tokens; any other value (in any bytes) counts as absent,
    # so nothing undecodable is looked up, hashed into the event id or stored.
    domain = printable_ascii(headers.get("X-Shopify-Shop-Domain"))
    topic = printable_ascii(headers.get("X-Shopify-Topic"))
    webhook_id = printable_ascii(headers.get("X-Shopify-Webhook-Id"))
    found = await request.app[SHOPS].by_domain(domain) if domain else None
    if found is None or not webhooks.verify(found[1], body, headers.get("X-Shopify-Hmac-Sha256")):
        metrics.EVENTS_REJECTED.labels("webhook", "unauthorized").inc()
        raise Refused(401, "unknown shop or invalid X-Shopify-Hmac-Sha256")
    shop = found[0]
    if not topic or not webhook_id:
        raise Refused(
            400, "X-Shopify-Topic and X-Shopify-Webhook-Id are required (printable ASCII)"
        )
    settings = request.app[SETTINGS]
    triggered_text = printable_ascii(headers.get("X-Shopify-Triggered-At"))
    triggered = webhooks.parse_time(triggered_text)
    max_age = settings.webhook_max_age_s
    if (
        max_age
        and triggered is not None
        and received_at.timestamp() - triggered.timestamp() > max_age
    ):
        # 401, as an expired signature: Shopify stops retrying after 4 hours, so only
        # a replay (or a clock far off) is this old. The header is unsigned, so this
        # stops careless replays only; the event id from the signed payload is what
        # keeps any replay to the delivery's one row.
        metrics.EVENTS_REJECTED.labels("webhook", "stale").inc()
        raise Refused(
            401,
            f"X-Shopify-Triggered-At is older than webhook_max_age_s={max_age:g} s",
        )
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused(400, f"webhook body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise Refused(400, "webhook body is not a JSON object")
    if has_nul(orjson.dumps(payload)):
        raise Refused(400, "webhook text must not contain NUL (\\u0000)")
    fields = webhooks.storefront_fields(
        topic[:200],
        webhook_id[:200],
        shop.domain,
        payload,
        triggered_text,
        body=body,
        shopify_event_id=(printable_ascii(headers.get("X-Shopify-Event-Id")) or "")[:200],
    )
    received = Received.of(request, settings, None, received_at, screen_bots=False)
    try:
        event = StorefrontEvent.model_validate(fields)
        record = storefront_record(event, shop, received)
        messages = records.pack(f"{shop.id}:{event.session_id}".encode(), [orjson.dumps(record)])
    except pydantic.ValidationError as exc:
        raise Refused(400, f"webhook cannot be stored: {_reason(exc)}") from exc
    except (orjson.JSONEncodeError, TypeError, ValueError) as exc:
        raise Refused(400, f"webhook cannot be encoded: {exc}") from exc
    size = sum(len(key) + len(value) for key, value in messages)
    if size > settings.max_record_bytes:
        # Refused, not trimmed: Shopify retries a non-2xx for 4 hours, so raising
        # the limit within that window recovers the whole order; a 2xx for a record
        # the broker must refuse would strand it (and everything spooled behind it).
        metrics.EVENTS_REJECTED.labels("webhook", "too_large").inc()
        raise Refused(
            413,
            f"webhook larger than max_record_bytes={settings.max_record_bytes} once stored "
            f"as one Kafka record ({size} bytes)",
        )
    try:
        await request.app[DELIVERY].deliver(
            "webhook", settings.topic_for(streams.STOREFRONT.name), messages
        )
    except Unavailable as exc:
        raise Refused(503, "event broker unavailable, retry later", {"Retry-After": "5"}) from exc
    metrics.EVENTS_ACCEPTED.labels("webhook").inc()
    return _json({"accepted": 1, "event_id": str(fields["event_id"])})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: this process can take a batch now.

    That is: the broker answers, or the spool has room (below its high-water
    mark). During a broker outage collectors thus stay in the load balancer and
    answer from their spools, which is what the spools are for; broker health
    is reported on its own (``eventpipe_broker_up``, which this check updates).
    """
    delivery = request.app[DELIVERY]
    if await delivery.producer.ready():
        return _json({"status": "ready", "broker": "up"})
    if delivery.spool is None:
        return _json({"status": "broker unreachable and the spool is disabled"}, 503)
    if not delivery.spool_below_high_water:
        return _json({"status": "broker unreachable and the spool above its high-water mark"}, 503)
    return _json({"status": "ready", "broker": "down", "spooling": True})


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /v1/openapi.json``: the OpenAPI 3 document of this API."""
    return _json(openapi.document())


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight for every ``/v1/`` route: any origin, no credentials."""
    from ingest.collector import segment  # builds on this module

    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
            # The request's own list echoed (the Segment SDKs send several of their own).
            "Access-Control-Allow-Headers": segment.allowed_headers(request),
            "Access-Control-Max-Age": "86400",
        },
    )


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn refusals into JSON answers, count every answer, add CORS headers."""
    try:
        response = await handler(request)
    except Dropped as exc:
        response = _json({"accepted": 0, "rejected": [], "dropped": exc.reason})
    except Refused as exc:
        response = _json({"error": exc.reason}, exc.status, exc.headers)
        if exc.status == 503:
            # A client's batch refused (every route's 503 is a Refused; /readyz answers
            # its 503 itself and is not counted): what EventpipeCollectorBrokerUnavailable reads.
            metrics.BATCHES_REFUSED.labels(
                "busy" if "busy" in exc.reason else "broker_unavailable"
            ).inc()
    except web.HTTPException as exc:
        kept = {
            k: v
            for k, v in exc.headers.items()
            if k.lower() not in ("content-type", "content-length")
        }
        response = _json({"error": exc.reason}, exc.status, kept)
    except Exception:
        log.exception("unhandled error", path=request.path)
        response = _json({"error": "internal error"}, 500)
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    metrics.HTTP_REQUESTS.labels(endpoint, str(response.status)).inc()
    if request.path.startswith("/v1/"):
        # Echo only what can be an origin; never reflect arbitrary bytes into a header.
        response.headers["Access-Control-Allow-Origin"] = (
            printable_ascii(request.headers.get("Origin")) or "*"
        )
        response.headers["Vary"] = "Origin"
        # The beacon reads Retry-After of a 429 or 503 to time its retry.
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    return response


def create_app(settings: Settings, delivery: Delivery, shops: ShopDirectory) -> web.Application:
    """The aiohttp application with every collector route."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[edge],
        handler_args={"auto_decompress": False},  # we inflate ourselves, within limits
    )
    app[SETTINGS] = settings
    app[DELIVERY] = delivery
    app[SHOPS] = shops
    app[LIMITER] = RateLimiter(
        settings.rate_limit_per_s,
        settings.rate_limit_burst,
        # rate_limit_per_s 0 turns rate limiting off altogether (benchmarks, one test shop).
        settings.rate_limit_client_per_s if settings.rate_limit_per_s > 0 else 0.0,
        settings.rate_limit_client_burst,
    )
    app[DECODE_SLOTS] = asyncio.Semaphore(settings.decode_concurrency)
    if settings.geoip_db is not None:
        geoip_reader(settings.geoip_db)  # a database that can't be read: refused at start
    app[TIMES] = AssignedTimes()
    app.router.add_post("/v1/behavior", post_behavior)
    app.router.add_post("/v1/storefront", post_storefront)
    app.router.add_post("/v1/webhooks/shopify", post_shopify_webhook)
    app.router.add_get("/v1/openapi.json", openapi_json)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", preflight)
    beacon.add_routes(app)
    # Imported here: segment.py builds on this module's helpers.
    from ingest.collector import segment

    segment.add_routes(app)
    from ingest.collector import snowplow

    snowplow.add_routes(app)
    from ingest.collector import posthog

    posthog.add_routes(app)
    return app
