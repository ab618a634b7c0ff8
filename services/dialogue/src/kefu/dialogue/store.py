"""The conversation log (stream CONV) and its materialized-state cache (KV conv_state).

With encryption at rest on (``KEFU_MASTER_KEY``), event bodies and cached states are sealed with the
tenant's data key (:mod:`kefu.shared.crypto`); what was written in clear before still reads."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import replace

import nats.errors
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import APIError, InvalidKeyError, KeyNotFoundError
from nats.js.kv import KeyValue

from kefu.dialogue.codec import event_from_proto, event_to_proto, state_from_proto, state_to_proto
from kefu.dialogue.state import Body, Event, State, fold, reduce
from kefu.proto.bus.v1 import events_pb2, turn_pb2
from kefu.shared.bus import Bus, decode, ensure_kv, ensure_stream, stream_publish
from kefu.shared.crypto import DecryptionFailed, Keyring, open_event, seal_event
from kefu.shared.errors import Conflict, NotFound
from kefu.shared.logging import get_logger
from kefu.shared.streams import KV_CONV_STATE, STREAM_CONV, conv_stream, conv_subject

log = get_logger("kefu.dialogue.store")

WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code for a failed Nats-Expected-Last-Subject-Sequence
# What a state costs in this process per byte of its encoding (its turns as Python objects and tuples):
# 4.2 measured with tracemalloc on conversations of six cited answers (18 KB held for 4.4 KB encoded).
PY_BYTES_PER_ENCODED = 4


class ConversationStore:
    """Appends events with optimistic concurrency and loads state (cached, or folded from the log)."""

    def __init__(self, bus: Bus, writer: str, local_bytes: int = 32 << 20, keyring: Keyring | None = None) -> None:
        """``local_bytes`` bounds the memory of the states this replica keeps for its own next turns
        (least recently written dropped first; a dropped one costs a KV round trip, nothing else)."""
        self.bus = bus
        self.writer = writer
        self.keyring = keyring or Keyring(bus.js, None)
        self.kv: KeyValue | None = None
        # The states this replica wrote last, for its own next turn on them (see load(local=True)), each
        # with what it is reckoned to cost; the total stays under local_bytes.
        self._local: OrderedDict[str, tuple[State, int]] = OrderedDict()
        self._local_bytes = 0
        self._local_max = local_bytes

    async def setup(self) -> None:
        await ensure_stream(self.bus.js, conv_stream())
        self.kv = await ensure_kv(self.bus.js, KeyValueConfig(bucket=KV_CONV_STATE, history=1,
                                                             storage=StorageType.FILE))

    async def append(self, state: State, body: Body, *, msg_id: str | None = None,
                     cache: bool = True) -> tuple[State, Event]:
        """Append ``body`` as the next event of ``state``'s conversation and return the new state.

        With ``cache`` false the cached state is left behind (a later append of the same turn writes
        it): it costs a state encoding and a KV write per event otherwise.

        Raises:
            Conflict: another writer appended first (the caller reloads and retries).
        """
        ev = Event(id=uuid.uuid4().hex, conversation_id=state.conversation_id, tenant=state.tenant,
                   seq=state.seq + 1, ts_ms=int(time.time() * 1000), writer=self.writer,
                   lamport=state.lamport + 1, body=body)
        headers = {"Nats-Msg-Id": msg_id or ev.id,
                   "Nats-Expected-Last-Subject-Sequence": str(state.stream_seq)}
        try:
            pb = await seal_event(self.keyring, event_to_proto(ev))
            # Rides out a stream leader election in a cluster (the Nats-Msg-Id makes a resend safe).
            ack = await stream_publish(self.bus.js, conv_subject(state.tenant, state.conversation_id),
                                       pb.SerializeToString(), headers=headers)
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise Conflict("the conversation changed meanwhile", code="concurrent_update") from None
            raise
        if ack.duplicate:
            # The same message id was stored before (a retried request): the log already has it.
            raise Conflict("duplicate append", code="concurrent_update")
        new = replace(reduce(state, ev), stream_seq=ack.seq)
        encoded = state_to_proto(new).SerializeToString() if cache else None
        self._remember(new, encoded)
        if encoded is not None:
            await self._cache(new, encoded)
        return new, ev

    @property
    def local_bytes(self) -> int:
        """What the states kept for this replica's next turns are reckoned to cost."""
        return self._local_bytes

    def _remember(self, state: State, encoded: bytes | None) -> None:
        cid = state.conversation_id
        old = self._local.pop(cid, None)
        # Without an encoding (an append that leaves the cache behind) the state is one event longer
        # than the last one weighed: that weight stands until the next encoding.
        size = len(encoded) * PY_BYTES_PER_ENCODED if encoded is not None else (old[1] if old else 4096)
        self._local_bytes += size - (old[1] if old else 0)
        self._local[cid] = (state, size)
        while self._local_bytes > self._local_max and self._local:
            _, (_, dropped) = self._local.popitem(last=False)
            self._local_bytes -= dropped

    async def _cache(self, state: State, encoded: bytes) -> None:
        assert self.kv is not None
        try:
            value = await self.keyring.seal(state.tenant, encoded, _state_context(state.conversation_id))
            await self.kv.put(state.conversation_id, value)
        except (nats.errors.Error, APIError) as exc:  # the cache is an optimisation: the log is the truth
            log.warning("state cache write failed", error=str(exc))

    async def load(self, conversation_id: str, verify: bool = False, local: bool = False) -> State:
        """The state: the cached one (one round trip), or, with ``verify`` or without a cache, the cached
        one checked against the log and folded anew when it lags. With ``local``, the state this replica
        wrote last, when it has one (no round trip).

        Trusting a cache is safe for writers: an append from a stale state fails its expected-last-
        subject-sequence check, and the writer reloads with ``verify``. Readers use the KV cache, which
        every writer updates before it answers.

        Raises:
            NotFound: no such conversation.
        """
        assert self.kv is not None
        if local and not verify and conversation_id in self._local:
            return self._local[conversation_id][0]
        cached: State | None = None
        try:
            entry = await self.kv.get(conversation_id)
            if entry.value:
                value = await self.keyring.open(entry.value, _state_context(conversation_id))
                cached = state_from_proto(decode(turn_pb2.ConversationState, value))
        except (KeyNotFoundError, InvalidKeyError):  # not a key a conversation of ours can have ("中文")
            pass
        except DecryptionFailed as exc:  # a cache entry that does not authenticate: rebuilt from the log
            log.warning("cached state rejected", conversation_id=conversation_id, error=exc.message)
        except (nats.errors.Error, APIError) as exc:  # the cache away (its leader elected anew): the log is the truth
            log.warning("state cache not read", conversation_id=conversation_id, error=type(exc).__name__)
        if cached is not None and not verify:
            return cached
        subject, count, last_seq = await self._locate(conversation_id, cached.tenant if cached else None)
        if cached is not None and cached.stream_seq == last_seq:
            return cached
        if not count:
            raise NotFound(f"conversation {conversation_id} does not exist", code="unknown_conversation")
        tenant = subject.split(".")[2]
        events, stream_seq = await self.read(subject, count)
        state = replace(fold(conversation_id, tenant, events), stream_seq=stream_seq)
        encoded = state_to_proto(state).SerializeToString()
        self._remember(state, encoded)
        await self._cache(state, encoded)
        return state

    async def state_at(self, conversation_id: str, at_seq: int) -> State:
        """The state right after event ``at_seq`` (time travel), folded from the log."""
        current = await self.load(conversation_id, verify=True)
        subject = conv_subject(current.tenant, conversation_id)
        events, _ = await self.read(subject, current.seq + 1)
        return fold(conversation_id, current.tenant, events, at_seq=at_seq)

    async def _locate(self, conversation_id: str, tenant: str | None) -> tuple[str, int, int]:
        """(subject, number of events, stream sequence of the last one)."""
        pattern = conv_subject(tenant, conversation_id) if tenant else f"kefu.conv.*.{conversation_id}"
        info = await self.bus.js.stream_info(STREAM_CONV, subjects_filter=pattern)
        subjects = info.state.subjects or {}
        if not subjects:
            return pattern, 0, 0
        subject, count = next(iter(subjects.items()))
        last = await self.bus.js.get_last_msg(STREAM_CONV, subject)
        return subject, count, last.seq or 0

    async def read(self, subject: str, count: int) -> tuple[list[Event], int]:
        """All events on ``subject`` in order, and the stream sequence of the last one."""
        sub = await self.bus.js.subscribe(subject, stream=STREAM_CONV, ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.ALL)
        events: list[Event] = []
        stream_seq = 0
        try:
            while len(events) < count:
                msg = await sub.next_msg(timeout=5)
                events.append(event_from_proto(await open_event(self.keyring, decode(events_pb2.Event, msg.data))))
                stream_seq = msg.metadata.sequence.stream
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return events, stream_seq


def _state_context(conversation_id: str) -> str:
    return f"conv_state/{conversation_id}"
