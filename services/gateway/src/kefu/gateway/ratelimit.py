"""Token-bucket rate limits per key (a conversation, a client address, a tenant, an account)."""

from __future__ import annotations

import time
from typing import Any

from kefu.shared.errors import RateLimited
from kefu.shared.ratelimit import RateLimiter

__all__ = ["RateLimiter", "RateLimits", "check_all", "client_address"]


def check_all(checks: list[tuple[RateLimiter, str]], cost: float = 1.0, now: float | None = None) -> None:
    """Take ``cost`` from every (limiter, key) bucket, or from none of them.

    Raises:
        RateLimited: some bucket is short; ``retry_after`` is when all of them will have enough.
    """
    now = time.monotonic() if now is None else now
    wait = max(((cost - lim.available(key, now)) / lim.rate for lim, key in checks), default=0.0)
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
