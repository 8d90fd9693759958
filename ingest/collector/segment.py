"""Segment's HTTP Tracking API, and the RudderStack and Jitsu dialects of it.

Sites that track with analytics.js, a Segment server SDK, RudderStack's or
Jitsu's SDKs change one URL and one key to send here. What a message becomes:

* ``track``, ``page`` and ``screen``: a storefront event (a row of ``events``):
  ``anon_id`` the ``anonymousId`` (else the ``userId``), ``event_type`` the
  track's ``event`` (``page_view`` / ``screen_view``), ``props`` the
  ``properties`` with ``$context`` (the message's context), ``$name`` (a
  page's or screen's name) and ``$message_id`` beside them, ``product_id``,
  ``experiment_id`` and ``variant`` from the properties Segment's e-commerce
  and A/B specs name (``product_id``, ``experiment_id``, ``variation_id`` else
  ``variant``).
* ``identify``, ``alias`` and ``group``: storefront records of event type
  ``$identify``, ``$alias``, ``$group`` (``anon_id`` the previousId for an
  alias, ``user_id`` the userId, ``props.traits``, ``props.group_id``) that the
  loader folds into ``identities`` (``consumers.identities``), not ``events``.
  Every record carries the ``userId`` as ``user_id``.
* ``event_id``: a UUIDv5 of the ``messageId`` in the shop's namespace (the
  shop id), so a retried message is stored once whatever the id's format
  (analytics.js sends ``ajs-next-<ms>-<uuid>``); a message without one gets
  the UUIDv5 of its canonical JSON, the same for a retry of the same bytes.
* The event time: a client ``timestamp`` (or ``originalTimestamp``) corrected
  by ``received - sentAt`` when the client clock is off by more than
  ``skew_min_s`` (Segment's ``receivedAt - (sentAt - originalTimestamp)``,
  but by whole minutes, so a retry sent seconds later keeps the same time and
  deduplicates); ``/v1/import`` (historical data) keeps the timestamp as sent.
  A message without any time gets the receive time (kept for a retry to the
  same process, as the native endpoints do).
* ``session_id``: ``context.sessionId`` when the SDK sends one (RudderStack
  does, analytics-next with its session plugin), else ``<anon_id>/<UTC day of
  the event>``: deterministic, so a retry and every event of one visit share it
  (a visit across UTC midnight is two sessions).

Answers: 200 ``{"success": true, "accepted": n, "rejected": [...]}`` when a
batch has a good message or none at all (SDKs drop a batch on any 4xx, so one
bad message never sinks the others), 400 when nothing in it is good or the
body is not a batch, 401, 413, 429 and 503 as the native endpoints.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import orjson
import pydantic
import uuid_utils
from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ingest.collector import app as collector
from ingest.collector.delivery import Unavailable
from ingest.collector.enrich import Received, storefront_fields_record
from ingest.collector.models import fast_time, has_nul
from ingest.core import metrics, streams
from ingest.core.headers import printable_ascii
from ingest.core.settings import Settings
from ingest.core.shops import Shop
from ingest.core.streams import CONTEXT, STOREFRONT

STREAM = streams.STOREFRONT.name
KIND = "segment"  # the stream label of this API's metrics
# Its accepted events' counter, looked up once (labels() takes a lock and a lookup).
_ACCEPTED = metrics.EVENTS_ACCEPTED.labels(KIND)
TYPES = ("track", "page", "screen", "identify", "group", "alias")
SHORT = {"t": "track", "p": "page", "s": "screen", "i": "identify", "g": "group", "a": "alias"}
EVENT_TYPES = {
    "page": "page_view",
    "screen": "screen_view",
    # Storefront records the loader folds into identities, not rows of events
    # (consumers.identities reads them).
    "identify": "$identify",
    "alias": "$alias",
    "group": "$group",
}
# Messages the events table takes; identify, group and alias build identities.
EVENT_MESSAGES = frozenset({"track", "page", "screen"})


def _id(value: Any) -> Any:
    """An id as text: numbers as their digits, an empty string (what some SDKs
    send for an absent id) as absent."""
    if isinstance(value, bool):
        return value  # refused below: an id is text or a number
    if isinstance(value, int | float):
        return str(value)
    if value == "":
        return None
    return value


Id = Annotated[Annotated[str, Field(max_length=256)] | None, BeforeValidator(_id)]


def _time(value: Any) -> Any:
    return None if value == "" else value


Time = Annotated[datetime | None, BeforeValidator(_time)]


class Message(BaseModel):
    """One message of the Segment spec (fields named as Segment names them)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["track", "page", "screen", "identify", "group", "alias"]
    event: Annotated[str, Field(max_length=256)] | None = None
    name: Annotated[str, Field(max_length=4096)] | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    anonymousId: Id = None
    userId: Id = None
    groupId: Id = None
    previousId: Id = None
    messageId: Annotated[Annotated[str, Field(max_length=1024)] | None, BeforeValidator(_id)] = None
    timestamp: Time = None
    originalTimestamp: Time = None
    sentAt: Time = None

    def client_time(self) -> datetime | None:
        """The client's time of the message, zone UTC when it has none."""
        value = self.originalTimestamp or self.timestamp
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Batch(BaseModel):
    """A batch body: ``{"batch": [...], "context"?, "integrations"?, "writeKey"?, "sentAt"?}``."""

    model_config = ConfigDict(extra="ignore")

    batch: list[Any]
    context: dict[str, Any] | None = None
    writeKey: str | None = None
    sentAt: Time = None


class WholeBatch(Batch):
    """A batch whose messages are validated in the same call as the body is parsed
    (pydantic-core reads the JSON itself): ``_whole_batch``'s, the reference of the
    fast decoder (``_fast_batch``) and what a body it declines is read with first."""

    batch: list[Message]


def _whole_batch(body: bytes, settings: Settings) -> tuple[WholeBatch, list[Message]] | None:
    """The batch and its messages when the body can be validated whole, else None.

    Taken when nothing needs a message's own check: the body is no larger than
    ``segment_max_message_bytes`` (so no message can be), holds no NUL, every
    message validates and passes the checks of ``_message``, and carries a
    ``messageId`` (a message without one gets the id of its raw JSON, which only
    the per-message path keeps). Otherwise the per-message path decides, with
    reasons. analytics.js and the server SDKs send such batches: one parse, one
    validation, instead of a parse, a copy and a validation per message.
    """
    if len(body) > settings.segment_max_message_bytes or has_nul(body):
        return None
    try:
        envelope = WholeBatch.model_validate_json(body)
    except pydantic.ValidationError:
        return None
    shared = envelope.context
    for message in envelope.batch:
        if not message.messageId or _refusal(message) is not None:
            return None
        if shared:
            own = message.context
            message.context = {**shared, **own} if own else dict(shared)
    return envelope, envelope.batch


# The fast decoder of a batch: msgspec reads the body into structs in C, checking
# what it can (types, lengths, the message type), and ``_fast_batch`` does the rest
# of ``Message``'s checks and normalisation in one loop. The pydantic models above
# stay the reference: a body the fast decoder does not take whole, or could read
# otherwise than pydantic, goes their way as before. analytics.js and the server
# SDKs send such batches; pydantic's per-field Python callbacks (``_id``, ``_time``)
# and its models were a third of a batch's handling.
# (gc=False on its structs: decoded JSON holds no reference cycle for the collector
# of cycles to find.)
_WireId = Annotated[str, msgspec.Meta(max_length=256)] | int | float | None
_WireType = Literal["track", "page", "screen", "identify", "group", "alias"]
_NULL = msgspec.Raw(b"null")  # an absent context: as a null one


class _WireMessage(msgspec.Struct, gc=False):
    """A message as the fast decoder reads it: ids and times as sent, before
    ``_fast_batch`` normalises them (fields and limits as ``Message``'s)."""

    type: _WireType
    event: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    name: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    # Its JSON text: the messages of a batch mostly share one context (analytics.js
    # sends its page's, library's and agent's with each), decoded, checked and
    # encoded once per distinct text (``_context``), not once per message.
    context: msgspec.Raw = _NULL
    anonymousId: _WireId = None
    userId: _WireId = None
    groupId: _WireId = None
    previousId: _WireId = None
    messageId: Annotated[str, msgspec.Meta(max_length=1024)] | int | float | None = None
    timestamp: str | None = None
    originalTimestamp: str | None = None
    sentAt: str | None = None


class _WireBatch(msgspec.Struct, gc=False):
    """A batch body as the fast decoder reads it (other keys skipped, as ``Batch``)."""

    batch: list[_WireMessage]
    context: dict[str, Any] | None = None
    writeKey: str | None = None
    sentAt: str | None = None


_WIRE = msgspec.json.Decoder(_WireBatch)
_CONTEXT = msgspec.json.Decoder(dict[str, Any] | None)  # a message's, as Message.context


class _Decline(Exception):
    """The fast decoder leaves the body to the reference path."""


def _fast_time(value: str) -> datetime:
    """``Time`` of a non-empty text, as pydantic reads it (``_Decline`` when the fast
    decoder does not read it)."""
    parsed = fast_time(value)
    if parsed is None:
        raise _Decline
    return parsed


def _number_id(value: int | float, limit: int) -> str:
    """``_id`` of a number, at most ``limit`` characters (``_Decline`` otherwise)."""
    try:
        text = str(value)
    except ValueError:  # an integer of more digits than str() writes
        raise _Decline from None
    if len(text) > limit:
        raise _Decline
    return text


class FastContext(msgspec.Struct, gc=False):
    """One context of a batch the fast decoder took, shared by the messages that sent
    its text: ``Message.context`` of each (the batch's context merged in), the session
    it names, and what the records hold of it."""

    value: dict[str, Any] | None
    session: str | None  # ``_text`` of its sessionId: the records' session when given
    # Its JSON as orjson writes it in a record (an orjson.Fragment, copied into each
    # record's props as it is), or the dict itself when orjson cannot write it there:
    # then the record's encoding refuses the message, as the reference's does.
    encoded: Any
    located: tuple[str, Any] | None = None  # (a country, ``encoded`` with its geo added)


def _encodable(value: dict[str, Any]) -> Any:
    """A dict of a record's as orjson writes it there, as an orjson.Fragment, else (when
    orjson cannot write it) the dict itself: ``FastContext.encoded``."""
    try:
        # Within three lists, as deep as a record puts a context (the records' array,
        # the record, its props): orjson's depth limit counts the levels above a value
        # too, and a fragment's text is copied without them.
        return orjson.Fragment(orjson.dumps([[[value]]])[3:-3])
    except (orjson.JSONEncodeError, TypeError, ValueError, OverflowError):
        return value


def _context(raw: msgspec.Raw, shared: dict[str, Any] | None) -> FastContext:
    """The ``FastContext`` of a message's context text (DecodeError when it is not an
    object or null, RecursionError when too deep for msgspec: the body is declined)."""
    own = _CONTEXT.decode(raw)
    value = ({**shared, **own} if own else dict(shared)) if shared else own
    context = value or {}
    return FastContext(value, _text(context.get("sessionId")), _encodable(context))


# One message of a batch the fast decoder took: its struct (type, event, name,
# properties and traits as ``Message`` has them), then its messageId, the record's
# anon_id, its userId and groupId (ids as text, absent when empty, as ``Message``
# has them), its ``client_time`` (zone UTC when it had none), its own sentAt, and
# its context.
FastMessage = tuple[
    _WireMessage, str, str, str | None, str | None, datetime | None, datetime | None, FastContext
]


class FastBatch(msgspec.Struct, gc=False):
    """A batch body the fast decoder took whole."""

    messages: list[FastMessage]
    context: dict[str, Any] | None
    writeKey: str | None
    sentAt: datetime | None


def _fast_batch(body: bytes, settings: Settings) -> FastBatch | None:
    """The batch as the fast decoder reads it when it takes the body, else None.

    It takes what ``_whole_batch`` takes, and less: a body within
    ``segment_max_message_bytes`` without NUL, of valid UTF-8, that msgspec decodes
    into ``_WireBatch``, whose every message passes ``_refusal`` with a ``messageId``,
    has a context that is an object or null (``_context``) and times of
    ``_TIME_SHAPES``. Any other body goes to ``_whole_batch`` and the per-message
    path, as before.
    """
    if len(body) > settings.segment_max_message_bytes or (b"\\" in body and has_nul(body)):
        # b"\\" first: a NUL in JSON is an escape, and a one-byte search is memchr's
        # (has_nul's five-byte one took as long as the decoding of a message).
        return None
    try:
        if not body.isascii():
            # msgspec checks the UTF-8 of the texts it decodes, not of those it skips
            # (keys no struct names) or keeps as they are: pydantic refuses the body.
            body.decode()
        wire = _WIRE.decode(body)
        shared = wire.context
        contexts: dict[bytes, FastContext] = {}
        last_raw: msgspec.Raw | None = None
        last: FastContext | None = None
        messages: list[FastMessage] = []
        append = messages.append
        for m in wire.batch:
            # _id: a number as its digits, "" as absent (msgspec checked the lengths
            # of texts, the number's are checked here).
            message_id = m.messageId
            if message_id is not None and not isinstance(message_id, str):
                message_id = _number_id(message_id, 1024)
            anonymous_id = m.anonymousId
            if anonymous_id is not None and not isinstance(anonymous_id, str):
                anonymous_id = _number_id(anonymous_id, 256)
            user_id = m.userId
            if user_id is not None and not isinstance(user_id, str):
                user_id = _number_id(user_id, 256)
            group_id = m.groupId
            if group_id is not None and not isinstance(group_id, str):
                group_id = _number_id(group_id, 256)
            previous_id = m.previousId
            if previous_id is not None and not isinstance(previous_id, str):
                previous_id = _number_id(previous_id, 256)
            kind = m.type
            if (
                not message_id  # its id is of its raw JSON: only the reference keeps it
                or not (anonymous_id or user_id)  # _refusal's reasons
                or (kind == "track" and not m.event)
                or (kind == "alias" and not (previous_id and user_id))
                or (kind == "group" and not group_id)
            ):
                raise _Decline
            # Message.client_time: originalTimestamp, else timestamp ("" is absent).
            # Both are checked whatever is used: either may be what pydantic refuses.
            # (fast_time itself, not _fast_time: a call less for each of a batch's times.)
            original = m.originalTimestamp
            client_time = None
            if original and (client_time := fast_time(original)) is None:
                raise _Decline
            timestamp = m.timestamp
            if timestamp:
                parsed = fast_time(timestamp)
                if parsed is None:
                    raise _Decline
                if client_time is None:
                    client_time = parsed
            if client_time is not None and client_time.tzinfo is None:
                client_time = client_time.replace(tzinfo=UTC)
            sent = m.sentAt
            raw = m.context
            context = last if raw == last_raw else None  # mostly the last message's again
            if context is None:
                key = bytes(raw)
                context = contexts.get(key)
                if context is None:
                    context = contexts[key] = _context(raw, shared)
                last_raw, last = raw, context
            append(
                (
                    m,
                    message_id,
                    # _record's anon_id: an alias's previousId, else the visitor's id.
                    (previous_id if kind == "alias" else anonymous_id or user_id) or "",
                    user_id or None,
                    group_id or None,
                    client_time,
                    _fast_time(sent) if sent else None,
                    context,
                )
            )
        sent = wire.sentAt
        return FastBatch(messages, shared, wire.writeKey, _fast_time(sent) if sent else None)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, _Decline):
        # RecursionError: JSON nested past msgspec's limit, which the reference refuses
        # with a 400.
        return None


def _parse(
    body: bytes, batched: bool, settings: Settings
) -> tuple[list[Any], dict[str, Any] | None, str | None, datetime | None, list[Message] | None]:
    """(messages, the batch's context, its writeKey, its sentAt, the messages already
    validated when ``_whole_batch`` took the body, else None); 400 for a body that is
    not JSON, not an object or not a batch."""
    whole = _whole_batch(body, settings) if batched else None
    if whole is not None:
        envelope, validated = whole
        return validated, envelope.context, envelope.writeKey, envelope.sentAt, validated
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise collector.Refused(400, f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise collector.Refused(400, "body is not a JSON object")
    if not batched:
        body_key = data.get("writeKey") if isinstance(data.get("writeKey"), str) else None
        return [data], None, body_key, None, None
    try:
        batch = Batch.model_validate(data)
    except pydantic.ValidationError as exc:
        raise collector.Refused(400, f"body is not a batch: {collector._reason(exc)}") from exc
    return batch.batch, batch.context, batch.writeKey, batch.sentAt, None


def header_key(request: web.Request) -> str | None:
    """The write key of the headers: HTTP Basic's user name, else ``X-Write-Key``
    (Jitsu's ``key:secret`` form read as its key)."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "basic" and credentials:
        try:
            user = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        if key := user.partition(":")[0]:
            return key
    given = request.headers.get("X-Write-Key")
    if given:
        return given.partition(":")[0] or None
    return None


async def _authenticate(request: web.Request, key: str | None) -> Shop:
    try:
        return await collector._authenticate(request, key)
    except collector.Refused as exc:
        if exc.status != 401:
            raise
        raise collector.Refused(
            401,
            "missing or unknown write key (Basic user name, X-Write-Key, body writeKey, "
            "or query writeKey)",
        ) from None


def namespace(shop: Shop) -> uuid.UUID:
    """The UUIDv5 namespace of a shop's message ids."""
    return _namespace(shop.id)


@functools.lru_cache(maxsize=4096)
def _namespace(shop_id: uuid.UUID) -> uuid.UUID:
    # Once per shop, not per message (benchmarks/profile_collector.py).
    return uuid.uuid5(shop_id, "segment")


@functools.lru_cache(maxsize=4096)
def _space(namespace: uuid.UUID) -> uuid_utils.UUID:
    """``namespace`` as uuid_utils takes it (once per shop)."""
    return uuid_utils.UUID(bytes=namespace.bytes)


def uuid5(namespace: uuid.UUID, name: str) -> uuid.UUID:
    """``uuid.uuid5(namespace, name)`` by uuid_utils (Rust), whose SHA-1 and text cost
    less than the standard library's on every message (benchmarks/README.md);
    ``test_segment`` checks the two agree."""
    return uuid.UUID(int=uuid_utils.uuid5(_space(namespace), name).int)


def event_id(shop: Shop, raw: dict[str, Any], message_id: str | None) -> uuid.UUID:
    """The stable event id of a message: of its messageId, else of its canonical JSON."""
    if message_id:
        return uuid5(namespace(shop), message_id)
    digest = hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return uuid5(namespace(shop), f"sha256:{digest}")


def _text(value: Any) -> str | None:
    """A property as a column's text: a string or number, at most 256 characters."""
    if value is None:  # the usual case first: most properties are absent
        return None
    if type(value) is str:
        return value[:256] or None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)[:256] or None


async def _accept(
    request: web.Request, kind: str | None, *, batched: bool, historical: bool = False
) -> web.Response:
    """Read, authenticate and deliver one request of the Segment API.

    ``kind`` is the route's message type (single-message routes); ``batched``
    says the body is a batch; ``historical`` that client timestamps are kept
    as sent (``/v1/import``).
    """
    received_at = datetime.now(UTC)
    settings = request.app[collector.SETTINGS]
    limiter = request.app[collector.LIMITER]
    client = collector.client_identity(request)
    given = header_key(request)
    # A key in a header is checked before the body is read (as the native routes do).
    shop = await _authenticate(request, given) if given is not None else None
    if given is not None and (wait := limiter.wait(given, client)) > 0:
        raise collector._limited(wait)
    raw = await collector.read_raw(request)
    async with collector._decode_slot(request):
        body = collector.inflate(request, raw)
        if len(body) > settings.segment_max_batch_bytes:
            raise collector.Refused(
                413,
                f"body larger than segment_max_batch_bytes={settings.segment_max_batch_bytes}",
            )
        collector._check_values(body, settings.max_json_values)
        fast = _fast_batch(body, settings) if batched else None
        messages: list[Any]
        if fast is not None:
            messages, shared, body_key, sent_at = (
                fast.messages,
                fast.context,
                fast.writeKey,
                fast.sentAt,
            )
            validated = None
        else:
            messages, shared, body_key, sent_at, validated = _parse(body, batched, settings)
        del body
        if shop is None:  # the body's key, else the query's
            given = body_key or request.query.get("writeKey") or request.query.get("k")
            shop = await _authenticate(request, given)
        key = printable_ascii(given) or ""
        if shared is not None:
            # Merged into every message: what no message could be stored with.
            try:
                encoded = orjson.dumps(shared)
            except (orjson.JSONEncodeError, TypeError, ValueError, OverflowError) as exc:
                raise collector.Refused(400, f"context cannot be encoded: {exc}") from None
            if has_nul(encoded):  # PostgreSQL's jsonb cannot hold it
                raise collector.Refused(400, "context must not contain NUL (\\u0000)")
        if not messages:
            return collector._json({"success": True, "accepted": 0, "rejected": []})
        limit = settings.segment_max_batch_messages
        if len(messages) > limit:
            raise collector.Refused(
                413, f"batch has {len(messages)} messages, segment_max_batch_messages={limit}"
            )
        if (wait := limiter.take(key, client)) > 0:
            raise collector._limited(wait)
        if fast is not None:
            sessions, rejected = _fast_sessions(request, shop, fast, historical, received_at)
        else:
            sessions, rejected = _sessions(
                request, shop, messages, shared, sent_at, kind, historical, received_at, validated
            )
        return await _deliver(request, shop, sessions, rejected)


Sessions = dict[str, list[tuple[int, dict[str, Any]]]]


def _sessions(
    request: web.Request,
    shop: Shop,
    messages: list[Any],
    shared: dict[str, Any] | None,
    sent_at: datetime | None,
    kind: str | None,
    historical: bool,
    received_at: datetime,
    validated: list[Message] | None = None,
) -> tuple[Sessions, list[dict[str, Any]]]:
    """(The records of the batch's messages by session, the messages refused): the
    reference path (``validated`` when ``_whole_batch`` checked them already)."""
    settings = request.app[collector.SETTINGS]
    times = request.app[collector.TIMES]
    rejected: list[dict[str, Any]] = []
    receipts: dict[datetime | None, Received] = {}
    sessions: Sessions = {}
    for index, raw in enumerate(messages):
        try:
            message = (
                validated[index]
                if validated is not None
                else _message(raw, shared, kind, settings.segment_max_message_bytes)
            )
            clock = None if historical else (message.sentAt or sent_at)
            if clock is not None and clock.tzinfo is None:
                clock = clock.replace(tzinfo=UTC)
            received = receipts.get(clock)
            if received is None:
                received = Received.of(request, settings, clock, received_at)
                receipts[clock] = received
            record = _record(shop, raw, message, received, times)
        except collector.EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
            continue
        sessions.setdefault(record["session_id"], []).append((index, record))
    return sessions, rejected


async def _deliver(
    request: web.Request,
    shop: Shop,
    sessions: Sessions,
    rejected: list[dict[str, Any]],
) -> web.Response:
    """The batch's records delivered; the Segment-shaped answer."""
    settings = request.app[collector.SETTINGS]
    late: list[dict[str, Any]] = []
    encoded: list[tuple[bytes, bytes]] = []
    prefix = f"{shop.id}:"
    for session, items in sessions.items():
        encoded += collector._encode(
            f"{prefix}{session}".encode(), items, KIND, late, settings.max_record_bytes
        )
    if rejected or late:
        rejected = sorted(rejected + late, key=lambda r: int(r["index"]))
    accepted = sum(map(len, sessions.values())) - len(late)
    if encoded:
        try:
            await request.app[collector.DELIVERY].deliver(KIND, settings.topic_for(STREAM), encoded)
        except Unavailable as exc:
            raise collector.Refused(
                503, "event broker unavailable, retry later", {"Retry-After": "5"}
            ) from exc
        _ACCEPTED.inc(accepted)
    if accepted or not rejected:
        return collector._json({"success": True, "accepted": accepted, "rejected": rejected})
    status = 413 if any(r["reason"].startswith("message larger") for r in rejected) else 400
    return collector._json(
        {"success": False, "accepted": 0, "rejected": rejected, "error": rejected[0]["reason"]},
        status,
    )


_NOT_YET = object()
# The properties a storefront record's columns come from.
_STOREFRONT_PROPERTIES = frozenset(("product_id", "experiment_id", "variation_id", "variant"))


def _fast_sessions(
    request: web.Request,
    shop: Shop,
    batch: FastBatch,
    historical: bool,
    received_at: datetime,
) -> tuple[Sessions, list[dict[str, Any]]]:
    """``_sessions`` of a batch the fast decoder took: the records ``_record`` makes
    and ``storefront_fields_record`` completes, made in one loop (test_segment_fast
    checks that the two give the same bytes).

    What the functions of the reference path work out again for every message is
    worked out once per request here (the shop's view of the request, its country,
    the namespace, the JSON of what every record holds), or once per distinct
    context (``FastContext``: its session, its JSON with or without the country), and
    the event id is kept as the text of its UUID (what the record's JSON holds; a
    standard library UUID object cost as much as its SHA-1).
    """
    settings = request.app[collector.SETTINGS]
    times = request.app[collector.TIMES]
    rejected: list[dict[str, Any]] = []
    receipts: dict[datetime | None, tuple[Received, str, Any, bool, str | None]] = {}
    sessions: Sessions = {}
    space = _space(namespace(shop))
    # What every record of the request holds, as orjson writes it, written once: a
    # UUID, an aware datetime and a dict cost orjson more than text it copies.
    shop_id = str(shop.id)
    session_id: str | None = None
    items: list[tuple[int, dict[str, Any]]] = []
    sent_at = batch.sentAt
    original_key = STOREFRONT.original_time_key
    uuid5_of = uuid_utils.uuid5
    given_clock: object = _NOT_YET  # the last message's send time as given (its: receipt)
    for index, (
        m,
        message_id,
        anon,
        user_id,
        group_id,
        client_time,
        own_sent,
        context,
    ) in enumerate(batch.messages):
        given = None if historical else (own_sent or sent_at)
        if given is not given_clock:  # a message's own sentAt; else the batch's, again
            given_clock, clock = given, given
            if clock is not None and clock.tzinfo is None:
                clock = clock.replace(tzinfo=UTC)
            receipt = receipts.get(clock)
            if receipt is None:
                received = Received.of(request, settings, clock, received_at)
                view = received.of_shop(shop)
                receipt = receipts[clock] = (
                    received,
                    # Its receive time and context as orjson writes them (see shop_id).
                    orjson.dumps(received.at)[1:-1].decode(),
                    _encodable(view.context),
                    view.bot,
                    view.context.get("country_code"),
                )
            received, received_text, context_of_request, bot, country = receipt
        kind = m.type
        # uuid5(namespace(shop), message_id) as text (uuid_utils writes it in Rust).
        identifier = str(uuid5_of(space, message_id))
        properties = m.properties or {}
        # What storefront_fields_record makes of props.$context: with the request's
        # country as context.geo unless the context has a geo of its own.
        if country:
            located = context.located
            if located is None or located[0] != country:
                value = context.value or {}
                located = context.located = (
                    country,
                    context.encoded
                    if "geo" in value
                    else _encodable({**value, "geo": {"country": {"code": country}}}),
                )
            encoded = located[1]
        else:
            encoded = context.encoded
        if kind in EVENT_MESSAGES:
            props: dict[str, Any] = {**properties, "$context": encoded}
        else:
            props = {"traits": m.traits or {}, "$context": encoded}
            if group_id:
                props["group_id"] = group_id
        props["$message_id"] = message_id
        if m.name:
            props["$name"] = m.name
        try:
            # What _record and storefront_fields_record do, in their order, on dicts
            # of this loop's own (so set in place where they copy).
            session = context.session
            # Received.event_time, inline.
            if client_time is None:
                assigned = times.time_for(shop, uuid.UUID(identifier), received.at)
                ts = assigned or received.at
            else:
                ts = client_time + received.skew if received.skew else client_time
                if ts > received.latest:
                    ts = received.at
                if ts is not client_time:
                    props[original_key] = client_time.isoformat()
            if session is None:
                session = f"{anon}/{ts.astimezone(UTC).date().isoformat()}"
            if bot:
                props["bot"] = True
            session = session[:256]
            if _STOREFRONT_PROPERTIES.isdisjoint(properties):  # one C call, mostly
                product = experiment = variant = None
            else:
                product = properties.get("product_id")
                experiment = properties.get("experiment_id")
                variant = properties.get("variation_id")
                if variant is None:
                    variant = properties.get("variant")
            record = {
                "event_id": identifier,
                "event_type": EVENT_TYPES.get(kind) or m.event,
                "anon_id": anon,
                "session_id": session,
                "ts": ts,
                "props": props,
                "product_id": None if product is None else _text(product),
                "experiment_id": None if experiment is None else _text(experiment),
                "variant": None if variant is None else _text(variant),
                "user_id": user_id,
                "shop_id": shop_id,
                "received_at": received_text,
                CONTEXT: context_of_request,
            }
        except (OverflowError, ValueError) as exc:
            rejected.append({"index": index, "reason": f"message cannot be stored: {exc}"})
            metrics.EVENTS_REJECTED.labels(KIND, "unencodable").inc()
            continue
        if session != session_id:  # mostly the last message's session again
            session_id = session
            items = sessions.setdefault(session, [])
        items.append((index, record))
    return sessions, rejected


def _message(raw: Any, shared: dict[str, Any] | None, kind: str | None, max_bytes: int) -> Message:
    """One raw message checked on its own (the batch's context merged in)."""
    if not isinstance(raw, dict):
        raise collector.EventRejected("invalid", "message is not a JSON object")
    collector.check_encoded(raw, max_bytes, what="message", limit="segment_max_message_bytes")
    fields = dict(raw)
    if kind is not None:
        fields["type"] = kind  # the route names it
    if shared:
        own = fields.get("context")
        fields["context"] = {**shared, **own} if isinstance(own, dict) else dict(shared)
    try:
        message = Message.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise collector.EventRejected("invalid", collector._reason(exc)) from exc
    if (reason := _refusal(message)) is not None:
        raise collector.EventRejected("invalid", reason)
    return message


def _refusal(message: Message) -> str | None:
    """Why a valid message of the spec still cannot be stored, or None."""
    if message.anonymousId is None and message.userId is None:
        return "anonymousId or userId is required"
    if message.type == "track" and not message.event:
        return "event: a track message needs its event name"
    if message.type == "alias" and not (message.previousId and message.userId):
        return "previousId and userId: an alias links the one to the other"
    if message.type == "group" and not message.groupId:
        return "groupId: a group message needs its group's id"
    return None


def _record(
    shop: Shop,
    raw: dict[str, Any],
    message: Message,
    received: Received,
    times: Any,
) -> dict[str, Any]:
    """The storefront record of a message: a track, page or screen message's event,
    or an identify, alias or group message as the record ``consumers.identities``
    reads (``anon_id`` the previousId for an alias, ``props.traits``, and
    ``props.group_id`` for a group)."""
    identifier = event_id(shop, raw, message.messageId)
    client_time = message.client_time()
    assigned = None if client_time else times.time_for(shop, identifier, received.at)
    properties = message.properties or {}
    context = message.context or {}
    anon = message.anonymousId or message.userId or ""
    if message.type == "alias":
        anon = message.previousId or ""
    props: dict[str, Any] = {**properties, "$context": context}
    if message.type not in EVENT_MESSAGES:
        props = {"traits": message.traits or {}, "$context": context}
        if message.groupId:
            props["group_id"] = message.groupId
    if message.messageId:
        props["$message_id"] = message.messageId
    if message.name:
        props["$name"] = message.name
    variant = properties.get("variation_id")
    try:
        session = _text(context.get("sessionId"))
        if session is None:
            # Inside the try: a time the skew correction (or the zone's offset) moves
            # past year 9999 or before year 1 is a refusal of its message, not a 500.
            at, _ = received.event_time(client_time, assigned)
            session = f"{anon}/{at.astimezone(UTC).date().isoformat()}"
        # The fields of a StorefrontEvent, not the model: every one is already what
        # the model checks (the event type a route constant or the track's
        # non-empty ``event`` of at most 256 characters, the ids ``Id``-checked
        # fields of ``Message``, non-empty for the one that names the visitor, the
        # session and the columns' texts cut by ``_text`` and ``[:256]``, NUL
        # refused on the whole message); validating or constructing the model
        # again showed in the profile (benchmarks/profile_collector.py).
        fields = {
            "event_id": identifier,
            "event_type": EVENT_TYPES.get(message.type) or message.event,
            "anon_id": anon,
            "session_id": session[:256],
            "ts": client_time,
            "props": props,
            "product_id": _text(properties.get("product_id")),
            "experiment_id": _text(properties.get("experiment_id")),
            "variant": _text(variant if variant is not None else properties.get("variant")),
            "user_id": message.userId,
        }
        return storefront_fields_record(fields, shop, received, assigned)
    except (OverflowError, ValueError) as exc:
        raise collector.EventRejected("unencodable", f"message cannot be stored: {exc}") from exc


def _cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """CORS headers for the routes outside ``/v1/`` (the app's edge adds them there)."""
    if not request.path.startswith("/v1/"):
        response.headers["Access-Control-Allow-Origin"] = (
            printable_ascii(request.headers.get("Origin")) or "*"
        )
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    return response


def _handler(
    kind: str | None, *, batched: bool, historical: bool = False, typed_path: bool = False
) -> collector.Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        message_kind = kind
        if typed_path:  # Jitsu: /api/s/{type}
            message_kind = request.match_info["type"]
            if message_kind not in TYPES:
                raise collector.Refused(404, f"unknown message type {message_kind[:50]!r}")
        try:
            response: web.StreamResponse = await _accept(
                request, message_kind, batched=batched, historical=historical
            )
        except collector.Refused as exc:
            response = collector._json({"error": exc.reason}, exc.status, exc.headers)
        return _cors(request, response)

    handle.__doc__ = f"The Segment API's {kind or 'typed'} route."
    return handle


# What these SDKs send besides the simple headers (analytics.js, RudderStack, Jitsu).
ALLOWED_HEADERS = (
    "Authorization, Content-Type, Content-Encoding, X-Write-Key, AnonymousId, "
    "X-Retry-Count, X-IP-Policy, X-Enable-Debug"
)


def allowed_headers(request: web.Request) -> str:
    """The preflight's Access-Control-Allow-Headers: the request's own list echoed
    (whatever an SDK adds next), else the headers these SDKs are known to send."""
    asked = printable_ascii(request.headers.get("Access-Control-Request-Headers"))
    return asked[:4096] if asked else ALLOWED_HEADERS


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight of the routes outside ``/v1/``: any origin, no credentials."""
    response = web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
            "Access-Control-Allow-Headers": allowed_headers(request),
            "Access-Control-Max-Age": "86400",
        },
    )
    _cors(request, response)
    return response


def _base(request: web.Request) -> str:
    """This collector's host as the client reached it (for the SDK's API host)."""
    return printable_ascii(request.headers.get("Host")) or "localhost"


async def project_settings(request: web.Request) -> web.Response:
    """``GET /v1/projects/{writeKey}/settings``: analytics.js's settings, with only
    this collector as destination and no device-mode integration (as Jitsu serves it)."""
    key = printable_ascii(request.match_info["writeKey"]) or ""
    return collector._json(
        {
            "integrations": {
                "Segment.io": {
                    "apiKey": key[:256],
                    "apiHost": f"{_base(request)}/v1",
                    "protocol": request.scheme,
                    "unbundledIntegrations": [],
                    "addBundledMetadata": False,
                }
            },
            "plan": {"track": {"__default": {"enabled": True, "integrations": {}}}},
            "edgeFunction": {},
            "analyticsNextEnabled": True,
            "middlewareSettings": {},
            "enabledMiddleware": {},
            "metrics": {"sampleRate": 0},
            "legacyVideoPluginsEnabled": False,
            "remotePlugins": [],
        }
    )


async def source_config(request: web.Request) -> web.Response:
    """``GET /sourceConfig``: RudderStack's JS SDK's source configuration (its
    ``configUrl``): enabled, no device-mode destination."""
    key = (printable_ascii(request.query.get("writeKey")) or "")[:256]
    response = collector._json(
        {
            "isHosted": False,
            "source": {
                "config": {},
                "id": "eventpipe",
                "name": "eventpipe",
                "writeKey": key,
                "workspaceId": "eventpipe",
                "enabled": True,
                "destinations": [],
            },
        }
    )
    return _cors(request, response)  # type: ignore[return-value]


BATCH_PATHS = ("/v1/batch", "/v1/b", "/beacon/v1/batch")
IMPORT_PATH = "/v1/import"
JITSU_PATHS = ("/api/s/{type}", "/api/s/s2s/{type}")


def message_paths() -> dict[str, str]:
    """Every single-message path and its message type."""
    paths = {f"/v1/{kind}": kind for kind in TYPES}
    paths.update({f"/v1/{short}": kind for short, kind in SHORT.items()})
    return paths


def add_routes(app: web.Application) -> None:
    """Register the Segment API's routes on the collector's application."""
    for path in BATCH_PATHS:
        app.router.add_post(path, _handler(None, batched=True))
    app.router.add_post(IMPORT_PATH, _handler(None, batched=True, historical=True))
    for path, kind in message_paths().items():
        app.router.add_post(path, _handler(kind, batched=False))
    for path in JITSU_PATHS:
        app.router.add_post(path, _handler(None, batched=False, typed_path=True))
    app.router.add_get("/v1/projects/{writeKey}/settings", project_settings)
    app.router.add_get("/sourceConfig", source_config)
    for prefix in ("/beacon/{tail:.*}", "/api/s/{tail:.*}", "/sourceConfig"):
        app.router.add_route("OPTIONS", prefix, preflight)
