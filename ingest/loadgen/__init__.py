"""The load generator: realistic traffic, its runner, verification."""
