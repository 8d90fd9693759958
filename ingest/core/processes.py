"""Child processes and loopback ports: the pieces the embedded services and ``up`` share."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from ingest.core.errors import StartupError
from ingest.core.logs import private_log_file

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int, what: str, setting: str) -> None:
    """Raise a StartupError naming ``setting`` when ``host:port`` is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} for the {what} is in use",
                    hint=f"stop what listens there or choose another port with {setting}",
                ) from exc
            raise StartupError(f"cannot bind {host}:{port} for the {what}: {exc}") from exc


def die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn that has the kernel send ``sig`` to the child when this process dies."""

    def set_pdeathsig() -> None:
        # Linux only: the kernel sends `sig` to the child when its parent dies,
        # so even a SIGKILLed `up` leaves no broker or database behind.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass

    return set_pdeathsig


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    death_signal: int = signal.SIGTERM,
    user: str | None = None,
    env: dict[str, str] | None = None,
    new_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with output to ``log_path``; it dies with this process.

    ``new_session`` keeps a terminal's Ctrl-C away from the child, so the
    supervisor decides the order in which things stop.
    """
    with open(private_log_file(log_path), "ab") as log_file:
        if user is not None:
            os.chown(log_path, *_ids(user))
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
                preexec_fn=die_with_parent(death_signal),
                user=user,
                env=env,
            )
        except OSError as exc:
            raise StartupError(f"cannot start {argv[0]}: {exc}") from exc


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


async def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 8.0
) -> int:
    """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while proc.poll() is None and loop.time() < deadline:  # noqa: ASYNC110 (polling a Popen)
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
    return proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file (empty when it can't be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and check it is writable, as one clear StartupError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"the {what} {path} is not writable: {exc.strerror or exc}",
            hint="choose another with --state-dir or EVENTPIPE_STATE_DIR, or fix its permissions",
        ) from exc
    return path.resolve()
