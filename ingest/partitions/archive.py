"""Archive files of retired partitions: gzip'd COPY text plus a JSON manifest.

A month's rows are written as PostgreSQL ``COPY ... (FORMAT text)`` output,
one row per line (the text format escapes newlines inside values), so a file
can be checked without a database: its line count is the row count and its
sha256 is taken over the uncompressed bytes. Everything here is synchronous
file work; the partition manager runs it in a thread.

Durability: the partition is dropped once its archive is written, so the
archive must survive a power loss that follows the DROP's commit. Every file
is fsynced before it is renamed into place, and its directory after (a rename
lives in the directory, not in the file), and a directory created for an
archive is fsynced into its parent.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ingest.core.durable import create_private, make_directories, replace_durably, write_durably
from ingest.core.errors import PartitionError

FORMAT = "postgresql-copy-text+gzip"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What an archive file holds: which table and range, how many rows, their checksum."""

    table: str
    partition: str
    column: str
    range_from: str
    range_to: str
    columns: list[str]
    row_count: int
    sha256: str
    data_file: str
    created_at: str
    format: str = FORMAT

    def save(self, path: Path) -> None:
        """Write the manifest atomically and durably (fsynced, and its directory)."""
        write_durably(path, (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest; PartitionError when it is missing or malformed."""
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise PartitionError(
                f"cannot read archive manifest {path}: {exc}",
                hint="pass the .manifest.json written by `partitions maintain` in archive mode",
            ) from exc


def paths(directory: Path, partition: str) -> tuple[Path, Path]:
    """The data file and manifest of ``partition`` archived in ``directory``."""
    return directory / f"{partition}.copy.gz", directory / f"{partition}.manifest.json"


def data_path(manifest_file: Path, manifest: Manifest) -> Path:
    """The data file a manifest names, beside it: a plain file name, never a path (a
    crafted manifest must not point a restore at another directory's file)."""
    name = manifest.data_file
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise PartitionError(
            f"archive manifest {manifest_file} names data file {name!r}, which is not a "
            "file name beside it",
            hint="a manifest names its NAME.copy.gz in the same directory",
        )
    return manifest_file.with_name(name)


def manifest_path(given: Path) -> Path:
    """The manifest of an archive named by either of its two files."""
    if given.name.endswith(".manifest.json"):
        return given
    if given.name.endswith(".copy.gz"):
        return given.with_name(given.name.removesuffix(".copy.gz") + ".manifest.json")
    raise PartitionError(
        f"{given} is not an archive file", hint="pass NAME.manifest.json or NAME.copy.gz"
    )


class ArchiveWriter:
    """Streams COPY output into a gzip file, counting rows and hashing as it goes.

    The file appears under its final name only after ``close``, so a crash
    never leaves a truncated archive that looks complete.
    """

    def __init__(self, path: Path) -> None:
        make_directories(path.parent)
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._raw = create_private(self._tmp)
        self._file = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6)
        self._sha = hashlib.sha256()
        self.rows = 0

    def write(self, data: bytes) -> None:
        """Append a chunk of COPY output."""
        self._sha.update(data)
        self.rows += data.count(b"\n")
        self._file.write(data)

    def close(self) -> tuple[int, str]:
        """Flush to disk and move into place, durably; returns (rows, sha256)."""
        self._file.close()  # a GzipFile given a fileobj leaves it open
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        replace_durably(self._tmp, self.path)
        return self.rows, self._sha.hexdigest()

    def abort(self) -> None:
        """Throw the partial file away."""
        self._file.close()
        self._raw.close()
        self._tmp.unlink(missing_ok=True)


def scan(path: Path) -> tuple[int, str]:
    """Rows and sha256 of an archive data file, read back from disk."""
    sha = hashlib.sha256()
    rows = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            rows += chunk.count(b"\n")
    return rows, sha.hexdigest()


def verify(manifest: Manifest, data_path: Path) -> None:
    """Raise PartitionError unless ``data_path`` holds exactly what ``manifest`` says."""
    try:
        rows, digest = scan(data_path)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise PartitionError(f"archive {data_path} is unreadable: {exc}") from exc
    if (rows, digest) != (manifest.row_count, manifest.sha256):
        raise PartitionError(
            f"archive {data_path} does not match its manifest: {rows} rows sha256 {digest[:12]}, "
            f"expected {manifest.row_count} rows sha256 {manifest.sha256[:12]}",
            hint="the partition was kept; check the archive location's disk",
        )


def open_data(path: Path) -> gzip.GzipFile:
    """The uncompressed COPY stream of an archive data file."""
    return gzip.GzipFile(path, "rb")
