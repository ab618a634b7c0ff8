import pytest

from kefu.gateway.auth import Auth, bearer
from kefu.gateway.ratelimit import RateLimiter
from kefu.shared import errors

AUTH = Auth("admin-secret-token", "signing-key", visitor_ttl=60)


def test_visitor_token_grants_one_conversation():
    token = AUTH.issue_visitor("c1", "acme", now=1000)
    grant = AUTH.verify_visitor(token, now=1001)
    assert (grant.conversation_id, grant.tenant) == ("c1", "acme")
    live = Auth("admin-secret-token", "signing-key", visitor_ttl=3600)
    live.require_conversation(live.issue_visitor("c1", "acme"), "c1", admin_ok=False)
    with pytest.raises(errors.PermissionDenied):
        live.require_conversation(live.issue_visitor("c1", "acme"), "c2", admin_ok=True)
    live.require_conversation("admin-secret-token", "c2", admin_ok=True)
    with pytest.raises(errors.PermissionDenied):  # the admin may read, not speak as the visitor
        live.require_conversation("admin-secret-token", "c2", admin_ok=False)


def test_expired_forged_and_foreign_tokens_are_rejected():
    token = AUTH.issue_visitor("c1", "acme", now=1000)
    with pytest.raises(errors.Unauthenticated) as exc:
        AUTH.verify_visitor(token, now=1061)
    assert exc.value.code == "token_expired"
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload[:-2]}xx.{sig}"
    for bad in (forged, "v1.abc", "garbage", token.replace("v1", "v2", 1)):
        with pytest.raises(errors.Unauthenticated):
            AUTH.verify_visitor(bad, now=1001)
    other_key = Auth("admin-secret-token", "another-key", 60)
    with pytest.raises(errors.Unauthenticated):
        other_key.verify_visitor(token, now=1001)


def test_admin_checks():
    AUTH.require_admin("admin-secret-token")
    with pytest.raises(errors.Unauthenticated):
        AUTH.require_admin(None)
    with pytest.raises(errors.PermissionDenied):
        AUTH.require_admin("admin-secret-tokeN")
    with pytest.raises(errors.PermissionDenied):  # a visitor token is not an admin token
        AUTH.require_admin(AUTH.issue_visitor("c1", "acme"))


def test_bearer_header():
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer") is None


def test_rate_limiter_bursts_then_refills():
    limiter = RateLimiter(per_second=2, burst=3)
    for _ in range(3):
        limiter.check("k", now=0)
    with pytest.raises(errors.RateLimited) as exc:
        limiter.check("k", now=0)
    assert exc.value.retry_after == pytest.approx(0.5)
    limiter.check("other", now=0)  # keys are independent
    limiter.check("k", now=0.6)


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(per_second=1, burst=1, max_keys=10)
    for i in range(100):
        limiter.check(str(i), now=0)
    assert len(limiter._buckets) == 10
