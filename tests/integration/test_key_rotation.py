"""Master-key and data-key rotation through `kefu keys rotate` and a real gateway, while a writer goes on
appending: every conversation stays readable, and afterwards the old master key is not needed."""

import asyncio
import base64
import os
import uuid

import pytest

from kefu.cli.main import main as cli
from kefu.dialogue.state import BotReply, Started, State, VisitorMessage
from kefu.dialogue.store import ConversationStore
from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.proto.bus.v1 import events_pb2, security_pb2
from kefu.shared.bus import Bus
from kefu.shared.crypto import Keyring, KeyUnavailable
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background
from kefu.shared.streams import AUDIT_SUBJECT, STREAM_AUDIT, STREAM_CONV, conv_subject

pytestmark = pytest.mark.integration

ADMIN = "admin-for-key-rotation"
OLD, NEW = os.urandom(32), os.urandom(32)
TEXTS = [("我的订单还没有发货，请帮我查一下", "您的订单已在处理中，预计明天发货。"),
         ("Can I return the X100 after 30 days?", "Returns are accepted within 30 days of delivery."),
         ("发票抬头写错了怎么改？", "请在订单详情页申请修改发票抬头。")]


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


async def converse(store: ConversationStore, tenant: str, question: str, answer: str) -> State:
    state, _ = await store.append(State(uuid.uuid4().hex, tenant), Started("v"))
    state, ev = await store.append(state, VisitorMessage(question, uuid.uuid4().hex), cache=False)
    state, _ = await store.append(state, BotReply(answer, "kb", ("doc1",), ev.seq))
    return state


async def kefu(*argv: str) -> int:
    return await asyncio.to_thread(cli, list(argv))


async def test_rotating_the_master_key_keeps_every_conversation_readable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", ADMIN)
    with NatsServer(tmp_path / "js") as nats:
        bus = await Bus.connect([nats.url], "rotation-test")
        try:
            before = ConversationStore(bus, "dialogue/before", keyring=Keyring(bus.js, OLD))
            await before.setup()
            tenants = ["acme", "globex", "租户甲"]
            states = [await converse(before, t, q, a) for t, (q, a) in zip(tenants, TEXTS, strict=True)]

            # Every replica restarted with the new key, the old one beside it; the gateway among them.
            gateway = GatewayService(GatewaySettings(nats_url=nats.url, data_dir=tmp_path, http_port=0, grpc_port=0,
                                                     log_level="warning", master_key=b64(NEW),
                                                     master_key_old=b64(OLD)))
            stop = asyncio.Event()
            task = await start_in_background(gateway, stop)
            url = f"http://127.0.0.1:{gateway.http_port}"
            during = ConversationStore(bus, "dialogue/during", keyring=Keyring(bus.js, NEW, [OLD]))
            await during.setup()
            try:
                # A replica keeps writing while the data keys are re-wrapped under it: no downtime.
                writing = True

                async def writer() -> list[State]:
                    written = []
                    while writing:
                        written.append(await converse(during, "acme", "还在吗？ still there?", "在的。"))
                    return written

                busy = asyncio.create_task(writer())
                await asyncio.sleep(0.2)
                assert await kefu("keys", "rotate", "--url", url) == 0
                writing = False
                states += await busy
                out = capsys.readouterr().out
                assert "3 data keys re-wrapped" in out and "KEFU_MASTER_KEY_OLD can now be removed" in out

                assert await kefu("keys", "rotate", "--data-keys", "--tenant", "acme", "--url", url) == 0
                assert "acme: new writes use data key v2" in capsys.readouterr().out
                assert await kefu("keys", "list", "--url", url) == 0
                listing = capsys.readouterr().out
                assert f"master key {Keyring(None, NEW).master.id}" in listing and "acme: current v2" in listing

                assert await kefu("audit", "verify", "--url", url) == 0
                assert "ok: 2 records, chain intact" in capsys.readouterr().out
                assert await kefu("audit", "list", "--url", url) == 0
                listed = capsys.readouterr().out
                assert "admin keys.rotate_master" in listed and "admin keys.rotate_data" in listed
            finally:
                stop.set()
                await task

            # The old key is gone: every conversation, old or written during the rotation, still reads,
            # from the log (verify) and from the cached states.
            after = ConversationStore(bus, "dialogue/after", keyring=Keyring(bus.js, NEW, refresh_s=0))
            await after.setup()
            for state in states:
                assert await after.load(state.conversation_id) == state
                assert await after.load(state.conversation_id, verify=True) == state
            newer = await converse(after, "acme", "新的密钥写的 / written with data key v2", "好的")
            last = await bus.js.get_last_msg(STREAM_CONV, conv_subject("acme", newer.conversation_id))
            sealed = events_pb2.Event.FromString(last.data).sealed
            assert sealed[5:9] == (2).to_bytes(4, "big")  # the new data key version seals new writes
            assert (await after.load(newer.conversation_id, verify=True)).turns[0].text.startswith("新的密钥")

            # Proof that the data keys really were re-wrapped: the old master key alone opens nothing now.
            stale = ConversationStore(bus, "dialogue/stale", keyring=Keyring(bus.js, OLD))
            await stale.setup()
            with pytest.raises(KeyUnavailable):
                await stale.load(states[0].conversation_id, verify=True)

            # A forged record in the audit stream is caught by `kefu audit verify`.
            raw = await bus.js.get_msg(STREAM_AUDIT, 1)
            entry = security_pb2.AuditEntry.FromString(raw.data)
            await bus.js.publish(AUDIT_SUBJECT, entry.SerializeToString())  # a replay of record 1
            task = await start_in_background(gateway := GatewayService(gateway.settings), stop := asyncio.Event())
            try:
                url = f"http://127.0.0.1:{gateway.http_port}"
                assert await kefu("audit", "verify", "--url", url) == 1
                assert "TAMPERED at record 1 (stream sequence 3)" in capsys.readouterr().out
            finally:
                stop.set()
                await task
        finally:
            await bus.close()
