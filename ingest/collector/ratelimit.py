"""Per-write-key token buckets.

Hand-written (a dozen lines) rather than a library: the well-kept ones
(aiolimiter, limits) either block instead of answering "retry after N s" or
need a storage backend; a collector needs neither.
"""

from __future__ import annotations

import time


class RateLimiter:
    """``rate`` requests per second per key with bursts of ``burst``; rate 0 disables it."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when allowed; otherwise the seconds to wait before a token is free."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()  # bounded memory; a reset only forgives
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate
