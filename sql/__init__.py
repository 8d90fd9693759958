"""The SQL of the pipeline: numbered migrations and the named queries (found as package data)."""
