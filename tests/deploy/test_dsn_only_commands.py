"""Commands that need only PostgreSQL run with only a DSN (a migrate Job, an operator's
shell): no Kafka bootstrap, no running stack. Those that need Kafka say so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(tmp_path: Path, dsn: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTPIPE_")}
    env |= {"EVENTPIPE_POSTGRES_DSN": dsn, "EVENTPIPE_STATE_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "ingest.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("argv", [["migrate"], ["deadletters", "list"]])
def test_runs_with_only_a_dsn(tmp_path: Path, pg_dsn: str, argv: list[str]) -> None:
    """Before: refused, 'no PostgreSQL DSN / Kafka bootstrap configured'."""
    done = _run(tmp_path, pg_dsn, *argv)
    assert done.returncode == 0, done.stderr


def test_a_kafka_command_without_bootstrap_says_so(tmp_path: Path, pg_dsn: str) -> None:
    done = _run(tmp_path, pg_dsn, "deadletters", "replay", "--all")
    assert done.returncode != 0
    assert "EVENTPIPE_KAFKA_BOOTSTRAP" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
