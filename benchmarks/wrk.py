"""wrk, the load generator of the maximum-throughput figures, and its Lua script.

wrk (Debian's package; C, one epoll loop per thread) sends requests far faster
than any server here answers them, so a maximum measured with it is the
server's, not the generator's. Python's generator (``ingest.loadgen``) is kept
for what it is right for: latency at a fixed rate, open loop, from the intended
send time.

The bodies are the load generator's own (several hundred realistic 20-event
beacons, or the same visits in another protocol, ``ingest.loadgen.dialects``),
written into a Lua script that rotates them. With ``unique_ids`` the script
rewrites the first 8 hex digits of every event id in a body with a per-request
counter, so a long run never repeats an id (what the end-to-end figure needs
to reconcile rows with ids); the ids of counter ``n`` are :func:`unique_ids`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ingest.loadgen.traffic import Request

WRK = "wrk"
ID_PLACEHOLDER = "ZZZZZZZZ"
_UUID = re.compile(rb'"([0-9a-f]{8})(-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"')


def ensure_wrk() -> str | None:
    """Install Debian's wrk when it is missing (as root); the reason it can't be, or None."""
    if shutil.which(WRK):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "wrk is not installed and cannot be (no apt-get, or not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", WRK],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", WRK],
    ):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=240)
            if shutil.which(WRK):
                return None
    return None if shutil.which(WRK) else "apt-get install wrk failed"


def _lua_string(data: bytes) -> str:
    text = data.decode()
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def template(request: Request) -> Request:
    """``request`` with the first 8 hex digits of each event id replaced by the placeholder."""
    body = _UUID.sub(lambda m: b'"' + ID_PLACEHOLDER.encode() + m.group(2) + b'"', request.body)
    return Request(request.kind, request.path, body, request.headers, request.ids)


def unique_ids(requests: list[Request], counter: int) -> list[str]:
    """The event ids the script sends in its ``counter``-th request (1-based, one thread)."""
    prefix = f"{counter:08x}"
    return [prefix + tail for tail in _id_tails(requests[(counter - 1) % len(requests)].body)]


def id_count(requests: list[Request], first: int, last: int) -> int:
    """How many event ids the script sends in its requests ``first`` to ``last``."""
    return sum(
        len(_id_tails(requests[(n - 1) % len(requests)].body)) for n in range(first, last + 1)
    )


@functools.lru_cache(maxsize=4096)
def _id_tails(body: bytes) -> tuple[str, ...]:
    # Each body's ids found once: the end-to-end figure's drain goes on while the
    # suite works out half a million ids, on the same two cores.
    return tuple(m.group(2).decode() for m in _UUID.finditer(body))


def write_script(path: Path, requests: list[Request], unique: bool = False) -> Path:
    """A Lua script rotating ``requests`` (each formatted once in ``init``)."""
    entries = []
    for r in requests:
        body = template(r).body if unique else r.body
        headers = ", ".join(
            f"[ {_lua_string(k.encode())} ] = {_lua_string(v.encode())}"
            for k, v in r.headers.items()
        )
        entries.append(
            f"{{path = {_lua_string(r.path.encode())}, headers = {{{headers}}}, "
            f"body = {_lua_string(body)}}}"
        )
    unique_lua = "true" if unique else "false"
    path.write_text(
        "local entries = {\n" + ",\n".join(entries) + "\n}\n"
        f"local unique = {unique_lua}\n"
        "local formatted = {}\n"
        "local threads = {}\n"
        "n = 0  -- a global: done() reads each thread's with thread:get\n"
        "function init(args)\n"
        "  for i, e in ipairs(entries) do\n"
        '    formatted[i] = wrk.format("POST", e.path, e.headers, e.body)\n'
        "  end\n"
        "end\n"
        "function request()\n"
        "  n = n + 1\n"
        "  local i = ((n - 1) % #entries) + 1\n"
        "  if not unique then return formatted[i] end\n"
        "  local e = entries[i]\n"
        f'  local body = string.gsub(e.body, "{ID_PLACEHOLDER}", string.format("%08x", n))\n'
        '  return wrk.format("POST", e.path, e.headers, body)\n'
        "end\n"
        "function setup(thread)\n"
        "  table.insert(threads, thread)\n"
        "end\n"
        "function done(summary, latency, requests)\n"
        "  local made = 0\n"
        '  for _, thread in ipairs(threads) do made = made + thread:get("n") end\n'
        '  io.write(string.format("LUA-REQUESTS-MADE %d\\n", made))\n'
        "end\n"
    )
    return path


@dataclass
class WrkResult:
    """One wrk run: counts from its report, its CPU, and the servers' CPU beside it."""

    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    latency_p50_ms: float
    latency_p99_ms: float
    generator_cpu_s: float
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    requests_made: int = 0  # the script's request() calls (unique ids: the highest counter)
    output: str = ""

    @property
    def requests_per_s(self) -> float:
        """Answered requests per second (2xx or not: check ``non_2xx``)."""
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self, events_per_request: int) -> dict[str, Any]:
        """JSON-friendly figures; the server's CPU is that of every measured process
        but the broker's (a server and its workers)."""
        server_cpu = sum(v for k, v in self.server_cpu_s.items() if k != "broker")
        ok = self.requests - self.non_2xx
        return {
            "requests_per_s": round(self.requests_per_s, 1),
            "events_per_s": round(ok * events_per_request / self.seconds, 1),
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "generator_cpu_s": round(self.generator_cpu_s, 2),
            "server_cpu_s": {k: round(v, 2) for k, v in self.server_cpu_s.items()},
            # wrk used less CPU than the server: the server, not wrk, was the limit
            "generator_below_server": self.generator_cpu_s < server_cpu,
            "server_cpu_us_per_request": round(1e6 * server_cpu / max(1, self.requests), 1),
            "server_cpu_us_per_event": round(1e6 * server_cpu / max(1, ok * events_per_request), 2),
        }


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
            out[name] = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    return out


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    unit = re.sub(r"^[0-9.]+", "", text)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}.get(unit, 1.0)


def run(
    url: str,
    script: Path,
    *,
    seconds: float,
    connections: int = 16,
    threads: int = 1,
    servers: dict[str, int] | None = None,
) -> WrkResult:
    """Run wrk against ``url`` (blocking: call it in a thread) and parse its report.

    Its CPU comes from ``wait4`` (the kernel's account of the child, exact), the
    servers' from ``/proc`` (``psutil``) before and after.
    """
    if threads != 1 and "local unique = true" in script.read_text():
        raise ValueError("unique ids need one wrk thread (its counter is per thread)")
    argv = [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s"]
    argv += ["--latency", "-s", str(script), url]
    before = _cpu(servers or {})
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    after = _cpu(servers or {})
    out = b"".join(chunks).decode(errors="replace")
    made = re.search(r"LUA-REQUESTS-MADE (\d+)", out)
    if proc.returncode != 0 or made is None:
        # wrk runs plain GETs (and exits 0) when its script fails to load
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {out[-1000:]}")
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if total is None:
        raise RuntimeError(f"unreadable wrk report: {out[-1000:]}")
    wall = float(total.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}.get(total.group(3), 1.0)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return WrkResult(
        requests=int(total.group(1)),
        seconds=wall or time.monotonic() - started,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(x) for x in errors.groups()) if errors else 0,
        latency_p50_ms=round(_ms(lat["50"]), 3) if "50" in lat else 0.0,
        latency_p99_ms=round(_ms(lat["99"]), 3) if "99" in lat else 0.0,
        generator_cpu_s=usage.ru_utime + usage.ru_stime,
        server_cpu_s={k: after[k] - before.get(k, 0.0) for k in after},
        requests_made=int(made.group(1)),
        output=out,
    )
