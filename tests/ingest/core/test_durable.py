"""Files the pipeline writes to disk are created 0600, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ingest.core.durable import write_durably
from ingest.partitions.archive import ArchiveWriter


def test_archives_and_manifests_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        writer = ArchiveWriter(tmp_path / "archive" / "events_p2026_01.copy.gz")
        writer.write(b"1\t2\n")
        writer.close()
        write_durably(tmp_path / "archive" / "events_p2026_01.manifest.json", b"{}\n")
    finally:
        os.umask(old)
    for name in ("events_p2026_01.copy.gz", "events_p2026_01.manifest.json"):
        mode = stat.S_IMODE((tmp_path / "archive" / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
