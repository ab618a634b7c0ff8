from kefu.dialogue.codec import event_from_proto, event_to_proto, state_from_proto, state_to_proto
from kefu.dialogue.state import (
    AgentMessage,
    BotReply,
    Event,
    ModeChanged,
    OcrResult,
    SlotSet,
    Started,
    State,
    VisitorMessage,
    fold,
    reduce,
)

BODIES = [
    Started("v1"),
    VisitorMessage("How much is the L2 lamp?", "m-1"),
    BotReply("129 yuan.", "kb", ("lamp",), 1),
    SlotSet("product", "L2"),
    ModeChanged("human", "asked"),
    AgentMessage("agent-7", "Hello, I can help."),
    OcrResult("订单号 12345", "media-1"),
]


def events() -> list[Event]:
    return [Event(f"e{i}", "c1", "acme", i, 1000 + i, "test", i + 1, body) for i, body in enumerate(BODIES)]


def test_fold_builds_the_visible_state():
    s = fold("c1", "acme", events())
    assert (s.visitor_id, s.mode, s.seq, s.slots) == ("v1", "human", 6, {"product": "L2"})
    assert [(t.seq, t.role) for t in s.turns] == [(1, "visitor"), (2, "bot"), (5, "agent"), (6, "visitor")]
    assert s.client_msgs == {"m-1": 1}
    assert s.reply_to(1).text == "129 yuan." and s.reply_to(6) is None


def test_reduce_is_pure():
    start = State("c1", "acme")
    ev = events()[1]
    assert reduce(start, ev) == reduce(start, ev)
    assert start.turns == () and start.client_msgs == {}  # the input is untouched


def test_time_travel_stops_at_a_sequence():
    s = fold("c1", "acme", events(), at_seq=1)
    assert s.seq == 1 and [t.text for t in s.turns] == ["How much is the L2 lamp?"] and s.mode == "bot"


def test_events_and_state_round_trip_through_protobuf():
    for ev in events():
        assert event_from_proto(event_to_proto(ev)) == ev
    s = fold("c1", "acme", events())
    assert state_from_proto(state_to_proto(s)) == s


def test_a_tool_call_is_pending_until_answered_and_round_trips():
    from kefu.dialogue.state import ToolConfirmed, ToolProposed, ToolResult

    proposed = ToolProposed("call-1", "payment", "create_refund", '{"order_id":"20261124001"}', "ab12", "visitor",
                            "Shall I request a refund?", 7)
    base = events()
    evs = [*base, Event("t1", "c1", "acme", 7, 2000, "test", 20, proposed)]
    s = fold("c1", "acme", evs)
    assert s.pending_tool().proposed.body == proposed
    confirmed = ToolConfirmed("call-1", "payment", "create_refund", "ab12", "visitor", 8)
    result = ToolResult("call-1", "payment", "create_refund", True, '{"created": true}', plugin_version="1.0.0")
    evs += [Event("t2", "c1", "acme", 8, 2001, "test", 21, confirmed), Event("t3", "c1", "acme", 9, 2002, "test", 22, result)]
    s = fold("c1", "acme", evs)
    assert s.pending_tool() is None
    call = s.tool_calls["call-1"]
    assert (call.confirmed.seq, call.result.body.ok) == (8, True)
    for ev in evs:
        assert event_from_proto(event_to_proto(ev)) == ev
    assert state_from_proto(state_to_proto(s)) == s
