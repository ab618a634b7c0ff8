"""The dialogue service: owns conversations (stream CONV) and answers kefu.dialogue.{start,turn,get}."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import time
import uuid
import weakref
from contextlib import AsyncExitStack

from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from pydantic import Field

from kefu.dialogue.answer import Answer, Answerer, AnswerSettings
from kefu.dialogue.codec import state_to_proto
from kefu.dialogue.gloss import Gloss
from kefu.dialogue.memory import fold, points_back, recall
from kefu.dialogue.plugins import Plugins
from kefu.dialogue.policy import HANDOFF_UPSET_TEXT, context_note, handoff_summary, lang, wants_human
from kefu.dialogue.slots import extract, rewrite, verify_model_slots
from kefu.dialogue.state import (
    AgentMessage,
    Body,
    BotReply,
    ModeChanged,
    OcrResult,
    Provenance,
    SlotSet,
    Started,
    State,
    TagAdded,
    TagRemoved,
    ToolConfirmed,
    ToolProposed,
    ToolResult,
    VisitorMessage,
)
from kefu.dialogue.store import ConversationStore
from kefu.dialogue.tools import (
    CANCELLED_TEXT,
    FAILED_TEXT,
    Match,
    ask_text,
    confirm_text,
    confirmation_answer,
    match_tool,
)
from kefu.proto.bus.v1 import llm_pb2, plugin_pb2, turn_pb2
from kefu.shared import metrics
from kefu.shared import text as textutil
from kefu.shared.bus import Bus, decode, ensure_kv, subject_token
from kefu.shared.config import KefuSettings
from kefu.shared.crypto import Keyring
from kefu.shared.errors import BadRequest, Conflict, KefuError
from kefu.shared.service import Service
from kefu.shared.streams import (
    TURN_CANCEL,
    arguments_sha256,
    handoff_context,
    handoff_subject,
    handoffs_kv,
    out_subject,
)

MAX_TEXT_CHARS = 4000
APPEND_RETRIES = 5
# How long a tool call may take, its plugin's own timeout included.
TOOL_CALL_TIMEOUT = 35.0
# How long the agent's suggestion may hold up a visitor message in human mode (a search, no model).
SUGGEST_TIMEOUT = 5.0


class DialogueSettings(KefuSettings):
    search_k: int = Field(default=12, ge=1, le=20)
    llm_max_tokens: int = Field(default=96, ge=8, le=1024)
    llm_first_chunk_timeout: float = Field(default=4.0, gt=0)
    llm_enabled: bool = True
    ocr_timeout: float = Field(default=60.0, gt=0)
    # Gloss questions into the other language (CC-CEDICT) for the keyword lane.
    gloss_enabled: bool = True
    # Ask the model for slots too (JSON schema constrained) where the rules find none; for a capable
    # model (KEFU_LLM_MODEL / the openai backend). What it proposes is kept only if the text bears it out.
    slots_model: bool = False
    # The memory (MiB) for the states this replica keeps for its own next turns (KEFU_STATE_CACHE_MB);
    # past it the least recently written are dropped, and their next turn reads the KV cache instead.
    state_cache_mb: int = Field(default=32, ge=0, le=65536)


def failures(state: State) -> int:
    """How many of the bot's latest replies in a row found nothing to answer with."""
    count = 0
    for turn in reversed(state.turns):
        if turn.role != "bot":
            continue
        if turn.provenance is None or turn.provenance.decision != "no_answer":
            break
        count += 1
    return count


def summary_for_agent(state: State, reason: str) -> str:
    """The handoff summary: why, the visitor's last questions, the slots, the bot's last evidence."""
    questions = [t.text for t in state.turns if t.role == "visitor"]
    last = next((t.provenance for t in reversed(state.turns) if t.role == "bot" and t.provenance), None)
    return handoff_summary(reason, questions, state.slots, last.evidence if last else "",
                           last.decision if last else "")


def conversation_note(state: State, seq: int) -> str:
    """The bounded note about the conversation before ``seq`` that goes into the prompt."""
    ctx = fold(state, seq)
    return context_note([(ex.question, ex.answer) for ex in ctx.recent], state.slots, ctx.summary)


def _with_summary(state: State) -> turn_pb2.ConversationState:
    """The state for readers, with the running summary of every topic so far (derived, not stored)."""
    return state_to_proto(dataclasses.replace(state, summary=fold(state, recent=0).summary))


def previous_query(state: State, seq: int) -> str:
    """What the visitor's question before ``seq`` searched for (its rewritten form when it had one)."""
    visitor = [t for t in state.turns if t.role == "visitor" and t.seq < seq and t.source != "ocr"]
    if not visitor:
        return ""
    reply = state.reply_to(visitor[-1].seq)
    if reply is not None and reply.provenance is not None and reply.provenance.query:
        return reply.provenance.query
    return visitor[-1].text


class DialogueService(Service):
    name = "dialogue"
    settings_class = DialogueSettings
    settings: DialogueSettings

    def __init__(self, settings: DialogueSettings | None = None) -> None:
        super().__init__(settings)
        self.store: ConversationStore | None = None
        self.answerer: Answerer | None = None
        # The same answer path without the model: the cited sentence the agent is offered in human mode.
        self.suggester: Answerer | None = None
        # One turn at a time per conversation in this replica; other replicas are kept out by the
        # expected-last-subject-sequence check on every append.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.handoffs: KeyValue | None = None
        self.plugins: Plugins | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        await asyncio.to_thread(textutil.warm_up)
        gloss = await asyncio.to_thread(Gloss.load) if self.settings.gloss_enabled else None
        keyring = Keyring.from_settings(bus.js, self.settings)
        self.store = ConversationStore(bus, f"dialogue/{self.settings.instance}", keyring=keyring,
                                       local_bytes=self.settings.state_cache_mb << 20)
        await self.store.setup()
        s = self.settings
        self.answerer = Answerer(bus, AnswerSettings(search_k=s.search_k, max_tokens=s.llm_max_tokens,
                                                     first_chunk_timeout=s.llm_first_chunk_timeout,
                                                     llm_enabled=s.llm_enabled), gloss, keyring)
        self.suggester = Answerer(bus, AnswerSettings(search_k=s.search_k, search_timeout=SUGGEST_TIMEOUT,
                                                      llm_enabled=False), gloss)
        await bus.serve("kefu.dialogue.start", turn_pb2.StartConversationRequest, self._start, queue="dialogue")
        await bus.serve("kefu.dialogue.turn", turn_pb2.TurnRequest, self._turn, queue="dialogue")
        await bus.serve("kefu.dialogue.get", turn_pb2.GetStateRequest, self._get, queue="dialogue")
        await bus.serve("kefu.dialogue.image", turn_pb2.ImageRequest, self._image, queue="dialogue")
        # Every replica hears it; the one running the turn stops its generation.
        cancel_sub = await bus.nc.subscribe(TURN_CANCEL, cb=self._on_cancel)
        stack.push_async_callback(cancel_sub.unsubscribe)
        await bus.serve("kefu.dialogue.agent", turn_pb2.AgentRequest, self._agent, queue="dialogue")
        self.handoffs = await ensure_kv(bus.js, handoffs_kv())
        self.plugins = Plugins(bus)
        await self.plugins.setup()

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = self._locks[conversation_id] = asyncio.Lock()
        return lock

    async def _start(self, req: turn_pb2.StartConversationRequest, _: Msg) -> turn_pb2.StartConversationReply:
        assert self.store is not None
        tenant = subject_token(req.tenant)
        conversation_id = uuid.uuid4().hex
        await self.store.append(State(conversation_id, tenant), Started(req.visitor_id[:128]))
        self.log.info("conversation started", tenant=tenant, conversation_id=conversation_id)
        return turn_pb2.StartConversationReply(conversation_id=conversation_id, tenant=tenant)

    async def _get(self, req: turn_pb2.GetStateRequest, _: Msg) -> turn_pb2.ConversationState:
        assert self.store is not None
        cid = subject_token(req.conversation_id)
        if req.has_at_seq:
            state = await self.store.state_at(cid, req.at_seq)
            if state.seq < req.at_seq:
                raise BadRequest(f"the conversation has no event {req.at_seq} (last is {state.seq})",
                                 code="invalid_field")
            return _with_summary(state)
        return _with_summary(await self.store.load(cid))

    async def _agent(self, req: turn_pb2.AgentRequest, _: Msg) -> turn_pb2.AgentReply:
        """An agent accepts a waiting conversation, replies in it, or hands it back to the bot."""
        assert self.store is not None and self.bus is not None and self.handoffs is not None
        cid = subject_token(req.conversation_id)
        agent = req.agent_id[:64] or "agent"
        if req.action not in ("accept", "reply", "release"):
            raise BadRequest("action must be accept, reply or release", code="invalid_field")
        text = req.text.strip()
        if req.action == "reply" and not text:
            raise BadRequest("text must not be empty", code="missing_field")
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest(f"text is longer than {MAX_TEXT_CHARS} characters", code="invalid_field")
        async with self._lock(cid):
            for attempt in range(APPEND_RETRIES):
                state = await self.store.load(cid, verify=attempt > 0, local=attempt == 0)
                if state.mode != "human":
                    raise Conflict("the conversation is not waiting for a person", code="not_in_human_mode")
                try:
                    if req.action == "accept":
                        state, ev = await self.store.append(state, TagAdded(f"agent:{agent}"))
                    elif req.action == "reply":
                        state, ev = await self.store.append(state, AgentMessage(agent, text))
                    else:
                        state, ev = await self.store.append(state, ModeChanged("bot", f"released by {agent}"))
                    break
                except Conflict:
                    continue
            else:
                raise Conflict("the conversation is too busy, try again", code="concurrent_update")
        if req.action == "reply":
            await self.bus.publish(out_subject(cid), turn_pb2.OutEvent(
                conversation_id=cid, kind="agent_message", text=text, seq=ev.seq))
        elif req.action == "release":
            await self.handoffs.delete(cid)
        else:
            notice = self._notice(state, agent)
            await self.handoffs.put(cid, await self._sealed(notice))
        self.log.info("agent action", conversation_id=cid, action=req.action, seq=ev.seq)
        reply = turn_pb2.AgentReply(seq=ev.seq, state=state_to_proto(state))
        if req.action == "accept" and (suggestion := await self._suggest_last(state)) is not None:
            reply.suggestion.CopyFrom(suggestion)
        return reply

    async def _suggest(self, tenant: str, text: str, query: str, kb_min_seq: int = 0) -> turn_pb2.Reply | None:
        """What the bot would answer from the knowledge base (the cited sentence), offered to the agent of a
        human-mode conversation; None when the knowledge base has no answer or cannot be asked now."""
        assert self.suggester is not None

        async def discard(_: str) -> None:
            pass

        try:
            answer = await self.suggester.answer(tenant=tenant, mode="bot", text=text, query=query,
                                                 kb_min_seq=kb_min_seq, emit=discard)
        except KefuError as exc:  # the visitor's message reaches the agent either way
            self.log.warning("no suggestion for the agent", code=exc.code)
            return None
        if answer.provenance.decision != "answered":
            return None
        return turn_pb2.Reply(text=answer.text, source=answer.source, citations=answer.citations)

    async def _suggest_last(self, state: State) -> turn_pb2.Reply | None:
        """The suggestion for the visitor's last question (not the request for a person itself)."""
        for turn in reversed(state.turns):
            if turn.role == "visitor" and turn.source != "ocr" and not wants_human(turn.text):
                query = rewrite(turn.text, state.slots, previous_query(state, turn.seq))
                return await self._suggest(state.tenant, turn.text, query)
        return None

    async def _sealed(self, notice: turn_pb2.HandoffNotice) -> bytes:
        """A handoff notice as KV "handoffs" keeps it: sealed (it quotes the visitor) when encryption is on."""
        assert self.store is not None
        return await self.store.keyring.seal(notice.tenant, notice.SerializeToString(),
                                             handoff_context(notice.conversation_id))

    @staticmethod
    def _notice(state: State, agent: str = "") -> turn_pb2.HandoffNotice:
        last = next((t.text for t in reversed(state.turns) if t.role == "visitor"), "")
        return turn_pb2.HandoffNotice(conversation_id=state.conversation_id, tenant=state.tenant,
                                      summary=state.handoff_summary, last_text=last[:200],
                                      ts_ms=int(time.time() * 1000), agent_id=agent)

    async def _image(self, req: turn_pb2.ImageRequest, _: Msg) -> turn_pb2.ImageReply:
        """OCR an image the visitor sent and add its text to the conversation (slots included: an order
        number in a screenshot is remembered like a typed one)."""
        assert self.store is not None and self.bus is not None
        cid = subject_token(req.conversation_id)
        await self.store.load(cid)  # an unknown conversation fails before the (slow) OCR
        ocr = await self.bus.request("kefu.inference.ocr", llm_pb2.OcrRequest(media_id=req.media_id),
                                     llm_pb2.OcrReply, timeout=self.settings.ocr_timeout)
        text = ocr.text.strip()
        slots = extract(text, datetime.datetime.now(datetime.UTC)) if text else {}
        async with self._lock(cid):
            for attempt in range(APPEND_RETRIES):
                state = await self.store.load(cid, verify=attempt > 0, local=attempt == 0)
                try:
                    state, ev = await self.store.append(state, OcrResult(text, req.media_id,
                                                                         tuple(sorted(slots.items()))),
                                                        msg_id=f"{cid}:media:{req.media_id}")
                    break
                except Conflict:
                    continue
            else:
                raise Conflict("the conversation is too busy, try again", code="concurrent_update")
        self.log.info("image read", conversation_id=cid, seq=ev.seq, chars=len(text))
        return turn_pb2.ImageReply(seq=ev.seq, text=text)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            req = decode(turn_pb2.TurnRequest, msg.data)
        except KefuError:
            return
        if req.turn_id and self.answerer is not None and await self.answerer.cancel_turn(req.turn_id):
            self.log.info("turn cancelled, the visitor left", conversation_id=req.conversation_id)

    async def _turn(self, req: turn_pb2.TurnRequest, _: Msg) -> turn_pb2.TurnReply:
        assert self.store is not None and self.answerer is not None
        t0 = time.perf_counter()
        cid = subject_token(req.conversation_id)
        text = req.text.strip()
        if not text:
            raise BadRequest("text must not be empty", code="missing_field")
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest(f"text is longer than {MAX_TEXT_CHARS} characters", code="invalid_field")
        cmid = req.client_msg_id[:128]
        slots = extract(text, datetime.datetime.now(datetime.UTC))
        async with self._lock(cid):
            state, seq = await self._append_visitor(cid, text, cmid, slots)
            if seq is not None and self.settings.slots_model and self.settings.llm_enabled:
                state = await self._model_slots(state, text, slots)
            if seq is None:  # a retry of a message that was already answered
                seq = state.client_msgs[cmid]
                turn = state.reply_to(seq)
                assert turn is not None
                return turn_pb2.TurnReply(seq=seq, replayed=True, reply_seq=turn.seq, reply=turn_pb2.Reply(
                    text=turn.text, source=turn.source, citations=list(turn.citations)))

            # The slots before this message, updated by it (the state already holds both).
            query = rewrite(text, state.slots, previous_query(state, seq))
            if state.mode == "human":  # the agent sees what the visitor writes, and what the bot would answer
                seen = turn_pb2.OutEvent(conversation_id=cid, turn_id=req.turn_id, kind="visitor_message",
                                         text=text, seq=seq)
                if (suggestion := await self._suggest(state.tenant, text, query, req.kb_min_seq)) is not None:
                    seen.suggestion.CopyFrom(suggestion)
                await self.bus.publish(out_subject(cid), seen)  # type: ignore[union-attr]

            async def emit(delta: str) -> None:
                await self.bus.publish(out_subject(cid), turn_pb2.OutEvent(  # type: ignore[union-attr]
                    conversation_id=cid, turn_id=req.turn_id, kind="delta", text=delta, seq=seq))

            answer = None
            if state.mode == "bot" and not wants_human(text):
                state, answer = await self._plugin_turn(state, seq, text)
            if answer is not None:
                await emit(answer.text)
            else:
                answer = await self.answerer.answer(
                    tenant=state.tenant, mode=state.mode, text=text, query=query, kb_min_seq=req.kb_min_seq,
                    emit=emit, failures=failures(state),
                    context=conversation_note(state, seq) if self.settings.llm_enabled else "", turn_id=req.turn_id)
            if state.mode == "bot" and not answer.handoff:
                state, answer = await self._reply_hook("before_reply", state, text, answer)
            reply_seq = await self._append_reply(state, seq, answer)
        reply = turn_pb2.Reply(text=answer.text, source=answer.source, citations=answer.citations)
        await self.bus.publish(out_subject(cid), turn_pb2.OutEvent(  # type: ignore[union-attr]
            conversation_id=cid, turn_id=req.turn_id, kind="reply", reply=reply, seq=seq, reply_seq=reply_seq))
        metrics.turn_duration().labels(answer.source).observe(time.perf_counter() - t0)
        if answer.provenance.generation_error:  # answered from the cited sentence; the model's failure counts
            metrics.count_error(self.name, answer.provenance.generation_error)
        self.log.info("turn answered", conversation_id=cid, seq=seq, source=answer.source)
        if state.mode == "bot" and not answer.handoff:
            self._after_reply(state.tenant, cid, text, answer)
        return turn_pb2.TurnReply(seq=seq, reply=reply, reply_seq=reply_seq)

    async def _reply_hook(self, hook: str, state: State, text: str, answer: Answer,
                          cache: bool = False) -> tuple[State, Answer]:
        """Run ``hook`` (before_reply, after_reply) of the tenant's plugins on the reply: their tags are
        recorded, and a plugin that asks for a person hands the conversation over after this reply (the
        reply itself may already be on the visitor's screen, streamed)."""
        assert self.plugins is not None
        results = await self.plugins.hook(hook, state.tenant, state.conversation_id, text, lang(text), state.slots,
                                          reply_text=answer.text)
        state = await self._tag(state, [t for r in results for t in r.tags], cache=cache)
        if reason := next((r.handoff_reason for r in results if r.handoff_reason), ""):
            answer = dataclasses.replace(answer, handoff=True, provenance=dataclasses.replace(
                answer.provenance, decision=f"handoff:plugin:{reason}"))
        return state, answer

    def _after_reply(self, tenant: str, cid: str, text: str, answer: Answer) -> None:
        """after_reply hooks run once the reply is out, off the visitor's time; their tags are recorded."""

        async def run() -> None:
            assert self.store is not None and self.plugins is not None
            if "after_reply" not in (await self.plugins.offer(tenant)).hooks:
                return
            try:
                async with self._lock(cid):
                    state = await self.store.load(cid)
                    # Nothing after these appends writes the cached state: they write it themselves.
                    state, later = await self._reply_hook("after_reply", state, text, answer, cache=True)
                    if later.handoff and state.mode != "human":
                        reason = later.provenance.decision.removeprefix("handoff:")
                        state = await self._append_body(state, ModeChanged("human", reason,
                                                                           summary_for_agent(state, reason)), cache=True)
                        await self._announce_handoff(state)
            except KefuError as exc:
                self.log.warning("after_reply hooks not applied", conversation_id=cid, code=exc.code)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Plugins: hooks, and tools routed by their intents under the confirmation rule (kefu.dialogue.tools)

    async def _plugin_turn(self, state: State, seq: int, text: str) -> tuple[State, Answer | None]:
        """The reply when plugins answer this message (a hook hands it over, a tool is asked for or
        confirmed); None to answer from the knowledge base."""
        assert self.plugins is not None
        language = lang(text)
        offer = await self.plugins.offer(state.tenant)
        if "on_message" in offer.hooks:
            results = await self.plugins.hook("on_message", state.tenant, state.conversation_id, text, language,
                                              state.slots)
            state = await self._tag(state, [t for r in results for t in r.tags])
            if reason := next((r.handoff_reason for r in results if r.handoff_reason), ""):
                return state, Answer(HANDOFF_UPSET_TEXT[language], "handoff", handoff=True,
                                     provenance=Provenance(decision=f"handoff:plugin:{reason}"))
        pending = state.pending_tool()
        if pending is not None and pending.proposed is not None:
            proposal: ToolProposed = pending.proposed.body  # type: ignore[assignment]
            yes = confirmation_answer(text)
            state = await self._append_body(state, ToolConfirmed(
                proposal.call_id, proposal.plugin, proposal.tool, proposal.arguments_sha256, "visitor", seq,
                declined=not yes))
            if yes:  # the yes is an event of its own; the plugins service reads it before it runs the tool
                return await self._run_tool(state, proposal, state.stream_seq, language)
            if yes is False:
                return state, Answer(CANCELLED_TEXT[language], "plugin", provenance=Provenance(
                    decision=f"tool_declined:{proposal.plugin}.{proposal.tool}"))
            # Anything else is not an answer: the offer lapses and the message is taken as it is.
        if not offer.tools:
            return state, None
        match = match_tool(text, offer.tools, state.slots) or self._asked_tool(state, offer.tools)
        if match is None:
            return state, None
        name = match.spec.name
        if match.missing:
            return state, Answer(ask_text(match.spec, match.missing, language), "plugin",
                                 provenance=Provenance(decision=f"tool_ask:{name}"))
        args = match.arguments_json
        proposal = ToolProposed(uuid.uuid4().hex, match.spec.plugin, match.spec.tool, args,
                                arguments_sha256(args),
                                match.spec.confirmation if match.spec.side_effecting else "none",
                                confirm_text(match.spec, match.arguments, language), seq)
        state = await self._append_body(state, proposal)
        if not match.spec.side_effecting:
            return await self._run_tool(state, proposal, 0, language)
        return state, Answer(proposal.summary, "plugin", provenance=Provenance(decision=f"tool_proposed:{name}"))

    @staticmethod
    def _asked_tool(state: State, specs: list) -> Match | None:  # noqa: ANN001 (list[ToolSpec])
        """The tool the bot asked arguments for in its last reply, now that the slots may hold them."""
        last = next((t for t in reversed(state.turns) if t.role == "bot"), None)
        decision = last.provenance.decision if last is not None and last.provenance is not None else ""
        if not decision.startswith("tool_ask:"):
            return None
        spec = next((s for s in specs if s.name == decision.removeprefix("tool_ask:")), None)
        if spec is None:
            return None
        args = {arg: state.slots[slot] for arg, slot in spec.slot_arguments.items() if state.slots.get(slot)}
        missing = tuple(a for a in spec.required if a not in args)
        return Match(spec, args, missing) if not missing else None

    async def _run_tool(self, state: State, proposal: ToolProposed, confirmation_stream_seq: int,
                        language: str) -> tuple[State, Answer]:
        assert self.plugins is not None
        name = f"{proposal.plugin}.{proposal.tool}"
        req = plugin_pb2.ToolCallRequest(
            tenant=state.tenant, conversation_id=state.conversation_id, plugin=proposal.plugin, tool=proposal.tool,
            arguments_json=proposal.arguments_json, call_id=proposal.call_id,
            confirmation_stream_seq=confirmation_stream_seq, lang=language)
        try:
            reply = await self.plugins.call(req, TOOL_CALL_TIMEOUT)
            result = ToolResult(proposal.call_id, proposal.plugin, proposal.tool, True, reply.result_json,
                                plugin_version=reply.version)
            try:
                message = json.loads(reply.result_json).get("message")
            except (ValueError, AttributeError):
                message = None
        except KefuError as exc:
            self.log.warning("tool call failed", conversation_id=state.conversation_id, tool=name, code=exc.code)
            result = ToolResult(proposal.call_id, proposal.plugin, proposal.tool, False, error_code=exc.code,
                                error_message=exc.message[:500])
            message = None
        state = await self._append_body(state, result)
        ok = result.ok and isinstance(message, str) and message.strip()
        text = message.strip()[:2000] if ok else FAILED_TEXT[language]  # type: ignore[union-attr]
        decision = f"tool_result:{name}" if ok else f"tool_failed:{name}:{result.error_code or 'no_message'}"
        return state, Answer(text, "plugin", provenance=Provenance(decision=decision))

    async def _tag(self, state: State, tags: list[str], cache: bool = False) -> State:
        """Add ``tags``; a tag ``kind:value`` replaces the conversation's other ``kind:`` tag."""
        for tag in dict.fromkeys(tags):
            if tag in state.tags:
                continue
            kind, sep, _ = tag.partition(":")
            for old in state.tags:
                if sep and old.startswith(kind + ":"):
                    state = await self._append_body(state, TagRemoved(old, tuple(sorted(state.tag_adds[old]))),
                                                    cache=cache)
            state = await self._append_body(state, TagAdded(tag), cache=cache)
        return state

    async def _append_body(self, state: State, body: Body, cache: bool = False) -> State:
        """Append ``body`` to the conversation (reloading and retrying when another writer came first);
        the cached state is left to the turn's reply to write unless ``cache``."""
        assert self.store is not None
        for _ in range(APPEND_RETRIES):
            try:
                state, _ev = await self.store.append(state, body, cache=cache)
                return state
            except Conflict:
                state = await self.store.load(state.conversation_id, verify=True)
        raise Conflict("the conversation is too busy, try again", code="concurrent_update")

    async def _model_slots(self, state: State, text: str, found: dict[str, str]) -> State:
        """Add the slots the model reads in ``text`` (and the text bears out) as SlotSet events."""
        assert self.store is not None and self.answerer is not None
        proposed = await self.answerer.model_slots(state.tenant, text)
        for name, value in verify_model_slots(proposed, text, found, datetime.datetime.now(datetime.UTC)).items():
            try:
                state, _ = await self.store.append(state, SlotSet(name, value), cache=False)
            except Conflict:
                break  # another writer moved on; the slot is a nicety, the turn goes on
        return state

    async def _append_visitor(self, cid: str, text: str, cmid: str,
                              slots: dict[str, str]) -> tuple[State, int | None]:
        """Append the visitor message; (state, None) when ``cmid`` was already answered."""
        assert self.store is not None
        for attempt in range(APPEND_RETRIES):
            # First from this replica's memory; a conflict means another writer moved on: verify.
            state = await self.store.load(cid, verify=attempt > 0, local=attempt == 0)
            if cmid and cmid in state.client_msgs:
                seq = state.client_msgs[cmid]
                if state.reply_to(seq) is not None:
                    return state, None
                return state, seq  # stored but never answered (a crash in between): answer it now
            if "product" not in slots and points_back(text):
                # "之前那个手机…": the product of the older topic it points at, from the memory vectors.
                memory = recall(fold(state).memories, text)
                if memory is not None and memory.product:
                    slots = {**slots, "product": memory.product}
            try:
                # The cache is written with the reply; a crash in between is caught by load(verify=True).
                state, ev = await self.store.append(state, VisitorMessage(text, cmid, tuple(sorted(slots.items()))),
                                                    msg_id=f"{cid}:{cmid}" if cmid else None, cache=False)
                return state, ev.seq
            except Conflict:
                continue
        raise Conflict("the conversation is too busy, try again", code="concurrent_update")

    async def _announce_handoff(self, state: State) -> None:
        """Put the conversation in the agents' queue and tell the agents online."""
        assert self.handoffs is not None and self.bus is not None
        notice = self._notice(state)
        try:
            await self.handoffs.put(state.conversation_id, await self._sealed(notice))
            await self.bus.publish(handoff_subject(state.tenant), notice)
        except Exception as exc:  # the conversation is in human mode either way; the queue is a view of it
            self.log.warning("handoff not announced", conversation_id=state.conversation_id, error=str(exc))

    async def _append_reply(self, state: State, seq: int, answer: Answer) -> int:
        """Append the reply to visitor message ``seq``; the reply event's own seq."""
        assert self.store is not None
        for _ in range(APPEND_RETRIES):
            try:
                if answer.handoff and state.mode != "human":
                    reason = answer.provenance.decision.removeprefix("handoff:")
                    state, _ev = await self.store.append(state, ModeChanged("human", reason,
                                                                            summary_for_agent(state, reason)),
                                                         cache=False)
                    await self._announce_handoff(state)
                _, ev = await self.store.append(state, BotReply(answer.text, answer.source, tuple(answer.citations),
                                                                seq, answer.provenance))
                return ev.seq
            except Conflict:
                state = await self.store.load(state.conversation_id, verify=True)
        raise Conflict("the conversation is too busy, try again", code="concurrent_update")
