"""The audit log of admin actions: stream AUDIT, one hash chain across every writer.

Each record holds the hash of the record before it, and is stored with its own hash (SHA-256, or SM3
with ``KEFU_CRYPTO=sm``) in an :class:`AuditEntry`. Writers (every gateway replica, every plugins
replica) append with ``Nats-Expected-Last-Subject-Sequence``, so the chain stays one line however many
write at once: a writer that lost the race reads the new head and tries again.

:meth:`AuditLog.verify` walks the chain and names the first record that was changed, removed or put
out of place. A chain shows tampering with the records it holds; someone who can rewrite the whole
stream and recompute every hash after the point they changed is caught only by comparing the head hash
``kefu audit verify`` prints with one kept elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import APIError, NotFoundError

from kefu.proto.bus.v1 import security_pb2
from kefu.shared.bus import ensure_stream
from kefu.shared.crypto import Suite, digest, hash_name
from kefu.shared.errors import BadRequest, Unavailable
from kefu.shared.logging import get_logger
from kefu.shared.streams import AUDIT_SUBJECT, STREAM_AUDIT, audit_stream

log = get_logger("kefu.audit")

WRONG_LAST_SEQUENCE = 10071
MAX_DETAIL_CHARS = 256


@dataclass
class Problem:
    """The first thing wrong with the chain: the record's index (or the one expected there), its
    stream sequence (0 when it is missing) and what is wrong."""

    index: int
    seq: int
    reason: str


@dataclass
class Verification:
    """What :meth:`AuditLog.verify` found: how many records hold, the head hash, the first problem."""

    records: int = 0
    head: str = ""
    problem: Problem | None = None
    algorithms: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.problem is None


def record_json(rec: security_pb2.AuditRecord, seq: int = 0, entry_hash: bytes = b"") -> dict[str, object]:
    """A record as the admin API shows it."""
    return {"index": rec.index, "seq": seq, "ts_ms": rec.ts_ms, "actor": rec.actor, "action": rec.action,
            "tenant": rec.tenant, "target": rec.target, "details": dict(rec.details), "instance": rec.instance,
            "algorithm": rec.algorithm, "prev_hash": rec.prev_hash.hex(), "hash": entry_hash.hex()}


class AuditLog:
    """Appends admin actions to stream AUDIT and verifies the chain.

    Args:
        js: JetStream.
        suite: ``aes`` (records hashed with SHA-256) or ``sm`` (SM3).
        instance: This replica's name, recorded with each of its records.
        stream: The stream's configuration (tests: one that allows deleting, to tamper with).
    """

    def __init__(self, js: JetStreamContext, suite: Suite = "aes", instance: str = "",
                 stream: StreamConfig | None = None) -> None:
        self.js = js
        self.algorithm = hash_name(suite)
        self.instance = instance
        self._stream = stream or audit_stream()

    async def setup(self) -> None:
        await ensure_stream(self.js, self._stream)

    async def _head(self) -> tuple[int, int, bytes]:
        """(stream sequence, index, hash) of the last record; zeros for an empty log."""
        try:
            last = await self.js.get_last_msg(STREAM_AUDIT, AUDIT_SUBJECT)
        except NotFoundError:
            return 0, 0, b""
        entry = security_pb2.AuditEntry.FromString(last.data or b"")
        return last.seq or 0, security_pb2.AuditRecord.FromString(entry.record).index, entry.hash

    async def record(self, action: str, actor: str, *, tenant: str = "", target: str = "",
                     details: dict[str, object] | None = None) -> security_pb2.AuditRecord:
        """Append one admin action (after it was done). ``details`` are small facts, never secrets.

        Raises:
            Unavailable: the log could not be written (audit_unavailable): the action is done but
                unrecorded, and retrying it (every admin action is idempotent) records it.
        """
        facts = {str(k)[:64]: str(v)[:MAX_DETAIL_CHARS] for k, v in (details or {}).items()}
        try:
            for _ in range(50):
                seq, index, prev = await self._head()
                rec = security_pb2.AuditRecord(index=index + 1, ts_ms=int(time.time() * 1000), actor=actor[:128],
                                               action=action, tenant=tenant, target=target[:256], details=facts,
                                               instance=self.instance, algorithm=self.algorithm, prev_hash=prev)
                body = rec.SerializeToString(deterministic=True)
                entry = security_pb2.AuditEntry(record=body, hash=digest(self.algorithm, body))
                try:
                    await self.js.publish(AUDIT_SUBJECT, entry.SerializeToString(), stream=STREAM_AUDIT,
                                          headers={"Nats-Expected-Last-Subject-Sequence": str(seq)})
                except APIError as exc:
                    if exc.err_code == WRONG_LAST_SEQUENCE:
                        continue  # another writer appended first: chain onto its record
                    raise
                log.info("audit", action=action, actor=actor, tenant=tenant, target=target, index=rec.index)
                return rec
        except (APIError, nats.errors.Error, TimeoutError) as exc:
            log.error("audit record not written", action=action, tenant=tenant, target=target, error=str(exc))
            raise Unavailable(f"{action} was done but its audit record could not be written ({exc}); "
                              "retry it", code="audit_unavailable") from None
        raise Unavailable(f"{action} was done but the audit log is too busy to record it; retry it",
                          code="audit_unavailable")

    async def _entries(self, start_seq: int = 1) -> list[tuple[int, bytes]]:
        """(stream sequence, data) of every stored record from ``start_seq``, in order."""
        info = await self.js.stream_info(STREAM_AUDIT)
        if not info.state.messages:
            return []
        start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start_seq, 1))
        sub = await self.js.subscribe(AUDIT_SUBJECT, stream=STREAM_AUDIT, ordered_consumer=True, config=start)
        out: list[tuple[int, bytes]] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=5)
                out.append((msg.metadata.sequence.stream, msg.data))
                if msg.metadata.num_pending == 0:
                    break
        except (TimeoutError, nats.errors.TimeoutError):
            pass  # nothing after start_seq
        finally:
            await sub.unsubscribe()
        return out

    async def list(self, *, limit: int = 100, tenant: str = "") -> list[dict[str, object]]:
        """The last ``limit`` records (of ``tenant`` when given), oldest first."""
        if not 1 <= limit <= 10_000:
            raise BadRequest("limit must be between 1 and 10000", code="invalid_field")
        info = await self.js.stream_info(STREAM_AUDIT)
        start = 1 if tenant else max(1, (info.state.last_seq or 0) - limit + 1)
        found = []
        for seq, data in await self._entries(start):
            try:
                entry = security_pb2.AuditEntry.FromString(data)
                rec = security_pb2.AuditRecord.FromString(entry.record)
            except Exception:  # a broken record is verify's to report; the list shows the rest
                continue
            if not tenant or rec.tenant == tenant:
                found.append(record_json(rec, seq, entry.hash))
        return found[-limit:]

    async def verify(self) -> Verification:
        """Walk the chain from the first record: each hash must match its record, each record must name
        the hash before it, and indexes (and stream sequences) must run 1, 2, 3... with no gap, up to the
        stream's last sequence."""
        out = Verification()
        info = await self.js.stream_info(STREAM_AUDIT)
        last_seq = info.state.last_seq or 0
        prev, expected = b"", 1
        for seq, data in await self._entries(1):
            try:
                entry = security_pb2.AuditEntry.FromString(data)
                rec = security_pb2.AuditRecord.FromString(entry.record)
            except Exception:
                out.problem = Problem(expected, seq, "not an audit record (unreadable)")
                return out
            out.algorithms.add(rec.algorithm)
            try:
                actual = digest(rec.algorithm, entry.record)
            except ValueError:
                out.problem = Problem(rec.index, seq, f"unknown hash algorithm {rec.algorithm!r}")
                return out
            if actual != entry.hash:
                out.problem = Problem(rec.index, seq, "changed: the record does not match its hash")
                return out
            if rec.index > expected or seq > expected:
                missing = min(rec.index, seq)
                out.problem = Problem(expected, 0, f"missing: records {expected}..{missing - 1} were removed"
                                      if missing - 1 > expected else f"missing: record {expected} was removed")
                return out
            if rec.index != expected or seq != expected:
                out.problem = Problem(rec.index, seq, f"out of place: record {rec.index} found where "
                                                      f"{expected} should be (a copy or a replay)")
                return out
            if rec.prev_hash != prev:
                out.problem = Problem(rec.index, seq, "chain broken: it does not name the hash of the record before")
                return out
            prev, expected = entry.hash, expected + 1
            out.records += 1
        if last_seq >= expected:
            out.problem = Problem(expected, 0, f"missing: records {expected}..{last_seq} at the end were removed"
                                  if last_seq > expected else f"missing: record {expected} at the end was removed")
            return out
        out.head = prev.hex()
        return out
