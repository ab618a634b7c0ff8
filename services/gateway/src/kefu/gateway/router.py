"""The gateway's one subscription on ``kefu.out.*`` (reply deltas, replies, agent messages), routed to
the connections of each conversation.

A subscription per socket costs nats-py a task and a pending queue each, which was most of an idle
visitor socket's memory; one wildcard subscription and a dict cost a few hundred bytes per socket.
The price: every gateway replica receives every conversation's events (small, and 30 ms-coalesced).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kefu.proto.bus.v1 import turn_pb2
from kefu.shared.logging import get_logger
from kefu.shared.streams import out_subject

log = get_logger("kefu.gateway.router")

OUT_PREFIX = out_subject("")

Listener = Callable[[turn_pb2.OutEvent], None]


class OutRouter:
    """The gateway's one subscription on ``kefu.out.*``, routed to listeners by conversation id.

    Listeners are called on the subscription's task, in publication order, and must not block.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}
        self._sub: Subscription | None = None

    async def start(self, nc: NATS) -> None:
        self._sub = await nc.subscribe(OUT_PREFIX + "*", cb=self._on_msg)
        # Interest must be registered at the server before the first listener relies on it.
        await nc.flush()

    async def _on_msg(self, msg: Msg) -> None:
        # Most of what dialogue publishes is for conversations with nobody connected here: look first, decode after.
        listeners = self._listeners.get(msg.subject[len(OUT_PREFIX):])
        if not listeners:
            return
        try:
            ev = turn_pb2.OutEvent.FromString(msg.data)
        except DecodeError:
            return
        for listener in tuple(listeners):
            try:
                listener(ev)
            except Exception:
                log.exception("out event listener failed")

    def listen(self, conversation_id: str, listener: Listener) -> None:
        """Call ``listener`` with every event published for ``conversation_id`` until :meth:`unlisten`."""
        self._listeners.setdefault(conversation_id, []).append(listener)

    def unlisten(self, conversation_id: str, listener: Listener) -> None:
        found = self._listeners.get(conversation_id)
        if found is not None:
            with contextlib.suppress(ValueError):
                found.remove(listener)
            if not found:
                del self._listeners[conversation_id]

    def listeners(self) -> list[Listener]:
        """Every listener now registered, of every conversation."""
        return [fn for found in self._listeners.values() for fn in found]

    def __len__(self) -> int:
        return len(self._listeners)
