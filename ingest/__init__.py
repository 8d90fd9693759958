"""eventpipe ingest side: the HTTP collector and the code shared by every component."""

__version__ = "0.1.0"
