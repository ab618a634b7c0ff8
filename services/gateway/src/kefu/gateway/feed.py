"""What one visitor connection (WebSocket, gRPC Converse) is sent: the live events of its conversation,
its own turns' deltas and replies, and on resume the events it missed — in order, with no gap and no
duplicate at the boundary.

Every frame carries the conversation seq: a ``delta`` the seq of the visitor message it answers, a
``reply`` that seq as ``seq`` (as in the HTTP answer) and its own event's as ``reply_seq``, an
``agent_message`` its own. A client keeps the highest ``reply_seq`` / ``agent_message`` seq it has
seen and names it as ``last_seq`` when it comes back. When the gateway's own NATS connection drops,
every open feed catches up the same way once it is back (:func:`follow_reconnects`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kefu.gateway.core import Core, Delta
from kefu.proto.bus.v1 import turn_pb2
from kefu.shared.errors import KefuError
from kefu.shared.logging import get_logger

log = get_logger("kefu.gateway.feed")

# More missed events than this: the client gets the state (resync) instead of a replay.
MAX_REPLAY = 500
_NONE: frozenset[int] = frozenset()  # shared: an empty frozenset is a new object each time


@dataclass(slots=True)
class Frame:
    """One server→client event, independent of the transport that renders it."""

    kind: str  # delta, reply, agent_message, resync, error
    seq: int = 0
    reply_seq: int = 0
    text: str = ""
    reply: turn_pb2.Reply | None = None
    state: turn_pb2.ConversationState | None = None
    reason: str = ""
    error: KefuError | None = None


def reply_frame(r: turn_pb2.TurnReply) -> Frame:
    return Frame("reply", seq=r.seq, reply_seq=r.reply_seq, reply=r.reply)


class Feed:
    """The frames one visitor connection is sent, handed to ``sink`` in order.

    Live events arrive from the router; while :meth:`resume` reads the state they are held, then those
    the replay already covered are dropped (subscribe first, then read, then deduplicate).
    """

    # Thousands of these sit idle on a gateway: slots, and nothing allocated until it is needed.
    __slots__ = ("_answered", "_held", "_lock", "_own", "_seen", "_upto", "cid", "core", "sink")

    def __init__(self, core: Core, conversation_id: str, sink: Callable[[Frame], None]) -> None:
        self.core = core
        self.cid = conversation_id
        self.sink = sink
        # Turns this connection sent: their frames come from its own request, not from the router.
        self._own: set[str] | None = None
        self._held: list[Frame] | None = None
        # After a resume: events up to this seq, and the replies to these visitor messages, were sent.
        self._upto = 0
        self._answered = _NONE
        # The highest event seq this connection was sent: where a catch-up starts from.
        self._seen = 0
        self._lock: asyncio.Lock | None = None  # one resume at a time (a client's, a catch-up); made when needed
        core.router.listen(conversation_id, self)

    def close(self) -> None:
        self.core.router.unlisten(self.cid, self)

    def __call__(self, ev: turn_pb2.OutEvent) -> None:
        """An event from the router (the feed itself is the listener: no bound method per socket)."""
        if self._own and ev.turn_id in self._own:
            return
        if ev.kind == "agent_message":
            self.deliver(Frame("agent_message", seq=ev.seq, text=ev.text))
        elif ev.kind == "delta":  # another connection's turn (another tab, or this visitor before reconnecting)
            self.deliver(Frame("delta", seq=ev.seq, text=ev.text))
        elif ev.kind == "reply":
            self.deliver(Frame("reply", seq=ev.seq, reply_seq=ev.reply_seq, reply=ev.reply))

    def deliver(self, frame: Frame) -> None:
        """Send ``frame`` unless a replay already did; hold it while a replay is being read."""
        if self._held is not None:
            self._held.append(frame)
        elif not self._covered(frame):
            self._send(frame)

    def _send(self, f: Frame) -> None:
        if f.kind != "delta":
            self._seen = max(self._seen, f.reply_seq if f.kind == "reply" else f.seq)
        self.sink(f)

    def _covered(self, f: Frame) -> bool:
        if f.kind == "agent_message":
            return 0 < f.seq <= self._upto
        if f.kind == "reply":
            return (0 < f.reply_seq <= self._upto) or f.seq in self._answered
        if f.kind == "delta":
            return f.seq in self._answered
        return False

    async def resume(self, last_seq: int) -> None:
        """Send every visitor-visible event after ``last_seq`` in order, or a resync with the state."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._resume(last_seq)

    async def _resume(self, last_seq: int) -> None:
        self._held = []
        try:
            try:
                state = await self.core.get_state(self.cid)
            except KefuError as exc:
                # No state to replay from: say so; the client fetches the state when it can.
                self._send(Frame("resync", reason="unavailable", error=exc))
                return
            visible = sorted((t for t in state.turns if t.role in ("bot", "agent") and t.seq > last_seq),
                             key=lambda t: t.seq)
            if last_seq > state.seq or len(visible) > MAX_REPLAY:
                self._send(Frame("resync", seq=state.seq, state=state,
                                 reason="unknown_seq" if last_seq > state.seq else "too_far_behind"))
            else:
                for t in visible:
                    if t.role == "bot":
                        frame = Frame("reply", seq=t.in_reply_to, reply_seq=t.seq, reply=turn_pb2.Reply(
                            text=t.text, source=t.source, citations=list(t.citations)))
                    else:
                        frame = Frame("agent_message", seq=t.seq, text=t.text)
                    self._send(frame)
            self._upto = max(self._upto, state.seq)
            self._seen = max(self._seen, state.seq)  # the client now has all there is to see up to here
            self._answered = self._answered | {t.in_reply_to for t in visible if t.role == "bot" and t.in_reply_to}
        finally:
            held, self._held = self._held, None
            for frame in held:
                self.deliver(frame)

    async def turn(self, text: str, client_msg_id: str = "") -> None:
        """Run one visitor message; its deltas and reply go to the sink (errors are raised)."""
        turn_id = uuid.uuid4().hex
        if self._own is None:
            self._own = set()
        self._own.add(turn_id)
        try:
            async for item in self.core.send_message(self.cid, text, client_msg_id, turn_id=turn_id):
                if isinstance(item, Delta):
                    self.deliver(Frame("delta", seq=item.seq, text=item.text))
                else:
                    self.deliver(reply_frame(item.reply))
        finally:
            # Dialogue's reply event may still be on its way to the router.
            asyncio.get_running_loop().call_later(5.0, self._own.discard, turn_id)

    async def catch_up(self, since_ms: int) -> None:
        """After this gateway lost NATS for a while (events published meanwhile never reached it): what
        changed since ``since_ms`` — replayed after the last event sent, or, when this connection was
        sent none yet (its client's position is unknown), a resync."""
        if self._lock is not None:
            async with self._lock:  # a resume in progress sets the position first
                pass
        if self._seen:
            await self.resume(self._seen)
            return
        try:
            state = await self.core.get_state(self.cid)
        except KefuError as exc:
            self._send(Frame("resync", reason="unavailable", error=exc))
            return
        if state.updated_ms >= since_ms:
            self._send(Frame("resync", seq=state.seq, state=state, reason="gateway_reconnected"))


def follow_reconnects(core: Core, concurrency: int = 32) -> None:
    """Have every open feed catch up when the gateway's NATS connection comes back after a drop."""
    down_since: list[int] = []
    running: set[asyncio.Task[None]] = set()

    def disconnected() -> None:
        if not down_since:
            # A second of margin: an event stamped by another machine's clock just before the drop.
            down_since.append(int(time.time() * 1000) - 1000)

    def reconnected() -> None:
        if not down_since:
            return
        since = down_since.pop()
        feeds = [f for f in core.router.listeners() if isinstance(f, Feed)]
        if feeds:
            task = asyncio.create_task(_catch_up(feeds, since, concurrency))
            running.add(task)
            task.add_done_callback(running.discard)

    core.bus.on_connection_change(disconnected, reconnected)


async def _catch_up(feeds: list[Feed], since_ms: int, concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)  # one state read per conversation; dialogue is not flooded

    async def one(feed: Feed) -> None:
        async with slots:
            try:
                await feed.catch_up(since_ms)
            except Exception:
                log.exception("catch-up failed", conversation_id=feed.cid)

    await asyncio.gather(*(one(f) for f in feeds))
