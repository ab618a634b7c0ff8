"""Admin and visitor credentials. A visitor token is signed (HMAC-SHA256) and grants exactly one
conversation until it expires; the gateway checks it without a lookup."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from kefu.shared.errors import PermissionDenied, Unauthenticated

_PREFIX = "v1"
_AGENT_PREFIX = "a1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class VisitorGrant:
    conversation_id: str
    tenant: str
    expires: int


class Auth:
    def __init__(self, admin_token: str, secret: str, visitor_ttl: float) -> None:
        self._admin = admin_token.encode()
        self._key = hashlib.sha256(b"kefu-visitor-token\0" + secret.encode()).digest()
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

    def issue_agent(self, agent_id: str, ttl: float, now: float | None = None) -> str:
        """A token for a human agent: the agent console (``/v1/agent/ws``) accepts it until it expires."""
        exp = int((now or time.time()) + ttl)
        payload = _b64(json.dumps({"a": agent_id, "e": exp}, separators=(",", ":")).encode())
        return f"{_AGENT_PREFIX}.{payload}.{self._sign(payload)}"

    def verify_agent(self, token: str | None, now: float | None = None) -> str:
        """The agent id of ``token`` (the admin token acts as agent "admin").

        Raises:
            Unauthenticated: missing, malformed, forged or expired.
        """
        if not token:
            raise Unauthenticated("an agent token is required")
        if self.is_admin(token):
            return "admin"
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _AGENT_PREFIX or not hmac.compare_digest(self._sign(parts[1]), parts[2]):
            raise Unauthenticated("invalid agent token", code="invalid_token")
        try:
            claims = json.loads(_unb64(parts[1]))
            agent, exp = str(claims["a"]), int(claims["e"])
        except (ValueError, KeyError, TypeError):
            raise Unauthenticated("invalid agent token", code="invalid_token") from None
        if exp < (now or time.time()):
            raise Unauthenticated("the token has expired", code="token_expired")
        return agent

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def require_admin(self, token: str | None) -> None:
        if not token:
            raise Unauthenticated("an admin token is required")
        if not self.is_admin(token):
            raise PermissionDenied("this call needs the admin token")

    def require_conversation(self, token: str | None, conversation_id: str, *, admin_ok: bool) -> None:
        """Allow the visitor of ``conversation_id`` (and the admin when ``admin_ok``)."""
        if not token:
            raise Unauthenticated("a visitor token is required")
        if admin_ok and self.is_admin(token):
            return
        if self.is_admin(token):
            raise PermissionDenied("use the visitor token of this conversation")
        grant = self.verify_visitor(token)
        if not hmac.compare_digest(grant.conversation_id, conversation_id):
            raise PermissionDenied("this token does not grant that conversation")


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
