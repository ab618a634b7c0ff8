"""Agent accounts (KV bucket "agents"): passwords, login, and revocation on every gateway replica.

Every check of an agent token reads its account from the bucket (a read from the stream leader, so a
removal counts on every replica as soon as it is stored), and every replica hears each change of the
bucket as it is written, so the open sockets of a removed agent close within milliseconds; a sweep every
few seconds covers a change missed while the replica was disconnected from NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.aio.msg import Msg

from kefu.gateway.auth import (
    ROLES,
    AgentGrant,
    Auth,
    check_password,
    check_password_rules,
    hash_password,
)
from kefu.proto.bus.v1 import agents_pb2
from kefu.shared.bus import Bus, decode, ensure_kv, subject_token
from kefu.shared.errors import BadRequest, KefuError, NotFound, Unauthenticated, Unavailable
from kefu.shared.logging import get_logger
from kefu.shared.streams import KV_AGENTS, agents_kv

log = get_logger("kefu.gateway.agents")

MAX_NAME_CHARS = 128
# Seconds between re-checks of the open sockets' accounts (the changes themselves arrive at once).
SWEEP_S = 3.0
_KV_PREFIX = f"$KV.{KV_AGENTS}."

OnRevoked = Callable[[str], Awaitable[None]]


def account_key(tenant: str, agent_id: str) -> str:
    return f"{subject_token(tenant)}.{subject_token(agent_id)}"


def admitted(grant: AgentGrant, account: agents_pb2.AgentAccount | None) -> AgentGrant:
    """``grant`` as the account record allows it now (with the account's current role).

    A login token needs its account, at the generation it was issued for (a new password or a removal
    moves the account on); any token of an id (login or ``POST /v1/agents``) issued before the account's
    ``not_before_ms`` (its creation, last password change or removal) is refused too.

    Raises:
        Unauthenticated: token_revoked.
    """
    if grant.key is None:
        return grant
    if account is None or account.deleted:
        if grant.account or (account is not None and grant.issued_ms < account.not_before_ms):
            raise Unauthenticated("this agent's access was revoked", code="token_revoked")
        return grant
    if grant.issued_ms < account.not_before_ms or (grant.account and grant.generation != account.generation):
        raise Unauthenticated("this agent's access was revoked", code="token_revoked")
    return dataclasses.replace(grant, role=account.role)


def account_json(a: agents_pb2.AgentAccount) -> dict[str, str]:
    return {"tenant": a.tenant, "agent_id": a.agent_id, "role": a.role, "name": a.name}


@dataclasses.dataclass(eq=False)
class _Session:
    grant: AgentGrant
    on_revoked: OnRevoked
    closing: bool = False


class AgentDirectory:
    """The agent accounts of every tenant, and the open agent sockets of this replica."""

    def __init__(self, bus: Bus, auth: Auth, token_ttl: float, *, hash_slots: int = 2) -> None:
        self.bus = bus
        self.auth = auth
        self.token_ttl = token_ttl
        # scrypt takes 32 MiB and ~90 ms of a core: at most this many at once, off the event loop.
        self._hashing = asyncio.Semaphore(hash_slots)
        self._sessions: dict[str, set[_Session]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def setup(self) -> None:
        self.kv = await ensure_kv(self.bus.js, agents_kv())
        # What an unknown agent's password is checked against, so that answer takes as long as a wrong one.
        self._decoy = await asyncio.to_thread(hash_password, secrets.token_urlsafe(16))
        self._changes = await self.bus.nc.subscribe(_KV_PREFIX + ">", cb=self._on_change)
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        self._sweeper.cancel()
        with contextlib.suppress(Exception):
            await self._changes.unsubscribe()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        for task in list(self._tasks):
            task.cancel()

    # Accounts

    async def get(self, tenant: str, agent_id: str) -> agents_pb2.AgentAccount | None:
        """The account record (a tombstone once removed), None if the id never had one."""
        try:
            entry = await self.kv.get(account_key(tenant, agent_id), validate_keys=False)
        except nats.js.errors.KeyNotFoundError as exc:
            if getattr(exc, "op", None):  # deleted by hand (nats kv del): as good as a tombstone of now
                return agents_pb2.AgentAccount(tenant=tenant, agent_id=agent_id, deleted=True,
                                               not_before_ms=int(time.time() * 1000))
            return None
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError, nats.js.errors.APIError) as exc:
            raise Unavailable(f"the agent accounts cannot be read: {exc}") from None
        return decode(agents_pb2.AgentAccount, entry.value or b"")

    async def put(self, tenant: str, agent_id: str, password: str, role: str = "agent",
                  name: str = "") -> agents_pb2.AgentAccount:
        """Create or update an account; a new password signs out the account's earlier tokens."""
        key = account_key(tenant, agent_id)
        check_password_rules(password)
        if role not in ROLES:
            raise BadRequest(f"role must be one of {', '.join(ROLES)}", code="invalid_field")
        if len(name) > MAX_NAME_CHARS:
            raise BadRequest(f"name is longer than {MAX_NAME_CHARS} characters", code="invalid_field")
        now_ms = int(time.time() * 1000)
        old = await self.get(tenant, agent_id)
        account = agents_pb2.AgentAccount(tenant=tenant, agent_id=agent_id, role=role, name=name,
                                          created_ms=now_ms, updated_ms=now_ms, not_before_ms=now_ms,
                                          generation=(old.generation + 1) if old is not None else 1)
        if old is not None and not old.deleted:
            account.created_ms = old.created_ms
            if await self._check(password, old.password_hash):
                account.not_before_ms, account.generation = old.not_before_ms, old.generation
        async with self._hashing:
            account.password_hash = await asyncio.to_thread(hash_password, password)
        await self._write(key, account)
        return account

    async def remove(self, tenant: str, agent_id: str) -> None:
        """Remove the account: its tokens stop working and its sockets close, on every replica.

        Raises:
            NotFound: unknown_agent.
        """
        key = account_key(tenant, agent_id)
        old = await self.get(tenant, agent_id)
        if old is None or old.deleted:
            raise NotFound(f"no agent {agent_id!r} in tenant {tenant!r}", code="unknown_agent")
        now_ms = int(time.time() * 1000)
        # The tombstone keeps refusing every token of the id issued until now (logins and POST /v1/agents).
        await self._write(key, agents_pb2.AgentAccount(tenant=tenant, agent_id=agent_id, deleted=True,
                                                       created_ms=old.created_ms, updated_ms=now_ms,
                                                       not_before_ms=now_ms, generation=old.generation + 1))

    async def list(self, tenant: str) -> list[agents_pb2.AgentAccount]:
        subject_token(tenant)
        watcher = await self.kv.watch(f"{tenant}.*", ignore_deletes=True)
        accounts = []
        try:
            while (entry := await watcher.updates(timeout=5.0)) is not None:
                if entry.value:
                    account = decode(agents_pb2.AgentAccount, entry.value)
                    if not account.deleted:
                        accounts.append(account)
        except nats.errors.TimeoutError:
            raise Unavailable("the agent accounts cannot be listed now") from None
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return sorted(accounts, key=lambda a: a.agent_id)

    async def login(self, tenant: str, agent_id: str, password: str) -> tuple[str, agents_pb2.AgentAccount]:
        """A fresh token for the account, if ``password`` is its password.

        Raises:
            Unauthenticated: invalid_credentials, the same for an unknown agent as for a wrong password
                (and after the same work: the password is checked against a decoy hash).
        """
        account = await self.get(tenant, agent_id)
        live = account is not None and not account.deleted
        stored = account.password_hash if live else self._decoy  # type: ignore[union-attr]
        if not await self._check(password, stored) or not live:
            raise Unauthenticated("wrong agent or password", code="invalid_credentials")
        assert account is not None
        # Never before not_before_ms, whatever this replica's clock says.
        issued_ms = max(int(time.time() * 1000), account.not_before_ms)
        token = self.auth.issue_agent(agent_id, self.token_ttl, tenant=tenant, role=account.role, account=True,
                                      issued_ms=issued_ms, generation=account.generation)
        return token, account

    async def admit(self, token: str | None) -> AgentGrant:
        """The grant of an agent token, checked against its signature, expiry and account.

        Raises:
            Unauthenticated: missing, malformed, forged, expired or revoked.
        """
        grant = self.auth.verify_agent(token)
        if grant.key is None:
            return grant
        return admitted(grant, await self.get(grant.tenant, grant.agent_id))

    async def _check(self, password: str, stored: str) -> bool:
        async with self._hashing:
            return await asyncio.to_thread(check_password, password, stored)

    async def _write(self, key: str, account: agents_pb2.AgentAccount) -> None:
        try:
            await self.kv.put(key, account.SerializeToString(), validate_keys=False)
        except Exception as exc:
            raise Unavailable(f"the agent accounts did not take the change: {exc}") from None
        # This replica's sockets need not wait for the change to come back from NATS.
        self._apply(key, account)

    # Open sockets

    def watch(self, grant: AgentGrant, on_revoked: OnRevoked) -> Callable[[], None]:
        """Call ``on_revoked(reason)`` once when ``grant`` stops being valid; returns the undo."""
        key = grant.key
        if key is None:
            return lambda: None
        session = _Session(grant, on_revoked)
        self._sessions.setdefault(key, set()).add(session)

        def forget() -> None:
            sessions = self._sessions.get(key)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self._sessions[key]

        return forget

    async def _on_change(self, msg: Msg) -> None:
        key = msg.subject[len(_KV_PREFIX):]
        if key not in self._sessions:
            return
        tenant, _, agent_id = key.partition(".")
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            account = agents_pb2.AgentAccount(tenant=tenant, agent_id=agent_id, deleted=True,
                                              not_before_ms=int(time.time() * 1000))
        else:
            try:
                account = decode(agents_pb2.AgentAccount, msg.data)
            except KefuError:
                return
        self._apply(key, account)

    def _apply(self, key: str, account: agents_pb2.AgentAccount | None) -> None:
        for session in list(self._sessions.get(key, ())):
            if session.closing:
                continue
            try:
                session.grant = admitted(session.grant, account)
            except Unauthenticated as exc:
                session.closing = True
                task = asyncio.create_task(session.on_revoked(exc.message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            for key in list(self._sessions):
                tenant, _, agent_id = key.partition(".")
                try:
                    self._apply(key, await self.get(tenant, agent_id))
                except Exception as exc:  # NATS away: the next round tries again
                    log.warning("agent sweep failed", error=str(exc))
                    break
