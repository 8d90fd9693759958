"""The collector's local spool: append-only, fsynced files that outlive a broker outage.

A batch the broker couldn't acknowledge in time is written here before the
client gets its 2xx, and drained to Kafka, in order, when the broker is back.

Format: segment files ``<seq>.seg``, each a run of frames
``[u32 length][u32 crc32][payload]``; the payload is
``[u16 topic length][topic][u32 n]`` then ``n`` times
``[u32 key length][key][u32 value length][value]``. A frame whose length or
CRC doesn't hold (a crash or a full disk mid-write) ends its segment: it was
never acknowledged, so nothing acknowledged is lost by dropping it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog

from ingest.errors import StartupError

log = structlog.get_logger(__name__)

_HEADER = struct.Struct(">II")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
SEGMENT_BYTES = 16 * 1024 * 1024

Messages = Sequence[tuple[bytes, bytes]]


class SpoolFull(Exception):
    """The spool can't take a batch (its cap, or the disk, is full)."""


@dataclass(frozen=True)
class Frame:
    """One spooled batch."""

    topic: str
    messages: list[tuple[bytes, bytes]]


def encode(topic: str, messages: Messages) -> bytes:
    """One frame's bytes."""
    name = topic.encode()
    parts = [_U16.pack(len(name)), name, _U32.pack(len(messages))]
    for key, value in messages:
        parts += [_U32.pack(len(key)), key, _U32.pack(len(value)), value]
    payload = b"".join(parts)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> Frame:
    (name_len,) = _U16.unpack_from(payload, 0)
    pos = 2
    topic = payload[pos : pos + name_len].decode()
    pos += name_len
    (count,) = _U32.unpack_from(payload, pos)
    pos += 4
    messages: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        (key_len,) = _U32.unpack_from(payload, pos)
        key = payload[pos + 4 : pos + 4 + key_len]
        pos += 4 + key_len
        (value_len,) = _U32.unpack_from(payload, pos)
        value = payload[pos + 4 : pos + 4 + value_len]
        pos += 4 + value_len
        messages.append((key, value))
    return Frame(topic, messages)


def read_segment(path: Path) -> list[Frame]:
    """The whole frames of a segment; a torn or corrupt tail is left out (and logged)."""
    data = path.read_bytes()
    frames: list[Frame] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        frames.append(_decode(payload))
        pos += _HEADER.size + length
    if pos != len(data):
        log.warning(
            "spool segment has a torn tail", segment=str(path), dropped_bytes=len(data) - pos
        )
    return frames


class Spool:
    """A directory of segments owned by one collector process (an exclusive lock says so).

    ``append`` is synchronous and fsyncs; callers run it in a thread.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.bytes = 0
        self.frames = 0
        self._lock_file: IO[bytes] | None = None
        self._current: IO[bytes] | None = None
        self._current_seq = 0

    def open(self) -> None:
        """Create or reopen the directory and take its lock."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.directory / ".lock", "wb")  # noqa: SIM115
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StartupError(
                f"the spool {self.directory} is in use by another collector",
                hint="give each collector process its own state dir or worker index",
            ) from exc
        except OSError as exc:
            raise StartupError(f"cannot open the spool {self.directory}: {exc}") from exc
        segments = self.segments()
        self.bytes = sum(p.stat().st_size for p in segments)
        self.frames = sum(len(read_segment(p)) for p in segments)
        self._current_seq = int(segments[-1].stem) + 1 if segments else 1
        if segments:
            log.warning("spool holds batches from before; they will be sent", frames=self.frames)

    def close(self) -> None:
        """Close files and release the lock (the data stays on disk)."""
        if self._current is not None:
            self._current.close()
            self._current = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        return sorted(self.directory.glob("*.seg"), key=lambda p: int(p.stem))

    @property
    def empty(self) -> bool:
        """True when nothing waits to be sent."""
        return self.frames == 0

    def append(self, topic: str, messages: Messages) -> None:
        """Write one batch and fsync it; SpoolFull when it doesn't fit."""
        frame = encode(topic, messages)
        if self.bytes + len(frame) > self.max_bytes:
            raise SpoolFull(f"spool cap of {self.max_bytes} bytes reached")
        if self._current is None or self._current.tell() >= SEGMENT_BYTES:
            self._rotate()
        assert self._current is not None
        start = self._current.tell()
        try:
            self._current.write(frame)
            self._current.flush()
            os.fsync(self._current.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):  # leave no torn frame behind
                self._current.truncate(start)
                self._current.seek(start)
            raise SpoolFull(f"cannot write the spool: {exc.strerror or exc}") from exc
        self.bytes += len(frame)
        self.frames += 1

    def _rotate(self) -> None:
        if self._current is not None:
            self._current.close()
        path = self.directory / f"{self._current_seq:012d}.seg"
        self._current_seq += 1
        self._current = open(path, "ab")  # noqa: SIM115

    def seal(self) -> None:
        """Close the segment being written, so every segment on disk is complete."""
        if self._current is not None:
            self._current.close()
            self._current = None

    def remove(self, path: Path, frames: int) -> None:
        """Delete a segment whose frames were all delivered."""
        size = path.stat().st_size
        path.unlink()
        self.bytes -= size
        self.frames -= frames
        if not self.segments():  # torn frames may have been counted; start clean
            self.bytes = self.frames = 0
