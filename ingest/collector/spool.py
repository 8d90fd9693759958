"""The collector's local spool: append-only, fsynced files that outlive a broker outage.

A batch the broker couldn't acknowledge in time is written here before the
client gets its 2xx, and drained to Kafka, in order, when the broker is back.

Format: segment files ``<seq>.seg``, each a run of frames
``[u32 length][u32 crc32][payload]``; the payload is
``[u16 topic length][topic][u32 n]`` then ``n`` times
``[u32 key length][key][u32 value length][value]``. A frame whose length or
CRC doesn't hold (a crash or a full disk mid-write) ends its segment: it was
never acknowledged, so nothing acknowledged is lost by dropping it. A frame
inside a segment that can't be decoded (a bad CRC with whole frames after it,
or a payload that doesn't parse) is handed to the drainer as corrupt, which
quarantines it and goes on.

Layout under ``<state>/spool/``: ``w<i>/`` per collector worker (its lock
file says it is alive), ``w<i>/adopted/<origin>-<n>/`` the spools of workers
that no longer run, moved in whole by a live worker (``Spool.adopt_orphans``),
and ``quarantine/`` the frames the broker refused for good (``Quarantine``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import structlog

from ingest.core.durable import fsync_directory
from ingest.core.errors import StartupError

log = structlog.get_logger(__name__)

_HEADER = struct.Struct(">II")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
SEGMENT_BYTES = 16 * 1024 * 1024
ADOPTED_DIR = "adopted"
QUARANTINE_DIR = "quarantine"
_WORKER_DIR = re.compile(r"^w[0-9]+$")

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
    """A frame's payload parsed; struct.error, UnicodeDecodeError or ValueError if it doesn't."""
    (name_len,) = _U16.unpack_from(payload, 0)
    pos = 2
    if pos + name_len > len(payload):
        raise ValueError("topic runs past the frame")
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
    if pos != len(payload):
        raise ValueError(f"{len(payload) - pos} bytes past the frame's last record")
    return Frame(topic, messages)


def decode_frame(raw: bytes) -> Frame:
    """A whole frame's bytes (header and payload) parsed; ValueError when they don't hold."""
    if len(raw) < _HEADER.size:
        raise ValueError("shorter than a frame header")
    length, crc = _HEADER.unpack_from(raw, 0)
    payload = raw[_HEADER.size :]
    if len(payload) != length or zlib.crc32(payload) != crc:
        raise ValueError("length or CRC doesn't hold")
    try:
        return _decode(payload)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc


@dataclass(frozen=True)
class Entry:
    """One frame of a segment at bytes ``[start, end)``: decoded, or ``frame`` None and why."""

    start: int
    end: int
    raw: bytes
    frame: Frame | None
    error: str = ""


def _whole_frame_at(data: bytes, pos: int) -> bool:
    if pos + _HEADER.size > len(data):
        return False
    length, crc = _HEADER.unpack_from(data, pos)
    payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
    return bool(len(payload) == length and zlib.crc32(payload) == crc)


def scan_segment(path: Path) -> list[Entry]:
    """Every frame of a segment in order, corrupt ones included; a torn tail is left out."""
    data = path.read_bytes()
    entries: list[Entry] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if end > len(data):
            break  # torn: never acknowledged
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            # At the tail a bad CRC is a torn write, never acknowledged. With a whole
            # frame after it, it is a damaged frame and the frames behind it still count.
            if not _whole_frame_at(data, end):
                break
            entries.append(Entry(pos, end, data[pos:end], None, "CRC mismatch"))
        else:
            try:
                entries.append(Entry(pos, end, data[pos:end], _decode(payload)))
            except (struct.error, UnicodeDecodeError, ValueError) as exc:
                entries.append(Entry(pos, end, data[pos:end], None, f"cannot decode: {exc}"))
        pos = end
    if pos != len(data):
        log.warning(
            "spool segment has a torn tail", segment=str(path), dropped_bytes=len(data) - pos
        )
    return entries


def read_segment(path: Path) -> list[Frame]:
    """The whole, decodable frames of a segment; a torn or corrupt tail is left out (and logged)."""
    return [e.frame for e in scan_segment(path) if e.frame is not None]


def _open_private(path: Path) -> IO[bytes]:
    """``open(path, "ab")``, but a new file is 0600: spooled batches hold personal data."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


@contextlib.contextmanager
def _try_lock(directory: Path) -> Iterator[IO[bytes] | None]:
    """The directory's lock file, locked (non-blocking), or None when someone holds it.

    After the lock is taken the lock file must still be the one at
    ``directory/.lock``: an adopter may have moved the whole directory away
    between our open and our flock.
    """
    try:
        lock = _open_private(directory / ".lock")
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            same = os.stat(directory / ".lock").st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            same = False
        yield lock if same else None
    finally:
        lock.close()


def _holds_data(directory: Path) -> bool:
    adopted = directory / ADOPTED_DIR
    return any(directory.glob("*.seg")) or (adopted.is_dir() and any(adopted.iterdir()))


class Spool:
    """A directory of segments owned by one collector process (an exclusive lock says so).

    ``append`` is synchronous and fsyncs; callers run it in a thread. An
    adopted spool (``origin`` set) lives inside its adopter's directory, is
    covered by the adopter's lock, and is only drained, never appended to.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        lock_wait_s: float = 2.0,
        origin: str | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.origin = origin
        self.bytes = 0
        self.frames = 0
        # An adopter holds an orphan's lock only while it moves the directory
        # away: an owner starting at that moment waits this long for it.
        self._lock_wait_s = lock_wait_s
        self._lock_file: IO[bytes] | None = None
        self._current: IO[bytes] | None = None
        self._current_seq = 0

    @property
    def root(self) -> Path:
        """``<state>/spool``: the parent of every worker's spool."""
        return self.directory.parents[2] if self.origin else self.directory.parent

    @property
    def label(self) -> str:
        """The spool's directory relative to the root (a metric label), e.g. ``w0``."""
        return str(self.directory.relative_to(self.root))

    def open(self) -> None:
        """Create or reopen the directory and take its lock (an adopted spool needs none)."""
        if self.origin is None:
            self._lock()
        segments = self.segments()
        self.bytes = sum(p.stat().st_size for p in segments)
        self.frames = sum(len(scan_segment(p)) for p in segments)
        self._current_seq = int(segments[-1].stem) + 1 if segments else 1
        if segments:
            log.warning(
                "spool holds batches from before; they will be sent",
                spool=self.label,
                frames=self.frames,
            )

    def _lock(self) -> None:
        deadline = time.monotonic() + self._lock_wait_s
        while True:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                lock = _open_private(self.directory / ".lock")
            except OSError as exc:
                raise StartupError(f"cannot open the spool {self.directory}: {exc}") from exc
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(self.directory / ".lock").st_ino == os.fstat(lock.fileno()).st_ino:
                    self._lock_file = lock
                    return
                # moved away by an adopter meanwhile: start again in a fresh directory
            except (BlockingIOError, FileNotFoundError):
                pass
            lock.close()
            if time.monotonic() > deadline:
                raise StartupError(
                    f"the spool {self.directory} is in use by another collector",
                    hint="give each collector process its own state dir or worker index",
                )
            time.sleep(0.05)

    def adopt_orphans(self) -> list[Spool]:
        """Move in the spools of workers that no longer run; the new adopted spools.

        A sibling ``w<i>`` whose lock nobody holds and that holds data is moved
        whole (one atomic rename) to ``adopted/`` here: from then on this
        worker's lock covers it, so exactly one live worker drains it, in its
        own order, and a worker ``i`` starting again gets a fresh directory at
        once. What an orphan had adopted itself is moved up beside it.
        """
        adopted_root = self.directory / ADOPTED_DIR
        found: list[Spool] = []
        for candidate in sorted(self.root.iterdir()):
            if candidate == self.directory or not _WORKER_DIR.match(candidate.name):
                continue
            with _try_lock(candidate) as held:
                if held is None or not _holds_data(candidate):
                    continue
                adopted_root.mkdir(mode=0o700, exist_ok=True)
                target = adopted_root / f"{candidate.name}-{time.time_ns()}"
                os.rename(candidate, target)
                fsync_directory(self.root)
                inner = target / ADOPTED_DIR
                if inner.is_dir():
                    for nested in sorted(inner.iterdir()):
                        os.rename(nested, adopted_root / nested.name)
                        found.append(Spool(adopted_root / nested.name, 0, origin=nested.name))
                    inner.rmdir()
                fsync_directory(adopted_root)
            found.insert(0, Spool(target, 0, origin=candidate.name))
            log.warning("adopted the spool of a worker that no longer runs", spool=candidate.name)
        return found

    def adopted(self) -> list[Spool]:
        """Every spool adopted by this one, this run or an earlier one, oldest first."""
        adopted_root = self.directory / ADOPTED_DIR
        if not adopted_root.is_dir():
            return []
        dirs = sorted(adopted_root.iterdir(), key=lambda p: int(p.name.rpartition("-")[2] or 0))
        return [Spool(d, 0, origin=d.name.rpartition("-")[0]) for d in dirs if d.is_dir()]

    def discard(self) -> None:
        """Remove an adopted spool's directory once it is drained."""
        assert self.origin is not None, "only an adopted spool is discarded"
        for leftover in self.directory.iterdir():  # the lock file, empty segments
            leftover.unlink()
        self.directory.rmdir()
        fsync_directory(self.directory.parent)

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
        self._current = _open_private(path)
        # The frame's fsync makes its bytes durable, not the file's name: without
        # this, a power loss can leave a 2xx'd batch in a file no directory lists.
        fsync_directory(self.directory)

    def seal(self) -> None:
        """Close the segment being written, so every segment on disk is complete."""
        if self._current is not None:
            self._current.close()
            self._current = None

    def remove(self, path: Path, frames: int) -> None:
        """Delete a segment whose frames were all delivered."""
        size = path.stat().st_size
        path.unlink()
        fsync_directory(self.directory)  # a delivered segment must not come back after a crash
        self.bytes -= size
        self.frames -= frames
        if not self.segments():  # torn frames may have been counted; start clean
            self.reset()

    def reset(self) -> None:
        """Count nothing waiting (the directory holds no segment)."""
        self.bytes = self.frames = 0


@dataclass(frozen=True)
class Quarantined:
    """A frame the broker refused for good, kept under ``<state>/spool/quarantine/``."""

    id: str
    file: str
    topic: str
    records: int
    bytes: int
    reason: str
    error: str
    when: str
    source: str


class Quarantine:
    """Frames set aside by the drainer: ``<id>.frame`` (the frame's bytes) and ``<id>.json``.

    The ``.frame`` file, renamed into place last, is what makes an entry; its
    ``.json`` says why. Every collector worker of a state dir shares one.
    """

    def __init__(self, root: Path) -> None:
        self.directory = root / QUARANTINE_DIR

    def add(self, raw: bytes, *, reason: str, error: str, source: str) -> Quarantined:
        """Keep ``raw`` (a whole frame) durably; the entry."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = datetime.now(UTC)
        entry_id = f"{now:%Y%m%dT%H%M%S}-{source}-{uuid.uuid4().hex[:8]}"
        try:
            frame: Frame | None = decode_frame(raw)
        except ValueError:
            frame = None
        entry = Quarantined(
            id=entry_id,
            file=str(self.directory / f"{entry_id}.frame"),
            topic=frame.topic if frame else "",
            records=len(frame.messages) if frame else 0,
            bytes=len(raw),
            reason=reason,
            error=error[:500],
            when=now.isoformat(timespec="seconds"),
            source=source,
        )
        self._write(self.directory / f"{entry_id}.json", json.dumps(asdict(entry)).encode())
        self._write(self.directory / f"{entry_id}.frame", raw)
        fsync_directory(self.directory)
        return entry

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def entries(self) -> list[Quarantined]:
        """Every quarantined frame, oldest first."""
        if not self.directory.is_dir():
            return []
        found: list[Quarantined] = []
        for path in sorted(self.directory.glob("*.frame")):
            try:
                found.append(Quarantined(**json.loads((path.with_suffix(".json")).read_bytes())))
            except (OSError, ValueError, TypeError):  # its note lost: say what the frame says
                found.append(
                    Quarantined(
                        path.stem, str(path), "", 0, path.stat().st_size, "unknown", "", "", ""
                    )
                )
        return found

    def frame(self, entry: Quarantined) -> Frame:
        """The entry's frame; ValueError when it cannot be decoded."""
        return decode_frame(Path(entry.file).read_bytes())

    def remove(self, entry: Quarantined) -> None:
        """Delete an entry (after it was replayed)."""
        Path(entry.file).unlink(missing_ok=True)
        Path(entry.file).with_suffix(".json").unlink(missing_ok=True)
        fsync_directory(self.directory)


@dataclass(frozen=True)
class SpoolDir:
    """A spool directory holding data, as ``eventpipe spool list`` shows it."""

    directory: str
    segments: int
    frames: int
    bytes: int
    live: bool


def spool_dirs(root: Path) -> list[SpoolDir]:
    """Every worker's and adopted spool under ``root`` that holds segments."""
    found: list[SpoolDir] = []
    if not root.is_dir():
        return found
    for worker in sorted(root.iterdir()):
        if not (_WORKER_DIR.match(worker.name) and worker.is_dir()):
            continue
        with _try_lock(worker) as held:
            live = held is None
        adopted = worker / ADOPTED_DIR
        for directory in [worker, *(sorted(adopted.iterdir()) if adopted.is_dir() else [])]:
            segments = sorted(directory.glob("*.seg"))
            if not segments:
                continue
            found.append(
                SpoolDir(
                    directory=str(directory.relative_to(root)),
                    segments=len(segments),
                    frames=sum(len(scan_segment(p)) for p in segments),
                    bytes=sum(p.stat().st_size for p in segments),
                    live=live,
                )
            )
    return found
