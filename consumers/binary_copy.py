"""PostgreSQL's binary COPY format: the pieces the loader encodes rows with.

asyncpg encodes a COPY's rows while the COPY runs (512 KB at a time,
PostgreSQL waiting for the first piece), from row tuples the loader first has
to build (and later free). Instead, the loader's reader encodes each record's
events straight into COPY data as it decodes them (``fast.storefront_copy``,
``fast.behavior_copy``, which also gathers what the rows tell of their
sessions for ``user_sessions``), in the time PostgreSQL spends on
the previous batch, for less than decoding into tuples alone costs (the
figures: ``benchmarks/README.md``, "Figures behind the loader's code").
asyncpg has no public encoder to reuse (its codecs live inside its COPY
coroutine), hence this.

Format: https://www.postgresql.org/docs/current/sql-copy.html (Binary Format).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterable
from functools import lru_cache

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # signature, flags, extension
TRAILER = struct.pack(">h", -1)

NULL = struct.pack(">i", -1)
# A field's length prefix, for the lengths most values have: a value that is
# longer raises IndexError, and its record takes the path asyncpg encodes.
LENGTHS = [struct.pack(">i", n) for n in range(4096)]
JSONB_VERSION = b"\x01"  # what starts a jsonb field, before its JSON text
int64 = struct.Struct(">q").pack  # a timestamptz: microseconds since 2000-01-01 UTC


def field_count(n: int) -> bytes:
    """What starts a tuple of ``n`` fields."""
    return struct.pack(">h", n)


@lru_cache(maxsize=4096)
def uuid_text(value: str) -> bytes:
    """A ``uuid`` field (length included) from a UUID string that was checked.

    Cached: rows carry shop ids as strings, and a few shops send most events.
    """
    return LENGTHS[16] + bytes.fromhex(value.replace("-", ""))


_CHUNK = 256 * 1024  # bytes per CopyData message: PostgreSQL starts on the first at once


async def stream(tuples: Iterable[bytes]) -> AsyncIterator[bytes]:
    """Encoded tuples as a whole binary COPY, in chunks: a ``source`` for asyncpg's
    ``copy_to_table`` (which takes a bare ``bytes`` source for a file name)."""
    parts, size = [HEADER], 0
    for data in tuples:
        parts.append(data)
        size += len(data)
        if size >= _CHUNK:
            yield b"".join(parts)
            parts, size = [], 0
    parts.append(TRAILER)
    yield b"".join(parts)
