"""Token-bucket rate limits per key (a conversation, a client address, a tenant, an account)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

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

    def _refilled(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)


def check_all(checks: list[tuple[RateLimiter, str]], cost: float = 1.0, now: float | None = None) -> None:
    """Take ``cost`` from every (limiter, key) bucket, or from none of them.

    Raises:
        RateLimited: some bucket is short; ``retry_after`` is when all of them will have enough.
    """
    now = time.monotonic() if now is None else now
    wait = max(((cost - lim._refilled(key, now)) / lim.rate for lim, key in checks), default=0.0)
    if wait > 0:
        raise RateLimited("too many requests", retry_after=wait)
    for lim, key in checks:
        lim.check(key, cost, now)


class RateLimits:
    """The gateway's limits per client address, per conversation (visitor) and per tenant, by kind of call."""

    def __init__(self, settings: Any) -> None:
        s = settings

        def lim(prefix: str) -> RateLimiter:
            return RateLimiter(getattr(s, f"{prefix}_per_second"), getattr(s, f"{prefix}_burst"))

        self.messages = lim("rate_messages")
        self.ip_messages = lim("rate_ip_messages")
        self.tenant_messages = lim("rate_tenant_messages")
        self.starts = lim("rate_starts")
        self.tenant_starts = lim("rate_tenant_starts")
        self.uploads = lim("rate_uploads")
        self.ip_uploads = lim("rate_ip_uploads")
        self.tenant_uploads = lim("rate_tenant_uploads")
        self.logins = lim("rate_logins")
        self.account_logins = lim("rate_account_logins")

    def message(self, address: str, conversation_id: str, tenant: str) -> None:
        check_all([(self.messages, conversation_id), (self.ip_messages, address), (self.tenant_messages, tenant)])

    def start(self, address: str, tenant: str) -> None:
        check_all([(self.starts, address), (self.tenant_starts, tenant)])

    def upload(self, address: str, conversation_id: str, tenant: str) -> None:
        check_all([(self.uploads, conversation_id), (self.ip_uploads, address), (self.tenant_uploads, tenant)])

    def login(self, address: str, account: str) -> None:
        check_all([(self.logins, address), (self.account_logins, account)])


def client_address(peer: str | None, forwarded_for: str | None, hops: int) -> str:
    """The address to limit: the peer, or with ``hops`` trusted proxies in front, the address the
    outermost of them saw (counted from the right of X-Forwarded-For, which a client can prepend to)."""
    if hops > 0 and forwarded_for:
        chain = [a.strip() for a in forwarded_for.split(",") if a.strip()]
        if chain:
            return chain[-min(hops, len(chain))]
    return peer or ""
