"""The JSON shapes of the public API (CONTRACT.md), shared by the HTTP routes and the sockets."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from google.protobuf.json_format import MessageToDict

from kefu.gateway.feed import Frame
from kefu.proto.bus.v1 import turn_pb2
from kefu.shared.errors import BadRequest

# Largest JSON body or frame a client may send (documents have their own, larger limit).
JSON_LIMIT = 64 * 1024


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with Chinese (and every other script) as UTF-8 text, not \\u escapes."""
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object from ``text``; escapes of lone surrogates ("\\ud800") count as invalid UTF-8."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the body holds text that is not valid UTF-8", code="invalid_utf8") from None
    except RecursionError:  # parsed just under the limit, but too deep to write back
        raise BadRequest("the body is nested too deeply", code="invalid_json") from None
    return value


def field(body: dict[str, Any], name: str, *, required: bool = True, kind: type = str, default: Any = None) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"missing field {name!r}", code="missing_field")
        return default
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"field {name!r} must be a {kind.__name__}", code="invalid_field")
    return value


def state_json(s: turn_pb2.ConversationState, *, admin: bool = False) -> dict[str, Any]:
    """The CONTRACT state JSON; admins also see what produced each bot turn (``provenance``)."""
    turns = []
    for t in s.turns:
        turn: dict[str, Any] = {"seq": t.seq, "role": t.role, "text": t.text}
        if t.source:
            turn["source"] = t.source
        if t.citations:
            turn["citations"] = list(t.citations)
        if admin and t.HasField("provenance"):
            turn["provenance"] = MessageToDict(t.provenance, preserving_proto_field_name=True)
        turns.append(turn)
    body = {"conversation_id": s.conversation_id, "tenant": s.tenant, "mode": s.mode or "bot", "seq": s.seq,
            "turns": turns, "slots": dict(s.slots), "summary": s.summary, "tags": list(s.tags)}
    if admin and s.handoff_summary:
        body["handoff_summary"] = s.handoff_summary
    if admin and s.tool_parts:
        body["tool_calls"] = tool_calls_json(s)
    return body


def tool_calls_json(s: turn_pb2.ConversationState) -> list[dict[str, Any]]:
    """The plugin tool calls of a conversation, in the order they were proposed: what was asked with
    which arguments, who confirmed it (a side-effecting tool), and what it returned."""
    calls: dict[str, dict[str, Any]] = {}
    for part in sorted(s.tool_parts, key=lambda p: p.seq):
        which = part.WhichOneof("part")
        if which is None:
            continue
        body = getattr(part, which)
        call = calls.setdefault(body.call_id, {"call_id": body.call_id, "plugin": body.plugin, "tool": body.tool})
        if which == "proposed":
            call.update(seq=part.seq, arguments=_json_or_text(body.arguments_json), confirmation=body.confirmation)
        elif which == "confirmed":
            call.update(confirmed_by=body.by, confirmed_seq=part.seq, declined=body.declined)
        else:
            call.update(ok=body.ok, result=_json_or_text(body.result_json) if body.ok else None,
                        error_code=body.error_code or None, plugin_version=body.plugin_version, result_seq=part.seq)
    return list(calls.values())


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def suggestion_json(r: turn_pb2.Reply) -> dict[str, Any]:
    """The bot's suggested answer the agent console shows (``{"text","citations"}``)."""
    return {"text": r.text, "citations": list(r.citations)}


def reply_json(r: turn_pb2.TurnReply) -> dict[str, Any]:
    """The answer to a visitor message: ``seq`` is the message's, ``reply_seq`` the reply's own event."""
    return {"seq": r.seq, "reply": _reply(r.reply), "reply_seq": r.reply_seq}


def _reply(r: turn_pb2.Reply) -> dict[str, Any]:
    return {"text": r.text, "source": r.source, "citations": list(r.citations)}


def frame_json(f: Frame) -> dict[str, Any]:
    """A visitor socket's server frame (the frame kinds of :mod:`kefu.gateway.feed`)."""
    if f.kind == "delta" or f.kind == "agent_message":
        return {"type": f.kind, "text": f.text, "seq": f.seq}
    if f.kind == "reply":
        assert f.reply is not None
        return {"type": "reply", "seq": f.seq, "reply": _reply(f.reply), "reply_seq": f.reply_seq}
    if f.kind == "resync":
        body: dict[str, Any] = {"type": "resync", "state": state_json(f.state) if f.state is not None else None,
                                "seq": f.seq, "reason": f.reason}
        if f.error is not None:
            body["error"] = {"code": f.error.code, "message": f.error.message}
        return body
    assert f.error is not None
    return {"type": "error", "code": f.error.code, "message": f.error.message}
