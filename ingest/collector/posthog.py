"""PostHog's capture API: ``/e/``, ``/i/v0/e/``, ``/capture/``, ``/batch/``, ``/track/``.

Sites that run posthog-js or a PostHog server SDK set its ``api_host`` to this
collector and its project key to a write key. Bodies as the SDKs send them:
one event, an array, or ``{"api_key"|"token", "batch": [...], "sent_at"}``;
gzip (found by its magic bytes, whatever the headers say: posthog-js sends
``text/plain`` gzip), ``compression=lz64`` / ``lz-string`` (lz-string's
base64 form), ``compression=base64``, form posts ``data=<base64 JSON>`` and
``GET ...?data=``. Every decoding is bounded by ``max_decompressed_bytes``:
gzip is inflated at most that far, base64 is at most 3/4 of a bounded body,
and lz-string is decoded by :func:`lz_decompress_base64`, which counts what it
has produced after every code and stops past the limit (the ``lzstring``
package has no bound: LZW output grows quadratically with its input, so a
1 MiB body can claim gigabytes, and no ratio check on the compressed size is
sound). ``beacon=1`` is answered 204.

What an event becomes (``properties`` ``P``):

* ``$pageview`` -> behavior ``page_view``; ``$autocapture`` with
  ``$event_type`` click -> ``click`` (submit -> ``form_submit``, change ->
  ``form_start``), the element from ``$elements`` / ``$elements_chain``
  (path ``tag#id.class > ...`` from the root as the beacon writes it, the
  target's text and tag); ``$rageclick`` -> ``rage_click``; ``$exception`` ->
  ``error``; ``$pageleave`` -> ``scroll_depth`` (``final``, the share of the page
  seen, the time on it), so that the session's exit page is the page left.
  ``P.$current_url`` is the page (a behavior event without one is kept as a
  storefront event).
* ``$identify`` / ``$create_alias`` -> the records of ``identities``.
* Everything else (custom events, ``$groupidentify``, ...) -> a storefront
  event named as the event, ``props`` the properties (the token removed),
  ``product_id`` / ``experiment_id`` / ``variant`` from properties of those
  names.
* ``distinct_id`` -> ``anon_id``; ``P.$session_id`` -> ``session_id`` (else
  ``<distinct_id>/<UTC day>``); ``uuid`` -> ``event_id`` (else the UUIDv5 of
  the event in the shop's namespace); the time is ``timestamp``, else
  ``sent_at`` (or the receive time) minus ``offset`` ms, corrected by the skew
  rule with the body's ``sent_at``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import re
import uuid
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import orjson
import pydantic
from aiohttp import web

from ingest.collector import app as collector
from ingest.collector import snowplow
from ingest.collector.enrich import (
    SESSION_FACTS,
    AssignedTimes,
    Received,
    behavior_fields_record,
)
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
from ingest.core.records import RECORD_BYTES
from ingest.core.shops import Shop

KIND = "posthog"  # the stream label of this API's metrics
CAPTURE_PATHS = ("/e/", "/i/v0/e/", "/capture/", "/batch/", "/track/")
CONFIG_PATHS = ("/decide/", "/flags/")
REMOTE_CONFIG_PATHS = ("/array/{token}/config", "/array/{token}/config.js")
FORM = "application/x-www-form-urlencoded"
GZIP_MAGIC = b"\x1f\x8b"
AUTOCAPTURE = {"click": "click", "submit": "form_submit", "change": "form_start"}


class LzError(ValueError):
    """lz-string text that cannot be decoded, or decodes past the limit."""


_LZ_VALUES = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")}
_LZ_VALUES.update({str(d): 52 + d for d in range(10)})
_LZ_VALUES.update({"+": 62, "/": 63, "=": 64, "-": 62, "$": 64})  # and the URI-safe alphabet


def lz_decompress_base64(text: str, limit: int) -> str:
    """lz-string's ``decompressFromBase64`` (the reference algorithm, as the ``lzstring``
    package implements it), stopping with ``LzError`` once more than ``limit``
    characters are produced: the dictionary holds at most what was produced, so
    memory stays within a few times ``limit`` whatever the input claims."""
    try:
        values = [_LZ_VALUES[c] for c in text.replace(" ", "+").strip()]
    except KeyError as exc:
        raise LzError("not lz-string base64 text") from exc
    length = len(values)
    if not length:
        return ""
    position, val, index = 32, values[0], 1

    def bits(count: int) -> int:
        nonlocal position, val, index
        out, power = 0, 1
        for _ in range(count):
            resb = val & position
            position >>= 1
            if position == 0:
                position = 32
                val = values[index] if index < length else 0
                index += 1
            if resb:
                out |= power
            power <<= 1
        return out

    dictionary: dict[int, str] = {}
    enlarge_in, dict_size, num_bits = 4, 4, 3
    first = bits(2)
    if first == 2:
        return ""
    if first not in (0, 1):
        raise LzError("lz-string text does not start with a literal")
    w = chr(bits(8 if first == 0 else 16))
    dictionary[3] = w
    result, produced = [w], 1
    while True:
        if index > length:
            raise LzError("lz-string text is truncated")
        code = bits(num_bits)
        if code in (0, 1):
            dictionary[dict_size] = chr(bits(8 if code == 0 else 16))
            code = dict_size
            dict_size += 1
            enlarge_in -= 1
        elif code == 2:
            return "".join(result)
        if enlarge_in == 0:
            enlarge_in = 1 << num_bits
            num_bits += 1
        if code in dictionary:
            entry = dictionary[code]
        elif code == dict_size:
            entry = w + w[0]
        else:
            raise LzError("lz-string text is corrupt")
        produced += len(entry)
        if produced > limit:
            raise LzError(f"larger than max_decompressed_bytes={limit} once decompressed")
        result.append(entry)
        dictionary[dict_size] = w + entry[0]
        dict_size += 1
        enlarge_in -= 1
        w = entry
        if enlarge_in == 0:
            enlarge_in = 1 << num_bits
            num_bits += 1


def _gunzip(raw: bytes, limit: int) -> bytes:
    """``raw`` inflated, at most ``limit`` bytes (a bomb is refused, never inflated)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise collector.Refused(400, f"body is not valid gzip: {exc}") from exc
    if len(body) > limit or inflater.unconsumed_tail:
        raise collector.Refused(
            413, f"body larger than max_decompressed_bytes={limit} once decompressed"
        )
    if not inflater.eof:
        raise collector.Refused(400, "gzip body is truncated")
    return body


def _base64(text: bytes | str) -> bytes:
    data = text.encode("latin-1") if isinstance(text, str) else text
    data = data.strip().replace(b" ", b"+").replace(b"-", b"+").replace(b"_", b"/")
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise collector.Refused(400, "data is not base64") from exc


async def _decoded(payload: bytes, compression: str, limit: int) -> bytes:
    """The JSON text of a body or ``data`` value, decoded as ``compression`` and its
    bytes say, within ``limit``."""
    if compression in ("lz64", "lz-string", "lz"):
        try:
            text = payload.decode("latin-1")
            # The decoder is plain Python: off the event loop, so other requests go on.
            decoded = await asyncio.to_thread(lz_decompress_base64, text, limit)
            # lz-string works on UTF-16 code units: pairs of surrogates are one character.
            payload = decoded.encode("utf-16-le", "surrogatepass").decode("utf-16-le").encode()
        except LzError as exc:
            status = 413 if "max_decompressed" in str(exc) else 400
            raise collector.Refused(status, f"body is not lz-string: {exc}") from exc
        except UnicodeError as exc:
            raise collector.Refused(400, "lz-string body is not text") from exc
    elif compression == "base64" or (
        payload[:1] not in (b"{", b"[", b" ", b"\n") and _looks_base64(payload)
    ):
        payload = _base64(payload)
    if payload[:2] == GZIP_MAGIC:  # gzip-js, or gzip without a Content-Encoding
        payload = _gunzip(payload, limit)
    if len(payload) > limit:
        raise collector.Refused(
            413, f"body larger than max_decompressed_bytes={limit} once decoded"
        )
    return payload


def _looks_base64(payload: bytes) -> bool:
    """A ``data=`` value that is not JSON nor gzip: base64 (posthog-js's beacon fallback)."""
    return bool(payload) and payload[:2] != GZIP_MAGIC


async def _body(request: web.Request) -> tuple[bytes, str]:
    """(JSON text, compression) of a capture request, every decoding bounded."""
    settings = request.app[collector.SETTINGS]
    limit = settings.max_decompressed_bytes
    compression = (request.query.get("compression") or "").strip().lower()
    if request.method == "GET":
        data = request.query.get("data")
        if data is None:
            raise collector.Refused(400, "a GET capture needs data=")
        return await _decoded(data.encode("latin-1", "replace"), compression, limit), compression
    media = request.content_type.lower() if request.headers.get("Content-Type") else ""
    if media not in collector.ACCEPTED_TYPES and media != FORM:
        raise collector.Refused(415, f"Content-Type {media} not accepted")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise collector.Refused(
            413, f"body larger than max_body_bytes={settings.max_body_bytes}"
        ) from exc
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        raise collector.Refused(415, f"Content-Encoding {encoding} not accepted: use gzip or none")
    if raw[:2] == GZIP_MAGIC:
        raw = _gunzip(raw, limit)
    if media == FORM or raw[:5] == b"data=":
        try:
            form = parse_qs(raw.decode("latin-1"), max_num_fields=20)
        except ValueError as exc:
            raise collector.Refused(400, f"form body is not a form: {exc}") from exc
        compression = (form.get("compression") or [compression])[0].strip().lower()
        if not form.get("data"):
            raise collector.Refused(400, "a form post needs data=")
        return await _decoded(
            form["data"][0].encode("latin-1", "replace"), compression, limit
        ), compression
    if compression in ("lz64", "lz-string", "lz", "base64"):
        return await _decoded(raw, compression, limit), compression
    return raw, compression


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _key_of(data: dict[str, Any]) -> str | None:
    for name in ("api_key", "token"):
        if isinstance(data.get(name), str):
            return str(data[name])
    properties = data.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get("token"), str):
        return str(properties["token"])
    return None


def _elements(properties: dict[str, Any]) -> list[dict[str, Any]]:
    """The autocaptured elements, target first: ``$elements``, else ``$elements_chain``."""
    elements = properties.get("$elements")
    if isinstance(elements, list):
        return [e for e in elements if isinstance(e, dict)]
    chain = properties.get("$elements_chain")
    return _parse_chain(chain) if isinstance(chain, str) else []


# Chains up to this long are remembered (a site's clicks repeat a few hundred
# chains; the bound keeps the cache's memory to a few MB whatever is sent).
_CACHED_CHAIN_CHARS = 2048


def _autocaptured(properties: dict[str, Any]) -> dict[str, Any]:
    """The element fields of an autocaptured event (``_element_fields`` of its
    elements). A chain's are worked out once and remembered: parsing it was half of a
    PostHog batch's handling (benchmarks/profile_collector.py). The dict returned is
    shared: callers copy it (``**``), never change it."""
    chain = properties.get("$elements_chain")
    if (
        not isinstance(properties.get("$elements"), list)
        and isinstance(chain, str)
        and len(chain) <= _CACHED_CHAIN_CHARS
    ):
        return _chain_fields(chain)
    return _element_fields(_elements(properties))


@functools.lru_cache(maxsize=4096)
def _chain_fields(chain: str) -> dict[str, Any]:
    return _element_fields(_parse_chain(chain))


def _parse_chain(chain: str) -> list[dict[str, Any]]:
    """posthog's ``$elements_chain``: ``tag.c1.c2:attr__id="x"text="t"nth-child="1";parent...``."""
    out: list[dict[str, Any]] = []
    for part in _split_unquoted(chain[:16384], ";")[:64]:
        head, _, rest = part.partition(":")
        tag, *classes = head.split(".")
        element: dict[str, Any] = {"tag_name": tag, "attr__class": classes}
        for name, value in _attributes(rest):
            if name == "text":
                element["$el_text"] = value
            else:
                element[name] = value
        out.append(element)
    return out


def _split_unquoted(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p]


def _attributes(text: str) -> list[tuple[str, str]]:
    out, index = [], 0
    while index < len(text):
        equals = text.find('="', index)
        if equals < 0:
            break
        name = text[index:equals]
        end, value = equals + 2, []
        while end < len(text) and text[end] != '"':
            if text[end] == "\\" and end + 1 < len(text):
                end += 1
            value.append(text[end])
            end += 1
        out.append((name, "".join(value)))
        index = end + 1
    return out


def _element_fields(elements: list[dict[str, Any]]) -> dict[str, Any]:
    if not elements:
        return {}
    parts = []
    for element in reversed(elements[:64]):  # from the root down to the target
        tag = element.get("tag_name")
        part = tag if isinstance(tag, str) and tag else "*"
        element_id = element.get("attr__id") or element.get("attr_id")
        if isinstance(element_id, str) and element_id:
            part += f"#{element_id}"
        classes = element.get("attr__class") or element.get("classes")
        if isinstance(classes, str):
            classes = classes.split()
        if isinstance(classes, list):
            part += "".join(f".{c}" for c in classes[:2] if isinstance(c, str) and c)
        parts.append(part)
    path = " > ".join(parts)
    target = elements[0]
    tag, text = target.get("tag_name"), target.get("$el_text")
    target_id = target.get("attr__id")
    return {
        "element_path": path[-512:],
        "element_type": tag[:256] if isinstance(tag, str) and tag else None,
        "element_text": text[:100] if isinstance(text, str) and text else None,
        "component_id": target_id[:256] if isinstance(target_id, str) and target_id else None,
    }


def _text(value: Any, limit: int = 256) -> str | None:
    if value is None:  # the usual cases first: absent, or a string
        return None
    if type(value) is str:
        return value[:limit] or None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)[:limit] or None


def _event_id(shop: Shop, raw: dict[str, Any]) -> uuid.UUID:
    given = raw.get("uuid")
    if isinstance(given, str):
        with_id = _uuid(given)
        if with_id is not None:
            return with_id
    digest = hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return uuid.uuid5(uuid.uuid5(shop.id, KIND), f"sha256:{digest}")


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def to_event(
    shop: Shop, raw: dict[str, Any], sent_at: datetime | None, received_at: datetime
) -> BehaviorEvent | StorefrontEvent:
    """The collector's event of one PostHog event (EventRejected when it can't be one)."""
    name = raw.get("event")
    if not isinstance(name, str) or not name:
        raise collector.EventRejected("invalid", "event: the event name is required")
    properties = raw.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        raise collector.EventRejected("invalid", "properties must be an object")
    distinct = _text(raw.get("distinct_id")) or _text(properties.get("distinct_id"))
    if not distinct:
        raise collector.EventRejected("invalid", "distinct_id is required")
    at = _time(raw.get("timestamp"))
    offset = raw.get("offset")
    try:
        if (
            at is None
            and isinstance(offset, int)
            and not isinstance(offset, bool)
            and 0 <= offset < 10**10
        ):
            at = (sent_at or received_at) - timedelta(milliseconds=offset)
        day = (at or received_at).astimezone(UTC).date().isoformat()
    except OverflowError as exc:  # a time of year 1 or 9999 whose UTC day is out of range
        raise collector.EventRejected("invalid", "timestamp: out of range") from exc
    identifier = _event_id(shop, raw)
    session = (_text(properties.get("$session_id")) or f"{distinct}/{day}")[:256]
    url = _text(properties.get("$current_url"), 4096)
    behavior: dict[str, Any] | None = None
    if name == "$pageview":
        width, height = properties.get("$screen_width"), properties.get("$screen_height")
        behavior = {
            "event_type": "page_view",
            "metadata": {
                "referrer": _text(properties.get("$referrer"), 1024),
                "language": _text(properties.get("$browser_language")),
                "screen_resolution": f"{width}x{height}"
                if isinstance(width, int) and isinstance(height, int)
                else None,
                "title": _text(properties.get("title"), 4096),
            },
        }
    elif (
        name == "$autocapture"
        # Only a string can be a kind (a list was looked up in the dict: a crash).
        and isinstance(kind := properties.get("$event_type"), str)
        and kind in AUTOCAPTURE
    ):
        behavior = {
            "event_type": AUTOCAPTURE[kind],
            **_autocaptured(properties),
        }
    elif name == "$rageclick":
        behavior = {"event_type": "rage_click", **_autocaptured(properties)}
    elif name == "$pageleave":
        # No behavior type is "left the page"; the beacon sends the page's final scroll
        # depth when it is left, and posthog-js's leave carries the same (the share of
        # the page scrolled): a leave is that row, so user_sessions' exit page and last
        # seen are the page left and when (the sessions upsert takes the latest row).
        behavior = {"event_type": "scroll_depth", "event_data": _leave(properties)}
    elif name == "$exception":
        exceptions = properties.get("$exception_list")
        first = exceptions[0] if isinstance(exceptions, list) and exceptions else {}
        first = first if isinstance(first, dict) else {}
        behavior = {
            "event_type": "error",
            "event_data": {
                "type": _text(first.get("type") or properties.get("$exception_type")),
                "message": _text(first.get("value") or properties.get("$exception_message"), 1000),
            },
        }
    if behavior is not None and url:
        viewport = (properties.get("$viewport_width"), properties.get("$viewport_height"))
        behavior.setdefault("event_data", {})
        behavior["metadata"] = {
            **behavior.get("metadata", {}),
            "anon_id": distinct,
            "event": name,
        }
        return collector.validated(
            BehaviorEvent,
            {
                "event_id": identifier,
                "session_id": session,
                "page_url": url,
                "timestamp": at,
                "viewport_size": {"width": viewport[0], "height": viewport[1]}
                if all(isinstance(v, int) and not isinstance(v, bool) for v in viewport)
                else None,
                **behavior,
            },
        )
    props = {k: v for k, v in properties.items() if k != "token"}
    for extra in ("$set", "$set_once"):
        if isinstance(raw.get(extra), dict):
            props[extra] = raw[extra]
    identity = _identity(name, distinct, properties, raw)
    if identity is not None:
        return collector.validated(
            StorefrontEvent,
            {"event_id": identifier, "session_id": session, "ts": at, **identity},
        )
    variant = properties.get("variant")
    return collector.validated(
        StorefrontEvent,
        {
            "event_id": identifier,
            "event_type": name[:256],
            "anon_id": distinct,
            "session_id": session,
            "ts": at,
            "props": props,
            "product_id": _text(properties.get("product_id")),
            "experiment_id": _text(properties.get("experiment_id")),
            "variant": _text(variant),
        },
    )


def _leave(properties: dict[str, Any]) -> dict[str, Any]:
    """A ``$pageleave``'s scroll depth: ``percentage`` the most of the page seen
    (``$prev_pageview_max_scroll_percentage``, a fraction), ``duration_ms`` the time
    on the page (``$prev_pageview_duration``, seconds), ``final`` as the beacon's."""
    data: dict[str, Any] = {"final": True, "left": True}
    seen = _fraction(properties.get("$prev_pageview_max_scroll_percentage"))
    if seen is not None:
        data["percentage"] = round(seen * 100)
    duration = properties.get("$prev_pageview_duration")
    if isinstance(duration, int | float) and not isinstance(duration, bool) and 0 <= duration < 1e9:
        data["duration_ms"] = round(duration * 1000)
    return data


def _fraction(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    return None


def _identity(
    name: str, distinct: str, properties: dict[str, Any], raw: dict[str, Any]
) -> dict[str, Any] | None:
    """PostHog's identity events as the records the loaders turn into ``identities``
    (the shape ``ingest.collector.segment`` gives identify, alias and group), or None.

    ``$identify``: the anonymous id (``$anon_distinct_id``) now known as the user
    ``distinct_id``, traits from ``$set``/``$set_once``; ``$create_alias``: the
    ``distinct_id`` so far now known as ``alias``. ``$groupidentify`` names a group,
    not a visitor (posthog-python sends it as ``$<type>_<key>``): it stays an event.
    """
    if name == "$identify":
        traits: dict[str, Any] = {}
        for found in (raw.get("$set_once"), properties.get("$set"), raw.get("$set")):
            if isinstance(found, dict):  # later ones win, as PostHog applies them
                traits.update(found)
        anon = _text(properties.get("$anon_distinct_id")) or distinct
        return {
            "event_type": "$identify",
            "anon_id": anon,
            "user_id": _text(distinct),
            "props": {"traits": traits},
        }
    if name == "$create_alias" and _text(properties.get("alias")):
        # posthog-python's alias(previous_id, distinct_id) and posthog-js's alias(alias)
        # send the id known so far as distinct_id and the id it becomes as ``alias``
        return {
            "event_type": "$alias",
            "anon_id": distinct,
            "user_id": _text(properties.get("alias")),
            "props": {"traits": {}},
        }
    return None


# The fast path of a batch. ``to_event`` and the per-event checks of ``_accept`` are
# the reference, kept and used by ``_accept(reference=True)``; what follows gives the
# same events, answers and records (tests/ingest/collector/test_posthog_fast.py
# compares them on many inputs) for a fraction of the CPU: every step of the
# reference costs a few microseconds an event, and a PostHog batch has dozens.

# What to_event gives model_validate, by kind of storefront event (the fields it sets).
_STOREFRONT_GIVEN = frozenset(
    {"event_id", "event_type", "anon_id", "session_id", "ts", "props"}
    | {"product_id", "experiment_id", "variant"}
)
_IDENTITY_GIVEN = frozenset(
    {"event_id", "session_id", "ts", "event_type", "anon_id", "user_id", "props"}
)
_Element = tuple[str | None, str | None, str | None, str | None]


def _element_tuple(fields: dict[str, Any]) -> _Element:
    """(path, type, text, component id) of ``_element_fields``' answer (None: no element)."""
    return (
        fields.get("element_path"),
        fields.get("element_type"),
        fields.get("element_text"),
        fields.get("component_id"),
    )


@functools.lru_cache(maxsize=4096)
def _chain_element(chain: str) -> _Element:
    return _element_tuple(_chain_fields(chain))


def _fast_event(
    shop: Shop,
    raw: dict[str, Any],
    sent_at: datetime | None,
    received_at: datetime,
    identifier: uuid.UUID | str | None,
) -> StorefrontEvent | EventFields | None:
    """``to_event(shop, raw, sent_at, received_at)`` for the events SDKs send (a behavior
    event as its fields, ``EventFields``), or None when ``raw`` is not one of them (then
    the caller asks ``to_event``, which also gives the reasons of refusals).
    ``identifier``: the event's ``uuid`` already read (``_given_ids``), None to read it
    here, or its text when that is a UUID's own (``_given_texts``): a behavior event's
    fields then hold that text as its ``event_id``, which its record writes as it would
    write the UUID, and a storefront event's model the UUID. The usual case of each
    step (a string where one is expected) is written out rather than asked of ``_text``
    or ``_time``."""
    name = raw.get("event")
    properties = raw.get("properties")
    if type(name) is not str or not name or type(properties) is not dict:
        return None
    distinct = raw.get("distinct_id")
    if type(distinct) is not str or not distinct:
        if distinct is None:  # posthog-js sends it in the properties
            distinct = properties.get("distinct_id")
            if type(distinct) is not str or not distinct:
                distinct = _text(distinct)
        else:
            distinct = _text(distinct) or _text(properties.get("distinct_id"))
        if not distinct:
            return None
    distinct = distinct[:256]
    at: datetime | None = None
    given = raw.get("timestamp")
    if type(given) is str and 0 < len(given) <= 64:
        try:
            at = datetime.fromisoformat(given)
        except ValueError:
            pass
        else:
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
    if at is None:
        offset = raw.get("offset")
        if type(offset) is int and 0 <= offset < 10**10:
            base = sent_at or received_at
            if base.year == 1:
                return None  # the time offset ms before may be out of range
            at = base - timedelta(milliseconds=offset)
    if at is not None and not 1 < at.year < 9999:
        return None  # to_event works out its UTC day, which may be out of range
    if identifier is None:
        identifier = _event_id(shop, raw)
    session = properties.get("$session_id")
    if type(session) is str and session:
        session = session[:256]
    else:
        session = _text(session)
        if session is None:
            day = (at or received_at).astimezone(UTC).date().isoformat()
            session = f"{distinct}/{day}"[:256]
    url = properties.get("$current_url")
    url = (url[:4096] or None) if type(url) is str else _text(url, 4096)
    if url is not None:
        path = tag = text = component = None
        event_data: dict[str, Any] = {}
        metadata: dict[str, Any] | None = None
        event_type = ""
        if name == "$autocapture":
            kind = properties.get("$event_type")
            event_type = AUTOCAPTURE.get(kind, "") if type(kind) is str else ""
        elif name == "$pageview":
            event_type = "page_view"
            width, height = properties.get("$screen_width"), properties.get("$screen_height")
            metadata = {
                "referrer": _text(properties.get("$referrer"), 1024),
                "language": _text(properties.get("$browser_language")),
                "screen_resolution": f"{width}x{height}"
                if isinstance(width, int) and isinstance(height, int)
                else None,
                "title": _text(properties.get("title"), 4096),
                "anon_id": distinct,
                "event": name,
            }
        elif name == "$rageclick":
            event_type = "rage_click"
        elif name == "$pageleave":
            event_type = "scroll_depth"
            event_data = _leave(properties)
        elif name == "$exception":
            return None  # rare: to_event's
        if event_type:
            if name != "$pageview" and name != "$pageleave":  # autocaptured: an element
                chain = properties.get("$elements_chain")
                if (
                    type(properties.get("$elements")) is not list
                    and type(chain) is str
                    and len(chain) <= _CACHED_CHAIN_CHARS
                ):
                    path, tag, text, component = _chain_element(chain)
                else:
                    path, tag, text, component = _element_tuple(_autocaptured(properties))
            width, height = properties.get("$viewport_width"), properties.get("$viewport_height")
            # The event's fields (``models.EventFields``): no model is built for a
            # behavior event, ``app._records`` makes the record of the dict itself.
            return {
                "event_id": identifier,
                "event_type": event_type,
                "session_id": session,
                "page_url": url,
                "timestamp": at,
                "element_path": path,
                "element_type": tag,
                "element_text": text,
                "coordinates": None,
                "viewport_size": {"width": width, "height": height}
                if type(width) is int and type(height) is int
                else None,
                "event_data": event_data,
                "component_id": component,
                "metadata": metadata or {"anon_id": distinct, "event": name},
            }
    if type(identifier) is str:
        identifier = uuid.UUID(identifier)
    identity = _identity(name, distinct, properties, raw)
    if identity is not None:
        return trusted(
            StorefrontEvent,
            {
                "event_id": identifier,
                "event_type": identity["event_type"],
                "anon_id": identity["anon_id"],
                "session_id": session,
                "ts": at,
                "props": identity["props"],
                "product_id": None,
                "experiment_id": None,
                "variant": None,
                "user_id": identity["user_id"],
            },
            _IDENTITY_GIVEN,
        )
    props = dict(properties)
    props.pop("token", None)
    for extra in ("$set", "$set_once"):
        found = raw.get(extra)
        if type(found) is dict:
            props[extra] = found
    return trusted(
        StorefrontEvent,
        {
            "event_id": identifier,
            "event_type": name[:256],
            "anon_id": distinct,
            "session_id": session,
            "ts": at,
            "props": props,
            "product_id": _text(properties.get("product_id")),
            "experiment_id": _text(properties.get("experiment_id")),
            "variant": _text(properties.get("variant")),
            "user_id": None,
        },
        _STOREFRONT_GIVEN,
    )


_UUIDS = pydantic.TypeAdapter(list[uuid.UUID])
_NUL_ESCAPE = re.compile(rb"\\u0000")
# The events a batch of _given_texts may hold: those mapped to behavior events, whose
# fields take the text itself (a storefront event's model needs a UUID, made one by one).
_BEHAVIOR_NAMES = frozenset({"$pageview", "$autocapture", "$rageclick", "$pageleave"})


def _given_texts(events: list[dict[str, Any]]) -> list[str] | None:
    """Each event's ``uuid`` when every one is the text ``str`` writes a UUID as
    (8-4-4-4-12 lowercase hex digits: what ``_event_id`` reads it as, written as the
    record writes that UUID) and every event names a behavior event; else None
    (``_given_ids``). No UUID is made: a behavior event's record needs only its text."""
    given: list[Any] = [raw.get("uuid") for raw in events]
    try:
        joined = "".join(given)
        behavior = _BEHAVIOR_NAMES.issuperset([raw.get("event") for raw in events])
    except TypeError:  # a uuid that is not a string, an event name that is a list
        return None
    count = len(given)
    if not behavior or not count or len(joined) != 36 * count or max(map(len, given)) != 36:
        return None  # (every one 36 characters long, as their total is 36 each)
    hyphens = "-" * count
    return (
        given
        if joined[8::36] == hyphens
        and joined[13::36] == hyphens
        and joined[18::36] == hyphens
        and joined[23::36] == hyphens
        # nothing else but lowercase hex digits (a non-ASCII character encodes to others)
        and joined.encode().translate(None, b"0123456789abcdef") == b"-" * (4 * count)
        else None
    )


def _given_ids(events: list[dict[str, Any]]) -> list[uuid.UUID | None]:
    """Each event's ``uuid`` as ``_event_id`` reads it when it is written as UUIDs are
    (8-4-4-4-12 hex digits), else None (``_event_id`` decides): all parsed in one call
    into pydantic-core rather than one ``uuid.UUID`` each. The form is checked here:
    ``uuid.UUID`` and pydantic each accept other forms, not the same ones, but read
    this one alike (and pydantic refuses it when it is not hex)."""
    given: list[Any] = [raw.get("uuid") for raw in events]
    try:
        joined = "".join(given)  # the usual case, every one a string of 36 characters
    except TypeError:
        joined = ""
    if joined and len(joined) == 36 * len(given) and set(map(len, given)) == {36}:
        hyphens = "-" * len(given)
        if (
            joined[8::36] == hyphens
            and joined[13::36] == hyphens
            and joined[18::36] == hyphens
            and joined[23::36] == hyphens
        ):
            try:
                return list(_UUIDS.validate_python(given))
            except pydantic.ValidationError:
                pass
    canonical = [
        type(g) is str and len(g) == 36 and g[8] == g[13] == g[18] == g[23] == "-" for g in given
    ]
    try:
        parsed = iter(
            _UUIDS.validate_python([g for g, c in zip(given, canonical, strict=True) if c])
        )
    except pydantic.ValidationError:
        return [None] * len(given)
    return [next(parsed) if c else None for c in canonical]


def _all_encoded(data: Any, max_bytes: int) -> bool:
    """Whether every event of the decoded body ``data`` passes ``check_encoded``,
    from one encoding of the whole: each event's JSON is a part of it (orjson writes a
    value alike wherever it is), so no event's is larger, nor holds a NUL the whole
    does not. False: each is checked on its own."""
    try:
        encoded = orjson.dumps(data)
    except (orjson.JSONEncodeError, TypeError, ValueError, OverflowError):
        return False
    if len(encoded) > max_bytes:
        return False
    # has_nul, its search for "u0000" replaced by one for "\\u0000" (in any text it finds a
    # NUL in), quicker in a batch whose texts escape quotes, as autocaptured elements' do
    return b"\\" not in encoded or _NUL_ESCAPE.search(encoded) is None or not has_nul(encoded)


async def _shop(request: web.Request, key: str | None, shops: dict[str, Shop]) -> Shop:
    return await snowplow.shop_for(
        request,
        key,
        shops,
        kind=KIND,
        refusal="missing or unknown project key (api_key, token or properties.token)",
    )


def _checked(
    events: list[Any], shared_key: str | None, each: bool, max_bytes: int
) -> tuple[Sequence[int], list[Any], list[str | None], list[dict[str, Any]]]:
    """The events that are objects (each one's encoding checked on its own when ``each``),
    with their places and write keys, and the refusals of the others."""
    rejected: list[dict[str, Any]] = []
    if events and not each and shared_key is not None and all(type(r) is dict for r in events):
        # The usual batch: every event an object of the body's key, checked by the whole.
        return range(len(events)), events, [shared_key] * len(events), rejected
    positions: list[int] = []
    raws: list[Any] = []
    keys: list[str | None] = []
    for index, raw in enumerate(events):
        try:
            if not isinstance(raw, dict):
                raise collector.EventRejected("invalid", "event is not a JSON object")
            if each:
                collector.check_encoded(raw, max_bytes)
        except collector.EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
            continue
        positions.append(index)
        raws.append(raw)
        keys.append(shared_key or _key_of(raw))
    return positions, raws, keys, rejected


async def _taken(request: web.Request, keys: list[str | None]) -> dict[str, Shop]:
    """The shop of each write key (a 401 for an unknown one), a token of each taken from
    the rate limiter (a 429 when one has none)."""
    shops: dict[str, Shop] = {}
    for key in keys:
        if (key or "") not in shops:  # as shop_for would find it, without the call
            await _shop(request, key, shops)
    snowplow.take_tokens(request, shops)
    return shops


async def _accept(request: web.Request, *, reference: bool = False) -> web.Response:
    """Map and deliver the events of one capture request. ``reference``: each event
    checked and mapped on its own as the reference does (``check_encoded``,
    ``to_event``); otherwise the fast path (``_accept_fast``), which gives the same."""
    received_at = datetime.now(UTC)
    settings = request.app[collector.SETTINGS]
    async with collector._decode_slot(request):
        body, _ = await _body(request)
        collector._check_values(body, settings.max_json_values)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise collector.Refused(400, f"body is not JSON: {exc}") from exc
        del body
        shared_key, sent_at = None, None
        if isinstance(data, dict) and "batch" in data:
            shared_key, sent_at = _key_of(data), _time(data.get("sent_at"))
            events = data["batch"]
        elif isinstance(data, dict):
            events = [data]
        else:
            events = data
        if not isinstance(events, list):
            raise collector.Refused(400, "body is not an event, a list or a batch of events")
        collector.check_count(len(events), settings)
        max_bytes = settings.max_event_bytes
        each = reference or not _all_encoded(data, max_bytes)
        positions, raws, keys, rejected = _checked(events, shared_key, each, max_bytes)
        if not raws and not rejected:
            await _shop(request, shared_key or request.query.get("token"), {})
            return collector._json({"status": 1, "accepted": 0, "rejected": []})
        shops = await _taken(request, keys)
        if not reference:
            return await _accept_fast(
                request, positions, raws, keys, shops, rejected, sent_at, received_at
            )
        groups: snowplow.Groups = {}
        # The group of each (stream, key), found once: a group's key hashes its Shop.
        targets: dict[tuple[bool, str | None], list[tuple[int, MappedEvent]]] = {}
        for index, raw, key in zip(positions, raws, keys, strict=True):
            shop = shops[key or ""]
            try:
                event = to_event(shop, raw, sent_at, received_at)
            except collector.EventRejected as exc:
                rejected.append({"index": index, "reason": exc.reason})
                metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
                continue
            behavior = is_behavior(event)
            target = targets.get((behavior, key))
            if target is None:
                stream = streams.BEHAVIOR.name if behavior else streams.STOREFRONT.name
                target = targets[behavior, key] = groups.setdefault((stream, shop, sent_at), [])
            target.append((index, event))
        return await snowplow.deliver_groups(request, KIND, groups, rejected, received_at)


class _Behaviors:
    """A shop's behavior records of one fast-path request, by session (``app._records``'
    grouping), with what every record of it shares encoded once: ``orjson`` writes a
    ``Fragment`` as it is, so the records' bytes are those ``app._records`` makes."""

    __slots__ = (
        "context",
        "late",
        "plain",
        "received",
        "received_at",
        "sessions",
        "shop",
        "shop_id",
        "view",
    )

    def __init__(self, shop: Shop, received: Received) -> None:
        self.shop = shop
        self.received = received
        self.view = received.of_shop(shop)
        # No clock to correct and no bot to flag: a record is its fields, a time given
        # kept unless too far ahead, and the shared fields.
        self.plain = not received.skew and not self.view.bot
        self.shop_id = orjson.Fragment(orjson.dumps(shop.id))
        self.received_at = orjson.Fragment(orjson.dumps(received.at))
        self.context = orjson.Fragment(orjson.dumps(self.view.behavior_context))
        # Each session's events' indices and records, in the events' order.
        self.sessions: dict[str, tuple[list[int], list[dict[str, Any]]]] = {}
        self.late: list[dict[str, Any]] = []

    def add(self, index: int, event: BehaviorEvent | EventFields, times: AssignedTimes) -> None:
        """``app._records``' step for one event, as it is: what is not the usual case."""
        fields = event if type(event) is dict else vars(event).copy()
        if type(fields["event_id"]) is str:  # a _given_texts text: the UUID it stands for
            fields["event_id"] = uuid.UUID(fields["event_id"])
        received = self.received
        given = (
            None
            if fields["timestamp"]
            else times.time_for(self.shop, fields["event_id"], received.at)
        )
        try:
            record = behavior_fields_record(fields, self.shop, received, given, self.view)
        except (OverflowError, ValueError) as exc:
            self.late.append({"index": index, "reason": f"event cannot be stored: {exc}"})
            metrics.EVENTS_REJECTED.labels(streams.BEHAVIOR.name, "unencodable").inc()
            return
        indices, records = self.sessions.setdefault(record["session_id"], ([], []))
        indices.append(index)
        records.append(record)

    def messages(self, max_record_bytes: int) -> tuple[list[tuple[bytes, bytes]], int]:
        """(Kafka records, events accepted), as ``app._records`` answers."""
        out: list[tuple[bytes, bytes]] = []
        stream = streams.BEHAVIOR.name
        # Accepted: the events of the sessions (one refused while enriched is in none)
        # but those _encode refuses.
        taken, refused = 0, len(self.late)
        for session, (indices, records) in self.sessions.items():
            taken += len(indices)
            key = f"{self.shop.id}:{session}".encode()
            # app._encode's usual case (one record of the session's events) first
            try:
                value = orjson.dumps(records)
            except (orjson.JSONEncodeError, TypeError, ValueError, OverflowError):
                value = b""
            if value and len(value) <= min(RECORD_BYTES, max_record_bytes - len(key)):
                out.append((key, value))
            else:
                items = list(zip(indices, records, strict=True))
                out += collector._encode(key, items, stream, self.late, max_record_bytes)
        return out, taken - (len(self.late) - refused)


async def _accept_fast(
    request: web.Request,
    positions: Sequence[int],
    raws: list[Any],
    keys: list[str | None],
    shops: dict[str, Shop],
    rejected: list[dict[str, Any]],
    sent_at: datetime | None,
    received_at: datetime,
) -> web.Response:
    """``_accept``'s fast path, for the events ``_checked`` took (``raws``, at ``positions``
    in the batch, of write ``keys`` whose ``shops`` ``_taken`` found): what the reference
    gives (the same answer, the same records in the same order), its steps fused into
    one pass over the events. Each event is
    mapped by ``_fast_event`` (``to_event`` when it declines), and a behavior event's
    record is completed at once: the usual one (its fields, its time given and kept as
    it is, no bot flag) here, any other by ``enrich.behavior_fields_record`` as
    ``app._records`` does. The delivery is ``snowplow.deliver_groups``', the groups in
    the order of their first event."""
    settings = request.app[collector.SETTINGS]
    # The ids as written when a behavior event's record needs no more, else as UUIDs.
    ids: Sequence[uuid.UUID | str | None] = _given_texts(raws) or _given_ids(raws)
    times = request.app[collector.TIMES]
    # What the request's records share, made with its first group, as deliver_groups
    # makes it for each (none when every event is refused).
    received: Received | None = None
    latest = received_at
    # deliver_groups' groups, by (stream, shop) in the order of their first events (keys
    # of one shop share its groups), each found by (stream, key) after its first event:
    # hashing a Shop, a dataclass, costs more than the rest of an event's step.
    order: list[tuple[str, Shop, Received]] = []
    by_shop: dict[Shop, _Behaviors] = {}
    stored_by_shop: dict[Shop, list[tuple[int, MappedEvent]]] = {}
    behaviors: dict[str | None, _Behaviors] = {}
    storefronts: dict[str | None, list[tuple[int, MappedEvent]]] = {}
    # The behavior group of the last key, and what its records share, kept at hand: a
    # batch's events are usually all of one key.
    group: _Behaviors | None = None
    group_key: str | None = None
    plain, shop_id, received_json, context = False, None, None, None
    sessions: dict[str, tuple[list[int], list[dict[str, Any]]]] = {}
    shop_key, shop = None, None
    for index, raw, key, identifier in zip(positions, raws, keys, ids, strict=True):
        if shop is None or key != shop_key:
            shop_key, shop = key, shops[key or ""]
        try:
            fast = _fast_event(shop, raw, sent_at, received_at, identifier)
            event = to_event(shop, raw, sent_at, received_at) if fast is None else fast
        except collector.EventRejected as exc:
            rejected.append({"index": index, "reason": exc.reason})
            metrics.EVENTS_REJECTED.labels(KIND, exc.kind).inc()
            continue
        if type(event) is not dict and not isinstance(event, BehaviorEvent):
            stored = storefronts.get(key)
            if stored is None:
                stored = stored_by_shop.get(shop)
                if stored is None:
                    received = received or Received.of(request, settings, sent_at, received_at)
                    latest = received.latest
                    stored = stored_by_shop[shop] = []
                    order.append((streams.STOREFRONT.name, shop, received))
                storefronts[key] = stored
            stored.append((index, event))
            continue
        if group is None or key != group_key:
            group = behaviors.get(key)
            if group is None:
                group = by_shop.get(shop)
                if group is None:
                    received = received or Received.of(request, settings, sent_at, received_at)
                    latest = received.latest
                    group = by_shop[shop] = _Behaviors(shop, received)
                    order.append((streams.BEHAVIOR.name, shop, received))
                behaviors[key] = group
            group_key = key
            plain, sessions = group.plain, group.sessions
            shop_id, received_json, context = group.shop_id, group.received_at, group.context
        if plain and type(event) is dict:
            at = event["timestamp"]
            metadata = event["metadata"]
            if at is not None and at <= latest:  # a fast event's time has its zone
                if metadata.keys().isdisjoint(SESSION_FACTS):
                    event["shop_id"] = shop_id
                    event["received_at"] = received_json
                    event[streams.CONTEXT] = context
                elif not group.view.anonymous:  # the facts the page view tells, as enrich's
                    event["shop_id"] = shop_id
                    event["received_at"] = received_json
                    event[streams.CONTEXT] = group.view.with_facts(metadata)
                else:
                    group.add(index, event, times)
                    continue
                session = sessions.get(event["session_id"])
                if session is None:
                    session = sessions[event["session_id"]] = ([], [])
                session[0].append(index)
                session[1].append(event)
                continue
        group.add(index, event, times)
    by_stream: dict[str, list[tuple[bytes, bytes]]] = {}
    accepted = 0
    for stream, shop, shared in order:
        if stream == streams.STOREFRONT.name:
            messages, taken = collector._records(
                stream,
                stored_by_shop[shop],
                shop,
                shared,
                times,
                rejected,
                settings.max_record_bytes,
            )
        else:
            made = by_shop[shop]
            messages, taken = made.messages(settings.max_record_bytes)
            rejected += made.late
        by_stream.setdefault(stream, []).extend(messages)
        accepted += taken
    return await snowplow.deliver_streams(request, KIND, by_stream, accepted, rejected)


async def capture(request: web.Request) -> web.StreamResponse:
    """PostHog's capture routes: one event, a list, or a batch."""
    try:
        answer = await _accept(request)
        response: web.StreamResponse = answer
        if answer.status == 200:
            if request.query.get("beacon") == "1":
                response = web.Response(status=204)
            elif isinstance(answer.body, bytes) and answer.body.startswith(b'{"accepted":'):
                # PostHog's status: 1 put first, as the else branch would (without
                # decoding and encoding the answer again)
                answer.body = b'{"status":1,' + answer.body[1:]
            else:  # the answer with PostHog's status: 1 (the same response, its body anew)
                body = orjson.loads(answer.body) if isinstance(answer.body, bytes) else {}
                answer.body = orjson.dumps({"status": 1, **body})
    except collector.Refused as exc:
        response = collector._json({"error": exc.reason}, exc.status, exc.headers)
    return snowplow.cors(request, response)


# Autocapture on; no feature flags, session recording, surveys, heatmaps or site apps.
CONFIG: dict[str, Any] = {
    "config": {"enable_collect_everything": True},
    "autocapture_opt_out": False,
    "autocaptureExceptions": False,
    "captureDeadClicks": False,
    "capturePerformance": False,
    "heatmaps": False,
    "isAuthenticated": False,
    "sessionRecording": False,
    "surveys": False,
    "siteApps": [],
    "siteAppsJS": [],
    "toolbarParams": {},
    "supportedCompression": ["gzip", "gzip-js"],
    "elementsChainAsString": True,
    "featureFlags": {},
    "featureFlagPayloads": {},
    "flags": {},
    "errorsWhileComputingFlags": False,
    "quotaLimited": [],
    "defaultIdentifiedOnly": True,
}


async def config(request: web.Request) -> web.StreamResponse:
    """``/decide/``, ``/flags/`` and ``/array/<token>/config``: the minimal document."""
    token = (printable_ascii(request.match_info.get("token")) or "")[:256]
    document = {**CONFIG, "token": token} if token else CONFIG
    response: web.StreamResponse
    if request.path.endswith(".js"):
        script = (
            "(function(){window._POSTHOG_REMOTE_CONFIG=window._POSTHOG_REMOTE_CONFIG||{};"
            f"window._POSTHOG_REMOTE_CONFIG[{orjson.dumps(token).decode()}]="
            f"{{config:{orjson.dumps(document).decode()},siteApps:[]}}}})();"
        )
        response = web.Response(text=script, content_type="application/javascript")
    else:
        response = collector._json(document)
    return snowplow.cors(request, response)


def add_routes(app: web.Application) -> None:
    """Register PostHog's capture and configuration routes on the collector's application."""
    for path in CAPTURE_PATHS:
        app.router.add_post(path, capture)
        app.router.add_get(path, capture)
        app.router.add_route("OPTIONS", path, snowplow.preflight)
    for path in CONFIG_PATHS:
        app.router.add_post(path, config)
        app.router.add_get(path, config)
        app.router.add_route("OPTIONS", path, snowplow.preflight)
    for path in REMOTE_CONFIG_PATHS:
        app.router.add_get(path, config)
