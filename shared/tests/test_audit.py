"""The audit chain on a real nats-server: concurrent writers keep one chain, and verify names the first
record that was changed, removed or replayed."""

import asyncio
import dataclasses

import nats.js.errors
import pytest

from kefu.proto.bus.v1 import security_pb2
from kefu.shared.audit import AuditLog
from kefu.shared.bus import Bus
from kefu.shared.crypto import digest
from kefu.shared.natsserver import NatsServer
from kefu.shared.streams import AUDIT_SUBJECT, STREAM_AUDIT, audit_stream

pytestmark = pytest.mark.integration


@pytest.fixture
async def private_bus(tmp_path):
    """A nats-server of the test's own: stream AUDIT is one per server."""
    with NatsServer(tmp_path / "js") as server:
        bus = await Bus.connect([server.url], "audit-test")
        yield bus
        await bus.close()


async def write(log: AuditLog, n: int, tenant: str = "acme") -> None:
    for i in range(n):
        await log.record("document.upsert", "admin", tenant=tenant, target=f"doc{i}", details={"version": i + 1})


async def test_concurrent_writers_make_one_chain_and_it_verifies(private_bus):
    logs = [AuditLog(private_bus.js, instance=f"gw{i}") for i in range(3)]
    await logs[0].setup()
    await asyncio.gather(*(write(log, 5, tenant=f"t{i}") for i, log in enumerate(logs)))
    report = await logs[1].verify()
    assert report.ok and report.records == 15 and len(report.head) == 64
    listed = await logs[0].list(limit=100)
    assert [r["index"] for r in listed] == list(range(1, 16))
    assert [r["target"] for r in await logs[0].list(tenant="t2")] == [f"doc{i}" for i in range(5)]
    assert listed[4]["prev_hash"] == listed[3]["hash"]


async def test_sm3_chain(private_bus):
    log = AuditLog(private_bus.js, suite="sm")
    await log.setup()
    await write(log, 3)
    report = await log.verify()
    assert report.ok and report.algorithms == {"sm3"}


async def test_the_stream_refuses_deletes_and_purges(private_bus):
    log = AuditLog(private_bus.js)
    await log.setup()
    await write(log, 3)
    with pytest.raises(nats.js.errors.APIError):
        await private_bus.js.delete_msg(STREAM_AUDIT, 2)
    with pytest.raises(nats.js.errors.APIError):
        await private_bus.js.purge_stream(STREAM_AUDIT)
    with pytest.raises(nats.js.errors.APIError):  # nor can the refusal be turned off
        await private_bus.js.update_stream(dataclasses.replace(audit_stream(), deny_delete=False))
    assert (await log.verify()).ok


async def test_a_republished_changed_record_is_reported(private_bus):
    log = AuditLog(private_bus.js)
    await log.setup()
    await write(log, 4)
    raw = await private_bus.js.get_msg(STREAM_AUDIT, 2)
    entry = security_pb2.AuditEntry.FromString(raw.data)
    rec = security_pb2.AuditRecord.FromString(entry.record)
    rec.actor = "someone-else"  # rewritten, with a hash that matches the rewrite
    body = rec.SerializeToString(deterministic=True)
    forged = security_pb2.AuditEntry(record=body, hash=digest("sha256", body))
    await private_bus.js.publish(AUDIT_SUBJECT, forged.SerializeToString())
    report = await log.verify()
    assert not report.ok and report.problem.index == 2 and report.problem.seq == 5
    assert "out of place" in report.problem.reason


@pytest.fixture
async def deletable(tmp_path):
    """An audit log whose stream allows deletes: an operator who created it so, or edited the store."""
    with NatsServer(tmp_path / "js") as server:
        bus = await Bus.connect([server.url], "audit-tamper")
        log = AuditLog(bus.js, stream=dataclasses.replace(audit_stream(), deny_delete=False, deny_purge=False))
        await log.setup()
        yield bus, log
        await bus.close()


async def test_a_deleted_record_is_reported_as_missing(deletable):
    bus, log = deletable
    await write(log, 5)
    await bus.js.delete_msg(STREAM_AUDIT, 3)
    report = await log.verify()
    assert not report.ok and report.problem.index == 3 and "missing" in report.problem.reason


async def test_deleted_last_records_and_first_records_are_reported(deletable):
    bus, log = deletable
    await write(log, 5)
    await bus.js.delete_msg(STREAM_AUDIT, 5)
    await bus.js.delete_msg(STREAM_AUDIT, 4)
    report = await log.verify()
    assert report.problem is not None and report.problem.index == 4 and "end" in report.problem.reason
    await bus.js.delete_msg(STREAM_AUDIT, 1)
    report = await log.verify()
    assert report.problem is not None and report.problem.index == 1


async def test_a_record_changed_in_place_is_reported(deletable):
    """A changed record put back where it was: its hash no longer matches, or the next record's link does."""
    bus, log = deletable
    await write(log, 3)
    raw = await bus.js.get_msg(STREAM_AUDIT, 3)
    entry = security_pb2.AuditEntry.FromString(raw.data)
    rec = security_pb2.AuditRecord.FromString(entry.record)
    rec.target = "another-doc"
    changed = security_pb2.AuditEntry(record=rec.SerializeToString(deterministic=True), hash=entry.hash)
    # JetStream cannot overwrite a message; a forger rolls the stream back and republishes from there.
    await bus.js.delete_msg(STREAM_AUDIT, 3)
    await bus.js.publish(AUDIT_SUBJECT, changed.SerializeToString())
    report = await log.verify()
    assert report.problem is not None and report.problem.index == 3
