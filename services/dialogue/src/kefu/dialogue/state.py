"""Conversation events and the pure fold over them: ``reduce(state, event) -> state`` does no I/O."""

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


@dataclass(frozen=True)
class SlotSet:
    name: str
    value: str


@dataclass(frozen=True)
class OcrResult:
    text: str
    media_id: str = ""


Body = Started | VisitorMessage | BotReply | AgentMessage | ModeChanged | SlotSet | OcrResult


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


@dataclass(frozen=True)
class State:
    conversation_id: str
    tenant: str
    visitor_id: str = ""
    mode: str = "bot"
    # The seq of the last event folded in; -1 before the first.
    seq: int = -1
    turns: tuple[Turn, ...] = ()
    slots: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    created_ms: int = 0
    updated_ms: int = 0
    lamport: int = 0
    # The CONV stream sequence of the last event: the expected-last-subject-sequence of the next append.
    stream_seq: int = 0
    # client_msg_id -> seq of that visitor message, kept for ever so a retry never makes a second turn.
    client_msgs: dict[str, int] = field(default_factory=dict)

    def reply_to(self, seq: int) -> Turn | None:
        """The bot reply to the visitor message at ``seq``, if there is one yet."""
        for turn in reversed(self.turns):
            if turn.role == "bot" and turn.in_reply_to == seq:
                return turn
        return None


def reduce(state: State, event: Event) -> State:
    """The state after ``event``. Pure: the same events always give the same state."""
    body = event.body
    common = {"seq": event.seq, "updated_ms": event.ts_ms, "lamport": max(state.lamport, event.lamport)}
    match body:
        case Started(visitor_id=visitor_id):
            return replace(state, visitor_id=visitor_id, created_ms=event.ts_ms, **common)
        case VisitorMessage(text=text, client_msg_id=cmid, slots=slots):
            client_msgs = {**state.client_msgs, cmid: event.seq} if cmid else state.client_msgs
            turn = Turn(event.seq, "visitor", text, client_msg_id=cmid)
            return replace(state, turns=(*state.turns, turn), client_msgs=client_msgs,
                           slots={**state.slots, **dict(slots)}, **common)
        case BotReply(text=text, source=source, citations=cites, in_reply_to=irt, provenance=prov):
            turn = Turn(event.seq, "bot", text, source, tuple(cites), in_reply_to=irt, provenance=prov)
            return replace(state, turns=(*state.turns, turn), **common)
        case AgentMessage(text=text):
            return replace(state, turns=(*state.turns, Turn(event.seq, "agent", text, "agent")), **common)
        case ModeChanged(mode=mode):
            return replace(state, mode=mode, **common)
        case SlotSet(name=name, value=value):
            return replace(state, slots={**state.slots, name: value}, **common)
        case OcrResult(text=text):
            return replace(state, turns=(*state.turns, Turn(event.seq, "visitor", text, "ocr")), **common)
    raise TypeError(f"unknown event body {type(body).__name__}")


def fold(conversation_id: str, tenant: str, events: list[Event], at_seq: int | None = None) -> State:
    """Fold ``events`` (in order) from the empty state, stopping after ``at_seq`` when given."""
    state = State(conversation_id, tenant)
    for ev in events:
        if at_seq is not None and ev.seq > at_seq:
            break
        state = reduce(state, ev)
    return state
