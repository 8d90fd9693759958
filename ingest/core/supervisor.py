"""Runs the collector and loader processes of ``eventpipe up``, restarting any that die."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from ingest.core.errors import StartupError
from ingest.core.processes import die_with_parent, stop_process
from ingest.core.service import Service

log = structlog.get_logger(__name__)


@dataclass
class Child:
    """One supervised command."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0  # how many times it was restarted
    delays: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # the latest waits
    delay: float = 0.0  # the wait before its next restart (0: the supervisor's first)
    started_at: float = 0.0  # time.monotonic() of its latest start
    restart_at: float | None = None  # set while it is down, waiting for its restart


class Supervisor(Service):
    """Starts children, restarts one that exits, and stops them all (SIGTERM, then SIGKILL).

    A child that exits is restarted after a delay that doubles from
    ``restart_delay_s`` up to ``max_restart_delay_s`` while it keeps exiting,
    and starts over once it has stayed up ``stable_after_s``. It is never
    given up on, and the others never stopped for it: a flapping loader (a
    PostgreSQL restart, a broker outage) must not take the collector, and
    the spool it fills, down with it. ``failed`` is kept for callers and is
    never set any more.
    """

    def __init__(
        self,
        children: list[Child],
        env: dict[str, str],
        stop_timeout: float = 6.0,
        *,
        restart_delay_s: float = 1.0,
        max_restart_delay_s: float = 30.0,
        stable_after_s: float = 60.0,
        poll_s: float = 0.2,
    ) -> None:
        self.children = children
        self.env = env
        self.stop_timeout = stop_timeout
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max(max_restart_delay_s, restart_delay_s)
        self.stable_after_s = stable_after_s
        self.poll_s = poll_s
        self.failed = asyncio.Event()
        self.failure = ""
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def _spawn(self, child: Child) -> None:
        child.started_at = time.monotonic()
        child.proc = subprocess.Popen(
            list(child.argv),
            stdin=subprocess.DEVNULL,
            env={**self.env, **child.env},
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops children in order
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        log.info("started", process=child.name, pid=child.proc.pid)

    async def start(self) -> None:
        """Start every child and the watcher."""
        for child in self.children:
            child.delay = self.restart_delay_s
            self._spawn(child)
        self._watch = asyncio.create_task(self._watcher())

    async def _watcher(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_s)
            for child in self.children:
                if self._stopping:
                    return
                try:
                    self._tend(child, time.monotonic())
                except Exception as exc:  # the watcher must outlive any one child's trouble
                    log.error("supervising failed", process=child.name, error=str(exc))

    def _tend(self, child: Child, now: float) -> None:
        """Notice an exit and schedule the restart, or do a restart that is due."""
        if child.restart_at is not None:
            if now < child.restart_at:
                return
            child.restart_at = None
            try:
                self._spawn(child)
            except OSError as exc:  # e.g. the executable is gone: try again, later
                self._schedule(child, now, f"cannot start: {exc}")
            return
        if child.proc is None or child.proc.poll() is None:
            return
        self._schedule(child, now, f"exited with code {child.proc.returncode}")

    def _schedule(self, child: Child, now: float, why: str) -> None:
        if now - child.started_at >= self.stable_after_s:
            child.delay = self.restart_delay_s  # it was up a while: not flapping
        delay = child.delay
        child.delay = min(delay * 2, self.max_restart_delay_s)
        child.restart_at = now + delay
        child.restarts += 1
        child.delays.append(delay)
        log.warning(
            "process down; restarting",
            process=child.name,
            reason=why,
            restart_in=delay,
            restarts=child.restarts,
        )

    async def wait(self, stop: asyncio.Event) -> bool:
        """Wait until ``stop`` is set; returns ``failed`` (never set: nothing is given up on)."""
        failed = asyncio.create_task(self.failed.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([failed, stopped], return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        stopped.cancel()
        return self.failed.is_set()

    def check_running(self) -> None:
        """Raise StartupError when a child has already exited."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                raise StartupError(
                    f"the {child.name} process exited with code {child.proc.returncode} at start",
                    hint="its error is printed above",
                )

    async def stop(self) -> None:
        """SIGTERM every child (they drain), SIGKILL what is left after the timeout."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.gather(
            *(
                stop_process(c.proc, signal.SIGTERM, self.stop_timeout)
                for c in self.children
                if c.proc
            )
        )
