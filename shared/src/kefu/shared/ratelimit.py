"""Token-bucket rate limits per key (a conversation, a client address, a tenant, a tool), shared by the services."""

from __future__ import annotations

import time
from collections import OrderedDict

from kefu.shared.errors import RateLimited


class RateLimiter:
    """Allows ``burst`` requests at once and ``per_second`` sustained, per key.

    Keys are kept in LRU order and capped at ``max_keys``, so a flood of distinct keys cannot grow memory.
    """

    def __init__(self, per_second: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = per_second
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key: str, cost: float = 1.0, now: float | None = None) -> None:
        """Take ``cost`` tokens for ``key``.

        Raises:
            RateLimited: not enough tokens; ``retry_after`` says when there will be.
        """
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            raise RateLimited("too many requests", retry_after=(cost - tokens) / self.rate)
        self._buckets[key] = (tokens - cost, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def available(self, key: str, now: float | None = None) -> float:
        """The tokens ``key`` has now (taking none)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)
