"""The load generator's beacons in the other protocols the collector speaks.

One native 20-event beacon of :class:`ingest.loadgen.traffic.Traffic` becomes a
Segment batch, a Snowplow ``payload_data`` POST or a PostHog batch carrying the
same visits (page views, clicks, scrolls, pings) as the trackers of those
protocols send them, so a benchmark compares protocols on the same events.
Each keeps the beacon's event ids where the protocol has a field for them
(Segment's ``messageId`` becomes a UUIDv5 at the collector, Snowplow's ``eid``
and PostHog's ``uuid`` are kept).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from ingest.loadgen.traffic import Request

SNOWPLOW_PAYLOAD = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
SNOWPLOW_UE = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
SNOWPLOW_LINK_CLICK = "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1"
USER_AGENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)


def _native(request: Request) -> tuple[list[dict[str, Any]], str]:
    body = orjson.loads(request.body)
    return body["events"], body["sent_at"]


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def segment(request: Request, write_key: str) -> Request:
    """A Segment ``/v1/batch`` of the beacon's events (pages and tracks), Basic auth."""
    events, sent_at = _native(request)
    batch = []
    for e in events:
        page = {"url": e["page_url"], "path": "/" + e["page_url"].split("/", 3)[-1]}
        message: dict[str, Any] = {
            "messageId": f"ajs-next-{_ms(e['timestamp'])}-{e['event_id']}",
            "anonymousId": f"anon-{e['session_id']}",
            "timestamp": e["timestamp"],
            "context": {
                "page": page,
                "userAgent": USER_AGENT,
                "library": {"name": "analytics.js", "version": "next-1.84.3"},
                "locale": "en-US",
                "sessionId": e["session_id"],
            },
        }
        if e["event_type"] == "page_view":
            message |= {"type": "page", "properties": page}
        else:
            props = {k: e[k] for k in ("element_path", "element_text", "event_data") if k in e}
            message |= {"type": "track", "event": e["event_type"], "properties": props}
        batch.append(message)
    auth = base64.b64encode(f"{write_key}:".encode()).decode()
    return Request(
        "storefront",
        "/v1/batch",
        orjson.dumps({"batch": batch, "sentAt": sent_at}),
        {"Content-Type": "text/plain", "Authorization": f"Basic {auth}"},
        request.ids,
    )


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def snowplow(request: Request, write_key: str) -> Request:
    """A Snowplow tp2 ``payload_data`` POST: ``pv``, ``pp`` and ``link_click`` events."""
    events, sent_at = _native(request)
    stm = str(_ms(sent_at))
    data = []
    for e in events:
        viewport = e.get("viewport_size") or {"width": 1440, "height": 900}
        item = {
            "eid": e["event_id"],
            "dtm": str(_ms(e["timestamp"])),
            "stm": stm,
            "tv": "js-4.10.1",
            "tna": "sp",
            "aid": write_key,
            "p": "web",
            "duid": f"anon-{e['session_id']}",
            "sid": e["session_id"],
            "url": e["page_url"],
            "vp": f"{viewport['width']}x{viewport['height']}",
            "ds": f"{viewport['width']}x4000",
            "res": "1920x1080",
            "cd": "24",
            "lang": "en-US",
            "ua": USER_AGENT,
        }
        if e["event_type"] == "page_view":
            item |= {"e": "pv", "page": "A product"}
        elif e["event_type"] in ("click", "rage_click"):
            link = {"targetUrl": e["page_url"], "elementId": "buy", "elementContent": "Buy"}
            ue = {"schema": SNOWPLOW_UE, "data": {"schema": SNOWPLOW_LINK_CLICK, "data": link}}
            item |= {"e": "ue", "ue_px": _b64(ue)}
        else:
            depth = (e.get("event_data") or {}).get("depth_pct", 50)
            item |= {"e": "pp", "pp_mix": "0", "pp_max": "0", "pp_miy": "0"}
            item["pp_may"] = str(int(depth * 31))
        data.append(item)
    return Request(
        "behavior",
        "/com.snowplowanalytics.snowplow/tp2",
        orjson.dumps({"schema": SNOWPLOW_PAYLOAD, "data": data}),
        {"Content-Type": "application/json; charset=UTF-8"},
        request.ids,
    )


def posthog(request: Request, write_key: str) -> Request:
    """A PostHog ``/batch/``: ``$pageview``, ``$autocapture`` clicks, ``$rageclick``."""
    events, sent_at = _native(request)
    batch = []
    for e in events:
        props: dict[str, Any] = {
            "distinct_id": f"anon-{e['session_id']}",
            "$session_id": e["session_id"],
            "$current_url": e["page_url"],
            "$lib": "web",
            "$lib_version": "1.449.2",
            "$viewport_width": (e.get("viewport_size") or {}).get("width", 1440),
        }
        if e["event_type"] == "page_view":
            name = "$pageview"
        elif e["event_type"] == "rage_click":
            name = "$rageclick"
        else:
            name = "$autocapture"
            props |= {
                "$event_type": "click",
                "$elements_chain": 'button.buy.primary:nth-child="1"nth-of-type="1"'
                'text="Buy now";div#main:attr__id="main"nth-child="1"',
            }
        batch.append(
            {"event": name, "uuid": e["event_id"], "timestamp": e["timestamp"], "properties": props}
        )
    return Request(
        "behavior",
        "/batch/",
        orjson.dumps({"api_key": write_key, "batch": batch, "sent_at": sent_at}),
        {"Content-Type": "application/json"},
        request.ids,
    )


DIALECTS: dict[str, Callable[[Request, str], Request]] = {
    "segment": segment,
    "snowplow": snowplow,
    "posthog": posthog,
}
