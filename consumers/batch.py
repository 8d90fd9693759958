"""A loader's batch: the records its reader took since the last commit, decoded.

The reader decodes each record as it arrives (``Batch.add``), in the time the
writer spends on the batch before: the storefront's straight to COPY data,
else into rows by the fast decoder, else event by event by the checked one,
each bad event with its reason.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition

from consumers.copy_writer import Decoded, Rejected
from consumers.rows import RecordRejected, TableSpec
from consumers.values import PgTime
from ingest.core import metrics
from ingest.core.suppression import Suppression


@dataclass
class Batch:
    """Records read since the last commit, decoded, by Kafka partition (in offset order)."""

    records: dict[TopicPartition, list[Decoded]] = field(default_factory=lambda: defaultdict(list))
    count: int = 0  # events
    size: int = 0  # bytes
    records_read: int = 0
    # The loader's seek epoch of each partition when its records were read: records
    # read before a seek are stale (the consumer reads them again from the seek).
    epochs: dict[TopicPartition, int] = field(default_factory=dict)
    # The earliest and latest event times of the rows (PgTime), for the partitions' months.
    earliest: PgTime | None = None
    latest: PgTime | None = None

    def add(
        self,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        spec: TableSpec,
        epoch: int = 0,
        suppression: Suppression | None = None,
    ) -> None:
        """Decode ``records`` of ``tp``, read in seek ``epoch``, into the batch, without
        the events of erased visitors (``suppression``)."""
        if self.epochs.setdefault(tp, epoch) != epoch:
            # ``tp`` was positioned again since its first records here were read:
            # those are stale, and read again from the new position.
            self.records[tp] = []
            self.epochs[tp] = epoch
        out = self.records[tp]
        first = len(out)
        decode, decode_copy = spec.decode, spec.decode_copy
        topic, partition = tp.topic, tp.partition
        times: list[PgTime] = []
        # Nothing per record unless some visitor is erased: then a substring test of
        # the suppressed shops' ids, and a decode only of records naming one.
        suppress = suppression if suppression is not None and suppression.active else None
        for record in records:
            raw = record.value or b""
            offset = record.offset
            if suppress is not None:
                kept, dropped = suppress.filter(raw)
                if dropped:
                    metrics.EVENTS_SUPPRESSED.labels(spec.table).inc(dropped)
                    if kept is None:  # nothing left: a record of no rows, its offset passed
                        out.append(Decoded(topic, partition, offset, raw, False, [], []))
                        self.count += 1
                        continue
                    record = _replaced(record, kept)
                    raw = kept
            self.size += len(raw)
            encoded = decode_copy(record.value)
            if encoded is not None:
                self.count += encoded.count
                times += (encoded.earliest, encoded.latest)
                batched = encoded.batched
                out.append(Decoded(topic, partition, offset, raw, batched, [], [], encoded=encoded))
                continue
            fast = decode(record.value)
            if fast is not None:
                rows, contexts, batched = fast
                self.count += len(rows)
                out.append(Decoded(topic, partition, offset, raw, batched, rows, contexts))
                continue
            # The record or one of its events is bad: each event checked on its own.
            try:
                events, batched = spec.events(record.value)
            except RecordRejected as exc:
                rejected = Rejected(topic, partition, offset, 0, raw, exc.reason, exc.error)
                out.append(Decoded(topic, partition, offset, raw, False, [], [], None, [rejected]))
                self.count += 1
                continue
            self.count += len(events)
            out.append(_one_by_one(tp, offset, raw, events, batched, spec))
        self.records_read += len(records)
        # Here, in the reader's time, not as one pass over the batch in the writer's.
        at = spec.time_index
        times += [row[at] for d in out[first:] for row in d.rows]
        if times:
            low, high = min(times), max(times)
            self.earliest = low if self.earliest is None else min(self.earliest, low)
            self.latest = high if self.latest is None else max(self.latest, high)

    def free_some(self, events: int) -> bool:
        """Drop the rows of about ``events`` events of this (written) batch; False when
        none are left.

        Freeing a batch's objects at once stalled the writer between one commit
        and the next COPY (``benchmarks/README.md``); the reader frees it
        piecemeal instead, while PostgreSQL is busy with the next batch.
        """
        while self.records:
            tp = next(iter(self.records))
            decoded = self.records[tp]
            while decoded and events > 0:
                events -= decoded.pop().count or 1
            if events <= 0:
                return True
            del self.records[tp]
        return False


def _replaced(record: ConsumerRecord[bytes, bytes], value: bytes) -> ConsumerRecord[bytes, bytes]:
    """``record`` with ``value`` instead of its own (events of erased visitors left out)."""
    return dataclasses.replace(record, value=value, serialized_value_size=len(value))


def _one_by_one(
    tp: TopicPartition,
    offset: int,
    raw: bytes,
    events: list[Any],
    batched: bool,
    spec: TableSpec,
) -> Decoded:
    """A record with a bad event: each event on its own, the bad ones with their reasons."""
    decoded = Decoded(tp.topic, tp.partition, offset, raw, batched, [], [], indexes=[])
    for index, data in enumerate(events):
        try:
            row, context = spec.row(data)
        except RecordRejected as exc:
            own = orjson.dumps(data) if batched else raw
            decoded.rejected.append(
                Rejected(tp.topic, tp.partition, offset, index, own, exc.reason, exc.error)
            )
        else:
            decoded.add(row, index, context)
    return decoded
