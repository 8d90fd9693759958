"""``eventpipe up`` as a user runs it: a subprocess, a curl-like beacon, Ctrl-C, and again;
and its supervisor, which backs off a flapping child instead of giving up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import psutil
import pytest

from ingest.core.processes import free_port
from ingest.core.supervisor import Child, Supervisor
from ingest.stack.postgres import EmbeddedPostgres
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "ingest.cli"]


def start_up(state: Path, port: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "up", "--state-dir", str(state), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def wait_banner(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if line.startswith("curl "):
            return line.strip()
    proc.kill()
    raise AssertionError(
        f"no curl line from up:\n{seen}\n{proc.stderr.read() if proc.stderr else ''}"
    )


async def post_curl(curl: str) -> int:
    """Send what the printed curl sends (its URL and body), as curl would."""
    import shlex

    words = shlex.split(curl)
    url = next(w for w in words if w.startswith("http"))
    body = words[words.index("-d") + 1]
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=body, headers={"Content-Type": "text/plain"}) as resp,
    ):
        return resp.status


def stop(proc: subprocess.Popen[str]) -> tuple[int, float, list[int]]:
    tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=15)
    took = time.monotonic() - started
    time.sleep(0.3)
    alive = [
        pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]
    return code, took, alive


async def test_up_beacon_row_stop_and_up_again(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    port = free_port()
    proc = start_up(state, port)
    curl = wait_banner(proc)
    info = json.loads((state / "stack.json").read_text())
    first_dsn = info["postgres_dsn"]
    assert_private(state)
    assert set(info) >= {
        "collector_url",
        "postgres_dsn",
        "kafka_bootstrap",
        "write_key",
        "webhook_secret",
        "shop_id",
        "shop_domain",
    }
    assert info["write_key"] in curl
    assert await post_curl(curl) == 200
    conn = await asyncpg.connect(info["postgres_dsn"])
    try:
        deadline = time.monotonic() + 5
        row = None
        while row is None and time.monotonic() < deadline:
            row = await conn.fetchrow(
                "SELECT tableoid::regclass::text AS part, to_char(timestamp AT TIME ZONE 'UTC', "
                "'YYYY_MM') AS month FROM behavior_events"
            )
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert row is not None, "the beacon did not become a row within 5 s"
    assert row["part"] == f"behavior_events_p{row['month']}"
    code, took, alive = stop(proc)
    assert code == 0 and took < 10 and alive == []

    proc = start_up(state, port)
    wait_banner(proc)
    info = json.loads((state / "stack.json").read_text())
    conn = await asyncpg.connect(info["postgres_dsn"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM behavior_events") == 1
    finally:
        await conn.close()
    code, _, alive = stop(proc)
    assert code == 0 and alive == []
    assert_private(state)
    # the same password on the second run (the port is a new free one)
    assert urlsplit(info["postgres_dsn"]).password == urlsplit(first_dsn).password


def assert_private(state: Path) -> None:
    """Nobody but the owner reads anything ``up`` left in the state directory: the
    directory is 0700 (0710 with the server user's group when run as root, so the
    server can reach its data), every file in it 0600 or tighter."""
    mode = stat.S_IMODE(state.stat().st_mode)
    assert mode == (0o710 if os.geteuid() == 0 else 0o700), oct(mode)
    loose = {
        str(p.relative_to(state)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in state.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o077
    }
    assert loose == {}
    for name in ("stack.json", "postgres.log", "broker.log"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name


async def test_embedded_postgres_needs_its_password(tmp_path: Path) -> None:
    """Any local user could connect to the port as the superuser (``--auth=trust``): now
    no password, or a wrong one, is refused, and the DSN's works."""
    state = tmp_path / "pg"
    async with EmbeddedPostgres(state, settings={"fsync": "off"}) as pg:
        base = f"postgresql://postgres@{pg.host}:{pg.port}/postgres"
        with pytest.raises(
            (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
        ):
            await asyncpg.connect(base)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(base, password="guess")
        conn = await asyncpg.connect(pg.dsn)
        await conn.close()
        assert stat.S_IMODE(state.stat().st_mode) & 0o007 == 0
        assert stat.S_IMODE(pg.log_path.stat().st_mode) == 0o600
        assert "trust" not in pg.hba_path.read_text().replace("# ", "")


TRUST_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"


async def test_a_trust_cluster_from_before_gets_a_password_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    """A data directory made by an earlier version (trust, stack.json without a password)
    starts with a new password, set before the server listens; its rows are still there.
    A restart with the known password keeps it."""
    state = tmp_path / "pg"
    async with EmbeddedPostgres(state, settings={"fsync": "off"}) as pg:
        conn = await asyncpg.connect(pg.dsn)
        await conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
        await conn.close()
    pg.hba_path.write_text(TRUST_HBA)  # what initdb --auth=trust wrote
    async with EmbeddedPostgres(state, settings={"fsync": "off"}) as upgraded:
        with pytest.raises(
            (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
        ):
            await asyncpg.connect(f"postgresql://postgres@{upgraded.host}:{upgraded.port}/postgres")
        conn = await asyncpg.connect(upgraded.dsn)
        assert await conn.fetchval("SELECT answer FROM kept") == 42
        await conn.close()
        password = upgraded.password
    assert password != pg.password
    async with EmbeddedPostgres(state, settings={"fsync": "off"}, password=password) as again:
        conn = await asyncpg.connect(again.dsn)
        assert await conn.fetchval("SELECT answer FROM kept") == 42
        await conn.close()


def run_up_expecting_failure(state: Path, port: int, **env: str) -> tuple[int, str]:
    proc = subprocess.run(
        [*CLI, "up", "--state-dir", str(state), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    return proc.returncode, proc.stderr


def assert_one_clear_line(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("eventpipe: error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, stderr = run_up_expecting_failure(tmp_path / "s", port)
    assert code == 3
    assert_one_clear_line(stderr, f"port {port}", "in use", "--port")


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, stderr = run_up_expecting_failure(blocker / "state", free_port())
    assert code == 3
    assert_one_clear_line(stderr, "not writable", "--state-dir")


def test_broker_binary_that_will_not_start(tmp_path: Path) -> None:
    code, stderr = run_up_expecting_failure(
        tmp_path / "s", free_port(), EVENTPIPE_BROKER_BIN="/bin/false"
    )
    assert code == 3
    assert_one_clear_line(stderr, "broker", "EVENTPIPE_KAFKA_BOOTSTRAP")


async def _restarted(child: Child, times: int) -> bool:
    return len(child.delays) >= times and child.proc is not None


async def test_supervisor_backs_off_a_flapping_child_and_keeps_the_others() -> None:
    """A child that exits at once is restarted again and again with growing, capped delays;
    the supervisor never gives up on it, and the other child keeps running untouched."""
    flapping = Child("flapping", [sys.executable, "-c", "import sys; sys.exit(1)"])
    steady = Child("steady", [sys.executable, "-c", "import time; time.sleep(120)"])
    supervisor = Supervisor(
        [flapping, steady],
        dict(os.environ),
        restart_delay_s=0.05,
        max_restart_delay_s=0.4,
        stable_after_s=30,
        poll_s=0.02,
    )
    started = time.monotonic()
    async with supervisor:
        assert steady.proc is not None
        steady_pid = steady.proc.pid
        await wait_for(lambda: _restarted(flapping, 7), timeout=30)
        took = time.monotonic() - started
        assert not supervisor.failed.is_set()
        assert steady.proc.pid == steady_pid and steady.proc.poll() is None
    assert list(flapping.delays)[:7] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert took >= sum([0.05, 0.1, 0.2, 0.4, 0.4, 0.4])  # the delays were really waited
    assert steady.proc.poll() is not None  # stopped with the supervisor


async def test_supervisor_resets_the_delay_of_a_child_that_stayed_up() -> None:
    """A child that ran longer than ``stable_after_s`` before exiting restarts after the
    first delay again, not a grown one."""
    child = Child("tired", [sys.executable, "-c", "import time; time.sleep(0.3)"])
    supervisor = Supervisor(
        [child], dict(os.environ), restart_delay_s=0.05, stable_after_s=0.2, poll_s=0.02
    )
    async with supervisor:
        await wait_for(lambda: _restarted(child, 3), timeout=30)
    assert list(child.delays)[:3] == [0.05, 0.05, 0.05]


def test_spool_and_quarantine_files_are_private_outside_up_too(tmp_path: Path) -> None:
    """A collector run on its own (no ``up``, the umask of its shell) still writes its
    spooled batches, lock and quarantine 0600 in 0700 directories: they hold personal data."""
    from ingest.collector.spool import Quarantine, Spool

    umask = os.umask(0o022)  # the usual one
    try:
        spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
        spool.open()
        spool.append("t", [(b"k", b"a visitor's event")])
        spool.close()
        Quarantine(tmp_path / "spool").add(b"raw", reason="r", error="e", source="s")
    finally:
        os.umask(umask)
    made = [p for p in (tmp_path / "spool").rglob("*")]
    assert any(p.suffix == ".seg" for p in made) and any(p.suffix == ".frame" for p in made)
    for p in made:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
