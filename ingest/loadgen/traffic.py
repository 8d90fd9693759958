"""Load generator of ``eventpipe bench``: realistic traffic, open and closed loops, statistics.

Traffic is drawn from a seeded RNG (event ids included), so two runs with the
same seed send the same events. Open loop (``rate``): requests are scheduled
at fixed intended times and latency is measured from the intended time, so
queueing in a slow server shows up in the figures. Closed loop (``max``): a
ramp of 1/4, 1/2 then all ``connections`` each sending back to back; the best
step is the maximum throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import queue
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson

from ingest.core import shopify

Kind = Literal["behavior", "storefront", "webhook"]
TABLES: dict[Kind, str] = {
    "behavior": "behavior_events",
    "storefront": "events",
    "webhook": "events",
}

BEHAVIOR_TYPES = (
    ("click", 30),
    ("scroll", 22),
    ("hover", 12),
    ("scroll_depth", 10),
    ("time_on_element", 7),
    ("page_view", 6),
    ("hesitation", 4),
    ("form_start", 3),
    ("form_submit", 2),
    ("error", 1),
    ("form_abandon", 2),
    ("rage_click", 1),
)
STOREFRONT_TYPES = ("page_view", "product_view", "search", "add_to_cart", "begin_checkout")
ELEMENTS = (
    ("a", "main > div.product-grid > a.card", "Linen shirt"),
    ("button", "form#product > button.add-to-cart", "Add to cart"),
    ("img", "main > div.gallery > img.hero", ""),
    ("input", "form#newsletter > input[name=email]", ""),
    ("a", "header > nav > a.menu-item", "Sale"),
    ("div", "main > section.reviews > div.review", "Great fit, fast shipping"),
)
VIEWPORTS = (
    {"width": 390, "height": 844},
    {"width": 1440, "height": 900},
    {"width": 820, "height": 1180},
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` by the nearest rank; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (127.0.0.0/8, ::1 or localhost)."""
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class Target:
    """Where to send and the credentials of the shop traffic is sent for."""

    url: str
    write_key: str
    webhook_secret: str | None = None
    shop_domain: str | None = None


@dataclass(frozen=True)
class Mix:
    """Share of requests of each kind (normalised)."""

    behavior: float = 0.7
    storefront: float = 0.2
    webhook: float = 0.1

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``behavior=0.7,storefront=0.2,webhook=0.1`` (kinds left out get 0)."""
        shares: dict[str, float] = {"behavior": 0.0, "storefront": 0.0, "webhook": 0.0}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in shares:
                raise ValueError(f"unknown kind {name!r} in mix (behavior, storefront, webhook)")
            shares[name] = float(value)
            if shares[name] < 0:
                raise ValueError(f"negative share for {name}")
        if sum(shares.values()) <= 0:
            raise ValueError("the mix must have a positive share")
        return cls(**shares)

    def weights(self) -> tuple[list[Kind], list[float]]:
        """Kinds and their weights."""
        return ["behavior", "storefront", "webhook"], [self.behavior, self.storefront, self.webhook]


@dataclass(frozen=True)
class Request:
    """One HTTP request of the generated traffic and the event ids it carries."""

    kind: Kind
    path: str
    body: bytes
    headers: dict[str, str]
    ids: tuple[str, ...]

    @property
    def table(self) -> str:
        """The table its events land in."""
        return TABLES[self.kind]


@dataclass
class _Session:
    id: str
    anon_id: str
    page: str
    viewport: dict[str, int]
    fresh: bool = True


class Traffic:
    """A reproducible stream of beacons, storefront batches and signed webhooks.

    ``sessions`` browsing sessions are live at a time; each ends with
    probability 1/30 per beacon and is replaced, so a long run sees many.
    """

    def __init__(
        self,
        target: Target,
        mix: Mix | None = None,
        batch_size: int = 20,
        seed: int = 0,
        sessions: int = 200,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.target = target
        # A webhook's event id is made of its signed payload, times included, so the
        # same seed gives the same ids only on the same clock (tests pass a fixed one).
        self.clock = clock or (lambda: datetime.now(UTC))
        self.mix = mix or Mix()
        if self.mix.webhook > 0 and not (target.webhook_secret and target.shop_domain):
            raise ValueError("webhooks in the mix need the shop's webhook secret and domain")
        self.batch_size = max(1, batch_size)
        self.rng = random.Random(seed)
        self._kinds, self._weights = self.mix.weights()
        self._types = [t for t, _ in BEHAVIOR_TYPES]
        self._type_weights = [w for _, w in BEHAVIOR_TYPES]
        self._sessions = [self._session() for _ in range(sessions)]

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _session(self) -> _Session:
        return _Session(
            id=f"s-{self.rng.getrandbits(48):012x}",
            anon_id=f"a-{self.rng.getrandbits(48):012x}",
            page=self._page(),
            viewport=self.rng.choice(VIEWPORTS),
        )

    def _page(self) -> str:
        domain = self.target.shop_domain or "shop.example"
        path = self.rng.choice(("", "collections/all", "products/", "cart", "search?q=shirt"))
        if path == "products/":
            path += f"item-{self.rng.randrange(300)}"
        return f"https://{domain}/{path}"

    def _pick_session(self) -> _Session:
        index = self.rng.randrange(len(self._sessions))
        if self.rng.random() < 1 / 30:
            self._sessions[index] = self._session()
        return self._sessions[index]

    def next(self) -> Request:
        """The next request."""
        kind = self.rng.choices(self._kinds, self._weights)[0]
        if kind == "behavior":
            return self._behavior()
        if kind == "storefront":
            return self._storefront()
        return self._webhook()

    def _behavior(self) -> Request:
        session = self._pick_session()
        now = datetime.now(UTC)
        events: list[dict[str, Any]] = []
        for i in range(self.batch_size):
            if session.fresh or self.rng.random() < 0.02:
                if not session.fresh:
                    session.page = self._page()
                session.fresh = False
                kind = "page_view"
            else:
                kind = self.rng.choices(self._types, self._type_weights)[0]
            element_type, path, text = self.rng.choice(ELEMENTS)
            event: dict[str, Any] = {
                "event_id": self._uuid(),
                "event_type": kind,
                "session_id": session.id,
                "page_url": session.page,
                "timestamp": (
                    now - timedelta(milliseconds=(self.batch_size - i) * 150)
                ).isoformat(),
                "viewport_size": session.viewport,
            }
            if kind in ("click", "hover", "rage_click", "hesitation", "time_on_element"):
                event |= {
                    "element_path": path,
                    "element_type": element_type,
                    "element_text": text,
                    "coordinates": {"x": self.rng.randrange(1440), "y": self.rng.randrange(3000)},
                }
            if kind == "rage_click":
                event["event_data"] = {"clicks": self.rng.randint(3, 9), "window_ms": 700}
            elif kind in ("scroll", "scroll_depth"):
                event["event_data"] = {"depth_pct": self.rng.randrange(0, 101, 5)}
            elif kind == "time_on_element":
                event["event_data"] = {"ms": self.rng.randrange(200, 20_000)}
            elif kind in ("form_start", "form_submit", "form_abandon"):
                event |= {"element_path": "form#checkout", "component_id": "checkout-form"}
                if kind == "form_abandon":
                    event["event_data"] = {"fields_filled": self.rng.randrange(5), "of": 7}
            elif kind == "error":
                event["event_data"] = {"message": "TypeError: x is undefined", "line": 42}
            if kind == "page_view":
                event["metadata"] = {"referrer": "https://www.google.com/", "utm_source": "ads"}
            events.append(event)
        body = orjson.dumps({"events": events, "sent_at": now.isoformat()})
        return Request(
            "behavior",
            f"/v1/behavior?k={self.target.write_key}",
            body,
            {"Content-Type": "text/plain"},  # what navigator.sendBeacon sends
            tuple(e["event_id"] for e in events),
        )

    def _storefront(self) -> Request:
        session = self._pick_session()
        now = datetime.now(UTC).isoformat()
        events: list[dict[str, Any]] = []
        for _ in range(max(1, self.batch_size // 4)):
            product = self.rng.randrange(300)
            events.append(
                {
                    "event_id": self._uuid(),
                    "event_type": self.rng.choice(STOREFRONT_TYPES),
                    "anon_id": session.anon_id,
                    "session_id": session.id,
                    "ts": now,
                    "product_id": f"gid://shopify/Product/{product}",
                    "props": {"url": session.page, "price": round(5 + product * 0.37, 2)},
                }
            )
        body = orjson.dumps({"events": events, "sent_at": now})
        return Request(
            "storefront",
            f"/v1/storefront?k={self.target.write_key}",
            body,
            {"Content-Type": "application/json"},
            tuple(e["event_id"] for e in events),
        )

    def _webhook(self) -> Request:
        assert self.target.webhook_secret and self.target.shop_domain
        topic = self.rng.choice(list(shopify.TOPIC_EVENT_TYPES))
        webhook_id = f"{self.rng.getrandbits(60):x}-bench"
        token = f"{self.rng.getrandbits(64):016x}"
        now = self.clock().isoformat()
        payload = {
            "id": self.rng.getrandbits(40),
            "token": token,
            "cart_token": token,
            "currency": "USD",
            "total_price": f"{self.rng.randrange(500, 40_000) / 100:.2f}",
            "customer": {"id": self.rng.getrandbits(40)},
            "line_items": [
                {"product_id": self.rng.randrange(300), "quantity": self.rng.randint(1, 3)}
                for _ in range(self.rng.randint(1, 4))
            ],
            "created_at": now,
            "updated_at": now,
        }
        body = orjson.dumps(payload)
        domain = self.target.shop_domain
        event_id = shopify.webhook_event_id(domain, topic, payload, body)
        headers = {
            "Content-Type": "application/json",
            "X-Shopify-Hmac-Sha256": shopify.signature(self.target.webhook_secret, body),
            "X-Shopify-Shop-Domain": domain,
            "X-Shopify-Topic": topic,
            "X-Shopify-Webhook-Id": webhook_id,
            "X-Shopify-Triggered-At": now,
        }
        return Request("webhook", "/v1/webhooks/shopify", body, headers, (str(event_id),))


@dataclass(frozen=True)
class LoadConfig:
    """One load run: open loop at ``rate`` requests/s, or the closed-loop ramp when None."""

    rate: float | None = None
    duration_s: float = 10.0
    connections: int = 16
    batch_size: int = 20
    mix: Mix = field(default_factory=Mix)
    seed: int = 0
    processes: int = 1
    timeout_s: float = 10.0
    max_in_flight: int = 20_000

    def ramp_levels(self, connections: int) -> list[int]:
        """Connections of each step of the closed-loop ramp."""
        return sorted({max(1, connections // 4), max(1, connections // 2), connections})


@dataclass
class Stats:
    """What one generator process measured (picklable; merged across processes)."""

    requests: int = 0
    events_sent: int = 0
    events_accepted: int = 0
    status: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    # per second since the start: [requests, accepted events, latencies]
    series: dict[int, list[Any]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    behind_s: float = 0.0
    capped: int = 0

    def merge(self, other: Stats) -> None:
        """Add ``other`` (another process's stats of the same run)."""
        self.requests += other.requests
        self.events_sent += other.events_sent
        self.events_accepted += other.events_accepted
        self.status.update(other.status)
        self.latencies_ms.extend(other.latencies_ms)
        for second, (reqs, events, lats) in other.series.items():
            mine = self.series.setdefault(second, [0, 0, []])
            mine[0] += reqs
            mine[1] += events
            mine[2].extend(lats)
        for i, step in enumerate(other.steps):
            if i < len(self.steps):
                for key in ("requests", "events"):
                    self.steps[i][key] += step[key]
                self.steps[i]["connections"] += step["connections"]
                self.steps[i]["latencies_ms"].extend(step["latencies_ms"])
            else:
                self.steps.append({**step, "latencies_ms": list(step["latencies_ms"])})
        self.cpu_s = max(self.cpu_s, other.cpu_s)
        self.wall_s = max(self.wall_s, other.wall_s)
        self.behind_s = max(self.behind_s, other.behind_s)
        self.capped += other.capped


Report = Callable[[dict[str, Any]], None]
"""Receives progress deltas: requests, accepted events, statuses, latencies and accepted ids."""


class _Worker:
    """One process's share of the load, on one aiohttp session."""

    def __init__(
        self, target: Target, config: LoadConfig, index: int, start_wall: float, report: Report
    ) -> None:
        self.target = target
        self.config = config
        share = config.processes
        self.connections = max(1, math.ceil(config.connections / share))
        self.rate = config.rate / share if config.rate else None
        self.traffic = Traffic(target, config.mix, config.batch_size, config.seed * 1000 + index)
        self.start_wall = start_wall
        self.report = report
        self.stats = Stats()
        self._delta: dict[str, Any] = self._empty_delta()
        self._step: dict[str, Any] | None = None

    @staticmethod
    def _empty_delta() -> dict[str, Any]:
        return {"requests": 0, "accepted": 0, "status": Counter(), "lat": [], "ids": {}}

    async def run(self) -> Stats:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=self.connections, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        flusher = asyncio.create_task(self._flush_every(0.5))
        try:
            async with aiohttp.ClientSession(
                self.target.url.rstrip("/"), connector=connector, timeout=timeout
            ) as session:
                delay = self.start_wall - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.rate:
                    await self._open_loop(session, loop)
                else:
                    await self._ramp(session, loop)
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            self._flush()
        self.stats.cpu_s = time.process_time() - cpu0
        self.stats.wall_s = time.perf_counter() - wall0
        return self.stats

    async def _flush_every(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            self._flush()

    def _flush(self) -> None:
        delta, self._delta = self._delta, self._empty_delta()
        self.report(delta)

    async def _open_loop(self, session: aiohttp.ClientSession, loop: Any) -> None:
        assert self.rate
        total = max(1, int(self.rate * self.config.duration_s))
        interval = 1 / self.rate
        t0 = loop.time()
        in_flight: set[asyncio.Task[None]] = set()
        sent = 0
        while sent < total:
            now = loop.time()
            due = min(total, int((now - t0) / interval) + 1)
            while sent < due:
                intended = t0 + sent * interval
                if len(in_flight) >= self.config.max_in_flight:
                    self.stats.capped += 1
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                else:
                    self.stats.behind_s = max(self.stats.behind_s, loop.time() - intended)
                task = asyncio.create_task(self._send(session, self.traffic.next(), intended))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            next_at = t0 + sent * interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.config.timeout_s + 1)

    async def _ramp(self, session: aiohttp.ClientSession, loop: Any) -> None:
        levels = self.config.ramp_levels(self.connections)
        step_s = self.config.duration_s / len(levels)
        for level in levels:
            step: dict[str, Any] = {"connections": level, "requests": 0, "events": 0}
            step["latencies_ms"] = []
            self._step = step
            end = loop.time() + step_s

            async def client(end: float = end) -> None:
                while loop.time() < end:
                    await self._send(session, self.traffic.next(), loop.time())

            started = loop.time()
            await asyncio.gather(*(client() for _ in range(level)))
            step["seconds"] = loop.time() - started
            self.stats.steps.append(step)
        self._step = None

    async def _send(
        self, session: aiohttp.ClientSession, request: Request, intended: float
    ) -> None:
        loop = asyncio.get_running_loop()
        accepted: list[str] = []
        try:
            async with session.post(request.path, data=request.body, headers=request.headers) as r:
                payload = await r.read()
                status = str(r.status)
                if r.status == 204:
                    accepted = list(request.ids)
                elif r.status == 200:
                    answer = orjson.loads(payload)
                    if request.kind == "webhook":
                        accepted = [str(answer.get("event_id", request.ids[0]))]
                    else:
                        refused = {int(x["index"]) for x in answer.get("rejected", [])}
                        accepted = [e for i, e in enumerate(request.ids) if i not in refused]
        except TimeoutError:
            status = "timeout"
        except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
            status = type(exc).__name__
        latency_ms = (loop.time() - intended) * 1000
        stats = self.stats
        stats.requests += 1
        stats.events_sent += len(request.ids)
        stats.events_accepted += len(accepted)
        stats.status[status] += 1
        stats.latencies_ms.append(latency_ms)
        second = int(time.time() - self.start_wall)
        bucket = stats.series.setdefault(second, [0, 0, []])
        bucket[0] += 1
        bucket[1] += len(accepted)
        bucket[2].append(latency_ms)
        if self._step is not None:
            self._step["requests"] += 1
            self._step["events"] += len(accepted)
            self._step["latencies_ms"].append(latency_ms)
        delta = self._delta
        delta["requests"] += 1
        delta["accepted"] += len(accepted)
        delta["status"][status] += 1
        delta["lat"].append(latency_ms)
        if accepted:
            delta["ids"].setdefault(request.table, []).extend(accepted)


def _child(
    target: Target, config: LoadConfig, index: int, start_wall: float, out: Any
) -> None:  # pragma: no cover - runs in a spawned process
    stats = asyncio.run(_Worker(target, config, index, start_wall, out.put).run())
    out.put({"final": stats})


@dataclass
class Result:
    """A finished run: merged stats and the figures derived from them."""

    config: LoadConfig
    stats: Stats
    started_at: datetime
    accepted_ids: dict[str, list[str]]

    @property
    def seconds(self) -> float:
        """Wall seconds of the load."""
        return self.stats.wall_s or self.config.duration_s

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly figures of the run."""
        s, c = self.stats, self.config
        lat = s.latencies_ms
        ok = sum(n for code, n in s.status.items() if code in ("200", "204"))
        cpu_pct = 100 * s.cpu_s / s.wall_s if s.wall_s else 0.0
        behind_pct = 100 * s.behind_s / c.duration_s if c.rate else 0.0
        steps = [
            {
                "connections": st["connections"],
                "requests_per_s": round(st["requests"] / st["seconds"], 1),
                "events_per_s": round(st["events"] / st["seconds"], 1),
                "p50_ms": round(percentile(st["latencies_ms"], 50), 2),
                "p99_ms": round(percentile(st["latencies_ms"], 99), 2),
            }
            for st in s.steps
            if st.get("seconds")
        ]
        series = [
            {
                "t": second,
                "requests_per_s": reqs,
                "events_per_s": events,
                "p50_ms": round(percentile(lats, 50), 2),
                "p99_ms": round(percentile(lats, 99), 2),
            }
            for second, (reqs, events, lats) in sorted(s.series.items())
        ]
        best = max(steps, key=lambda st: st["requests_per_s"]) if steps else None
        return {
            "mode": "rate" if c.rate else "max",
            "target_rate": c.rate,
            "duration_s": c.duration_s,
            "connections": c.connections,
            "processes": c.processes,
            "batch_size": c.batch_size,
            "mix": asdict(c.mix),
            "seed": c.seed,
            "started_at": self.started_at.isoformat(),
            "requests": s.requests,
            "ok_requests": ok,
            "errors": s.requests - ok,
            "status": dict(sorted(s.status.items())),
            "requests_per_s": round(s.requests / self.seconds, 1),
            "events_sent": s.events_sent,
            "events_accepted": s.events_accepted,
            "events_per_s": round(s.events_accepted / self.seconds, 1),
            "latency_ms": {
                q: round(percentile(lat, v), 2)
                for q, v in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
            },
            "max_requests_per_s": best["requests_per_s"] if best else None,
            "max_events_per_s": best["events_per_s"] if best else None,
            "steps": steps,
            "series": series,
            "generator_cpu_percent": round(cpu_pct, 1),
            "behind_schedule_percent": round(behind_pct, 1),
            "generator_saturated": cpu_pct > 90 or behind_pct > 5,
        }


async def run_load(target: Target, config: LoadConfig, report: Report | None = None) -> Result:
    """Run the load (in ``config.processes`` processes when more than one); merged result.

    ``report`` receives progress deltas about twice a second (in this process).
    """
    accepted: dict[str, list[str]] = {}

    def collect(delta: dict[str, Any]) -> None:
        for table, ids in delta["ids"].items():
            accepted.setdefault(table, []).extend(ids)
        if report is not None:
            report(delta)

    started_at = datetime.now(UTC)
    start_wall = time.time() + (0.0 if config.processes == 1 else 1.5)
    if config.processes == 1:
        stats = await _Worker(target, config, 0, start_wall, collect).run()
        return Result(config, stats, started_at, accepted)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(target, config, i, start_wall, out), daemon=True)
        for i in range(config.processes)
    ]
    for child in children:
        child.start()
    merged = Stats()
    finals = 0
    deadline = time.monotonic() + config.duration_s + config.timeout_s + 60
    try:
        while finals < len(children) and time.monotonic() < deadline:
            try:
                message = await asyncio.to_thread(out.get, True, 0.2)
            except queue.Empty:
                if not any(c.is_alive() for c in children) and out.empty():
                    break
                continue
            if "final" in message:
                merged.merge(message["final"])
                finals += 1
            else:
                collect(message)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
    if finals < len(children):
        merged.status["generator_process_lost"] += len(children) - finals
    return Result(config, merged, started_at, accepted)
