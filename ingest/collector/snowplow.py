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
import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from ingest.collector import app as collector
from ingest.collector.delivery import Unavailable
from ingest.collector.enrich import Received
from ingest.collector.models import BehaviorEvent, StorefrontEvent
from ingest.core import metrics, streams
from ingest.core.headers import printable_ascii
from ingest.core.shops import Shop

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
    if x and width.isdigit() and height.isdigit() and len(width) < 7 and len(height) < 7:
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
    ids = {
        name: fields[key][:256]
        for key, name in (
            ("aid", "app_id"),
            ("p", "platform"),
            ("tv", "tracker"),
            ("tna", "namespace"),
            ("duid", "anon_id"),
            ("uid", "user_id"),
            ("vid", "visit"),
            ("tz", "timezone"),
        )
        if fields.get(key)
    }
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


async def accept(request: web.Request, payloads: list[Any], received_at: datetime) -> web.Response:
    """Authenticate, map and deliver the events of one request."""
    settings = request.app[collector.SETTINGS]
    limiter = request.app[collector.LIMITER]
    rejected: list[dict[str, Any]] = []
    shops: dict[str, Shop] = {}
    # (stream, aid, stm) -> the valid events of one shop sent at one time.
    groups: dict[tuple[str, str, str], list[tuple[int, BehaviorEvent | StorefrontEvent]]] = {}
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
    for _, fields in events:  # every app id known before anything is taken
        await _shop(request, fields.get("aid"), shops)
    client = collector.client_identity(request)
    for key in shops:
        if (wait := limiter.take(printable_ascii(key) or "", client)) > 0:
            raise collector._limited(wait)
    for index, fields in events:
        try:
            shop = shops[fields.get("aid") or ""]
            event = to_event(shop, fields)
            extras = derived(shop, fields, event)  # an event whose extras fail is rejected
        except collector.EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
            continue
        for made_event in (event, *extras):
            stream = (
                streams.BEHAVIOR.name
                if isinstance(made_event, BehaviorEvent)
                else streams.STOREFRONT.name
            )
            group = (stream, fields.get("aid") or "", fields.get("stm") or "")
            groups.setdefault(group, []).append((index, made_event))
        made += len(extras)
    received = {stm: _ms(stm) for _, _, stm in groups}
    return await deliver_groups(
        request,
        KIND,
        {
            (stream, shops[aid], received[stm]): valid
            for (stream, aid, stm), valid in groups.items()
        },
        rejected,
        received_at,
        derived=made,
    )


Groups = dict[tuple[str, Shop, datetime | None], list[tuple[int, BehaviorEvent | StorefrontEvent]]]


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
    metrics.EVENTS_ACCEPTED.labels(kind).inc(accepted)
    rejected.sort(key=lambda r: int(r["index"]))
    status = 200 if accepted or not rejected else 400
    return collector._json({"accepted": accepted, "rejected": rejected}, status)


async def post_tp2(request: web.Request) -> web.StreamResponse:
    """``POST /com.snowplowanalytics.snowplow/tp2``: a ``payload_data`` batch of events."""
    received_at = datetime.now(UTC)
    settings = request.app[collector.SETTINGS]
    try:
        raw = await collector.read_raw(request)
        async with collector._decode_slot(request):
            body = collector.inflate(request, raw)
            collector._check_values(body, settings.max_json_values)
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
            if len(payloads) > settings.max_events_per_batch:
                raise collector.Refused(
                    413,
                    f"batch has {len(payloads)} events, max_events_per_batch="
                    f"{settings.max_events_per_batch}",
                )
            response: web.StreamResponse = await accept(request, payloads, received_at)
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
