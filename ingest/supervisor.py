"""Runs the collector and loader processes of ``eventpipe up``, restarting any that die."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from ingest.errors import StartupError
from ingest.processes import die_with_parent, stop_process
from ingest.service import Service

log = structlog.get_logger(__name__)


@dataclass
class Child:
    """One supervised command."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)


class Supervisor(Service):
    """Starts children, restarts one that exits, and stops them all (SIGTERM, then SIGKILL).

    A child that dies five times within a minute is given up on, and ``failed``
    is set so ``up`` can stop with a clear message instead of looping.
    """

    def __init__(
        self, children: list[Child], env: dict[str, str], stop_timeout: float = 6.0
    ) -> None:
        self.children = children
        self.env = env
        self.stop_timeout = stop_timeout
        self.failed = asyncio.Event()
        self.failure = ""
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def _spawn(self, child: Child) -> None:
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
            self._spawn(child)
        self._watch = asyncio.create_task(self._watcher())

    async def _watcher(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await asyncio.sleep(0.2)
            for child in self.children:
                if self._stopping or child.proc is None or child.proc.poll() is None:
                    continue
                now = loop.time()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                log.warning("process exited", process=child.name, code=child.proc.returncode)
                if len(child.restarts) >= 5:
                    self.failure = (
                        f"the {child.name} process keeps exiting (code {child.proc.returncode})"
                    )
                    self.failed.set()
                    return
                await asyncio.sleep(min(2 ** len(child.restarts) * 0.25, 5))
                if not self._stopping:
                    self._spawn(child)

    async def wait(self, stop: asyncio.Event) -> bool:
        """Wait until ``stop`` is set or a child is given up on; True in the second case."""
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
