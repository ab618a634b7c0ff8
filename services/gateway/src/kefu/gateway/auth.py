"""Admin, visitor and agent credentials.

A visitor token is signed (HMAC-SHA256) and grants exactly one conversation until it expires; the
gateway checks it without a lookup. An agent token is signed with another key (so neither kind can pass
for the other), names its tenant (none: every tenant), agent, role, expiry and issue time; whether its
account still exists, and since when its tokens count, is :class:`kefu.gateway.agents.AgentDirectory`'s
check. Every comparison of a secret is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from kefu.shared.errors import BadRequest, PermissionDenied, Unauthenticated

_PREFIX = "v1"
_AGENT_PREFIX = "a2"
ROLES = ("agent", "admin")

# scrypt cost: 2**15 x 8 x 128 B = 32 MiB and about 90 ms per hash on a laptop core.
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 15, 8, 1
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class VisitorGrant:
    conversation_id: str
    tenant: str
    expires: int


@dataclass(frozen=True)
class AgentGrant:
    """What an agent token (or the admin token, as agent "admin") allows.

    Attributes:
        tenant: The one tenant whose conversations the agent sees; "" for every tenant.
        issued_ms: When the token was issued (unix ms); the account's ``not_before_ms`` refuses older ones.
        account: Issued at login for a stored account, so only valid while that account exists.
        generation: The account generation a login token was issued for (a new password or a removal
            moves the account on).
        deployment_admin: The deployment's admin token itself.
    """

    agent_id: str
    tenant: str
    role: str
    expires: float
    issued_ms: int
    account: bool = False
    deployment_admin: bool = False
    generation: int = 0

    @property
    def key(self) -> str | None:
        """The account key in KV bucket "agents" ("<tenant>.<agent_id>"), None for a deployment-wide token."""
        return f"{self.tenant}.{self.agent_id}" if self.tenant else None

    def sees(self, tenant: str) -> bool:
        return not self.tenant or self.tenant == tenant

    def may_manage(self, tenant: str) -> bool:
        """May create, list and remove ``tenant``'s agent accounts."""
        return self.deployment_admin or (self.role == "admin" and self.sees(tenant))


class Auth:
    def __init__(self, admin_token: str, secret: str, visitor_ttl: float) -> None:
        self._admin = admin_token.encode()
        self._key = hashlib.sha256(b"kefu-visitor-token\0" + secret.encode()).digest()
        self._agent_key = hashlib.sha256(b"kefu-agent-token\0" + secret.encode()).digest()
        self.visitor_ttl = visitor_ttl

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self._admin)  # type: ignore[union-attr]

    def issue_visitor(self, conversation_id: str, tenant: str, now: float | None = None) -> str:
        exp = int((now or time.time()) + self.visitor_ttl)
        payload = _b64(json.dumps({"c": conversation_id, "t": tenant, "e": exp}, separators=(",", ":")).encode())
        return f"{_PREFIX}.{payload}.{self._sign(payload)}"

    def verify_visitor(self, token: str, now: float | None = None) -> VisitorGrant:
        """The grant in ``token``.

        Raises:
            Unauthenticated: malformed, forged or expired.
        """
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX:
            raise Unauthenticated("invalid token", code="invalid_token")
        if not hmac.compare_digest(self._sign(parts[1]), parts[2]):
            raise Unauthenticated("invalid token", code="invalid_token")
        try:
            claims = json.loads(_unb64(parts[1]))
            grant = VisitorGrant(str(claims["c"]), str(claims["t"]), int(claims["e"]))
        except (ValueError, KeyError, TypeError):
            raise Unauthenticated("invalid token", code="invalid_token") from None
        if grant.expires < (now or time.time()):
            raise Unauthenticated("the token has expired", code="token_expired")
        return grant

    def issue_agent(self, agent_id: str, ttl: float, *, tenant: str = "", role: str = "agent", account: bool = False,
                    now: float | None = None, issued_ms: int | None = None, generation: int = 0) -> str:
        """A token for a human agent, for ``tenant`` ("" for every tenant), valid ``ttl`` seconds."""
        now = now or time.time()
        claims: dict[str, object] = {"a": agent_id, "r": role, "e": int(now + ttl),
                                     "i": issued_ms if issued_ms is not None else int(now * 1000)}
        if tenant:
            claims["t"] = tenant
        if account:
            claims["k"] = 1
            claims["g"] = generation
        payload = _b64(json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode())
        return f"{_AGENT_PREFIX}.{payload}.{self._sign_agent(payload)}"

    def verify_agent(self, token: str | None, now: float | None = None) -> AgentGrant:
        """The grant of ``token`` as far as its signature and expiry tell (the admin token acts as agent
        "admin" of every tenant); revocation is checked by the agent directory.

        Raises:
            Unauthenticated: missing, malformed, forged or expired.
        """
        if not token:
            raise Unauthenticated("an agent token is required")
        if self.is_admin(token):
            return AgentGrant("admin", "", "admin", float("inf"), 0, deployment_admin=True)
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _AGENT_PREFIX or not hmac.compare_digest(self._sign_agent(parts[1]), parts[2]):
            raise Unauthenticated("invalid agent token", code="invalid_token")
        try:
            claims = json.loads(_unb64(parts[1]))
            grant = AgentGrant(str(claims["a"]), str(claims.get("t", "")), str(claims["r"]), int(claims["e"]),
                               int(claims["i"]), account=bool(claims.get("k")), generation=int(claims.get("g", 0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Unauthenticated("invalid agent token", code="invalid_token") from None
        if grant.role not in ROLES:
            raise Unauthenticated("invalid agent token", code="invalid_token")
        if grant.expires < (now or time.time()):
            raise Unauthenticated("the token has expired", code="token_expired")
        return grant

    @staticmethod
    def is_agent_token(token: str) -> bool:
        """Shaped like an agent token (whether it is genuine is :meth:`verify_agent`'s question)."""
        return token.startswith(_AGENT_PREFIX + ".")

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def _sign_agent(self, payload: str) -> str:
        return _b64(hmac.new(self._agent_key, f"{_AGENT_PREFIX}.{payload}".encode(), hashlib.sha256).digest())

    def require_admin(self, token: str | None) -> None:
        if not token:
            raise Unauthenticated("an admin token is required")
        if not self.is_admin(token):
            raise PermissionDenied("this call needs the admin token")

    def require_conversation(self, token: str | None, conversation_id: str, *, admin_ok: bool) -> VisitorGrant | None:
        """Allow the visitor of ``conversation_id`` (and the admin when ``admin_ok``); the visitor's grant,
        None for the admin."""
        if not token:
            raise Unauthenticated("a visitor token is required")
        if admin_ok and self.is_admin(token):
            return None
        if self.is_admin(token):
            raise PermissionDenied("use the visitor token of this conversation")
        grant = self.require_visitor(token)
        # As bytes: compare_digest refuses str with non-ASCII characters (a path may hold any).
        if not hmac.compare_digest(grant.conversation_id.encode(), conversation_id.encode("utf-8", "replace")):
            raise PermissionDenied("this token does not grant that conversation")
        return grant

    def require_visitor(self, token: str) -> VisitorGrant:
        """The grant of a visitor token; a genuine agent token is refused as such (403 permission_denied),
        a forged one as any forged token (401)."""
        if self.is_agent_token(token):
            self.verify_agent(token)
            raise PermissionDenied("an agent token does not grant visitor calls", code="permission_denied")
        return self.verify_visitor(token)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _origin(value: str) -> tuple[str, str]:
    """(scheme, host[:port]) of an origin, lower-case, without the scheme's default port."""
    scheme, sep, host = value.strip().rstrip("/").lower().partition("://")
    if not sep:
        return "", scheme
    port = _DEFAULT_PORTS.get(scheme)
    if port and host.endswith(":" + port):
        host = host[: -len(port) - 1]
    return scheme, host


class Origins:
    """Which browser origins may open the WebSockets (``KEFU_ALLOWED_ORIGINS``).

    Always the gateway's own origin (the Origin's host is the request's Host); also every origin listed,
    or any with "*". A handshake without an Origin header is not a browser's, and is let in: the token
    is what guards it, the origin check only stops other sites' pages from riding a visitor's browser.
    """

    def __init__(self, spec: str = "") -> None:
        items = [x.strip() for x in spec.split(",") if x.strip()]
        self.any = "*" in items
        self.allowed = frozenset(_origin(x) for x in items if x != "*")

    def check(self, origin: str | None, host: str | None) -> None:
        """Raises: PermissionDenied (origin_not_allowed)."""
        if origin is None or self.any:
            return
        scheme, where = _origin(origin)
        if (scheme, where) in self.allowed:
            return
        if scheme and host and where == _origin(f"{scheme}://{host}")[1]:
            return
        raise PermissionDenied(f"pages from {origin[:100]!r} may not open this socket", code="origin_not_allowed")


def check_password_rules(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise BadRequest(f"the password must have at least {MIN_PASSWORD_CHARS} characters", code="invalid_field")
    if len(password) > MAX_PASSWORD_CHARS:
        raise BadRequest(f"the password must have at most {MAX_PASSWORD_CHARS} characters", code="invalid_field")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the password is not valid UTF-8", code="invalid_utf8") from None
    return password


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**log_n, r=r, p=p, dklen=32,
                          maxmem=129 * r * 2**log_n + 2**20)


def hash_password(password: str) -> str:
    """``password`` as "scrypt$<log2 n>$<r>$<p>$<salt>$<hash>" (slow on purpose: run it off the event loop)."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_LOG_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a :func:`hash_password` result), compared in constant time."""
    try:
        scheme, log_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or not (10 <= int(log_n) <= 20 and 1 <= int(r) <= 32 and 1 <= int(p) <= 16):
            return False
        expected = _unb64(digest)
        actual = _scrypt(password, _unb64(salt), int(log_n), int(r), int(p))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return False
    return hmac.compare_digest(actual, expected)
