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


def test_agent_tokens_carry_tenant_role_and_issue_time():
    token = AUTH.issue_agent("alice", 60, tenant="acme", role="admin", account=True, now=1000)
    grant = AUTH.verify_agent(token, now=1001)
    assert (grant.agent_id, grant.tenant, grant.role, grant.account) == ("alice", "acme", "admin", True)
    assert grant.issued_ms == 1_000_000 and grant.key == "acme.alice"
    assert grant.sees("acme") and not grant.sees("globex") and grant.may_manage("acme") and not grant.may_manage("x")
    wide = AUTH.verify_agent(AUTH.issue_agent("bob", 60, now=1000), now=1001)
    assert wide.tenant == "" and wide.key is None and wide.sees("anything") and not wide.may_manage("acme")
    admin = AUTH.verify_agent("admin-secret-token")
    assert admin.deployment_admin and admin.sees("acme") and admin.may_manage("acme")


def test_agent_and_visitor_tokens_cannot_pass_for_each_other():
    agent = AUTH.issue_agent("alice", 60, tenant="acme")
    visitor = AUTH.issue_visitor("c1", "acme")
    with pytest.raises(errors.Unauthenticated):
        AUTH.verify_agent(visitor)
    with pytest.raises(errors.Unauthenticated):
        AUTH.verify_visitor(agent)
    # The same payload and signature under the other prefix: another key signs each kind.
    _, payload, sig = visitor.split(".")
    with pytest.raises(errors.Unauthenticated):
        AUTH.verify_agent(f"a2.{payload}.{sig}")
    with pytest.raises(errors.PermissionDenied) as exc:  # a genuine agent token on a visitor route
        AUTH.require_conversation(agent, "c1", admin_ok=True)
    assert exc.value.code == "permission_denied"


def test_forged_expired_and_foreign_agent_tokens_are_rejected():
    token = AUTH.issue_agent("alice", 60, tenant="acme", now=1000)
    with pytest.raises(errors.Unauthenticated) as exc:
        AUTH.verify_agent(token, now=1061)
    assert exc.value.code == "token_expired"
    head, payload, sig = token.split(".")
    for bad in (f"{head}.{payload}x.{sig}", f"{head}.{payload}.{sig[:-1]}A", "a2.x", "a2..", "", None):
        with pytest.raises(errors.Unauthenticated):
            AUTH.verify_agent(bad, now=1001)
    with pytest.raises(errors.Unauthenticated):
        Auth("admin-secret-token", "another-key", 60).verify_agent(token, now=1001)
    # A role the gateway does not know, even when correctly signed, is not a token.
    with pytest.raises(errors.Unauthenticated):
        AUTH.verify_agent(AUTH.issue_agent("alice", 60, tenant="acme", role="root"))


def test_admission_follows_the_account():
    from kefu.gateway.agents import admitted
    from kefu.proto.bus.v1.agents_pb2 import AgentAccount

    login = AUTH.verify_agent(AUTH.issue_agent("alice", 60, tenant="acme", role="admin", account=True,
                                               issued_ms=5000))
    issued = AUTH.verify_agent(AUTH.issue_agent("alice", 60, tenant="acme", issued_ms=5000))
    live = AgentAccount(tenant="acme", agent_id="alice", role="agent", not_before_ms=4000)
    assert admitted(login, live).role == "agent"  # the account's current role counts, not the token's
    for grant in (login, issued):
        with pytest.raises(errors.Unauthenticated) as exc:  # issued before the account's not_before
            admitted(grant, AgentAccount(tenant="acme", agent_id="alice", role="agent", not_before_ms=6000))
        assert exc.value.code == "token_revoked"
        with pytest.raises(errors.Unauthenticated):  # removed since
            admitted(grant, AgentAccount(tenant="acme", agent_id="alice", deleted=True, not_before_ms=6000))
    with pytest.raises(errors.Unauthenticated):  # a login token needs its account
        admitted(login, None)
    assert admitted(issued, None) == issued  # an admin-issued token of an id that never had an account
    wide = AUTH.verify_agent(AUTH.issue_agent("bob", 60))
    assert admitted(wide, None) == wide


def test_password_hashes_are_salted_scrypt():
    from kefu.gateway.auth import check_password, check_password_rules, hash_password

    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second and first.startswith("scrypt$15$8$1$") and "correct" not in first
    assert check_password("correct horse", first) and not check_password("correct horsE", first)
    for broken in ("", "scrypt$15$8$1$abc", "md5$1$1$1$a$b", "scrypt$40$8$1$AA$AA", "scrypt$x$8$1$AA$AA"):
        assert not check_password("correct horse", broken)
    with pytest.raises(errors.BadRequest) as exc:
        check_password_rules("short")
    assert exc.value.code == "invalid_field"


def test_origin_allow_list():
    from kefu.gateway.auth import Origins

    own = Origins("")
    own.check(None, "kefu.example:8080")  # a program, not a browser
    own.check("http://kefu.example:8080", "kefu.example:8080")
    own.check("https://KEFU.example", "kefu.example:443")
    for bad in ("http://evil.example", "null", "", "http://kefu.example:9999", "kefu.example:8080"):
        with pytest.raises(errors.PermissionDenied) as exc:
            own.check(bad, "kefu.example:8080")
        assert exc.value.code == "origin_not_allowed"
    listed = Origins("https://shop.example, http://localhost:3000/")
    listed.check("https://shop.example:443", "kefu.example")
    listed.check("http://localhost:3000", "kefu.example")
    listed.check("http://kefu.example", "kefu.example")
    with pytest.raises(errors.PermissionDenied):
        listed.check("http://shop.example", "kefu.example")  # another scheme is another origin
    Origins("*").check("http://anything.example", "kefu.example")


def test_limits_take_from_every_bucket_or_none():
    from kefu.gateway.ratelimit import check_all

    per_key, per_tenant = RateLimiter(per_second=1, burst=2), RateLimiter(per_second=1, burst=3)
    check_all([(per_key, "a"), (per_tenant, "t")], now=0)
    check_all([(per_key, "a"), (per_tenant, "t")], now=0)
    check_all([(per_key, "b"), (per_tenant, "t")], now=0)
    with pytest.raises(errors.RateLimited) as exc:  # "c" has tokens, the tenant has none
        check_all([(per_key, "c"), (per_tenant, "t")], now=0)
    assert exc.value.retry_after == pytest.approx(1.0)
    with pytest.raises(errors.RateLimited):
        check_all([(per_key, "a"), (per_tenant, "t")], now=0.5)
    check_all([(per_key, "c"), (per_tenant, "t")], now=1.0)
    per_key.check("c", now=1.0)  # the refused call above took nothing from "c"


def test_client_address_behind_proxies():
    from kefu.gateway.ratelimit import client_address

    assert client_address("10.0.0.1", "1.2.3.4", 0) == "10.0.0.1"  # untrusted header ignored
    assert client_address("10.0.0.1", "6.6.6.6, 1.2.3.4", 1) == "1.2.3.4"  # a forged first entry does not count
    assert client_address("10.0.0.1", "1.2.3.4, 10.0.0.9", 2) == "1.2.3.4"
    assert client_address("10.0.0.1", None, 1) == "10.0.0.1"


def test_a_new_password_refuses_earlier_login_tokens_even_if_the_clock_went_back():
    from kefu.gateway.agents import admitted
    from kefu.proto.bus.v1 import agents_pb2
    from kefu.shared.errors import Unauthenticated

    auth = Auth("admin-token-for-tests", "secret-for-tests", 3600)
    token = auth.issue_agent("alice", 600, tenant="acme", account=True, issued_ms=2_000, generation=3)
    grant = auth.verify_agent(token)
    assert grant.generation == 3
    now = agents_pb2.AgentAccount(tenant="acme", agent_id="alice", role="agent", not_before_ms=1_000, generation=3)
    assert admitted(grant, now).agent_id == "alice"
    # The password changed on a replica whose clock is behind: not_before_ms is older than the token.
    moved = agents_pb2.AgentAccount(tenant="acme", agent_id="alice", role="agent", not_before_ms=1_500, generation=4)
    with pytest.raises(Unauthenticated) as err:
        admitted(grant, moved)
    assert err.value.code == "token_revoked"
