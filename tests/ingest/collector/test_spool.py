"""The spool: whole frames survive, torn tails and full disks don't corrupt, a frame the
broker refuses for good is quarantined and the rest drains, orphans are adopted."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY

from ingest.collector import delivery as delivery_module
from ingest.collector.delivery import Delivery
from ingest.collector.spool import Quarantine, Spool, SpoolFull, encode, read_segment
from ingest.core.errors import StartupError
from ingest.core.producer import EventProducer
from ingest.core.settings import Settings
from tests.conftest import wait_for


def _cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


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


def test_a_new_segment_directory_is_fsynced_before_append_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment's data fsynced in a file whose directory entry is not is lost on power loss."""
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    synced: list[int] = []  # inodes of the directories fsynced
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append(st.st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    spool.append("t", [(b"k", b"v")])
    assert tmp_path.stat().st_ino in synced
    synced.clear()
    spool.append("t", [(b"k", b"v")])  # same segment: no new entry, no directory fsync needed
    assert synced == []
    spool.close()


def test_every_append_fsyncs_the_segment_it_wrote_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2xx promise: each appended frame is fsynced in its segment's file before append returns,
    and after the bytes were written (the fd fsynced holds the frame at that moment)."""
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    synced: list[tuple[int, int]] = []  # (inode, size at fsync) of the regular files fsynced
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            synced.append((st.st_ino, st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    for n in range(1, 4):
        spool.append("t", [(b"k", b"v" * n)])
        [segment] = spool.segments()
        size = segment.stat().st_size
        assert synced[-1] == (segment.stat().st_ino, size), f"append {n} not fsynced"
    spool.close()


async def _topic_values(settings: Settings, topic: str, expected: int) -> list[bytes]:
    """The values of the first ``expected`` records of ``topic`` (across partitions)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < expected:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values += [r.value for r in records if r.value is not None]
    finally:
        await consumer.stop()
    return values


def _quarantined(reason: str) -> float:
    return REGISTRY.get_sample_value("eventpipe_spool_quarantined_total", {"reason": reason}) or 0.0


async def _drained(spool: Spool) -> bool:
    return spool.empty


async def test_a_frame_too_large_is_quarantined_and_the_frames_behind_it_reach_kafka(
    settings: Settings,
) -> None:
    own = settings.model_copy(update={"max_record_bytes": 64 * 1024})
    topic = own.topic_behavior
    spool = Spool(own.state_dir / "spool" / "w0", own.spool_max_bytes)
    spool.open()
    spool.append(topic, [(b"k", b"before")])
    spool.append(topic, [(b"k", b"x" * 200_000), (b"k", b"in-the-big-frame")])
    spool.append(topic, [(b"k", b"after-1"), (b"k", b"after-2")])
    spool.close()
    before = _quarantined("too_large")
    async with EventProducer(own) as producer, Delivery(own, producer, spool) as delivery:
        await wait_for(lambda: _drained(spool), timeout=30)
        assert delivery.spool is spool
    assert sorted(await _topic_values(own, topic, 3)) == [b"after-1", b"after-2", b"before"]
    assert _quarantined("too_large") == before + 1
    [entry] = Quarantine(own.state_dir / "spool").entries()
    assert (entry.topic, entry.records, entry.reason) == (topic, 2, "too_large")
    assert not spool.segments()


def _append_bytes(path: Path, *chunks: bytes) -> None:
    with open(path, "ab") as f:
        for chunk in chunks:
            f.write(chunk)


async def test_a_corrupt_frame_is_quarantined_and_the_drain_goes_on(settings: Settings) -> None:
    topic = settings.topic_behavior
    directory = settings.state_dir / "spool" / "w0"
    spool = Spool(directory, settings.spool_max_bytes)
    spool.open()
    spool.append(topic, [(b"k", b"first")])
    spool.close()
    garbage = b"\x00\x05ab"  # a topic of 5 bytes in a payload of 4: its CRC holds, it can't decode
    _append_bytes(
        spool.segments()[0],
        struct.pack(">II", len(garbage), zlib.crc32(garbage)) + garbage,
        encode(topic, [(b"k", b"last")]),
    )
    before = _quarantined("corrupt")
    async with EventProducer(settings) as producer, Delivery(settings, producer, spool):
        await wait_for(lambda: _drained(spool), timeout=30)
    assert sorted(await _topic_values(settings, topic, 2)) == [b"first", b"last"]
    assert _quarantined("corrupt") == before + 1


async def test_spool_list_and_replay(settings: Settings) -> None:
    """Quarantined frames are listed, and replayed once the limit is raised."""
    own = settings.model_copy(update={"max_record_bytes": 64 * 1024})
    topic = own.topic_behavior
    spool = Spool(own.state_dir / "spool" / "w0", own.spool_max_bytes)
    spool.open()
    spool.append(topic, [(b"k", b"y" * 100_000)])
    spool.append(topic, [(b"k", b"small")])
    spool.close()
    async with EventProducer(own) as producer, Delivery(own, producer, spool):
        await wait_for(lambda: _drained(spool), timeout=30)
    stranded = Spool(own.state_dir / "spool" / "w5", own.spool_max_bytes)  # no worker 5 runs
    stranded.open()
    stranded.append(topic, [(b"k", b"stranded")])
    stranded.close()
    env = {**os.environ, **settings.to_env(), "EVENTPIPE_LOG_LEVEL": "warning"}
    listed = _cli(["spool", "list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(x) for x in listed.stdout.splitlines()]
    assert [(x["directory"], x["frames"], x["live"]) for x in lines if x["kind"] == "spool"] == [
        ("w5", 1, False)
    ]
    [line] = [x for x in lines if x["kind"] == "quarantined"]
    assert (line["topic"], line["records"], line["reason"]) == (topic, 1, "too_large")
    assert line["bytes"] > 100_000 and line["when"]
    small = {**env, "EVENTPIPE_MAX_RECORD_BYTES": str(64 * 1024)}
    refused = _cli(["spool", "replay", "--all"], small)  # not fixed yet: a one-line error
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused
    assert "too_large" in refused.stderr or "max_request_size" in refused.stderr
    replayed = _cli(["spool", "replay", line["id"]], env)
    assert replayed.returncode == 0, replayed.stderr
    assert "1 frame(s) replayed" in replayed.stdout
    assert Quarantine(own.state_dir / "spool").entries() == []
    values = await _topic_values(own, topic, 2)
    assert sorted(values) == [b"small", b"y" * 100_000]
    nothing = _cli(["spool", "replay"], env)
    assert nothing.returncode == 2 and "nothing chosen" in nothing.stderr


async def test_the_drainer_survives_an_unexpected_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = settings.topic_behavior
    spool = Spool(settings.state_dir / "spool" / "w0", settings.spool_max_bytes)
    spool.open()
    spool.append(topic, [(b"k", b"survivor")])
    spool.close()
    calls = 0
    real = delivery_module.scan_segment

    def flaky(path: Path) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the drainer")
        return real(path)

    monkeypatch.setattr(delivery_module, "scan_segment", flaky)
    before = REGISTRY.get_sample_value("eventpipe_spool_drain_errors_total") or 0.0
    async with EventProducer(settings) as producer, Delivery(settings, producer, spool):
        await wait_for(lambda: _drained(spool), timeout=30)
    assert calls >= 2
    assert REGISTRY.get_sample_value("eventpipe_spool_drain_errors_total") == before + 1
    assert await _topic_values(settings, topic, 1) == [b"survivor"]


def test_orphans_are_adopted_once_and_their_owner_can_start_again(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    live = Spool(root / "w1", 1 << 20)
    live.open()
    live.append("t", [(b"k", b"live")])
    orphan = Spool(root / "w3", 1 << 20)
    orphan.open()
    orphan.append("t", [(b"k", b"o1")])
    orphan.append("t", [(b"k", b"o2")])
    orphan.close()
    mine = Spool(root / "w0", 1 << 20)
    mine.open()
    adopted = mine.adopt_orphans()
    assert [a.origin for a in adopted] == ["w3"]  # w1 is locked by its live owner
    [spool] = adopted
    frames = [f.messages for seg in spool.segments() for f in read_segment(seg)]
    assert frames == [[(b"k", b"o1")], [(b"k", b"o2")]]  # the orphan's own order
    assert mine.adopt_orphans() == []  # never twice
    again = Spool(root / "w3", 1 << 20)  # a worker 3 started again gets a fresh spool
    again.open()
    assert again.empty
    again.close()
    live.close()
    mine.close()
