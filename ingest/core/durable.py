"""Writes that survive a power loss: a file's bytes fsynced, and its directory entry too.

An fsync of a file makes its bytes durable, not its name: a file created,
renamed or unlinked needs its directory fsynced as well (the spool before a
2xx, an archive before its partition is dropped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (files created, renamed or unlinked) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(directory: Path) -> None:
    """``mkdir -p`` whose new directories survive a power loss: each is fsynced into its
    parent (and itself, once its first entry is written, by the caller)."""
    missing: list[Path] = []
    at = directory
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):  # outermost first
        fsync_directory(created.parent)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the fsynced file ``tmp`` to ``path`` and fsync the directory, so that after
    a crash ``path`` is either the old file or the whole new one, and stays there."""
    tmp.replace(path)
    fsync_directory(path.parent)


def create_private(path: Path) -> BinaryIO:
    """``path`` opened for writing, created (or truncated) 0600 whatever the umask: what
    the pipeline writes to disk holds personal data (events, addresses)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, "wb")


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: tmp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    with create_private(tmp) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)
