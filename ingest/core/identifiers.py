"""SQL identifiers made from names: checked, then quoted (the only way names enter SQL text)."""

from __future__ import annotations

import re

from ingest.core.errors import ConfigError

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")


class BadIdentifier(ConfigError):
    """A table, column or role name that is not a plain lower-case identifier."""


def ident(name: str) -> str:
    """``name`` double-quoted after checking it is a plain lower-case identifier."""
    if not _IDENT.match(name):
        raise BadIdentifier(
            f"refusing identifier {name!r}", hint="use lower-case letters, digits, _"
        )
    return f'"{name}"'


def quote(name: str) -> str:
    """Any catalog name (a column) as a quoted identifier."""
    return '"' + name.replace('"', '""') + '"'
