"""Producing a reply: handoff, retrieval, grounded generation gated sentence by sentence, and the
extractive fallback. The decisions are in kefu.dialogue.policy; this module does the I/O."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import nats.errors

from kefu.dialogue.gloss import Gloss
from kefu.dialogue.policy import (
    HANDOFF_FAILED_TEXT,
    HANDOFF_TEXT,
    HANDOFF_UPSET_TEXT,
    HUMAN_MODE_TEXT,
    NO_ANSWER_TEXT,
    Evidence,
    Passage,
    best_evidence,
    bridge_query,
    build_messages,
    cited,
    lang,
    sentence_ok,
    split_complete,
    upset,
    wants_human,
    with_bridge,
)
from kefu.dialogue.state import Provenance
from kefu.proto.bus.v1 import llm_pb2, retrieval_pb2
from kefu.shared.bus import Bus, decode
from kefu.shared.crypto import Keyring
from kefu.shared.errors import DeadlineExceeded, KefuError, RateLimited, Unavailable, from_code
from kefu.shared.lexicon import expansions
from kefu.shared.logging import get_logger
from kefu.shared.streams import LLM_CANCEL, LLM_GENERATE

log = get_logger("kefu.dialogue.answer")

MAX_SENTENCES = 2
# The index of the chunk that ends a job its visitor left (after any real chunk).
_LAST_INDEX = 2**31
SLOT_PROMPT = ("Read the customer's message. Give as JSON only what it states: product (a product name or "
               "model), order_id, phone, date (YYYY-MM-DD). Leave out anything it does not state.")
SLOT_SCHEMA = json.dumps({"type": "object", "properties": {
    name: {"type": "string", "maxLength": 40} for name in ("product", "order_id", "phone", "date")}})

Emit = Callable[[str], Awaitable[None]]
# Greedy decoding: the same prompt gives the same answer, so a turn can be re-run from its provenance.
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "seed": 1}


@dataclass
class _Generation:
    sampling: str = ""
    prompt_sha256: str = ""
    model: str = ""
    prompt_chars: int = 0
    error: str = ""


@dataclass
class Answer:
    text: str
    source: str
    citations: list[str] = field(default_factory=list)
    handoff: bool = False
    provenance: Provenance = field(default_factory=Provenance)


@dataclass
class AnswerSettings:
    search_k: int = 12
    expand_docs: int = 2
    max_tokens: int = 96
    # How long a job may wait for a free replica, then how long a running job may be silent (its
    # replica sends a heartbeat every second): past either, the cited sentence answers.
    first_chunk_timeout: float = 4.0
    search_timeout: float = 40.0
    chunk_timeout: float = 3.0
    llm_enabled: bool = True


class Answerer:
    def __init__(self, bus: Bus, settings: AnswerSettings, gloss: Gloss | None = None,
                 keyring: Keyring | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.gloss = gloss
        # Jobs wait in stream LLM (on disk) with the visitor's words: sealed like the conversation.
        self.keyring = keyring or Keyring(bus.js, None)
        # turn id -> (job id, inbox) of the generation running for it, so a departed visitor's turn
        # can be stopped.
        self.running: dict[str, tuple[str, str]] = {}

    async def cancel_turn(self, turn_id: str) -> bool:
        """Stop the generation of ``turn_id`` (its visitor left): the model stops within a token, or
        drops the job if it has not started, and the turn is answered with what was shown so far or
        the cited sentence. False when this replica runs no generation for it."""
        job = self.running.get(turn_id)
        if job is None:
            return False
        job_id, inbox = job
        await self._cancel(job_id)
        with contextlib.suppress(Exception):
            await self.bus.publish(inbox, llm_pb2.GenerateChunk(
                job_id=job_id, index=_LAST_INDEX, done=True, finish_reason="cancelled", error_code="visitor_left",
                error_message="the visitor left before the reply"))
        return True

    async def answer(self, *, tenant: str, mode: str, text: str, query: str, kb_min_seq: int, emit: Emit,
                     failures: int = 0, context: str = "", turn_id: str = "") -> Answer:
        """The reply to ``text``; ``query`` is what to search (``text`` rewritten with the remembered slots),
        ``failures`` how many of the bot's last replies in a row found no answer."""
        language = lang(text)
        if mode == "human":
            reply = Answer(HUMAN_MODE_TEXT[language], "handoff", provenance=Provenance(decision="human_mode"))
        elif wants_human(text):
            reply = Answer(HANDOFF_TEXT[language], "handoff", handoff=True,
                           provenance=Provenance(decision="handoff:asked"))
        elif upset(text):
            reply = Answer(HANDOFF_UPSET_TEXT[language], "handoff", handoff=True,
                           provenance=Provenance(decision="handoff:upset"))
        else:
            reply = await self._from_kb(tenant, text, query, kb_min_seq, emit, context, turn_id)
            if reply.provenance.decision != "no_answer":
                return reply  # already streamed
            if failures >= 1:
                # Twice in a row the bot had nothing: a person, not another apology.
                reply = Answer(HANDOFF_FAILED_TEXT[language], "handoff", handoff=True,
                               provenance=replace(reply.provenance, decision="handoff:repeated_failure"))
        await emit(reply.text)
        return reply

    async def _from_kb(self, tenant: str, text: str, query: str, kb_min_seq: int, emit: Emit,
                       context: str = "", turn_id: str = "") -> Answer:
        # Synonyms of the concepts asked about, and the words in the other language: they count less
        # than the question's own words in the keyword lane.
        glossed = self.gloss(query) if self.gloss else []
        keywords = list(dict.fromkeys(expansions(query) + glossed))
        s = self.settings
        search = self.bus.request(
            "kefu.retrieval.search",
            retrieval_pb2.SearchRequest(tenant=tenant, query=query, k=s.search_k, min_kb_seq=kb_min_seq,
                                        keywords=keywords, expand_docs=s.expand_docs),
            retrieval_pb2.SearchReply, timeout=s.search_timeout,
        )
        # The question in the other language's words, searched at the same time by keywords only (no second
        # embedding): the page that answers may be written in the other language.
        bridge = bridge_query(query, glossed)
        if bridge:
            found, bridged = await asyncio.gather(search, self.bus.request(
                "kefu.retrieval.search",
                retrieval_pb2.SearchRequest(tenant=tenant, query=bridge, k=s.search_k, min_kb_seq=kb_min_seq,
                                            keywords_only=True),
                retrieval_pb2.SearchReply, timeout=s.search_timeout), return_exceptions=True)
            if isinstance(found, BaseException):
                raise found
            if isinstance(bridged, BaseException):
                log.info("bridge search failed", error=str(bridged))  # the question's own search answers
                bridged = retrieval_pb2.SearchReply()
        else:
            found, bridged = await search, retrieval_pb2.SearchReply()
        passages = with_bridge([Passage(h.doc_id, h.title, h.text, h.score, h.heading) for h in found.hits],
                               [Passage(h.doc_id, h.title, h.text, h.score, h.heading) for h in bridged.hits])
        by_text = {(h.doc_id, h.text): h for h in [*bridged.hits, *found.hits]}
        hits = [by_text[(p.doc_id, p.text)] for p in passages]
        prov = Provenance(query=query, keywords=tuple(keywords), chunk_ids=tuple(h.chunk_id for h in hits),
                          versions=tuple(h.version for h in hits), scores=tuple(round(p.score, 6) for p in passages))
        evidence = best_evidence(query, passages, tuple(glossed), focus=text)
        if evidence is None:
            return Answer(NO_ANSWER_TEXT[lang(text)], "kb", provenance=replace(prov, decision="no_answer"))
        prov = replace(prov, decision="answered", evidence=evidence.sentence,
                       required_facts=tuple(sorted(evidence.required)))
        if self.settings.llm_enabled:
            shown, gen = await self._generate_checked(tenant, query, passages, evidence, emit, context, turn_id)
            prov = replace(prov, model=gen.model, sampling=gen.sampling, prompt_sha256=gen.prompt_sha256,
                           prompt_chars=gen.prompt_chars, generation_error=gen.error)
            if shown:
                sep = "" if lang(text) == "zh" else " "
                return Answer(sep.join(shown), "llm", cited(shown, passages, evidence),
                              provenance=replace(prov, generated_used=True))
        # The model dropped or invented a fact (or is not there): the cited sentence itself is the answer.
        await emit(evidence.sentence)
        return Answer(evidence.sentence, "kb", [evidence.doc_id], provenance=prov)

    async def _generate_checked(self, tenant: str, query: str, passages: list[Passage], evidence: Evidence,
                                emit: Emit, context: str = "", turn_id: str = "") -> tuple[list[str], _Generation]:
        """Stream the model's answer, showing each sentence only once it has passed the fact check;
        stop the model at the first sentence that fails. Returns the sentences shown."""
        shown: list[str] = []
        sep = "" if lang(query) == "zh" else " "
        buffer = ""
        job_id = uuid.uuid4().hex
        messages = build_messages(query, passages, evidence, context)
        gen = _Generation(sampling=json.dumps(SAMPLING, sort_keys=True), prompt_sha256=hashlib.sha256(
            json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest(),
            prompt_chars=sum(len(m["content"]) for m in messages))
        try:
            async for piece in self._generate(tenant, job_id, messages, gen, turn_id):
                buffer += piece
                sentences, buffer = split_complete(buffer)
                for s in sentences:
                    # A repeated sentence is the model looping: what was shown is the answer.
                    if len(shown) >= MAX_SENTENCES or s in shown or not sentence_ok(
                            s, query=query, passages=passages, evidence=evidence, first=not shown):
                        await self._cancel(job_id)
                        return shown, gen
                    await emit((sep if shown else "") + s)
                    shown.append(s)
            rest = buffer.strip()
            if rest and len(shown) < MAX_SENTENCES and rest not in shown and sentence_ok(
                    rest, query=query, passages=passages, evidence=evidence, first=not shown):
                await emit((sep if shown else "") + rest)
                shown.append(rest)
        except KefuError as exc:
            # Busy, over the tenant's budget or down: the cited sentence answers at once instead.
            log.warning("generation unavailable, answering from the passage", code=exc.code, error=exc.message)
            gen.error = exc.code
            await self._cancel(job_id)
        return shown, gen

    async def model_slots(self, tenant: str, text: str) -> dict[str, str]:
        """Slots the model reads in ``text``, as JSON constrained by a schema (KEFU_SLOTS_MODEL, for a
        capable model). Only proposals: kefu.dialogue.slots.verify_model_slots keeps what the text
        itself shows. {} when the model is busy, down or says nothing usable."""
        messages = [{"role": "system", "content": SLOT_PROMPT}, {"role": "user", "content": text[:1000]}]
        out = ""
        try:
            async for piece in self._generate(tenant, uuid.uuid4().hex, messages, _Generation(),
                                              json_schema=SLOT_SCHEMA):
                out += piece
            found = json.loads(out)
        except (KefuError, ValueError) as exc:
            log.info("no slots from the model", error=str(exc))
            return {}
        return {k: v.strip() for k, v in found.items() if isinstance(v, str) and v.strip()} \
            if isinstance(found, dict) else {}

    async def _generate(self, tenant: str, job_id: str, messages: list[dict[str, str]],
                        gen: _Generation, turn_id: str = "", json_schema: str = "") -> AsyncIterator[str]:
        """Queue a job on the LLM work queue and yield its text pieces as they arrive at our inbox."""
        async with self.bus.inbox() as (inbox, sub):
            if turn_id:
                self.running[turn_id] = (job_id, inbox)
            try:
                async for piece in self._pieces(tenant, job_id, messages, gen, inbox, sub, json_schema):
                    yield piece
            finally:
                self.running.pop(turn_id, None)

    async def _pieces(self, tenant: str, job_id: str, messages: list[dict[str, str]], gen: _Generation,
                      inbox: str, sub: Any, json_schema: str = "") -> AsyncIterator[str]:
        """The job's text pieces, in order; a typed error when it fails, waits too long or is cancelled."""
        s = self.settings
        job = llm_pb2.GenerateRequest(
            job_id=job_id, max_tokens=s.max_tokens, reply_inbox=inbox, tenant=tenant, json_schema=json_schema,
            **SAMPLING,
            deadline_ms=int((time.time() + s.first_chunk_timeout + 4 * s.chunk_timeout) * 1000),
            messages=[llm_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        )
        try:
            data = await self.keyring.seal(tenant, job.SerializeToString(), LLM_GENERATE)
            await self.bus.js.publish(LLM_GENERATE, data, headers={"Nats-Msg-Id": job_id})
        except Exception as exc:
            if "maximum messages" in str(exc):  # the LLM queue is full (discard new)
                raise RateLimited("the model is busy", code="busy", retry_after=2) from None
            raise Unavailable(f"cannot queue generation: {exc}", code="service_unavailable") from None
        expected = 0
        timeout = s.first_chunk_timeout
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                # No free replica in time, or the replica's heartbeats stopped (it died).
                raise DeadlineExceeded("the model did not answer in time", code="model_timeout") from None
            chunk = decode(llm_pb2.GenerateChunk, msg.data)
            timeout = s.chunk_timeout
            if chunk.heartbeat:
                continue
            if chunk.index < expected:
                continue  # a redelivered job replays chunks we already have
            expected = chunk.index + 1
            if chunk.error_code:
                raise from_code(chunk.error_code, chunk.error_message or "generation failed")
            if chunk.text:
                yield chunk.text
            if chunk.done:
                gen.model = chunk.model
                return

    async def _cancel(self, job_id: str) -> None:
        try:
            await self.bus.nc.publish(LLM_CANCEL, job_id.encode())
        except Exception:
            pass
