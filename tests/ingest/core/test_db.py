"""SQL text helpers: literals that PostgreSQL reads back as the same values."""

from __future__ import annotations

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.core.db import Database, inline, literal


@pytest.mark.parametrize("conforming", ["on", "off"])
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))))
async def test_text_literals_read_back_unchanged(db: Database, conforming: str, text: str) -> None:
    async with db.pool.acquire() as conn:
        await conn.execute(f"SET standard_conforming_strings = {conforming}")
        try:
            assert await conn.fetchval(f"SELECT {literal(text)}::text") == text
            assert await conn.fetchval(f"SELECT {literal(text + chr(92) + chr(39))}") == (
                text + "\\'"
            )
        finally:
            await conn.execute("RESET standard_conforming_strings")


async def test_numbers_and_arrays(db: Database) -> None:
    assert await db.pool.fetchval(f"SELECT {literal([3, -1, 0])}::bigint[]") == [3, -1, 0]
    assert await db.pool.fetchval(f"SELECT {literal([])}::int[]") == []
    assert await db.pool.fetchval(f"SELECT {literal(-42)}") == -42


def test_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="NUL"):
        literal("a\x00b")
    with pytest.raises(TypeError):
        literal(True)


async def test_inline_writes_a_named_query_runnable_as_plain_text(db: Database) -> None:
    sql = inline("set_local_role", "it's")
    assert sql == "SELECT set_config('role', 'it''s', true)"
    async with db.pool.acquire() as conn, conn.transaction():
        with pytest.raises(asyncpg.InvalidParameterValueError, match="it's"):
            await conn.execute(sql)
