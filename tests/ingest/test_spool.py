"""The spool's file format: whole frames survive, torn tails and full disks don't corrupt."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.errors import StartupError
from ingest.spool import Spool, SpoolFull, encode, read_segment


def test_frames_round_trip_and_survive_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    spool.append("t1", [(b"k1", b"v1"), (b"", b"")])
    spool.append("t2", [(b"k2", b"\x00\xff" * 100)])
    spool.close()
    again = Spool(tmp_path, max_bytes=1 << 20)
    again.open()
    assert again.frames == 2 and not again.empty
    frames = [f for seg in again.segments() for f in read_segment(seg)]
    assert [(f.topic, f.messages) for f in frames] == [
        ("t1", [(b"k1", b"v1"), (b"", b"")]),
        ("t2", [(b"k2", b"\x00\xff" * 100)]),
    ]


def test_torn_tail_is_dropped_not_misread(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    spool.append("t", [(b"k", b"complete")])
    spool.close()
    segment = spool.segments()[0]
    torn = encode("t", [(b"k", b"torn by a crash")])
    with open(segment, "ab") as f:
        f.write(torn[: len(torn) // 2])
    assert [f.messages for f in read_segment(segment)] == [[(b"k", b"complete")]]
    data = bytearray(segment.read_bytes())
    data[12] ^= 0xFF  # a flipped bit inside the first frame: its CRC fails
    segment.write_bytes(bytes(data))
    assert read_segment(segment) == []


def test_cap_refuses_and_leaves_no_partial_frame(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=200)
    spool.open()
    spool.append("t", [(b"k", b"x" * 50)])
    with pytest.raises(SpoolFull, match="cap"):
        spool.append("t", [(b"k", b"x" * 200)])
    assert spool.frames == 1
    assert len(read_segment(spool.segments()[0])) == 1


def test_one_owner_per_spool(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=1000)
    first.open()
    with pytest.raises(StartupError, match="in use"):
        Spool(tmp_path, max_bytes=1000).open()
    first.close()
