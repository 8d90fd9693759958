"""The fast decoders: a well-formed record to rows (or COPY data) in one pass.

msgspec parses a record straight into typed structs in C (times included),
and jsonb fields stay as their raw JSON text instead of being parsed and
dumped again. A record they refuse in any way (None) goes to the checked
decoders of ``consumers.rows``, the reference, which give each bad event its
reason; both make the same rows (``tests/consumers/test_rows.py``,
``test_binary_copy.py``), as aiokafka keeps its C and pure-Python record code
side by side. The structs' fields are checked against the record contract
(``ingest.core.streams``) by ``tests/ingest/core/test_streams.py``.

The loops are written out by hand, per stream, on purpose: they are the
loader's hottest code, and a call per row or per field (a generic builder
driven by the contract) cost as much again (``benchmarks/README.md``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from asyncpg.pgproto.pgproto import UUID

from consumers import binary_copy, sessions
from consumers.values import MICROSECOND as _MICROSECOND
from consumers.values import PG_EPOCH as _PG_EPOCH
from consumers.values import UUID_TEXT, Encoded, PgTime, Row, Rows, Session, SessionPart, pg_time
from ingest.core import streams

_is_uuid = UUID_TEXT.fullmatch
_Aware = Annotated[datetime, msgspec.Meta(tz=True)]


class _Shops:
    """Shop ids already checked: every event of a record carries the same one.
    Bounded: it starts over when full."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def ok(self, value: str) -> bool:
        if value in self.seen:
            return True
        if not _is_uuid(value):
            return False
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen.add(value)
        return True


_shops = _Shops()


_NULL = msgspec.Raw(b"null")  # msgspec can't decode a Raw or None: a missing field is this


def _object_text(raw: msgspec.Raw) -> str:
    """A jsonb column that holds a JSON object: "{}" for null, "" (refused) for another value."""
    text = str(raw, "utf-8")
    if text[0] == "{":
        return text
    return "{}" if text == "null" else ""


def _object_json(raw: msgspec.Raw) -> bytes:
    """``_object_text`` as UTF-8 bytes, for COPY data."""
    data = bytes(raw)
    if data[0] == 0x7B:  # {
        return data
    return b"{}" if data == b"null" else b""


def _json_text(raw: msgspec.Raw) -> str | None:
    """A jsonb column of any JSON value; JSON null is SQL NULL."""
    text = str(raw, "utf-8")
    return None if text == "null" else text


class BehaviorEvent(msgspec.Struct, kw_only=True, gc=False):
    event_id: str
    shop_id: str
    session_id: str
    event_type: str
    element_path: str | None = None
    element_type: str | None = None
    element_text: str | None = None
    coordinates: msgspec.Raw = _NULL
    viewport_size: msgspec.Raw = _NULL
    event_data: msgspec.Raw = _NULL
    timestamp: _Aware
    page_url: str
    component_id: str | None = None
    metadata: msgspec.Raw = _NULL
    received_at: _Aware
    context: Any = None


def behavior_fast(events: list[BehaviorEvent]) -> Rows | None:
    rows: list[Row] = []
    received: tuple[datetime | None, PgTime] = (None, (0,))  # a request's: the same in each
    for e in events:
        if e.received_at != received[0]:
            received = (e.received_at, pg_time(e.received_at))
        data, meta = _object_text(e.event_data), _object_text(e.metadata)
        if not (_shops.ok(e.shop_id) and data and meta):
            return None
        rows.append(
            (
                UUID(e.event_id),  # ValueError: the checked decoder gives the reason
                e.shop_id,
                e.session_id,
                e.event_type,
                e.element_path,
                e.element_type,
                e.element_text,
                _json_text(e.coordinates),
                _json_text(e.viewport_size),
                data,
                pg_time(e.timestamp),
                e.page_url,
                e.component_id,
                meta,
                received[1],
            )
        )
    return rows, [e.context for e in events]


class StorefrontEvent(msgspec.Struct, kw_only=True, gc=False):
    event_id: str
    shop_id: str
    anon_id: str
    session_id: str
    event_type: str
    ts: _Aware
    props: msgspec.Raw = _NULL
    product_id: str | None = None
    experiment_id: str | None = None
    variant: str | None = None
    received_at: _Aware
    user_id: str | None = None


# Storefront records of these types build ``identities``, not rows of events
# (``consumers.identities``): the fast decoders leave a record holding one to
# the checked path, which the loader splits. Each is tested by a chained
# comparison first ("$" <= type < "%": begins with "$"), the cheapest test
# that lets an ordinary type through.
IDENTITY_TYPES = frozenset({"$identify", "$alias", "$group"})
_IDENTITY_BYTES = frozenset(t.encode() for t in IDENTITY_TYPES)


# The two loops share their shape on purpose: a per-stream row builder called
# from one loop would cost a Python call per row on the loader's hottest path.
def storefront_fast(events: list[StorefrontEvent]) -> Rows | None:
    rows: list[Row] = []
    received: tuple[datetime | None, PgTime] = (None, (0,))  # a request's: the same in each
    for e in events:
        if e.received_at != received[0]:
            received = (e.received_at, pg_time(e.received_at))
        props, kind = _object_text(e.props), e.event_type
        if not (_shops.ok(e.shop_id) and props) or ("$" <= kind < "%" and kind in IDENTITY_TYPES):
            return None
        rows.append(
            (
                UUID(e.event_id),  # ValueError: the checked decoder gives the reason
                e.shop_id,
                e.anon_id,
                e.session_id,
                kind,
                pg_time(e.ts),
                props,
                e.product_id,
                e.experiment_id,
                e.variant,
                received[1],
                e.user_id,
            )
        )
    return rows, []


_STOREFRONT_FIELDS = binary_copy.field_count(len(streams.STOREFRONT.columns))
_COPY_NULL, _LENGTHS, _JSONB = binary_copy.NULL, binary_copy.LENGTHS, binary_copy.JSONB_VERSION
_UUID_LENGTH, _INT64_LENGTH = _LENGTHS[16], _LENGTHS[8]
_int64, _uuid_text = binary_copy.int64, binary_copy.uuid_text


def storefront_copy(events: list[StorefrontEvent], batched: bool) -> Encoded | None:
    # storefront_fast's checks, each row encoded (binary_copy) instead of
    # built. Written out field by field, with what a request's events share
    # (shop, session, receive time) encoded once: this is the loader's hottest
    # loop, and a call per field cost as much again. IndexError (a value of
    # 4 KB or more, see LENGTHS) and UnicodeEncodeError send the record down
    # the path asyncpg encodes.
    out: list[bytes] = []
    times: list[int] = []
    received: datetime | None = None
    shop: str | None = None  # not "": that is a value (a refused one for a shop)
    session: str | None = None
    received_field = shop_field = session_field = b""
    for e in events:
        if e.received_at != received:
            received = e.received_at
            received_field = _INT64_LENGTH + _int64((received - _PG_EPOCH) // _MICROSECOND)
        if e.shop_id != shop:
            if not _shops.ok(e.shop_id):
                return None
            shop = e.shop_id
            shop_field = _uuid_text(shop)
        if e.session_id != session:
            session = e.session_id
            data = session.encode()
            session_field = _LENGTHS[len(data)] + data
        props = _object_json(e.props)
        if not props:
            return None
        ts = (e.ts - _PG_EPOCH) // _MICROSECOND
        times.append(ts)
        anon, kind = e.anon_id.encode(), e.event_type.encode()
        if b"$" <= kind < b"%" and kind in _IDENTITY_BYTES:
            return None
        product, experiment, variant, user = e.product_id, e.experiment_id, e.variant, e.user_id
        null = _COPY_NULL
        out.append(
            b"".join(
                (
                    _STOREFRONT_FIELDS,
                    _UUID_LENGTH,
                    UUID(e.event_id).bytes,  # ValueError: the checked decoder says why
                    shop_field,
                    _LENGTHS[len(anon)],
                    anon,
                    session_field,
                    _LENGTHS[len(kind)],
                    kind,
                    _INT64_LENGTH,
                    _int64(ts),
                    _LENGTHS[len(props) + 1],
                    _JSONB,
                    props,
                    null if product is None else _LENGTHS[len(p := product.encode())] + p,
                    null if experiment is None else _LENGTHS[len(x := experiment.encode())] + x,
                    null if variant is None else _LENGTHS[len(v := variant.encode())] + v,
                    received_field,
                    null if user is None else _LENGTHS[len(u := user.encode())] + u,
                )
            )
        )
    return Encoded(b"".join(out), len(out), (min(times),), (max(times),), batched)


class BehaviorCopyEvent(BehaviorEvent, kw_only=True, gc=False):
    """A behavior event as ``behavior_copy`` reads it: its session context left as its
    JSON text, parsed once for a run of events that share it (a request's usually do)."""

    context: msgspec.Raw = _NULL


_BEHAVIOR_FIELDS = binary_copy.field_count(len(streams.BEHAVIOR.columns))
_json = msgspec.json.decode  # a context as the rows' decoder reads it (Any)


def _json_field(raw: msgspec.Raw) -> bytes:
    """A jsonb field of any JSON value (length included); JSON null is SQL NULL."""
    data = bytes(raw)
    return _COPY_NULL if data == b"null" else _LENGTHS[len(data) + 1] + _JSONB + data


def behavior_copy(events: list[BehaviorCopyEvent], batched: bool) -> Encoded | None:
    # behavior_fast's checks, each row encoded as storefront_copy encodes its
    # own, and what the rows tell of their sessions (user_sessions) gathered on
    # the way: one part per run of one session's events, the context parsed
    # again only where it differs from the event before's. Written out by hand
    # for the reasons storefront_copy is.
    out: list[bytes] = []
    times: list[int] = []
    parts: list[SessionPart] = []
    part: Session | None = None
    context: msgspec.Raw | None = None
    received: datetime | None = None
    shop: str | None = None
    session: str | None = None
    received_field = shop_field = session_field = b""
    for e in events:
        if e.received_at != received:
            received = e.received_at
            received_field = _INT64_LENGTH + _int64((received - _PG_EPOCH) // _MICROSECOND)
        if e.shop_id != shop:
            if not _shops.ok(e.shop_id):
                return None
            shop = e.shop_id
            shop_field = _uuid_text(shop)
            part = None
        if e.session_id != session:
            session = e.session_id
            data = session.encode()
            session_field = _LENGTHS[len(data)] + data
            part = None
        event_data, metadata = _object_json(e.event_data), _object_json(e.metadata)
        if not (event_data and metadata):
            return None
        ts = (e.timestamp - _PG_EPOCH) // _MICROSECOND
        times.append(ts)
        url, kind = e.page_url, e.event_type
        views = 1 if kind == "page_view" else 0
        if part is None:
            context = e.context
            part = Session((ts,), url, (ts,), url, views, sessions.context(_json(context)))
            parts.append(((shop, session), part))
        else:
            if ts < part.first_seen[0]:
                part.first_seen, part.landing_page = (ts,), url
            if ts >= part.last_seen[0]:
                part.last_seen, part.exit_page = (ts,), url
            part.page_views += views
            if e.context != context:  # the same text again adds nothing
                context = e.context
                sessions.fill(part.context, sessions.context(_json(context)))
        page, kind_data = url.encode(), kind.encode()
        path, element, text, component = (
            e.element_path,
            e.element_type,
            e.element_text,
            e.component_id,
        )
        null = _COPY_NULL
        out.append(
            b"".join(
                (
                    _BEHAVIOR_FIELDS,
                    _UUID_LENGTH,
                    UUID(e.event_id).bytes,  # ValueError: the checked decoder says why
                    shop_field,
                    session_field,
                    _LENGTHS[len(kind_data)],
                    kind_data,
                    null if path is None else _LENGTHS[len(p := path.encode())] + p,
                    null if element is None else _LENGTHS[len(t := element.encode())] + t,
                    null if text is None else _LENGTHS[len(x := text.encode())] + x,
                    _json_field(e.coordinates),
                    _json_field(e.viewport_size),
                    _LENGTHS[len(event_data) + 1],
                    _JSONB,
                    event_data,
                    _INT64_LENGTH,
                    _int64(ts),
                    _LENGTHS[len(page)],
                    page,
                    null if component is None else _LENGTHS[len(c := component.encode())] + c,
                    _LENGTHS[len(metadata) + 1],
                    _JSONB,
                    metadata,
                    received_field,
                )
            )
        )
    return Encoded(b"".join(out), len(out), (min(times),), (max(times),), batched, tuple(parts))
