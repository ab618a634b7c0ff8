import uuid

import pytest

from kefu.dialogue.codec import state_to_proto
from kefu.dialogue.state import BotReply, Started, State, VisitorMessage
from kefu.dialogue.store import PY_BYTES_PER_ENCODED, ConversationStore
from kefu.shared import errors
from kefu.shared.streams import KV_CONV_STATE, STREAM_CONV, conv_subject

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(bus):
    s = ConversationStore(bus, "test-writer")
    await s.setup()
    return s


async def new_conversation(store, tenant="acme") -> State:
    state, _ = await store.append(State(uuid.uuid4().hex, tenant), Started("visitor"))
    return state


async def test_events_land_in_stream_conv_with_dense_seqs(store, bus):
    state = await new_conversation(store)
    state, ev = await store.append(state, VisitorMessage("hi", "m1"))
    state, _ = await store.append(state, BotReply("hello", "kb", (), ev.seq))
    assert state.seq == 2 and [t.role for t in state.turns] == ["visitor", "bot"]
    msg = await bus.js.get_last_msg(STREAM_CONV, conv_subject("acme", state.conversation_id))
    assert msg.seq == state.stream_seq


async def test_a_stale_writer_gets_a_conflict_and_nothing_is_lost(store):
    state = await new_conversation(store)
    first, _ = await store.append(state, VisitorMessage("from replica A"))
    with pytest.raises(errors.Conflict):
        await store.append(state, VisitorMessage("from replica B, based on an old state"))
    fresh = await store.load(state.conversation_id, verify=True)
    assert [t.text for t in fresh.turns] == ["from replica A"]
    again, _ = await store.append(fresh, VisitorMessage("from replica B, retried"))
    assert [t.seq for t in again.turns] == [1, 2]


async def test_state_is_rebuilt_from_the_log_when_the_cache_is_gone(store, bus):
    state = await new_conversation(store, tenant="t2")
    state, _ = await store.append(state, VisitorMessage("remember me", "m9"))
    kv = await bus.js.key_value(KV_CONV_STATE)
    await kv.delete(state.conversation_id)
    rebuilt = await store.load(state.conversation_id)
    assert rebuilt == state
    # A cache that lags the log (a writer died between append and cache write) is caught by verify.
    lagging = state
    state, _ = await store.append(state, VisitorMessage("written, cache not updated"))
    await kv.put(state.conversation_id, state_to_proto(lagging).SerializeToString())
    assert await store.load(state.conversation_id) == lagging
    assert await store.load(state.conversation_id, verify=True) == state


async def test_unknown_conversation_is_not_found(store):
    with pytest.raises(errors.NotFound):
        await store.load(uuid.uuid4().hex)


async def test_time_travel(store):
    state = await new_conversation(store)
    for i in range(3):
        state, _ = await store.append(state, VisitorMessage(f"message {i}"))
    past = await store.state_at(state.conversation_id, 2)
    assert past.seq == 2 and [t.text for t in past.turns] == ["message 0", "message 1"]


async def test_same_message_id_is_stored_once(store):
    state = await new_conversation(store)
    await store.append(state, VisitorMessage("once", "cm"), msg_id=f"{state.conversation_id}:cm")
    with pytest.raises(errors.Conflict):
        await store.append(state, VisitorMessage("once", "cm"), msg_id=f"{state.conversation_id}:cm")
    assert [t.text for t in (await store.load(state.conversation_id)).turns] == ["once"]


async def test_local_states_are_capped_by_bytes(bus):
    """The states a replica keeps for its own next turns stay under their byte budget, the least recently
    written dropped first; a dropped one still loads (from the KV cache)."""
    store = ConversationStore(bus, "capped", local_bytes=64 << 10)
    await store.setup()
    states = []
    for n in range(40):
        state = await new_conversation(store)
        state, ev = await store.append(state, VisitorMessage(f"question {n:02d} " + "x" * 200, f"m{n:02d}"), cache=False)
        state, _ = await store.append(state, BotReply("answer " + "y" * 400, "kb", ("doc#0",), ev.seq))
        states.append(state)
    weight = len(state_to_proto(states[-1]).SerializeToString()) * PY_BYTES_PER_ENCODED
    assert 0 < store.local_bytes <= 64 << 10
    kept = [s for s in states if await store.load(s.conversation_id, local=True) is s]
    # The latest ones are kept (as many as fit), the oldest dropped; every one still loads.
    assert kept == states[len(states) - len(kept):] and len(kept) == (64 << 10) // weight
    assert await store.load(states[0].conversation_id, local=True) == states[0]
