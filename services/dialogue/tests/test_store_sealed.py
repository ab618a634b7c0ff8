"""The conversation store with encryption at rest: turned on for conversations written in clear, the
log mixes both and folds the same; a cached state that does not authenticate is rebuilt from the log."""

import os
import uuid

import pytest

from kefu.dialogue.state import BotReply, Started, State, VisitorMessage
from kefu.dialogue.store import ConversationStore
from kefu.proto.bus.v1 import events_pb2
from kefu.shared.crypto import Keyring, KeyUnavailable
from kefu.shared.streams import KV_CONV_STATE, STREAM_CONV, conv_subject

pytestmark = pytest.mark.integration


async def test_turning_encryption_on_for_an_existing_conversation(bus):
    clear = ConversationStore(bus, "before")
    await clear.setup()
    state, _ = await clear.append(State(uuid.uuid4().hex, "acme"), Started("v"))
    state, ev = await clear.append(state, VisitorMessage("written before encryption / 加密之前写的"))
    state, _ = await clear.append(state, BotReply("noted", "kb", (), ev.seq))

    sealed = ConversationStore(bus, "after", keyring=Keyring(bus.js, os.urandom(32)))
    await sealed.setup()
    assert await sealed.load(state.conversation_id) == state  # the cache, in clear, still reads
    state, _ = await sealed.append(state, VisitorMessage("written after / 加密之后写的"))
    kinds = []
    sub = await bus.js.subscribe(conv_subject("acme", state.conversation_id), stream=STREAM_CONV,
                                 ordered_consumer=True)
    for _ in range(4):
        kinds.append(events_pb2.Event.FromString((await sub.next_msg(timeout=5)).data).WhichOneof("body"))
    await sub.unsubscribe()
    assert kinds == ["started", "visitor_message", "bot_reply", "sealed"]
    rebuilt = await sealed.load(state.conversation_id, verify=True)
    assert [t.text for t in rebuilt.turns] == ["written before encryption / 加密之前写的", "noted",
                                               "written after / 加密之后写的"]
    assert [t.text for t in (await sealed.state_at(state.conversation_id, 2)).turns] == [
        "written before encryption / 加密之前写的", "noted"]
    with pytest.raises(KeyUnavailable):  # a replica without the key cannot read the sealed event
        await clear.load(state.conversation_id, verify=True)


async def test_a_tampered_cached_state_is_rebuilt_from_the_log(bus):
    store = ConversationStore(bus, "w", keyring=Keyring(bus.js, os.urandom(32)))
    await store.setup()
    state, _ = await store.append(State(uuid.uuid4().hex, "globex"), Started("v"))
    state, _ = await store.append(state, VisitorMessage("真的"))
    other, _ = await store.append(State(uuid.uuid4().hex, "globex"), Started("v"))
    other, _ = await store.append(other, VisitorMessage("swapped in"))
    kv = await bus.js.key_value(KV_CONV_STATE)
    # Another conversation's sealed state put under this one's key: it does not open here.
    await kv.put(state.conversation_id, (await kv.get(other.conversation_id)).value)
    fresh = ConversationStore(bus, "r", keyring=store.keyring)
    await fresh.setup()
    assert [t.text for t in (await fresh.load(state.conversation_id)).turns] == ["真的"]
