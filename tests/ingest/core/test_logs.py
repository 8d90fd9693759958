"""``redact``: the password of every DSN form we may log is hidden, and nothing else is."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ingest.core.logs import redact

# (text, the secret that must not survive, what must survive)
CASES = [
    ("postgresql://u:p4ss@h:5432/d", "p4ss", "postgresql://u:***@h:5432/d"),
    ("postgresql://:p4ss@h/d", "p4ss", "postgresql://:***@h/d"),  # no user name
    ("postgres://u:p@ss@h/d", "p@ss", "postgres://u:***@h/d"),  # an unencoded @
    ("postgresql://u:a@b@c@h:5432/d", "a@b@c", "postgresql://u:***@h:5432/d"),
    ("postgresql://u:p 4ss@h/d", "p 4ss", "postgresql://u:***@h/d"),  # a space in it
    ("dsn=postgresql://u:s3cret@db/x other", "s3cret", "dsn=postgresql://u:***@db/x other"),
    ("host=h user=u password=p4ss dbname=d", "p4ss", "host=h user=u password=*** dbname=d"),
    ("host=h password='p 4ss' dbname=d", "p 4ss", "host=h password=*** dbname=d"),
    ("host=h password = p4ss dbname=d", "p4ss", "host=h password = *** dbname=d"),
    ("host=h password='it\\'s' dbname=d", "it\\'s", "host=h password=*** dbname=d"),
    ("postgresql://h/d?user=u&password=p4ss&sslmode=off", "p4ss", "&sslmode=off"),
    ("postgresql://u:%40pw@h/d", "%40pw", "postgresql://u:***@h/d"),  # the encoded form
    (
        "a postgresql://a:one@h/d and postgresql://b:two@k/e",
        "one",
        "postgresql://b:***@k/e",
    ),
]


@pytest.mark.parametrize(("text", "secret", "kept"), CASES)
def test_redact_hides_the_password(text: str, secret: str, kept: str) -> None:
    out = redact(text)
    assert secret not in out
    assert kept in out


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://postgres@127.0.0.1:5432/eventpipe",  # no password: unchanged
        "http://127.0.0.1:8780/v1/behavior?k=wk_abc",
        "an email a@b.example and a time 12:30",
        "host=h user=u dbname=d",
    ],
)
def test_redact_leaves_text_without_a_password_alone(text: str) -> None:
    assert redact(text) == text


def test_a_spawned_process_logs_to_a_file_only_its_owner_reads(tmp_path: Path) -> None:
    """Logs hold client addresses and payload excerpts: 0600 whatever the umask."""
    import sys

    from ingest.core.processes import spawn

    log_path = tmp_path / "child.log"
    old = os.umask(0o022)
    try:
        proc = spawn([sys.executable, "-c", "print('hello')"], log_path=log_path)
    finally:
        os.umask(old)
    assert proc.wait(timeout=30) == 0
    assert log_path.read_text().strip() == "hello"
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
