"""The conversation state converges: any interleaving of bot, agent and two-replica writes, folded or
merged in any order, any number of times, gives the same state (hypothesis property tests)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kefu.dialogue.state import (
    AgentMessage,
    BotReply,
    Event,
    ModeChanged,
    SlotSet,
    Started,
    State,
    TagAdded,
    TagRemoved,
    ToolConfirmed,
    ToolProposed,
    ToolResult,
    VisitorMessage,
    fold,
    merge,
)

WRITERS = ("bot", "agent", "replica-2")


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """Events of three writers, each with its own Lamport clock, including removals of seen tags."""
    n = draw(st.integers(1, 25))
    clocks = dict.fromkeys(WRITERS, 0)
    added: list[tuple[str, str]] = []  # (tag, add event id)
    events = [Event("e0", "c", "t", 0, 1000, "bot", 1, Started("v"))]
    for i in range(1, n + 1):
        writer = draw(st.sampled_from(WRITERS))
        clocks[writer] = max(clocks[writer], draw(st.integers(0, 3)) + max(clocks.values())) + 1
        kind = draw(st.sampled_from(["visitor", "bot", "agent", "mode", "slot", "tag", "untag", "tool"]))
        if kind == "visitor":
            body = VisitorMessage(draw(st.sampled_from(["hi", "X100 price?", "它保修多久"])),
                                  draw(st.sampled_from(["", "m1", "m2"])),
                                  draw(st.sampled_from([(), (("product", "X100"),), (("product", "K5"),)])))
        elif kind == "bot":
            body = BotReply(draw(st.sampled_from(["129 yuan.", "18 个月。"])), "kb", ("doc",), draw(st.integers(0, 5)))
        elif kind == "agent":
            body = AgentMessage("agent-1", draw(st.sampled_from(["hello", "let me check"])))
        elif kind == "mode":
            body = ModeChanged(draw(st.sampled_from(["bot", "human"])))
        elif kind == "slot":
            body = SlotSet(draw(st.sampled_from(["product", "order_id"])), draw(st.sampled_from(["a", "b", "c"])))
        elif kind == "tag":
            body = TagAdded(draw(st.sampled_from(["vip", "angry"])))
            added.append((body.tag, f"e{i}"))
        elif kind == "tool":
            # Parts of two calls, possibly written twice by different writers (a retry on another replica).
            call = draw(st.sampled_from(["call-1", "call-2"]))
            body = draw(st.sampled_from([
                ToolProposed(call, "payment", "create_refund", '{"order_id":"1"}', "h1"),
                ToolConfirmed(call, "payment", "create_refund", "h1", "visitor", 3),
                ToolConfirmed(call, "payment", "create_refund", "h1", "visitor", 3, declined=True),
                ToolResult(call, "payment", "create_refund", True, '{"created":true}'),
            ]))
        else:
            tag = draw(st.sampled_from(["vip", "angry"]))
            body = TagRemoved(tag, tuple(eid for t, eid in added if t == tag))
        events.append(Event(f"e{i}", "c", "t", i, 1000 + i, writer, clocks[writer], body))
    return events


def state(events: list[Event]) -> State:
    return fold("c", "t", events)


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_any_order_and_any_repetition_folds_to_the_same_state(events, rnd):
    shuffled = list(events)
    rnd.shuffle(shuffled)
    repeated = shuffled + rnd.sample(events, k=len(events) // 2)
    assert state(shuffled) == state(events) == state(repeated)


@settings(max_examples=200, deadline=None)
@given(histories(), st.data())
def test_merge_is_commutative_associative_idempotent_and_a_union(events, data):
    cut1 = data.draw(st.integers(0, len(events)))
    cut2 = data.draw(st.integers(cut1, len(events)))
    a, b, c = state(events[:cut1]), state(events[cut1:cut2]), state(events[cut2:])
    assert merge(a, b) == merge(b, a)
    assert merge(a, merge(b, c)) == merge(merge(a, b), c)
    assert merge(a, a) == a
    assert merge(merge(a, b), c) == state(events)


def test_last_writer_wins_and_removal_keeps_concurrent_additions():
    events = [
        Event("e0", "c", "t", 0, 1, "bot", 1, Started("v")),
        Event("e1", "c", "t", 1, 2, "bot", 2, SlotSet("product", "X100")),
        Event("e2", "c", "t", 2, 3, "agent", 2, SlotSet("product", "K5")),  # same clock: the writer decides
        Event("e3", "c", "t", 3, 4, "agent", 3, TagAdded("vip")),
        Event("e4", "c", "t", 4, 5, "bot", 3, TagAdded("vip")),
        Event("e5", "c", "t", 5, 6, "bot", 4, TagRemoved("vip", ("e4",))),  # the bot only saw its own addition
        Event("e6", "c", "t", 6, 7, "agent", 5, ModeChanged("human")),
        Event("e7", "c", "t", 7, 8, "bot", 5, ModeChanged("bot")),
    ]
    s = state(events)
    assert s.slots == {"product": "X100"}  # (2, "bot") > (2, "agent")
    assert s.tags == ["vip"]  # the agent's concurrent addition survives the bot's removal
    assert s.mode == "bot"  # (5, "bot") > (5, "agent")
    assert state(events[:6]).tags == ["vip"] and state(events[:3] + events[4:6]).tags == []
