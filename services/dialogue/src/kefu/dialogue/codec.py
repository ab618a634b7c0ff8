"""Protobuf at the edge: conversions between the bus payloads and the dialogue's dataclasses."""

from __future__ import annotations

import functools
from dataclasses import replace

from kefu.dialogue.state import (
    AgentMessage,
    Body,
    BotReply,
    Event,
    ModeChanged,
    OcrResult,
    Provenance,
    SlotSet,
    Stamp,
    Started,
    State,
    TagAdded,
    TagRemoved,
    ToolCall,
    ToolConfirmed,
    ToolPart,
    ToolProposed,
    ToolResult,
    Turn,
    VisitorMessage,
)
from kefu.proto.bus.v1 import events_pb2, turn_pb2
from kefu.shared.errors import BadRequest


def event_to_proto(ev: Event) -> events_pb2.Event:
    pb = events_pb2.Event(id=ev.id, conversation_id=ev.conversation_id, tenant=ev.tenant, seq=ev.seq,
                          ts_ms=ev.ts_ms, writer=ev.writer, lamport=ev.lamport)
    b = ev.body
    match b:
        case Started():
            pb.started.visitor_id = b.visitor_id
        case VisitorMessage():
            pb.visitor_message.text, pb.visitor_message.client_msg_id = b.text, b.client_msg_id
            pb.visitor_message.slots.update(dict(b.slots))
        case BotReply():
            pb.bot_reply.text, pb.bot_reply.source, pb.bot_reply.in_reply_to = b.text, b.source, b.in_reply_to
            pb.bot_reply.citations.extend(b.citations)
            if b.provenance is not None:
                pb.bot_reply.provenance.CopyFrom(provenance_to_proto(b.provenance))
        case AgentMessage():
            pb.agent_message.agent_id, pb.agent_message.text = b.agent_id, b.text
        case ModeChanged():
            pb.mode_changed.mode, pb.mode_changed.reason = b.mode, b.reason
            pb.mode_changed.handoff_summary = b.handoff_summary
        case SlotSet():
            pb.slot_set.name, pb.slot_set.value = b.name, b.value
        case OcrResult():
            pb.ocr_result.text, pb.ocr_result.media_id = b.text, b.media_id
            pb.ocr_result.slots.update(dict(b.slots))
        case TagAdded():
            pb.tag_added.tag = b.tag
        case TagRemoved():
            pb.tag_removed.tag = b.tag
            pb.tag_removed.add_ids.extend(b.add_ids)
        case ToolProposed() | ToolConfirmed() | ToolResult():
            getattr(pb, _TOOL_FIELDS[type(b)]).CopyFrom(_tool_to_proto(b))
    return pb


_TOOL_FIELDS = {ToolProposed: "tool_proposed", ToolConfirmed: "tool_confirmed", ToolResult: "tool_result"}
_TOOL_PROTOS = {ToolProposed: events_pb2.ToolCallProposed, ToolConfirmed: events_pb2.ToolCallConfirmed,
                ToolResult: events_pb2.ToolCallResult}


def _tool_to_proto(b: ToolProposed | ToolConfirmed | ToolResult):  # noqa: ANN202 (one of three messages)
    # The dataclasses mirror their messages field for field.
    return _TOOL_PROTOS[type(b)](**{f: getattr(b, f) for f in b.__dataclass_fields__})


def _tool_from_proto(kind: type, pb) -> ToolProposed | ToolConfirmed | ToolResult:  # noqa: ANN001
    return kind(**{f: getattr(pb, f) for f in kind.__dataclass_fields__})


def event_from_proto(pb: events_pb2.Event) -> Event:
    kind = pb.WhichOneof("body")
    body: Body
    if kind == "started":
        body = Started(pb.started.visitor_id)
    elif kind == "visitor_message":
        v = pb.visitor_message
        body = VisitorMessage(v.text, v.client_msg_id, tuple(sorted(v.slots.items())))
    elif kind == "bot_reply":
        r = pb.bot_reply
        body = BotReply(r.text, r.source, tuple(r.citations), r.in_reply_to,
                        provenance_from_proto(r.provenance) if r.HasField("provenance") else None)
    elif kind == "agent_message":
        body = AgentMessage(pb.agent_message.agent_id, pb.agent_message.text)
    elif kind == "mode_changed":
        body = ModeChanged(pb.mode_changed.mode, pb.mode_changed.reason, pb.mode_changed.handoff_summary)
    elif kind == "slot_set":
        body = SlotSet(pb.slot_set.name, pb.slot_set.value)
    elif kind == "ocr_result":
        body = OcrResult(pb.ocr_result.text, pb.ocr_result.media_id, tuple(sorted(pb.ocr_result.slots.items())))
    elif kind == "tag_added":
        body = TagAdded(pb.tag_added.tag)
    elif kind == "tag_removed":
        body = TagRemoved(pb.tag_removed.tag, tuple(pb.tag_removed.add_ids))
    elif kind == "tool_proposed":
        body = _tool_from_proto(ToolProposed, pb.tool_proposed)
    elif kind == "tool_confirmed":
        body = _tool_from_proto(ToolConfirmed, pb.tool_confirmed)
    elif kind == "tool_result":
        body = _tool_from_proto(ToolResult, pb.tool_result)
    else:
        raise BadRequest(f"event {pb.id} has no body", code="invalid_protobuf")
    return Event(pb.id, pb.conversation_id, pb.tenant, pb.seq, pb.ts_ms, pb.writer, pb.lamport, body)


def provenance_to_proto(p: Provenance) -> events_pb2.Provenance:
    return events_pb2.Provenance(
        decision=p.decision, query=p.query, keywords=list(p.keywords), chunk_ids=list(p.chunk_ids),
        versions=list(p.versions), scores=list(p.scores), evidence=p.evidence, required_facts=list(p.required_facts),
        model=p.model, sampling=p.sampling, prompt_sha256=p.prompt_sha256, generated_used=p.generated_used,
        prompt_chars=p.prompt_chars, generation_error=p.generation_error)


def provenance_from_proto(pb: events_pb2.Provenance) -> Provenance:
    return Provenance(pb.decision, pb.query, tuple(pb.keywords), tuple(pb.chunk_ids), tuple(pb.versions),
                      tuple(round(s, 6) for s in pb.scores), pb.evidence, tuple(pb.required_facts), pb.model,
                      pb.sampling, pb.prompt_sha256, pb.generated_used, pb.prompt_chars,
                      pb.generation_error)


def state_to_proto(s: State) -> turn_pb2.ConversationState:
    pb = turn_pb2.ConversationState(
        conversation_id=s.conversation_id, tenant=s.tenant, visitor_id=s.visitor_id, mode=s.mode,
        seq=max(s.seq, 0), summary=s.summary, created_ms=s.created_ms, updated_ms=s.updated_ms, lamport=s.lamport,
        stream_seq=s.stream_seq, handoff_summary=s.handoff_summary,
    )
    pb.turns.extend(_turn_to_proto(t) for t in s.turns)
    pb.slots.update(s.slots)
    pb.client_msgs.update(s.client_msgs)
    pb.tags.extend(s.tags)
    for name, stamp in s.slot_stamps.items():
        pb.slot_stamps[name].CopyFrom(_stamp_to_proto(stamp))
    pb.mode_stamp.CopyFrom(_stamp_to_proto(s.mode_stamp))
    for tag, ids in s.tag_adds.items():
        pb.tag_adds[tag].ids.extend(sorted(ids))
    pb.tag_removes.extend(sorted(s.tag_removes))
    for call in s.tool_calls.values():
        for part in (call.proposed, call.confirmed, call.result):
            if part is not None:
                tp = pb.tool_parts.add(seq=part.seq, stamp=_stamp_to_proto(part.stamp))
                getattr(tp, _PART_FIELDS[type(part.body)]).CopyFrom(_tool_to_proto(part.body))
    return pb


_PART_FIELDS = {ToolProposed: "proposed", ToolConfirmed: "confirmed", ToolResult: "result"}
_PART_KINDS = {"proposed": ToolProposed, "confirmed": ToolConfirmed, "result": ToolResult}


def _tool_calls_from_proto(parts) -> dict[str, ToolCall]:  # noqa: ANN001 (repeated ToolPart)
    calls: dict[str, ToolCall] = {}
    for tp in parts:
        which = tp.WhichOneof("part")
        if which is None:
            continue
        body = _tool_from_proto(_PART_KINDS[which], getattr(tp, which))
        call = calls.get(body.call_id, ToolCall(body.call_id))
        calls[body.call_id] = replace(call, **{which: ToolPart(tp.seq, _stamp_from_proto(tp.stamp), body)})
    return calls


@functools.lru_cache(maxsize=8192)
def _turn_to_proto(t: Turn) -> turn_pb2.Turn:
    """A turn's message, built once: turns never change, and the state (all its turns) is written to the
    KV cache after every reply."""
    turn = turn_pb2.Turn(seq=t.seq, role=t.role, text=t.text, source=t.source, citations=list(t.citations),
                         client_msg_id=t.client_msg_id, in_reply_to=t.in_reply_to, lamport=t.stamp[0],
                         writer=t.stamp[1], id=t.stamp[2])
    if t.provenance is not None:
        turn.provenance.CopyFrom(provenance_to_proto(t.provenance))
    return turn


def _stamp_to_proto(stamp: Stamp) -> turn_pb2.Stamp:
    return turn_pb2.Stamp(lamport=stamp[0], writer=stamp[1], id=stamp[2])


def _stamp_from_proto(pb: turn_pb2.Stamp) -> Stamp:
    return (pb.lamport, pb.writer, pb.id)


def state_from_proto(pb: turn_pb2.ConversationState) -> State:
    turns = tuple(Turn(t.seq, t.role, t.text, t.source, tuple(t.citations), t.client_msg_id, t.in_reply_to,
                       provenance_from_proto(t.provenance) if t.HasField("provenance") else None,
                       (t.lamport, t.writer, t.id))
                  for t in pb.turns)
    return State(pb.conversation_id, pb.tenant, pb.visitor_id, pb.mode or "bot", pb.seq, turns, dict(pb.slots),
                 pb.summary, pb.created_ms, pb.updated_ms, pb.lamport, pb.stream_seq, dict(pb.client_msgs),
                 {k: _stamp_from_proto(v) for k, v in pb.slot_stamps.items()}, _stamp_from_proto(pb.mode_stamp),
                 {k: frozenset(v.ids) for k, v in pb.tag_adds.items()}, frozenset(pb.tag_removes),
                 pb.handoff_summary, _tool_calls_from_proto(pb.tool_parts))
