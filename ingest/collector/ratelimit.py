"""Token buckets per (write key, client address) under a ceiling per write key.

Write keys are public (every page's HTML holds one), so the key alone cannot be
the identity a limit protects: one client would spend a shop's whole budget.
Each client address gets its own bucket, and the key a larger one that bounds
the shop's total. A request takes a token from both or from neither, so a
client refused at its own bucket spends nothing of its shop's.

Hand-written (a few dozen lines) rather than a library: the well-kept ones
(aiolimiter, limits) either block instead of answering "retry after N s" or
need a storage backend; a collector needs neither.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class _Buckets:
    """``rate`` tokens a second up to ``burst``, per name; at most ``max_keys`` names.

    The least recently used bucket is dropped past ``max_keys``: a dropped
    bucket starts full again, so an eviction only ever forgives.
    """

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def tokens(self, name: str, now: float) -> float:
        if self.rate <= 0:
            return self.burst
        tokens, last = self._buckets.get(name, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def wait(self, tokens: float) -> float:
        return 0.0 if self.rate <= 0 or tokens >= 1 else (1 - tokens) / self.rate

    def spend(self, name: str, tokens: float, now: float) -> None:
        if self.rate <= 0:
            return
        self._buckets[name] = (tokens - 1, now)
        self._buckets.move_to_end(name)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimiter:
    """Per (key, client) ``client_rate``/s with bursts of ``client_burst``, and per key
    ``key_rate``/s with bursts of ``key_burst``; a rate of 0 turns that level off."""

    def __init__(
        self,
        key_rate: float,
        key_burst: int,
        client_rate: float,
        client_burst: int,
        max_keys: int = 100_000,
    ) -> None:
        self._keys = _Buckets(key_rate, key_burst, max_keys)
        self._clients = _Buckets(client_rate, client_burst, max_keys)

    def wait(self, key: str, client: str) -> float:
        """0 when a request would be allowed now, else the seconds until it would; spends
        nothing (checked before the body is decoded, taken once it holds an event)."""
        now = time.monotonic()
        return max(
            self._clients.wait(self._clients.tokens(f"{key} {client}", now)),
            self._keys.wait(self._keys.tokens(key, now)),
        )

    def take(self, key: str, client: str) -> float:
        """0 when allowed (a token taken from both buckets); else the seconds to wait,
        and nothing taken from either."""
        now = time.monotonic()
        pair = f"{key} {client}"
        mine, shared = self._clients.tokens(pair, now), self._keys.tokens(key, now)
        wait = max(self._clients.wait(mine), self._keys.wait(shared))
        if wait > 0:
            return wait
        self._clients.spend(pair, mine, now)
        self._keys.spend(key, shared, now)
        return 0.0

    def size(self) -> int:
        """Buckets held (per key plus per key and client)."""
        return len(self._keys) + len(self._clients)
