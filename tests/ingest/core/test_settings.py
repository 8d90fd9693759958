"""Settings: one object from EVENTPIPE_* variables, completed from a stack file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.core.errors import ConfigError
from ingest.core.logs import redact
from ingest.core.settings import Settings, StackInfo


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPIPE_COLLECTOR_PORT", "9999")
    monkeypatch.setenv("EVENTPIPE_TOPIC_BEHAVIOR", "b")
    s = Settings()
    assert (s.collector_port, s.topic_behavior) == (9999, "b")
    assert Settings(collector_port=1234).collector_port == 1234  # flags win


def test_resolve_from_stack_file(tmp_path: Path) -> None:
    StackInfo(
        collector_url="http://127.0.0.1:1",
        postgres_dsn="postgresql://u@h:5/d",
        kafka_bootstrap="h:9",
        kafka_log_id="abc",
        write_key="k",
        webhook_secret="s",
        shop_id="00000000-0000-0000-0000-000000000000",
        shop_domain="d",
    ).save(tmp_path)
    s = Settings(state_dir=tmp_path).resolve_stack()
    assert (s.postgres_dsn, s.kafka_bootstrap, s.kafka_log_id) == (
        "postgresql://u@h:5/d",
        "h:9",
        "abc",
    )
    explicit = Settings(state_dir=tmp_path, postgres_dsn="postgresql://x@y/z").resolve_stack()
    assert explicit.postgres_dsn == "postgresql://x@y/z"


def test_no_stack_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eventpipe up"):
        Settings(state_dir=tmp_path).resolve_stack()


def test_redact_hides_passwords() -> None:
    assert redact("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert "s3cret" not in redact("dsn=postgresql://app:s3cret@db/x other")


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    missing = [
        f"EVENTPIPE_{name.upper()}"
        for name in Settings.model_fields
        if f"EVENTPIPE_{name.upper()}" not in readme
    ]
    assert missing == []
