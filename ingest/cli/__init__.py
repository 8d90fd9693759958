"""The `eventpipe` command: the entry point (``main``) and one module per command group.

The only package that imports ``consumers``; nothing imports it.
"""

from ingest.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
