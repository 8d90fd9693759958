"""The embedded stack: PostgreSQL, the broker, and `eventpipe up`."""
