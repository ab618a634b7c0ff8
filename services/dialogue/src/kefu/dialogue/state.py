"""Conversation events and the pure fold over them: ``reduce(state, event) -> state`` does no I/O.

The state is a CRDT, so writers that never saw each other's events (bot and agent, two dialogue
replicas, two sites joined by leaf nodes) converge: turns are a grow-only set ordered by their stamp
(lamport, writer, event id), slots and the mode are last-writer-wins registers, tags an observed-remove
set. ``reduce`` is ``merge`` with the state of a single event, so folding the same events in any order,
any number of times, gives the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Started:
    visitor_id: str = ""


@dataclass(frozen=True)
class VisitorMessage:
    text: str
    client_msg_id: str = ""
    # Slots the message mentions (product, order_id, phone, date).
    slots: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Provenance:
    """What produced a bot reply, so it can be audited and re-run."""

    decision: str = ""
    query: str = ""
    keywords: tuple[str, ...] = ()
    chunk_ids: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()
    evidence: str = ""
    required_facts: tuple[str, ...] = ()
    model: str = ""
    sampling: str = ""
    prompt_sha256: str = ""
    generated_used: bool = False
    prompt_chars: int = 0
    generation_error: str = ""


@dataclass(frozen=True)
class BotReply:
    text: str
    source: str
    citations: tuple[str, ...] = ()
    in_reply_to: int = 0
    provenance: Provenance | None = None


@dataclass(frozen=True)
class AgentMessage:
    agent_id: str
    text: str


@dataclass(frozen=True)
class ModeChanged:
    mode: str
    reason: str = ""
    handoff_summary: str = ""


@dataclass(frozen=True)
class SlotSet:
    name: str
    value: str


@dataclass(frozen=True)
class OcrResult:
    text: str
    media_id: str = ""
    slots: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TagAdded:
    tag: str


@dataclass(frozen=True)
class TagRemoved:
    tag: str
    # The TagAdded events the remover had seen (observed-remove).
    add_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToolProposed:
    """The bot offers a plugin tool call; a side-effecting one waits for a ToolConfirmed."""

    call_id: str
    plugin: str
    tool: str
    arguments_json: str
    arguments_sha256: str
    confirmation: str = "visitor"
    summary: str = ""
    in_reply_to: int = 0


@dataclass(frozen=True)
class ToolConfirmed:
    """The visitor's (or an agent's) yes or no to a proposed call, in a turn of its own."""

    call_id: str
    plugin: str
    tool: str
    arguments_sha256: str
    by: str
    message_seq: int = 0
    declined: bool = False


@dataclass(frozen=True)
class ToolResult:
    call_id: str
    plugin: str
    tool: str
    ok: bool
    result_json: str = ""
    error_code: str = ""
    error_message: str = ""
    plugin_version: str = ""


Body = (Started | VisitorMessage | BotReply | AgentMessage | ModeChanged | SlotSet | OcrResult | TagAdded | TagRemoved
        | ToolProposed | ToolConfirmed | ToolResult)
ToolPartBody = ToolProposed | ToolConfirmed | ToolResult


Stamp = tuple[int, str, str]  # (lamport, writer, event id): a total order of writes
NO_STAMP: Stamp = (0, "", "")


@dataclass(frozen=True)
class Event:
    id: str
    conversation_id: str
    tenant: str
    seq: int
    ts_ms: int
    writer: str
    lamport: int
    body: Body

    @property
    def stamp(self) -> Stamp:
        return (self.lamport, self.writer, self.id)


@dataclass(frozen=True)
class Turn:
    seq: int
    role: str  # visitor, bot or agent
    text: str
    source: str = ""
    citations: tuple[str, ...] = ()
    client_msg_id: str = ""
    in_reply_to: int = 0
    provenance: Provenance | None = None
    stamp: Stamp = NO_STAMP


@dataclass(frozen=True)
class ToolPart:
    """One event of a tool call, with where it sits in the log."""

    seq: int
    stamp: Stamp
    body: ToolPartBody


@dataclass(frozen=True)
class ToolCall:
    """A plugin tool call as the log tells it: proposed, then confirmed (or declined), then its result."""

    call_id: str
    proposed: ToolPart | None = None
    confirmed: ToolPart | None = None
    result: ToolPart | None = None

    @property
    def pending(self) -> bool:
        """Proposed and waiting for the visitor's yes or no."""
        return self.proposed is not None and self.confirmed is None and self.result is None


@dataclass(frozen=True)
class State:
    conversation_id: str
    tenant: str
    visitor_id: str = ""
    mode: str = "bot"
    # The highest seq folded in; -1 before the first.
    seq: int = -1
    turns: tuple[Turn, ...] = ()
    slots: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    created_ms: int = 0
    updated_ms: int = 0
    lamport: int = 0
    # The CONV stream sequence of the last event: the expected-last-subject-sequence of the next append.
    # Local bookkeeping of this replica's log, not part of the merged value.
    stream_seq: int = 0
    # client_msg_id -> seq of that visitor message, kept for ever so a retry never makes a second turn.
    client_msgs: dict[str, int] = field(default_factory=dict)
    slot_stamps: dict[str, Stamp] = field(default_factory=dict)
    mode_stamp: Stamp = NO_STAMP
    tag_adds: dict[str, frozenset[str]] = field(default_factory=dict)
    tag_removes: frozenset[str] = frozenset()
    # Written with the mode (same register): the summary for the agent of the last handoff.
    handoff_summary: str = ""
    # Plugin tool calls by call id; each part is written once (the latest stamp wins if ever twice).
    tool_calls: dict[str, ToolCall] = field(default_factory=dict)

    def pending_tool(self) -> ToolCall | None:
        """The latest proposed call still waiting for the visitor's answer."""
        pending = [c for c in self.tool_calls.values() if c.pending]
        return max(pending, key=lambda c: c.proposed.stamp) if pending else None  # type: ignore[union-attr]

    @property
    def tags(self) -> list[str]:
        """The tags with an addition no removal has seen."""
        return sorted(tag for tag, ids in self.tag_adds.items() if ids - self.tag_removes)

    def reply_to(self, seq: int) -> Turn | None:
        """The bot reply to the visitor message at ``seq``, if there is one yet."""
        for turn in reversed(self.turns):
            if turn.role == "bot" and turn.in_reply_to == seq:
                return turn
        return None


def _lww(a: dict[str, str], a_stamps: dict[str, Stamp], b: dict[str, str],
         b_stamps: dict[str, Stamp]) -> tuple[dict[str, str], dict[str, Stamp]]:
    values, stamps = dict(a), dict(a_stamps)
    for key, stamp in b_stamps.items():
        if stamp > stamps.get(key, NO_STAMP):
            values[key], stamps[key] = b[key], stamp
    return values, stamps


def _later(x: ToolPart | None, y: ToolPart | None) -> ToolPart | None:
    if x is None or y is None:
        return x or y
    return x if x.stamp >= y.stamp else y


def _merge_tools(a: dict[str, ToolCall], b: dict[str, ToolCall]) -> dict[str, ToolCall]:
    if not b:
        return a
    out = dict(a)
    for cid, call in b.items():
        mine = out.get(cid)
        out[cid] = call if mine is None else ToolCall(cid, _later(mine.proposed, call.proposed),
                                                      _later(mine.confirmed, call.confirmed),
                                                      _later(mine.result, call.result))
    return out


def merge(a: State, b: State) -> State:
    """The join of two states of the same conversation: commutative, associative and idempotent."""
    turns = {t.stamp: t for t in a.turns}
    turns.update({t.stamp: t for t in b.turns})
    slots, slot_stamps = _lww(a.slots, a.slot_stamps, b.slots, b.slot_stamps)
    winner = a if a.mode_stamp >= b.mode_stamp else b
    mode, mode_stamp, handoff_summary = winner.mode, winner.mode_stamp, winner.handoff_summary
    client_msgs = dict(a.client_msgs)
    for cmid, seq in b.client_msgs.items():
        client_msgs[cmid] = min(seq, client_msgs.get(cmid, seq))
    tag_adds = dict(a.tag_adds)
    for tag, ids in b.tag_adds.items():
        tag_adds[tag] = tag_adds.get(tag, frozenset()) | ids
    # The visitor id comes with the ConversationStarted event: the earliest one's wins.
    started = [(s.created_ms, s.visitor_id) for s in (a, b) if s.created_ms]
    created, visitor_id = min(started) if started else (0, max(a.visitor_id, b.visitor_id))
    return State(
        conversation_id=a.conversation_id or b.conversation_id, tenant=a.tenant or b.tenant, visitor_id=visitor_id,
        mode=mode, seq=max(a.seq, b.seq), turns=tuple(turns[k] for k in sorted(turns)), slots=slots,
        summary=max(a.summary, b.summary), created_ms=created, updated_ms=max(a.updated_ms, b.updated_ms),
        lamport=max(a.lamport, b.lamport), stream_seq=max(a.stream_seq, b.stream_seq), client_msgs=client_msgs,
        slot_stamps=slot_stamps, mode_stamp=mode_stamp, tag_adds=tag_adds, tag_removes=a.tag_removes | b.tag_removes,
        handoff_summary=handoff_summary, tool_calls=_merge_tools(a.tool_calls, b.tool_calls),
    )


def of_event(conversation_id: str, tenant: str, event: Event) -> State:
    """The state that holds just ``event``."""
    base = State(conversation_id, tenant, seq=event.seq, updated_ms=event.ts_ms, lamport=event.lamport)
    body, stamp = event.body, event.stamp
    match body:
        case Started(visitor_id=visitor_id):
            return replace(base, visitor_id=visitor_id, created_ms=event.ts_ms)
        case VisitorMessage(text=text, client_msg_id=cmid, slots=slots):
            turn = Turn(event.seq, "visitor", text, client_msg_id=cmid, stamp=stamp)
            return replace(base, turns=(turn,), client_msgs={cmid: event.seq} if cmid else {},
                           slots=dict(slots), slot_stamps={k: stamp for k, _ in slots})
        case BotReply(text=text, source=source, citations=cites, in_reply_to=irt, provenance=prov):
            turn = Turn(event.seq, "bot", text, source, tuple(cites), in_reply_to=irt, provenance=prov, stamp=stamp)
            return replace(base, turns=(turn,))
        case AgentMessage(text=text):
            return replace(base, turns=(Turn(event.seq, "agent", text, "agent", stamp=stamp),))
        case ModeChanged(mode=mode, handoff_summary=summary):
            return replace(base, mode=mode, mode_stamp=stamp, handoff_summary=summary)
        case SlotSet(name=name, value=value):
            return replace(base, slots={name: value}, slot_stamps={name: stamp})
        case OcrResult(text=text, slots=slots):
            return replace(base, turns=(Turn(event.seq, "visitor", text, "ocr", stamp=stamp),), slots=dict(slots),
                           slot_stamps={k: stamp for k, _ in slots})
        case TagAdded(tag=tag):
            return replace(base, tag_adds={tag: frozenset({event.id})})
        case TagRemoved(add_ids=add_ids):
            return replace(base, tag_removes=frozenset(add_ids))
        case ToolProposed() | ToolConfirmed() | ToolResult():
            part = ToolPart(event.seq, stamp, body)
            kind = {ToolProposed: "proposed", ToolConfirmed: "confirmed", ToolResult: "result"}[type(body)]
            return replace(base, tool_calls={body.call_id: ToolCall(body.call_id, **{kind: part})})
    raise TypeError(f"unknown event body {type(body).__name__}")


def reduce(state: State, event: Event) -> State:
    """The state after ``event``. Pure, and order-insensitive: it merges the event's own state in."""
    return merge(state, of_event(state.conversation_id, state.tenant, event))


def fold(conversation_id: str, tenant: str, events: list[Event], at_seq: int | None = None) -> State:
    """Fold ``events`` from the empty state, keeping only those up to ``at_seq`` when given."""
    state = State(conversation_id, tenant)
    for ev in events:
        if at_seq is None or ev.seq <= at_seq:
            state = reduce(state, ev)
    return state
