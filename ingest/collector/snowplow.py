"""Snowplow's tracker protocol: ``POST /com.snowplowanalytics.snowplow/tp2`` and ``GET /i``.

Sites that track with a Snowplow tracker (browser, Python, ...) point its
collector URL here and set the tracker's ``appId`` to a write key. What an
event (``e``) becomes:

* ``pv`` -> behavior ``page_view`` (``refr``, ``lang``, ``res`` as the
  session's referrer, language and screen resolution; ``page`` as the title).
* ``pp`` (page ping) -> behavior ``scroll_depth``: ``percentage`` is how far
  down the document the viewport's bottom reached
  (``(pp_may + viewport height) / document height``, from ``vp`` and ``ds``;
  none when ``ds`` is stale), the offsets kept beside it. Its
  ``element_statistics`` entities (the element tracking plugin) are also one
  ``time_on_element`` each (``ms`` the element's visible time so far).
* ``ue`` ``link_click`` -> ``click`` (element path ``a#id.class``, the link's
  text, its ``href`` in ``event_data``); ``submit_form`` -> ``form_submit``;
  ``focus_form`` / ``change_form`` -> ``form_start`` (field name only, never
  a value); ``io.eventpipe/form_abandon`` (the README's snippet: Snowplow has
  no abandon event) -> ``form_abandon``; every form event's path is
  ``form#<formId>``; ``application_error`` -> ``error``.
* Anything else (``se``, other ``ue`` schemas, ``tr`` / ``ti``) -> a storefront
  event: ``event_type`` the structured event's action, the self-describing
  schema's name, ``transaction`` or ``transaction_item``; ``props`` keep the
  schema (``$schema``) and the data, the contexts (``$contexts``) and the
  tracker's ids (``$snowplow``).

Ids: ``eid`` is the event id (a UUID; else the UUIDv5 of the payload in the
shop's namespace); ``sid`` the session, else ``<duid>/<UTC day>``;
``duid`` the ``anon_id`` (else ``uid``, else ``nuid``). ``uid`` is a storefront
event's ``user_id`` and a behavior event's ``metadata.user_id`` (behavior_events
has no user id column); a page view with ``uid`` and ``duid`` also sends an
``$identify`` record, so ``identities`` maps the visitor to the user.
Times: ``ttm`` else ``dtm`` (device ms) is the event time, corrected by the
collector's skew rule with ``stm`` (sent ms) as the client's send time.

The write key: trackers carry only ``aid``, which must be a live write key of
the shop; an unknown one is a 401 for ``tp2``. A pixel (``GET /i``) always
answers the 1x1 GIF (browsers ignore an image's errors; a 429 or 503 keeps its
status so a server tracker retries), its refusals counted in
``eventpipe_events_rejected_total{stream="snowplow"}``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import operator
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson
from aiohttp import web
from msgspec import UNSET, UnsetType
from prometheus_client import Counter

from ingest.collector import app as collector
from ingest.collector.delivery import Unavailable
from ingest.collector.enrich import SESSION_FACTS, AssignedTimes, Received, behavior_fields_record
from ingest.collector.models import (
    BehaviorEvent,
    EventFields,
    MappedEvent,
    StorefrontEvent,
    has_nul,
    is_behavior,
    trusted,
)
from ingest.core import metrics, streams
from ingest.core.headers import printable_ascii
from ingest.core.shops import Shop
from ingest.core.streams import CONTEXT

KIND = "snowplow"  # the stream label of this protocol's metrics
POST_PATH = "/com.snowplowanalytics.snowplow/tp2"
GET_PATH = "/i"
# A 1x1 transparent GIF: what Snowplow collectors answer a pixel with.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
IGLU = "iglu:com.snowplowanalytics.snowplow/"
# Snowplow has no form abandon event: the README's snippet sends this one, by the
# beacon's rule (a form started, then the page left without a submit).
FORM_ABANDON = "iglu:io.eventpipe/form_abandon/jsonschema/1-"
ELEMENT_STATISTICS = "iglu:com.snowplowanalytics.snowplow/element_statistics/jsonschema/1-"
# Self-describing events of Snowplow's own schemas that are behavior events.
FORM_EVENTS = {
    "submit_form": "form_submit",
    "focus_form": "form_start",
    "change_form": "form_start",
}


# The tracker's ids kept in every event (``$snowplow``, a behavior event's metadata).
_IDS = (
    ("aid", "app_id"),
    ("p", "platform"),
    ("tv", "tracker"),
    ("tna", "namespace"),
    ("duid", "anon_id"),
    ("uid", "user_id"),
    ("vid", "visit"),
    ("tz", "timezone"),
)


def _json_field(fields: Mapping[str, str], plain: str, encoded: str) -> Any:
    """A JSON field sent as JSON (``plain``) or base64url JSON (``encoded``); None if absent."""
    text = fields.get(plain)
    if text is None and (coded := fields.get(encoded)) is not None:
        try:
            # Trackers send base64url, padded or not; some send standard base64.
            coded = coded.strip().replace("-", "+").replace("_", "/")
            text = base64.b64decode(coded + "=" * (-len(coded) % 4), validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
            raise collector.EventRejected("invalid", f"{encoded} is not base64 JSON") from exc
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise collector.EventRejected(
            "invalid", f"{plain if plain in fields else encoded} is not JSON"
        ) from exc


def _self_describing(fields: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """(schema, data) of a ``ue`` event's ``ue_pr`` / ``ue_px`` envelope."""
    envelope = _json_field(fields, "ue_pr", "ue_px")
    inner = envelope.get("data") if isinstance(envelope, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("schema"), str):
        raise collector.EventRejected(
            "invalid", "ue_pr/ue_px: a self-describing event needs data.schema"
        )
    data = inner.get("data")
    return inner["schema"][:512], data if isinstance(data, dict) else {"value": data}


def _contexts(fields: Mapping[str, str]) -> list[Any]:
    envelope = _json_field(fields, "co", "cx")
    data = envelope.get("data") if isinstance(envelope, dict) else None
    return data if isinstance(data, list) else []


def _name(schema: str) -> str:
    """The event name of an Iglu URI: ``iglu:vendor/NAME/jsonschema/1-0-0`` -> ``NAME``."""
    parts = schema.removeprefix("iglu:").split("/")
    return (parts[1] if len(parts) >= 2 else schema)[:256] or "unknown"


def _ms(value: str | None) -> datetime | None:
    """A time in ms since the epoch (a tracker's ``dtm``, ``stm``, ``ttm``); None when not one."""
    if not value:
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _size(value: str | None) -> tuple[int, int] | None:
    """``1024x768`` -> (1024, 768); None when not a size."""
    width, x, height = (value or "").partition("x")
    # isdecimal, not isdigit: that is true of superscripts and circled digits too,
    # which int refuses.
    if x and width.isdecimal() and height.isdecimal() and len(width) < 7 and len(height) < 7:
        return int(width), int(height)
    return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None and len(value) < 12 else None
    except ValueError:
        return None


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None and len(value) < 40 else None
    except ValueError:
        return None
    return number if number is not None and abs(number) < 1e300 else None  # no inf or nan


def _element_path(tag: str, element_id: Any, classes: Any) -> str:
    path = tag
    if isinstance(element_id, str) and element_id:
        path += f"#{element_id}"
    if isinstance(classes, list):
        path += "".join(f".{c}" for c in classes if isinstance(c, str) and c)
    return path[:4096]


def _text(value: Any, limit: int = 4096) -> str | None:
    return value[:limit] or None if isinstance(value, str) else None


def _fields(raw: Any) -> dict[str, str]:
    """One event of a payload: an object of strings (the protocol sends every value as one)."""
    if not isinstance(raw, dict):
        raise collector.EventRejected("invalid", "event is not a JSON object")
    for name, value in raw.items():
        if not isinstance(value, str):
            raise collector.EventRejected(
                "invalid", f"{str(name)[:50]}: every value must be a string"
            )
    return raw


def event_id(shop: Shop, fields: Mapping[str, str]) -> uuid.UUID:
    """``eid`` when it is a UUID, else the UUIDv5 of the payload in the shop's namespace."""
    try:
        return uuid.UUID(fields["eid"])
    except (KeyError, ValueError):
        digest = hashlib.sha256(orjson.dumps(dict(fields), option=orjson.OPT_SORT_KEYS))
        return uuid.uuid5(uuid.uuid5(shop.id, KIND), f"sha256:{digest.hexdigest()}")


def to_event(shop: Shop, fields: Mapping[str, str]) -> BehaviorEvent | StorefrontEvent:
    """The collector's event of one tracker payload (EventRejected when it can't be one)."""
    kind = fields.get("e")
    if not kind:
        raise collector.EventRejected("invalid", "e: the event type is required")
    at = _ms(fields.get("ttm")) or _ms(fields.get("dtm"))
    anon = fields.get("duid") or fields.get("uid") or fields.get("nuid") or fields.get("tnuid")
    anon = (anon or "anonymous")[:256]
    day = (at or datetime.now(UTC)).date().isoformat()
    session = (fields.get("sid") or f"{anon}/{day}")[:256]
    identifier = event_id(shop, fields)
    contexts = _contexts(fields)
    ids = {name: fields[key][:256] for key, name in _IDS if fields.get(key)}
    behavior: dict[str, Any] | None = None
    url = fields.get("url")
    names = {"pv": "page_view", "pp": "page_ping"}
    schema, data = f"{IGLU}{names.get(kind, kind[:64])}", dict[str, Any]()
    if kind == "pv":
        behavior = {
            "event_type": "page_view",
            "metadata": {
                "referrer": _text(fields.get("refr"), 1024),
                "language": _text(fields.get("lang"), 256),
                "screen_resolution": _text(fields.get("res"), 64),
                "title": _text(fields.get("page")),
            },
        }
    elif kind == "pp":
        behavior = {"event_type": "scroll_depth", "event_data": _ping(fields)}
    elif kind == "ue":
        schema, data = _self_describing(fields)
        name = _name(schema)
        if schema.startswith(IGLU) and name == "link_click":
            behavior = {
                "event_type": "click",
                "element_path": _element_path(
                    "a", data.get("elementId"), data.get("elementClasses")
                ),
                "element_type": "a",
                "element_text": _text(data.get("elementContent"), 100),
                "component_id": _text(data.get("elementId"), 256),
                "event_data": {"href": data.get("targetUrl"), "target": data.get("elementTarget")},
            }
        elif (schema.startswith(IGLU) and name in FORM_EVENTS) or schema.startswith(FORM_ABANDON):
            form_id = data.get("formId")
            field = data.get("elementId") if name != "submit_form" else None
            # Field names only: a form's values are never stored.
            event_data: dict[str, Any] = {"field": field} if isinstance(field, str) else {}
            classes = data.get("formClasses")
            if isinstance(classes, list) and classes:
                event_data["classes"] = [c for c in classes[:16] if isinstance(c, str)]
            behavior = {
                "event_type": FORM_EVENTS.get(name, "form_abandon"),
                # form#id for every form event: focus and change events carry no form
                # classes, and a form's start, submit and abandon must share a path.
                "element_path": _element_path("form", form_id, None),
                "element_type": "form",
                "component_id": _text(form_id, 256),
                "event_data": event_data,
            }
        elif schema.startswith(IGLU) and name == "application_error":
            behavior = {
                "event_type": "error",
                "event_data": {
                    "message": _text(data.get("message"), 1000),
                    "source": _text(data.get("fileName"), 1024),
                    "line": data.get("lineNumber"),
                    "column": data.get("lineColumn"),
                    "stack": _text(data.get("stackTrace"), 2000),
                },
            }
        else:
            return _storefront(
                identifier, name, anon, session, at, fields, contexts, ids, schema, data
            )
    if behavior is not None and not url:
        # A server tracker's event has no page: kept as a storefront event instead.
        behavior = None
        name = _name(schema)
        return _storefront(identifier, name, anon, session, at, fields, contexts, ids, schema, data)
    if behavior is not None:
        viewport = _size(fields.get("vp"))
        return collector.validated(
            BehaviorEvent,
            {
                "event_id": identifier,
                "session_id": session,
                "page_url": url,
                "timestamp": at,
                "viewport_size": {"width": viewport[0], "height": viewport[1]}
                if viewport
                else None,
                **behavior,
                "metadata": {**behavior.get("metadata", {}), **ids, "contexts": contexts}
                if contexts
                else {**behavior.get("metadata", {}), **ids},
            },
        )
    if kind == "se":
        data = {
            "category": fields.get("se_ca"),
            "action": fields.get("se_ac"),
            "label": fields.get("se_la"),
            "property": fields.get("se_pr"),
            "value": _number(fields.get("se_va")),
        }
        name = (fields.get("se_ac") or "structured")[:256]
        schema = f"{IGLU}structured"
    elif kind in ("tr", "ti"):
        prefix = f"{kind}_"
        data = {
            key.removeprefix(prefix): value
            for key, value in fields.items()
            if key.startswith(prefix)
        }
        name = "transaction" if kind == "tr" else "transaction_item"
        schema = f"{IGLU}{name}"
    else:
        data = {}
        name, schema = kind[:256], f"{IGLU}{kind[:64]}"
    return _storefront(identifier, name, anon, session, at, fields, contexts, ids, schema, data)


def _ping(fields: Mapping[str, str]) -> dict[str, Any]:
    """A page ping's scroll: the offsets, and the percentage of the document seen."""
    offsets = {key: _int(fields.get(key)) for key in ("pp_mix", "pp_max", "pp_miy", "pp_may")}
    data: dict[str, Any] = {k: v for k, v in offsets.items() if v is not None}
    # ``ds`` is the document's size (``cd`` is the screen's colour depth; an older
    # reading of the protocol took ``cd`` as the size, which is kept when it is one).
    viewport = _size(fields.get("vp"))
    document = _size(fields.get("ds")) or _size(fields.get("cd"))
    if viewport and document and document[1] > 0:
        reached = max(offsets["pp_may"] or 0, 0) + viewport[1]
        # The browser tracker reads ``ds`` once and refreshes it on resize: a document
        # grown since then is reported smaller than the offset reached. Past a pixel of
        # rounding that size is stale, and no percentage is better than a wrong 100.
        if reached <= document[1] + 2:
            data["percentage"] = min(100, round(reached / document[1] * 100))
    data["ping"] = True
    return data


def _storefront(
    identifier: uuid.UUID,
    name: str,
    anon: str,
    session: str,
    at: datetime | None,
    fields: Mapping[str, str],
    contexts: list[Any],
    ids: dict[str, str],
    schema: str,
    data: dict[str, Any],
) -> StorefrontEvent:
    props: dict[str, Any] = {"$schema": schema, "data": data, "$snowplow": ids}
    if contexts:
        props["$contexts"] = contexts
    if fields.get("url"):
        props["$url"] = fields["url"][:4096]
    sku = fields.get("ti_sk") if fields.get("e") == "ti" else None
    event = collector.validated(
        StorefrontEvent,
        {
            "event_id": identifier,
            "event_type": name,
            "anon_id": anon,
            "session_id": session,
            "ts": at,
            "props": props,
            "product_id": sku[:256] if sku else None,
            "user_id": fields["uid"][:256] if fields.get("uid") else None,
        },
    )
    assert isinstance(event, StorefrontEvent)
    return event


def derived(
    shop: Shop, fields: Mapping[str, str], event: BehaviorEvent | StorefrontEvent
) -> list[BehaviorEvent | StorefrontEvent]:
    """Records made beside ``event``: its ``$identify`` (a page view with ``uid`` and
    ``duid``) and the ``time_on_element`` rows of a page ping's element statistics."""
    out: list[BehaviorEvent | StorefrontEvent] = []
    if (identity := identify(shop, fields)) is not None:
        out.append(identity)
    if isinstance(event, BehaviorEvent) and fields.get("e") == "pp":
        out += times_on_elements(event, _contexts(fields))
    return out


def times_on_elements(ping: BehaviorEvent, contexts: list[Any]) -> list[BehaviorEvent]:
    """A ``time_on_element`` row per ``element_statistics`` entity of a page ping.

    The element tracking plugin attaches one for each tracked element to page pings
    (``includeStats: ["page_ping"]``): ``total_time_visible_ms``, the element's time
    in view on this page so far, is ``event_data.ms``. It is cumulative, so the
    largest per page view and element is the element's total. Each row's id derives
    from the ping's, so a retried ping is the same rows."""
    assert ping.event_id is not None
    out: list[BehaviorEvent] = []
    statistics = [
        c
        for c in contexts[:64]
        if isinstance(c, dict)
        and isinstance(c.get("schema"), str)
        and c["schema"].startswith(ELEMENT_STATISTICS)
        and isinstance(c.get("data"), dict)
    ]
    for entity in statistics:
        data = entity["data"]
        name, ms = _text(data.get("element_name"), 256), data.get("total_time_visible_ms")
        if name is None or not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms < 2**53:
            continue
        index = _count(data.get("element_index"))
        event = collector.validated(
            BehaviorEvent,
            {
                "event_id": uuid.uuid5(ping.event_id, f"time_on_element:{name}:{index}"),
                "event_type": "time_on_element",
                "session_id": ping.session_id,
                "page_url": ping.page_url,
                "timestamp": ping.timestamp,
                "viewport_size": ping.viewport_size,
                "element_path": name,
                "component_id": name,
                "event_data": {
                    "ms": ms,
                    "views": _count(data.get("times_in_view")),
                    "index": _count(index),
                    "max_depth_ratio": _ratio(data.get("max_y_depth_ratio")),
                    "cumulative": True,
                },
                "metadata": {k: v for k, v in ping.metadata.items() if k != "contexts"},
            },
        )
        assert isinstance(event, BehaviorEvent)
        out.append(event)
    return out


def _count(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
    return value if ok else None


def _ratio(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1e6
    return float(value) if ok else None


def identify(shop: Shop, fields: Mapping[str, str]) -> StorefrontEvent | None:
    """The ``$identify`` record (``identities``: the visitor ``duid`` is the user ``uid``)
    of a page view sent with both, else None.

    Snowplow has no identify call: a tracker's ``setUserId`` puts ``uid`` beside the
    ``duid`` of every later event. Page views carry it to ``identities`` (once a page,
    not once an event); its id is derived from the page view's, so a retry is one."""
    user, anon = fields.get("uid"), fields.get("duid")
    if fields.get("e") != "pv" or not user or not anon or user == anon:
        return None
    identifier = uuid.uuid5(event_id(shop, fields), "identify")
    event = collector.validated(
        StorefrontEvent,
        {
            "event_id": identifier,
            "event_type": "$identify",
            "anon_id": anon[:256],
            "user_id": user[:256],
            "session_id": (fields.get("sid") or anon)[:256],
            "ts": _ms(fields.get("ttm")) or _ms(fields.get("dtm")),
            "props": {"traits": {}},
        },
    )
    assert isinstance(event, StorefrontEvent)
    return event


# The fast path of the tp2 route (``_tracked``, ``_accept_fast``, ``_fast``) beside the
# reference (orjson, ``accept``, ``to_event``, ``derived``), after aiokafka's fast and
# reference record code. Page views, page pings and link clicks with their page are
# what browser trackers send most, and the reference's generality (each event checked
# on its own and validated by pydantic, a ping's contexts decoded twice, the same ids
# rebuilt for every event of a batch) was most of the route's CPU. The commonest of
# those, stored as they came, are not even mapped: ``_accept_fast`` writes each one's
# record JSON from what its tracker's records share, encoded once (``_Tracker``), and
# its own id and time (the splice). Anything else takes the reference;
# tests/ingest/collector/test_snowplow_fast.py checks that all give the same events,
# records (byte for byte), refusals and answers.


class _Read(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One event of a ``payload_data`` body as the fast path reads it: each field of the
    tracker protocol a string when sent, UNSET when not (never None: a JSON null is
    not a string, and such an event is the reference's to refuse)."""

    # In the order the load generator's payloads list them (Snowplow's trackers differ
    # a little): msgspec looks for each key from where it found the last one.
    e: str | UnsetType = UNSET
    page: str | UnsetType = UNSET
    refr: str | UnsetType = UNSET
    ue_px: str | UnsetType = UNSET
    ue_pr: str | UnsetType = UNSET
    pp_mix: str | UnsetType = UNSET
    pp_max: str | UnsetType = UNSET
    pp_miy: str | UnsetType = UNSET
    pp_may: str | UnsetType = UNSET
    eid: str | UnsetType = UNSET
    dtm: str | UnsetType = UNSET
    stm: str | UnsetType = UNSET
    tv: str | UnsetType = UNSET
    tna: str | UnsetType = UNSET
    aid: str | UnsetType = UNSET
    p: str | UnsetType = UNSET
    cookie: str | UnsetType = UNSET
    cs: str | UnsetType = UNSET
    duid: str | UnsetType = UNSET
    sid: str | UnsetType = UNSET
    url: str | UnsetType = UNSET
    vp: str | UnsetType = UNSET
    ds: str | UnsetType = UNSET
    res: str | UnsetType = UNSET
    cd: str | UnsetType = UNSET
    lang: str | UnsetType = UNSET
    tz: str | UnsetType = UNSET
    ttm: str | UnsetType = UNSET
    vid: str | UnsetType = UNSET
    uid: str | UnsetType = UNSET
    nuid: str | UnsetType = UNSET
    tnuid: str | UnsetType = UNSET
    co: str | UnsetType = UNSET
    cx: str | UnsetType = UNSET
    ua: str | UnsetType = UNSET


# The other fields of Snowplow's tracker protocol: decoded (checked to be strings) and
# not read by the fast path. A field of none of them sends its body to the reference.
_UNREAD = (
    "tid", "ip", "fp", "ctype", "mac", "f_pdf", "f_qt", "f_realp",
    "f_wma", "f_dir", "f_fla", "f_java", "f_gears", "f_ag", "se_ca", "se_ac", "se_la",
    "se_pr", "se_va", "tr_id", "tr_af", "tr_tt", "tr_tx", "tr_sh", "tr_ci", "tr_st",
    "tr_co", "tr_cu", "ti_id", "ti_sk", "ti_nm", "ti_na", "ti_ca", "ti_pr", "ti_qu",
    "ti_cu",
)  # fmt: skip
_TRACKED_EVENT = msgspec.defstruct(
    "_TrackedEvent",
    [(name, str | UnsetType, UNSET) for name in _UNREAD],
    bases=(_Read,),
    forbid_unknown_fields=True,
    gc=False,
)
_TRACKED = msgspec.json.Decoder(
    msgspec.defstruct(
        "_Tracked",
        [("data", list[_TRACKED_EVENT]), ("schema", str | None, None)],  # type: ignore[valid-type]
        forbid_unknown_fields=True,
    )
)


class _PayloadData(msgspec.Struct, forbid_unknown_fields=True):
    """A body ``_tracked`` took, its events as the reference reads them."""

    data: list[dict[str, str]]
    schema: str | None = None


_PAYLOAD_DATA = msgspec.json.Decoder(_PayloadData)


def _tracked(body: bytes, max_event_bytes: int) -> list[_Read] | None:
    """The events of a body none of whose events needs its own check, else None (the
    reference then decides, event by event, with reasons).

    The rule of the native routes' ``app._whole_batch``: a body no larger than
    ``max_event_bytes`` holding no escaped NUL (an event's JSON as orjson writes it is
    never longer than its text in the body, and JSON has no other way to write a NUL),
    whose events are all objects of the protocol's fields, each a string (msgspec
    checks them as it decodes, in C)."""
    if len(body) > max_event_bytes or has_nul(body):
        return None
    try:
        decoded: Any = _TRACKED.decode(body)  # a struct of a class made at import
    except msgspec.DecodeError:  # ValidationError is one
        return None
    events: list[_Read] = decoded.data
    return events


# The fields of the model each kind's values give (the rest are the model's defaults),
# as ``model_validate`` records them.
_GIVEN_PV = frozenset(
    ("event_id", "event_type", "session_id", "page_url", "timestamp", "viewport_size", "metadata")
)
_GIVEN_PP = _GIVEN_PV | {"event_data"}
_GIVEN_CLICK = _GIVEN_PP | {"element_path", "element_type", "element_text", "component_id"}
_OFFSETS = ("pp_mix", "pp_max", "pp_miy", "pp_may")
_MAIN = operator.attrgetter("e", "url", "ttm", "dtm", "vp", "co", "cx")
# What the ids, the visitor and the session of an event are made of, in _IDS's order
# first: the same for every event of a tracker's batch, so made once a batch.
_PING = operator.attrgetter(*_OFFSETS, "vp", "ds", "cd")
_WHO = operator.attrgetter(*(key for key, _ in _IDS), "nuid", "tnuid", "sid")
_NO_DATA: dict[str, Any] = {}  # the event data of a page view (shared, never changed)


@functools.lru_cache(maxsize=4096)
def _viewport(vp: str | None) -> dict[str, int] | None:
    """A record's ``viewport_size`` of ``vp``: viewports repeat from event to event, so
    each is parsed once and its dict shared (never changed)."""
    size = _size(vp)
    return {"width": size[0], "height": size[1]} if size else None


_UUIDS = list[uuid.UUID]


@functools.lru_cache(maxsize=4096)
def _scroll(*sent: str | UnsetType) -> dict[str, Any]:
    """``_ping``'s event data of a ping's ``pp_mix``, ``pp_max``, ``pp_miy``, ``pp_may``,
    ``vp``, ``ds`` and ``cd``. Cached (pings of a page repeat them): shared, never
    changed."""
    fields = dict(zip((*_OFFSETS, "vp", "ds", "cd"), sent, strict=True))
    return _ping({k: v for k, v in fields.items() if not isinstance(v, UnsetType)})


def _uuid(text: str | UnsetType) -> uuid.UUID | None:
    """``uuid.UUID(text)`` when ``text`` is a UUID's 32 hex digits, with dashes or not (as
    trackers send an ``eid``); None for anything else (``event_id`` then decides).

    msgspec parses those in C, in a third of ``uuid.UUID``'s time, to the same UUID;
    the other forms ``uuid.UUID`` reads (braces, ``urn:uuid:``, dashes elsewhere)
    are left to it."""
    if not text:
        return None
    try:
        return msgspec.convert(text, uuid.UUID)
    except msgspec.ValidationError:
        return None


def _uuids(events: list[_Read]) -> list[uuid.UUID | None]:
    """``_uuid`` of each event's ``eid``: in one call when every one is a UUID."""
    try:
        found: list[uuid.UUID | None] = msgspec.convert([e.eid for e in events], _UUIDS)
    except msgspec.ValidationError:
        return [_uuid(e.eid) for e in events]
    return found


# Each hexadecimal digit in lower case to "x", for _written.
_LOWER_HEX = bytes(0x78 if chr(b) in "0123456789abcdef" else b for b in range(256))
_WRITTEN = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"


def _written(events: list[_Read]) -> bool:
    """Whether every event's ``eid`` is a UUID as orjson writes one (hyphenated, in lower
    case): its own text then, with no UUID made of it. In C calls, a third of
    ``_uuids``' time (which makes each UUID)."""
    try:
        joined = "".join([e.eid for e in events])  # type: ignore[misc]  # TypeError if UNSET
    except TypeError:
        return False
    return joined.isascii() and joined.encode().translate(_LOWER_HEX) == _WRITTEN * len(events)


_fromtimestamp = datetime.fromtimestamp


def _sent(**fields: str | UnsetType) -> dict[str, str]:
    """The fields sent of ``fields``, as the reference's helpers read them."""
    return {k: v for k, v in fields.items() if not isinstance(v, UnsetType)}


@functools.lru_cache(maxsize=4096)
def _link_click(
    plain: str | None, encoded: str | None
) -> tuple[str, str | None, str | None, str | None, str | None] | None:
    """(element path, text, component id, href, target) of a ``link_click`` sent as
    ``ue_pr`` / ``ue_px``, as ``to_event`` maps it; None when it is another event, or
    its href or target is not text (then the reference maps it).

    Cached: a page's links are clicked again and again, each time the same payload, and
    its base64 and JSON were most of a click's time. Only text is kept, never decoded
    objects two events would share. EventRejected as ``_self_describing`` raises it
    (never cached)."""
    sent = {k: v for k, v in (("ue_pr", plain), ("ue_px", encoded)) if v is not None}
    schema, data = _self_describing(sent)
    if not schema.startswith(IGLU) or _name(schema) != "link_click":
        return None
    href, target = data.get("targetUrl"), data.get("elementTarget")
    if not (href is None or isinstance(href, str)) or not (
        target is None or isinstance(target, str)
    ):
        return None
    element_id = data.get("elementId")
    return (
        _element_path("a", element_id, data.get("elementClasses")),
        _text(data.get("elementContent"), 100),
        _text(element_id, 256),
        href,
        target,
    )


_Who = tuple[dict[str, str], str, str | None]


def _who(key: tuple[str | UnsetType, ...]) -> _Who:
    """(ids, visitor, session or None: by the event's day) of ``_WHO``'s fields, as
    ``to_event`` makes them."""
    ids = {name: value[:256] for (_, name), value in zip(_IDS, key, strict=False) if value}
    duid, uid, nuid, tnuid, sid = key[4], key[5], key[8], key[9], key[10]
    anon = (duid or uid or nuid or tnuid or "anonymous")[:256]
    return ids, anon, sid[:256] if sid else None


def _fast(
    shop: Shop,
    event: _Read,
    identifier: uuid.UUID | None,
    known: dict[tuple[str | UnsetType, ...], _Who],
) -> list[MappedEvent] | None:
    """``[to_event(...), *derived(...)]`` of a page view, page ping or link click with its
    page and a UUID ``eid`` (``identifier``), EventRejected as they raise it; None for
    any other event. ``known``: the ``_who`` of the batch's events so far. A behavior
    event is given as its fields (``EventFields``) unless a model was needed."""
    kind, url, ttm, dtm, vp, co, cx = _MAIN(event)
    if kind != "pv" and kind != "pp" and kind != "ue":
        return None
    if not url or len(url) > 4096 or identifier is None:
        # No page: a storefront event; too long a page: refused by the model; an eid
        # not a UUID: the id of the whole payload.
        return None
    at = _ms(ttm) if ttm else None
    if at is None and dtm:
        try:  # ``_ms``, inlined
            at = _fromtimestamp(int(dtm) / 1000, UTC)
        except (ValueError, OverflowError, OSError):
            at = None
    key = _WHO(event)
    who = known.get(key)
    if who is None:
        who = known[key] = _who(key)
    template, anon, session = who
    if session is None:
        session = f"{anon}/{(at or datetime.now(UTC)).date().isoformat()}"[:256]
    # Decoded once: the reference decodes a ping's again for its element statistics.
    contexts = [] if co is UNSET and cx is UNSET else _contexts(_sent(co=co, cx=cx))
    # The tracker's ids, a ping's scroll data and a viewport are dicts shared by the
    # records of a batch that have the same ones (made once, cached): nothing after
    # this changes a record's nested dicts in place (enrich replaces its metadata
    # with a new dict where it adds keys), and each record is encoded at once.
    element_path = element_type = element_text = component_id = None
    event_data: dict[str, Any] = _NO_DATA
    if kind == "pv":
        event_type, given = "page_view", _GIVEN_PV
        metadata: dict[str, Any] = {
            "referrer": _text(event.refr, 1024),
            "language": _text(event.lang, 256),
            "screen_resolution": _text(event.res, 64),
            "title": _text(event.page),
            **template,
        }
    elif kind == "pp":
        event_type, given, metadata = "scroll_depth", _GIVEN_PP, template
        event_data = _scroll(*_PING(event))
    else:
        pr, px = event.ue_pr, event.ue_px
        click = _link_click(None if pr is UNSET else pr, None if px is UNSET else px)
        if click is None:
            return None
        event_type, given, metadata, element_type = "click", _GIVEN_CLICK, template, "a"
        element_path, element_text, component_id, href, target = click
        event_data = {"href": href, "target": target}
    if contexts:
        metadata = {**metadata, "contexts": contexts}
    # The event's fields, every one the model would hold (``models.EventFields``): no
    # model is built, ``app._records`` makes the record of the dict itself.
    fields: EventFields = {
        "event_id": identifier,
        "event_type": event_type,
        "session_id": session,
        "page_url": url,
        "timestamp": at,
        "element_path": element_path,
        "element_type": element_type,
        "element_text": element_text,
        "coordinates": None,
        "viewport_size": _viewport(vp or None),
        "event_data": event_data,
        "component_id": component_id,
        "metadata": metadata,
    }
    if kind == "pv":
        user, duid = event.uid, event.duid
        if not user or not duid or user == duid:
            return [fields]
        return [fields, _identity(identifier, user, duid, event.sid, at)]
    if kind == "pp" and contexts:  # element times are made of the ping's model
        ping = trusted(BehaviorEvent, fields, given)
        return [ping, *times_on_elements(ping, contexts)]
    return [fields]


def _identity(
    identifier: uuid.UUID, user: str, anon: str, sid: str | UnsetType, at: datetime | None
) -> StorefrontEvent:
    """``identify``'s record of the page view ``identifier`` of ``user`` and ``anon``."""
    event = collector.validated(
        StorefrontEvent,
        {
            "event_id": uuid.uuid5(identifier, "identify"),
            "event_type": "$identify",
            "anon_id": anon[:256],
            "user_id": user[:256],
            "session_id": (sid or anon)[:256],
            "ts": at,
            "props": {"traits": {}},
        },
    )
    assert isinstance(event, StorefrontEvent)
    return event


def reference_mapped(shop: Shop, fields: Mapping[str, str]) -> list[MappedEvent]:
    """The event of one tracker payload and the records made beside it: ``to_event``,
    then ``derived``."""
    event = to_event(shop, fields)
    return [event, *derived(shop, fields, event)]


async def shop_for(
    request: web.Request, key: str | None, shops: dict[str, Shop], *, kind: str, refusal: str
) -> Shop:
    """The shop whose write key is ``key``, looked up once per request (``shops`` holds
    the request's lookups); an unknown key is a 401 with ``refusal``, counted for ``kind``.
    The tracker protocols carry their key in every event, not once per request."""
    given = key or ""
    if given not in shops:
        try:
            shops[given] = await collector._authenticate(request, key)
        except collector.Refused as exc:
            if exc.status != 401:
                raise
            metrics.EVENTS_REJECTED.labels(kind, "unauthorized").inc()
            raise collector.Refused(401, refusal) from None
    return shops[given]


async def _shop(request: web.Request, aid: str | None, shops: dict[str, Shop]) -> Shop:
    return await shop_for(
        request,
        aid,
        shops,
        kind=KIND,
        refusal="missing or unknown app id: set the tracker's appId to a write key",
    )


async def _taken(request: web.Request, aids: Iterable[str | None]) -> dict[str, Shop]:
    """The shops of a request's app ids (in the events' order: the first unknown one is
    the 401), a token of each one's rate limit taken (429 otherwise)."""
    shops: dict[str, Shop] = {}
    # Each app id once (None and "" are the same missing one): a batch has one, mostly.
    for aid in dict.fromkeys(aid or None for aid in aids):
        await _shop(request, aid, shops)
    take_tokens(request, shops)
    return shops


def take_tokens(request: web.Request, keys: Iterable[str]) -> None:
    """A token of each write key's rate limit taken for the request's client (a 429 when
    one has none): a tracker protocol's batch may name several keys."""
    client = collector.client_identity(request)
    limiter = request.app[collector.LIMITER]
    for key in keys:
        if (wait := limiter.take(printable_ascii(key) or "", client)) > 0:
            raise collector._limited(wait)


_Made = list[tuple[int, MappedEvent]]
_STOREFRONT = streams.STOREFRONT.name


async def accept(request: web.Request, payloads: list[Any], received_at: datetime) -> web.Response:
    """Authenticate, map and deliver the events of one request."""
    settings = request.app[collector.SETTINGS]
    rejected: list[dict[str, Any]] = []
    # (stream, aid, stm) -> the valid events of one shop sent at one time.
    groups: dict[tuple[str, str, str], _Made] = {}
    events: list[tuple[int, dict[str, str]]] = []
    made = 0  # records made here beside the events sent (``derived``)
    for index, raw in enumerate(payloads):
        try:
            fields = _fields(raw)
            collector.check_encoded(fields, settings.max_event_bytes)
        except collector.EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
            continue
        events.append((index, fields))
    # Every app id known before anything is taken.
    shops = await _taken(request, (fields.get("aid") for _, fields in events))
    for index, fields in events:
        try:
            shop = shops[fields.get("aid") or ""]
            event = to_event(shop, fields)
            extras = derived(shop, fields, event)  # an event whose extras fail is rejected
        except collector.EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
            continue
        _group(groups, index, fields.get("aid") or "", fields.get("stm") or "", [event, *extras])
        made += len(extras)
    return await _deliver(request, groups, shops, rejected, received_at, made)


def _group(
    groups: dict[tuple[str, str, str], _Made],
    index: int,
    aid: str,
    stm: str,
    made: list[MappedEvent],
) -> None:
    """Add the records ``made`` of event ``index`` to their (stream, aid, stm) groups."""
    for event in made:
        behavior = is_behavior(event)
        stream = streams.BEHAVIOR.name if behavior else _STOREFRONT
        groups.setdefault((stream, aid, stm), []).append((index, event))


async def _deliver(
    request: web.Request,
    groups: dict[tuple[str, str, str], _Made],
    shops: dict[str, Shop],
    rejected: list[dict[str, Any]],
    received_at: datetime,
    made: int,
) -> web.Response:
    received = {stm: _ms(stm) for _, _, stm in groups}
    # By (stream, shop, time sent): two app ids of one shop (its keys while it rotates
    # them) or two stm texts of one time are one group, its events in the batch's order.
    merged: Groups = {}
    for (stream, aid, stm), valid in groups.items():
        merged.setdefault((stream, shops[aid], received[stm]), []).extend(valid)
    if len(merged) < len(groups):
        for valid in merged.values():  # stable: a page view's derived records follow it
            valid.sort(key=operator.itemgetter(0))
    return await deliver_groups(request, KIND, merged, rejected, received_at, derived=made)


class _Group:
    """One (stream, aid, stm) group of the fast path: its shop and the request as it
    enriches the group's records (``Received.of`` of its ``stm``); a behavior group's
    records made as its events are mapped, by session, a storefront group's events
    kept for ``app._records``."""

    __slots__ = ("count", "kept", "late", "received", "sessions", "shop", "valid", "view")

    def __init__(self, shop: Shop, received: Received) -> None:
        self.shop, self.received = shop, received
        self.view = view = received.of_shop(shop)
        # Whether a record of a time given and not too far ahead is stored as it came:
        # no clock to correct, no bot to flag, no session fact to drop.
        self.kept = not received.skew and not view.bot and not view.anonymous
        # A record is a dict, or its JSON (an orjson Fragment, from the splice): orjson
        # writes either the same.
        self.sessions: dict[str, list[tuple[int, Any]]] = {}
        self.late: list[dict[str, Any]] = []  # what app._records would add to rejected
        self.valid: _Made = []  # a storefront group's events
        self.count = 0  # a behavior group's events

    def add(self, index: int, event: MappedEvent, times: AssignedTimes) -> None:
        """The behavior record of ``event``, as ``app._records`` makes it."""
        self.count += 1
        fields = event if type(event) is dict else vars(event).copy()
        received = self.received
        at = received.at
        given = None if fields["timestamp"] else times.time_for(self.shop, fields["event_id"], at)
        try:
            record = behavior_fields_record(fields, self.shop, received, given, self.view)
        except (OverflowError, ValueError) as exc:
            self.late.append({"index": index, "reason": f"event cannot be stored: {exc}"})
            metrics.EVENTS_REJECTED.labels(_BEHAVIOR, "unencodable").inc()
            return
        self.sessions.setdefault(record["session_id"], []).append((index, record))

    def messages(
        self, stream: str, times: AssignedTimes, rejected: list[dict[str, Any]], max_bytes: int
    ) -> tuple[list[tuple[bytes, bytes]], int]:
        """``app._records`` of the group: (Kafka records, events accepted)."""
        if stream != _BEHAVIOR:
            return collector._records(
                stream, self.valid, self.shop, self.received, times, rejected, max_bytes
            )
        late = self.late
        messages: list[tuple[bytes, bytes]] = []
        shop = _dumps(self.shop.id)[1:-1] + b":"  # the shop's part of each key
        for session, items in self.sessions.items():
            messages += collector._encode(shop + session.encode(), items, stream, late, max_bytes)
        if late:
            rejected += late
            rejected.sort(key=lambda r: int(r["index"]))
        return messages, self.count - len(late)


_BEHAVIOR = streams.BEHAVIOR.name
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# Below this many ms since the epoch (the year 2096), ``datetime.fromtimestamp(ms / 1000)``
# is ms exactly (the float's error is under half a microsecond), so a time is written
# from its digits; a later one takes ``_fast``.
_MS_LIMIT = 4 * 10**12
# A time's text after its second, by its ms, as orjson writes a UTC datetime.
_FRACTION = ("+00:00", *(f".{ms:03}000+00:00" for ms in range(1, 1000)))
_SPLICE = operator.attrgetter("e", "url", "ttm", "dtm", "co", "cx", "eid")
# What a tracker's records share (its ids, session, page, sizes, aid and stm).
_TRACKER = operator.attrgetter(
    "aid", "p", "tv", "tna", "duid", "uid", "vid", "tz", "sid", "stm", "url", "vp", "ds", "cd"
)
_dumps = orjson.dumps
_Fragment = orjson.Fragment


class _Clock:
    """What the records of one (aid, stm) share on the splice path: whether they are
    stored as they came (``_Group.kept``), the latest time kept, the record's end."""

    __slots__ = ("end", "kept", "latest", "server", "view")

    def __init__(self, shop: Shop, received: Received) -> None:
        self.view = view = received.of_shop(shop)
        self.kept = not received.skew and not view.bot and not view.anonymous
        self.latest = (received.latest - _EPOCH) // _US  # in µs
        # The server's fields but the context's value, then with the context of a
        # record whose metadata names no session fact.
        self.server = (
            f',"shop_id":{_dumps(shop.id).decode()},'
            f'"received_at":{_dumps(received.at).decode()},"{CONTEXT}":'
        )
        self.end = f"{self.server}{_dumps(view.behavior_context).decode()}}}"

    def facts_end(self, metadata: dict[str, Any]) -> str:
        """The end of a record whose metadata is ``metadata``, naming session facts: its
        context holds them, as ``behavior_fields_record`` copies them."""
        return f"{self.server}{_dumps(self.view.with_facts(metadata)).decode()}}}"


class _Parts:
    """What the records of a tracker share on the splice path, the same from request to
    request (``_parts``, cached): its ids, session, page and sizes, as JSON. Never
    changed but for its bounded cache of clicks."""

    __slots__ = (
        "aid",
        "click",
        "clicks",
        "empty",
        "identifies",
        "ids",
        "ids_json",
        "nulls",
        "ping",
        "session",
        "sizes",
        "view",
        "viewport",
    )  # fmt: skip

    def __init__(self, key: tuple[Any, ...]) -> None:
        # _TRACKER's fields but stm (a batch's send time, another in each request).
        aid, sid, url = key[0], key[8], key[9]
        self.aid = aid or ""
        self.session = session = sid[:256]
        self.ids = ids = {
            name: value[:256] for (_, name), value in zip(_IDS, key, strict=False) if value
        }
        self.ids_json = _dumps(ids).decode()
        page = f',"session_id":{_dumps(session).decode()},"page_url":{_dumps(url).decode()}'
        self.ping = f'","event_type":"scroll_depth"{page},"timestamp":"'
        self.click = f'","event_type":"click"{page},"timestamp":"'
        self.view = f'","event_type":"page_view"{page},"timestamp":"'
        uid, duid = key[5], key[4]
        self.identifies = bool(uid and duid and uid != duid)  # its page views' $identify
        self.sizes: tuple[str | UnsetType, ...] = key[10:]  # vp, ds, cd
        self.viewport = viewport = _dumps(_viewport(key[10] or None)).decode()
        self.nulls = (
            '","element_path":null,"element_type":null,"element_text":null,'
            f'"coordinates":null,"viewport_size":{viewport},"event_data":'
        )
        self.empty = f"{self.nulls}{{}}{_PING_END}"  # a page view's, to its metadata
        # A click's JSON from its time to its metadata by its ue_pr and ue_px (None:
        # not one the splice writes): a page's links are clicked again and again.
        self.clicks: dict[tuple[str | UnsetType, ...], str | None] = {}

    def click_part(self, sent: tuple[str | UnsetType, ...]) -> str | None:
        """The JSON of a link click sent as ``sent`` (ue_pr, ue_px) from its time to its
        metadata; None when ``_link_click`` makes no click of it, or raises (``_fast``
        then maps it, or raises). Cached in ``clicks``."""
        clicks = self.clicks
        if sent in clicks:
            return clicks[sent]
        if len(clicks) >= 16:
            clicks.clear()
        pr, px = sent
        try:
            click = _link_click(None if pr is UNSET else pr, None if px is UNSET else px)
        except collector.EventRejected:
            return None  # not cached: _fast raises it
        part = None
        if click is not None:
            path, text, component, href, target = click
            try:
                part = (
                    f'","element_path":{_dumps(path).decode()},"element_type":"a",'
                    f'"element_text":{_dumps(text).decode()},"coordinates":null,'
                    f'"viewport_size":{self.viewport},'
                    f'"event_data":{_dumps({"href": href, "target": target}).decode()},'
                    f'"component_id":{_dumps(component).decode()},"metadata":'
                )
            except orjson.JSONEncodeError:
                part = None  # app._encode refuses it
        clicks[sent] = part
        return part


_parts = functools.lru_cache(maxsize=1024)(_Parts)


class _Tracker:
    """A tracker's records in one request on the splice path: its ``_Parts``, the end of
    its records (the request's fields and context), its group and session once it has
    a record."""

    __slots__ = (
        "aid",
        "click",
        "clock",
        "empty",
        "group",
        "identifies",
        "items",
        "latest",
        "nulls",
        "pages",
        "parts",
        "ping",
        "session",
        "sizes",
        "stm",
        "tail",
        "view",
    )  # fmt: skip

    def __init__(self, parts: _Parts, stm: str, clock: _Clock) -> None:
        self.parts, self.clock, self.latest = parts, clock, clock.latest
        self.aid, self.stm, self.session = parts.aid, stm, parts.session
        self.ping, self.click, self.view = parts.ping, parts.click, parts.view
        self.identifies, self.sizes = parts.identifies, parts.sizes
        self.nulls, self.empty = parts.nulls, parts.empty
        self.tail = f"{parts.ids_json}{clock.end}"  # after "metadata":
        self.items: list[tuple[int, Any]] | None = None  # its session's, once it has one
        self.group: _Group | None = None  # its behavior group, once it has a record
        # A page view's JSON from its metadata on, by its refr, lang, res and page.
        self.pages: dict[tuple[str | UnsetType, ...], str] = {}

    def page_tail(self, sent: tuple[str | UnsetType, ...]) -> str:
        """The JSON of a page view sent with ``sent`` (refr, lang, res, page) from its
        metadata on, as ``_fast`` makes its metadata."""
        refr, lang, res, page = sent
        metadata = {
            "referrer": _text(refr, 1024),
            "language": _text(lang, 256),
            "screen_resolution": _text(res, 64),
            "title": _text(page),
            **self.parts.ids,
        }
        return f"{_dumps(metadata).decode()}{self.clock.facts_end(metadata)}"


@functools.lru_cache(maxsize=4096)
def _scroll_json(offsets: tuple[str | UnsetType, ...], sizes: tuple[str | UnsetType, ...]) -> str:
    """The JSON of ``_scroll`` of a ping's offsets and its vp, ds and cd."""
    return _dumps(_scroll(*offsets, *sizes)).decode()


_PING_END = ',"component_id":null,"metadata":'  # a ping's JSON after its event data
# A time's text up to its second, by the second (the seconds of recent events).
_SECONDS: dict[int, str] = {}


_OFFSET_FIELDS = operator.attrgetter(*_OFFSETS)
_CLICK_FIELDS = operator.attrgetter("ue_pr", "ue_px")
_PAGE_FIELDS = operator.attrgetter("refr", "lang", "res", "page")


async def _accept_fast(
    request: web.Request, events: list[_Read], body: bytes, received_at: datetime
) -> web.Response:
    """``accept`` of the events ``_tracked`` read from ``body``: no event checked on its
    own (none needs it), each written by the splice, else mapped by ``_fast``, else by
    the reference.

    A behavior event's record is made as soon as it is mapped (what ``app._records``
    makes of it later on the reference path): ``app._records`` called
    ``behavior_fields_record``, ``enrich._record`` and ``Received.event_time`` for each
    event, most of its time, where the usual event only gains the request's fields and
    its context, here in the loop. The usual ping or click of a tracker's batch is
    not even a dict: its record's JSON is written from the parts the tracker's records
    share (``_Tracker``), encoded once, and its own (its id and time), as the native
    routes splice theirs (``native.records``)."""
    settings = request.app[collector.SETTINGS]
    times = request.app[collector.TIMES]
    rejected: list[dict[str, Any]] = []
    groups: dict[tuple[str, Shop, datetime | None], _Group] = {}
    made = 0
    # Each app id once, in order (a batch has one, mostly).
    shops = await _taken(request, dict.fromkeys([e.aid or None for e in events]))
    # Every eid as orjson writes its UUID (as trackers send them): no UUID made but for
    # an event _fast maps.
    canonical = _written(events)
    identifiers = None if canonical else _uuids(events)
    known: dict[tuple[str | UnsetType, ...], _Who] = {}
    payloads: list[dict[str, str]] | None = None  # the reference's events, when needed
    sent: dict[str, datetime | None] = {}  # each stm's time
    requests: dict[datetime | None, Received] = {}  # Received.of of each time sent

    def received_for(stm: str) -> Received:
        at = sent[stm] if stm in sent else sent.setdefault(stm, _ms(stm))
        received = requests.get(at)
        if received is None:
            received = requests[at] = Received.of(request, settings, at, received_at)
        return received

    def group(stream: str, aid: str, stm: str) -> _Group:
        # By (stream, shop, time sent), as _deliver delivers them: two app ids of one
        # shop (its keys while it rotates them) or two stm texts of one time are one.
        received = received_for(stm)
        key = (stream, shops[aid], sent[stm])
        found = groups.get(key)
        if found is None:
            found = groups[key] = _Group(shops[aid], received)
        return found

    clocks: dict[tuple[str, str], _Clock] = {}

    def tracker_of(key: tuple[Any, ...]) -> _Tracker | None:
        """The splice's tracker of ``key`` (``_TRACKER``); None when its records are not
        written by it (no session id, or not stored as they came)."""
        aid, stm, sid = key[0] or "", key[9] or "", key[8]
        clock = clocks.get((aid, stm))
        if clock is None:
            clock = clocks[(aid, stm)] = _Clock(shops[aid], received_for(stm))
        if not sid or not clock.kept:
            return None
        return _Tracker(_parts((*key[:9], *key[10:])), stm, clock)

    trackers: dict[tuple[Any, ...], _Tracker | None] = {}
    tracked: tuple[Any, ...] | None = None  # the last spliced event's _TRACKER
    tracker: _Tracker | None = None
    # The behavior group of the last (aid, stm): a batch's events nearly always share them.
    last: tuple[str, str] | None = None
    target = None
    for index, event in enumerate(events):
        kind, url, ttm, dtm, co, cx, eid = _SPLICE(event)
        if (
            (kind == "pp" or kind == "ue" or kind == "pv")
            and (identifiers is None or identifiers[index] is not None)
            and url
            and len(url) <= 4096
            and co is UNSET
            and cx is UNSET
            and not ttm
            and dtm
        ):
            # What _fast maps to one record the splice writes: a ping, a link click or a
            # page view with its page, a UUID eid, no contexts, its time from dtm, of a
            # tracker with a session id; stored as it came, a time not too far ahead.
            key = _TRACKER(event)
            if key != tracked:
                tracked = key
                if key in trackers:
                    tracker = trackers[key]
                else:
                    tracker = trackers[key] = tracker_of(key)
            try:
                ms = int(dtm)
            except ValueError:
                ms = -1  # not a time: _fast's
            if tracker is not None and 0 <= ms < _MS_LIMIT and ms * 1000 <= tracker.latest:
                part: str | None
                tail = tracker.tail
                if kind == "pp":
                    scroll = _scroll_json(_OFFSET_FIELDS(event), tracker.sizes)
                    part = f"{tracker.nulls}{scroll}{_PING_END}"
                    head = tracker.ping
                elif kind == "ue":
                    part = tracker.parts.click_part(_CLICK_FIELDS(event))
                    head = tracker.click
                elif tracker.identifies:
                    part = None  # a page view and its $identify: _fast's
                else:
                    part = tracker.empty
                    page = _PAGE_FIELDS(event)
                    pages = tracker.pages
                    tail = pages.get(page) or pages.setdefault(page, tracker.page_tail(page))
                    head = tracker.view
                if part is not None:
                    second, fraction = divmod(ms, 1000)
                    stamp = _SECONDS.get(second)
                    if stamp is None:
                        if len(_SECONDS) >= 65_536:
                            _SECONDS.clear()
                        stamp = _dumps(_fromtimestamp(second, UTC))[1:20].decode()
                        _SECONDS[second] = stamp
                    if not canonical and (len(eid) != 36 or eid.lower() != eid):
                        assert identifiers is not None
                        eid = str(identifiers[index])  # as orjson writes a UUID
                    # The tracker's group and session made once it has a record, as
                    # _Group.add would make them.
                    found, items = tracker.group, tracker.items
                    if found is None or items is None:
                        found = tracker.group = group(_BEHAVIOR, tracker.aid, tracker.stm)
                        items = tracker.items = found.sessions.setdefault(tracker.session, [])
                    found.count += 1
                    items.append(
                        (
                            index,
                            _Fragment(
                                f'{{"event_id":"{eid}{head}{stamp}{_FRACTION[fraction]}{part}{tail}'
                            ),
                        )
                    )
                    continue
        aid = event.aid or ""
        stm = event.stm or ""
        identifier = _uuid(eid) if identifiers is None else identifiers[index]
        try:
            records: list[MappedEvent] | None = _fast(shops[aid], event, identifier, known)
            if records is None:
                if payloads is None:
                    payloads = _PAYLOAD_DATA.decode(body).data
                records = reference_mapped(shops[aid], payloads[index])
        except collector.EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
            continue
        if len(records) == 1 and type(record := records[0]) is dict:  # the usual
            if target is None or last != (aid, stm):
                last, target = (aid, stm), group(_BEHAVIOR, aid, stm)
                kept, latest = target.kept, target.received.latest
                plain = target.view.behavior_context
                sessions = target.sessions
            time = record["timestamp"]
            if kept and time is not None and time <= latest:
                # Stored as it came: the fields gain the request's, and the context.
                target.count += 1
                record["shop_id"] = target.shop.id
                record["received_at"] = received_at
                metadata = record["metadata"]
                if metadata.keys().isdisjoint(SESSION_FACTS):
                    record[CONTEXT] = plain
                else:
                    record[CONTEXT] = target.view.with_facts(metadata)
                sessions.setdefault(record["session_id"], []).append((index, record))
            else:
                target.add(index, record, times)
            continue
        for mapped in records:
            if is_behavior(mapped):
                group(_BEHAVIOR, aid, stm).add(index, mapped, times)
            else:
                group(_STOREFRONT, aid, stm).valid.append((index, mapped))
        made += len(records) - 1
    by_stream: dict[str, list[tuple[bytes, bytes]]] = {}
    accepted = 0
    for (stream, _, _), found in groups.items():
        messages, taken = found.messages(stream, times, rejected, settings.max_record_bytes)
        by_stream.setdefault(stream, []).extend(messages)
        accepted += taken
    return await deliver_streams(request, KIND, by_stream, accepted, rejected, made)


Groups = dict[tuple[str, Shop, datetime | None], list[tuple[int, MappedEvent]]]


async def deliver_groups(
    request: web.Request,
    kind: str,
    groups: Groups,
    rejected: list[dict[str, Any]],
    received_at: datetime,
    *,
    derived: int = 0,
) -> web.Response:
    """Enrich and deliver valid events grouped by (stream, shop, client send time) as the
    native endpoints do (``app._records``, the Delivery), and answer the batch.
    ``derived`` records of the groups were made by the protocol beside the events sent
    (not counted as accepted)."""
    settings = request.app[collector.SETTINGS]
    by_stream: dict[str, list[tuple[bytes, bytes]]] = {}
    accepted = 0
    for (stream, shop, sent_at), valid in groups.items():
        received = Received.of(request, settings, sent_at, received_at)
        messages, taken = collector._records(
            stream,
            valid,
            shop,
            received,
            request.app[collector.TIMES],
            rejected,
            settings.max_record_bytes,
        )
        by_stream.setdefault(stream, []).extend(messages)
        accepted += taken
    return await deliver_streams(request, kind, by_stream, accepted, rejected, derived)


@functools.cache
def _accepted(kind: str) -> Counter:
    """``eventpipe_events_accepted_total`` of ``kind`` (looked up once: ``labels`` was a
    request's microseconds)."""
    return metrics.EVENTS_ACCEPTED.labels(kind)


async def deliver_streams(
    request: web.Request,
    kind: str,
    by_stream: dict[str, list[tuple[bytes, bytes]]],
    accepted: int,
    rejected: list[dict[str, Any]],
    derived: int = 0,
) -> web.Response:
    """Deliver the Kafka records of each stream and answer the batch, as the tracker
    protocols' routes answer (``deliver_groups``' end, and the fast paths' of Snowplow
    and PostHog): ``accepted`` events with ``derived`` made beside them."""
    settings = request.app[collector.SETTINGS]
    for stream, messages in by_stream.items():
        if not messages:
            continue
        try:
            await request.app[collector.DELIVERY].deliver(
                kind, settings.topic_for(stream), messages
            )
        except Unavailable as exc:
            raise collector.Refused(
                503, "event broker unavailable, retry later", {"Retry-After": "5"}
            ) from exc
    accepted = max(0, accepted - derived)
    _accepted(kind).inc(accepted)
    rejected.sort(key=lambda r: int(r["index"]))
    status = 200 if accepted or not rejected else 400
    return collector._json({"accepted": accepted, "rejected": rejected}, status)


async def post_tp2(request: web.Request) -> web.StreamResponse:
    """``POST /com.snowplowanalytics.snowplow/tp2``: a ``payload_data`` batch of events."""
    return await _tp2(request, datetime.now(UTC), fast=True)


async def _tp2(request: web.Request, received_at: datetime, *, fast: bool) -> web.StreamResponse:
    """``post_tp2`` received at ``received_at``; ``fast`` False: by the reference alone."""
    settings = request.app[collector.SETTINGS]
    try:
        raw = await collector.read_raw(request)
        async with collector._decode_slot(request):
            body = collector.inflate(request, raw)
            collector._check_values(body, settings.max_json_values)
            tracked = _tracked(body, settings.max_event_bytes) if fast else None
            response: web.StreamResponse
            if tracked is not None:
                collector.check_count(len(tracked), settings)
                response = await _accept_fast(request, tracked, body, received_at)
            else:
                try:
                    data = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise collector.Refused(400, f"body is not JSON: {exc}") from exc
                del body
                payloads = data.get("data") if isinstance(data, dict) else None
                if not isinstance(payloads, list):
                    raise collector.Refused(
                        400, 'body is not payload_data: {"schema": ..., "data": [events]}'
                    )
                collector.check_count(len(payloads), settings)
                response = await accept(request, payloads, received_at)
    except collector.Refused as exc:
        response = collector._json({"error": exc.reason}, exc.status, exc.headers)
    return cors(request, response)


async def get_pixel(request: web.Request) -> web.StreamResponse:
    """``GET /i``: one event in the query string, answered with a 1x1 GIF."""
    received_at = datetime.now(UTC)
    status = 200
    try:
        fields = dict(request.query)
        if fields:  # a bare GET /i (a health probe) stores nothing
            async with collector._decode_slot(request):
                answer = await accept(request, [fields], received_at)
            if answer.status != 200:
                metrics.EVENTS_REJECTED.labels(KIND, "pixel_refused").inc()
    except collector.Refused as exc:
        metrics.EVENTS_REJECTED.labels(KIND, "pixel_refused").inc()
        # Browsers ignore an image's status; a server tracker retries these two.
        status = exc.status if exc.status in (429, 503) else 200
    response = web.Response(
        body=PIXEL,
        status=status,
        content_type="image/gif",
        headers={"Cache-Control": "no-store, no-cache, max-age=0"},
    )
    return cors(request, response)


def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """CORS as Snowplow's collector answers: the origin echoed, with credentials (the
    browser tracker posts ``withCredentials`` by default)."""
    origin = printable_ascii(request.headers.get("Origin"))
    response.headers["Access-Control-Allow-Origin"] = origin or "*"
    if origin:
        response.headers["Access-Control-Allow-Credentials"] = "true"
    response.headers["Vary"] = "Origin"
    return response


async def preflight(request: web.Request) -> web.StreamResponse:
    """CORS preflight of the tracker routes."""
    asked = printable_ascii(request.headers.get("Access-Control-Request-Headers"))
    response = web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
            "Access-Control-Allow-Headers": asked[:4096] if asked else "Content-Type",
            "Access-Control-Max-Age": "86400",
        },
    )
    return cors(request, response)


def paths(alias: str | None) -> tuple[list[str], list[str]]:
    """(POST paths, GET paths) of the protocol, the configured alias among them."""
    posts, gets = [POST_PATH], [GET_PATH]
    if alias:
        alias = "/" + alias.strip("/")
        posts.append(alias)
        gets.append(alias)
    return posts, gets


def add_routes(app: web.Application) -> None:
    """Register the tracker protocol's routes on the collector's application."""
    posts, gets = paths(app[collector.SETTINGS].snowplow_path_alias)
    for path in posts:
        app.router.add_post(path, post_tp2)
        app.router.add_route("OPTIONS", path, preflight)
    for path in gets:
        app.router.add_get(path, get_pixel)
