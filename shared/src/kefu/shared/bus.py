"""NATS helpers: connect with reconnect, protobuf request/reply with a deadline and typed errors,
served handlers that never leave a request hanging, streaming to an inbox, and idempotent JetStream
set-up of streams, KV buckets and object stores.

Subjects (see protos/kefu/bus/v1 for the payloads)::

    kefu.health.<service>            HealthRequest -> HealthReply (every replica)
    kefu.dialogue.{start,turn,get}   queue group "dialogue"
    kefu.retrieval.search            queue group "retrieval"
    kefu.llm.generate                JetStream work queue LLM, chunks to the job's inbox
    kefu.plugins.{list,call}         queue group "plugins"
    kefu.out.<conversation>          reply deltas and agent messages for the gateway
    kefu.conv.<tenant>.<conversation>  stream CONV (events)
    kefu.kb.<tenant>.doc.<doc_id>      stream KB (documents, one message per subject)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, PubAck, StreamConfig
from nats.js.errors import BucketNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from kefu.shared import metrics
from kefu.shared.errors import (
    BadRequest,
    DeadlineExceeded,
    Internal,
    KefuError,
    Unavailable,
    from_headers,
)
from kefu.shared.logging import get_logger

log = get_logger("kefu.bus")

M = TypeVar("M", bound=Message)
Handler = Callable[[Any, Msg], Awaitable[Message]]


# Letters and digits of any script, and a few separators that mean nothing to NATS or to KV keys.
_IDENTIFIER = re.compile(r"[\w\-:@+=]{1,128}")


def subject_token(value: str) -> str:
    """Validate ``value`` for use as one token of a subject (tenant, conversation or document id)."""
    if "\ufffd" in value:
        # What a decoder leaves of invalid UTF-8 (e.g. %FF in a URL): refuse rather than store garbage.
        raise BadRequest("the identifier is not valid UTF-8", code="invalid_utf8")
    if not _IDENTIFIER.fullmatch(value):
        raise BadRequest(f"invalid identifier {value[:40]!r}: use 1-128 letters, digits, '_', '-', ':', '@', '+' or '='",
                         code="invalid_field")
    return value


class JetStream(JetStreamContext):
    """nats-py's JetStream context, plus how many copies the streams and buckets kefu creates keep.

    Args:
        nc: A connected client.
        stream_replicas: Replicas of every stream, KV bucket and object store :func:`ensure_stream`,
            :func:`ensure_kv` and :func:`ensure_object_store` set up (``KEFU_STREAM_REPLICAS``).
    """

    def __init__(self, nc: NATS, stream_replicas: int = 1) -> None:
        super().__init__(nc)
        self.stream_replicas = stream_replicas


class Bus:
    """A NATS connection with kefu's conventions (protobuf payloads, typed errors, deadlines).

    Args:
        nc: A connected client.
        default_timeout: Deadline in seconds for :meth:`request` when none is given.
        stream_replicas: Replicas of the streams and buckets it sets up (:class:`JetStream`).
    """

    def __init__(self, nc: NATS, default_timeout: float = 10.0, flags: dict[str, bool] | None = None,
                 hooks: dict[str, list[Callable[[], None]]] | None = None, *, stream_replicas: int = 1) -> None:
        self.nc = nc
        self._flags = flags if flags is not None else {}
        self._hooks = hooks if hooks is not None else {"disconnected": [], "reconnected": []}
        self.js: JetStream = JetStream(nc, stream_replicas)
        self.default_timeout = default_timeout
        # The service this connection belongs to: the label of the errors its handlers answer.
        self.service = ""
        # True at the edge (the gateway): while NATS is out of reach, requests fail at once with
        # Unavailable instead of waiting in the client's reconnect buffer, so a visitor is told to retry
        # rather than kept waiting for a deadline, and nothing piles up in memory meanwhile.
        self.fail_fast = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(cls, servers: list[str], name: str, *, default_timeout: float = 10.0,
                      connect_timeout: float = 60.0, tls: ssl.SSLContext | None = None,
                      stream_replicas: int = 1) -> Bus:
        """Connect, retrying until ``connect_timeout``; once connected, reconnect forever. With ``tls``
        (:meth:`kefu.shared.config.KefuSettings.nats_tls`) the connection is TLS, with a client
        certificate when the context holds one. ``servers`` may name every node of a cluster: the client
        moves to another when its node goes away."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc))

        flags = {"closing": False}
        hooks: dict[str, list[Callable[[], None]]] = {"disconnected": [], "reconnected": []}

        async def on_disconnect() -> None:
            if not flags["closing"]:
                log.warning("nats disconnected")
                for fn in hooks["disconnected"]:
                    fn()

        async def on_reconnect() -> None:
            log.info("nats reconnected")
            for fn in hooks["reconnected"]:
                fn()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        delay = 0.1
        while True:
            nc = NATS()
            try:
                # Bounded as a whole: a TLS server that turns our certificate away after the handshake
                # drops the connection, and the client would try again forever.
                await asyncio.wait_for(nc.connect(
                    servers=servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                    connect_timeout=2, allow_reconnect=True, drain_timeout=5, tls=tls,
                ), timeout=max(deadline - loop.time(), 2.0))
                return cls(nc, default_timeout, flags, hooks, stream_replicas=stream_replicas)
            except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await nc.close()
                if loop.time() + delay > deadline:
                    raise Unavailable(f"cannot reach NATS at {','.join(servers)}: {exc or 'no connection in time'}"
                                      ) from exc
                log.info("waiting for nats", servers=servers)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def on_connection_change(self, disconnected: Callable[[], None], reconnected: Callable[[], None]) -> None:
        """Call ``disconnected`` when the connection to NATS drops, ``reconnected`` once it is back with
        its subscriptions: core messages published in between were not received (JetStream's were kept)."""
        self._hooks["disconnected"].append(disconnected)
        self._hooks["reconnected"].append(reconnected)

    async def close(self) -> None:
        """Drain subscriptions (in-flight handlers finish) and close."""
        self._flags["closing"] = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    async def request(self, subject: str, msg: Message, reply_type: type[M], *,
                      timeout: float | None = None, headers: dict[str, str] | None = None) -> M:
        """Send ``msg`` and decode the reply as ``reply_type``.

        Raises:
            Unavailable: nobody serves ``subject``, or the bus is not connected (at once with
                :attr:`fail_fast`; otherwise when the reconnect buffer is full).
            DeadlineExceeded: no reply within ``timeout``.
            KefuError: the error the serving side raised.
        """
        if self.fail_fast:
            self.require_connection()
        try:
            reply = await self.nc.request(subject, msg.SerializeToString(), timeout=timeout or self.default_timeout,
                                          headers=headers)
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no service answers {subject}", code="service_unavailable") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise DeadlineExceeded(f"{subject} did not answer in time") from None
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError):
            raise Unavailable("the message bus is not connected", code="service_unavailable") from None
        error = from_headers(reply.headers)
        if error is not None:
            raise error
        return decode(reply_type, reply.data)

    def require_connection(self) -> None:
        """Raise :class:`Unavailable` (``service_unavailable``) unless connected to NATS right now."""
        if not self.nc.is_connected:
            raise Unavailable("the message bus is out of reach; try again", code="service_unavailable")

    async def serve(self, subject: str, request_type: type[M], handler: Callable[[M, Msg], Awaitable[Message]], *,
                    queue: str = "", max_inflight: int = 256) -> Subscription:
        """Answer requests on ``subject`` with ``handler``, each in its own task.

        A :class:`KefuError` becomes an error reply; NATS not answering in time (a JetStream leader being
        elected, the broker away) becomes ``service_unavailable``, which the requester may retry; any
        other exception is logged and answered as ``internal``, so a requester never waits for a reply
        that will not come.
        """
        slots = asyncio.Semaphore(max_inflight)

        async def run(msg: Msg) -> None:
            async with slots:
                try:
                    req = decode(request_type, msg.data)
                    reply = await handler(req, msg)
                    if msg.reply:
                        await msg.respond(reply.SerializeToString())
                except KefuError as exc:
                    await self._respond_error(msg, exc)
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError,
                        nats.errors.ConnectionClosedError) as exc:
                    log.warning("handler found NATS unavailable", subject=subject, error=type(exc).__name__)
                    await self._respond_error(msg, Unavailable("the message bus did not answer in time; try again",
                                                               code="service_unavailable"))
                except Exception:
                    log.exception("handler failed", subject=subject)
                    await self._respond_error(msg, Internal("internal error"))

        async def on_msg(msg: Msg) -> None:
            task = asyncio.create_task(run(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def _respond_error(self, msg: Msg, exc: KefuError) -> None:
        metrics.count_error(self.service or "unknown", exc.code)
        if not msg.reply:
            return
        with contextlib.suppress(Exception):
            await self.nc.publish(msg.reply, b"", headers=exc.to_headers())

    async def publish(self, subject: str, msg: Message, headers: dict[str, str] | None = None) -> None:
        """Publish a protobuf message on core NATS (fire and forget)."""
        await self.nc.publish(subject, msg.SerializeToString(), headers=headers)

    @contextlib.asynccontextmanager
    async def inbox(self) -> AsyncIterator[tuple[str, Subscription]]:
        """A fresh inbox subscription for streamed replies; unsubscribed on exit."""
        subject = self.nc.new_inbox()
        sub = await self.nc.subscribe(subject)
        try:
            yield subject, sub
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def decode(message_type: type[M], data: bytes) -> M:
    """Parse ``data`` as ``message_type``; malformed bytes raise :class:`BadRequest` (invalid_protobuf)."""
    msg = message_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise BadRequest(f"malformed {message_type.DESCRIPTOR.name}: {exc}", code="invalid_protobuf") from None
    return msg


# What nats-server answers when it cannot place the replicas asked for (a single server; fewer nodes).
_REPLICAS_REFUSED = {10074, 10023, 10005}
# How long a publish to a stream waits for one to take it: a cluster elects a new stream leader within
# seconds of losing one (6.5 s measured after kill -9 of the leader, tests/integration/test_cluster.py).
STREAM_PATIENCE = 20.0


def _replicas(js: JetStreamContext) -> int:
    return js.stream_replicas if isinstance(js, JetStream) else 1


def _refused(exc: nats.js.errors.APIError, name: str, replicas: int) -> KefuError:
    """The error for a server that cannot keep ``replicas`` copies: say which setting to change."""
    if exc.err_code in _REPLICAS_REFUSED and replicas > 1:
        return Unavailable(f"KEFU_STREAM_REPLICAS={replicas} but NATS cannot keep {replicas} copies of {name} "
                           f"({exc.description}): it needs a JetStream cluster of at least {replicas} nodes",
                           code="stream_replicas_unavailable")
    return Internal(f"NATS refused the set-up of {name}: {exc.description}")


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it to ``config`` when it exists: safe to call at every start-up.

    The stream gets ``js``'s replicas (:class:`JetStream`, ``KEFU_STREAM_REPLICAS``) unless ``config``
    names its own, so an existing stream is scaled up or down to them (a cluster moves the copies).

    Raises:
        Unavailable: the server cannot keep that many copies (code ``stream_replicas_unavailable``).
    """
    if config.num_replicas is None:
        config = config.evolve(num_replicas=_replicas(js))
    name = config.name or ""
    try:
        try:
            await js.stream_info(name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                return
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # another replica created it in between (name in use)
                    raise
        await js.update_stream(config)
    except nats.js.errors.APIError as exc:
        if isinstance(exc, NotFoundError):
            raise
        raise _refused(exc, f"stream {name}", config.num_replicas or 1) from None


async def _scale(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Give the existing stream behind a KV bucket or object store ``replicas`` copies."""
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) != replicas:
        try:
            await js.update_stream(info.config.evolve(num_replicas=replicas))
        except nats.js.errors.APIError as exc:
            raise _refused(exc, f"stream {stream}", replicas) from None


async def ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The KV bucket ``config.bucket``, created on first use with ``js``'s replicas (an existing one is
    scaled to them, like :func:`ensure_stream`)."""
    replicas = _replicas(js)
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(config.evolve(replicas=replicas))
        except nats.js.errors.APIError as exc:
            if exc.err_code != 10058:
                raise _refused(exc, f"KV bucket {config.bucket}", replicas) from None
            kv = await js.key_value(config.bucket)  # another replica created it in between
    await _scale(js, f"KV_{config.bucket}", replicas)
    return kv


async def ensure_object_store(js: JetStreamContext, config: ObjectStoreConfig) -> ObjectStore:
    """The object store ``config.bucket``, created on first use with ``js``'s replicas (an existing one
    is scaled to them)."""
    replicas = _replicas(js)
    try:
        store = await js.object_store(config.bucket or "")
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_object_store(bucket=config.bucket, config=config.evolve(replicas=replicas))
        except nats.js.errors.APIError as exc:
            if exc.err_code != 10058:
                raise _refused(exc, f"object store {config.bucket}", replicas) from None
            store = await js.object_store(config.bucket or "")
    await _scale(js, f"OBJ_{config.bucket}", replicas)
    return store


async def stream_publish(js: JetStreamContext, subject: str, payload: bytes, *,
                         headers: dict[str, str] | None = None, patience: float = STREAM_PATIENCE) -> PubAck:
    """Publish to a stream and wait for its ack, riding out a leader election.

    A clustered stream whose leader goes away has none for a few seconds: a publish then finds nobody
    (no responders: not stored) or gets no ack in time (maybe stored). It is sent again, with the same
    headers, until ``patience`` runs out; give it a ``Nats-Msg-Id`` so that the stream stores a message
    that was in fact stored the first time only once (the ack then says ``duplicate``).

    Raises:
        Unavailable: no ack within ``patience`` (code ``stream_unavailable``): safe to retry.
        nats.js.errors.APIError: the stream refused the message (wrong expected sequence, too large, ...).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = 0.1
    while True:
        try:
            return await js.publish(subject, payload, headers=headers,
                                    timeout=max(0.5, min(5.0, deadline - loop.time())))
        except (NoStreamResponseError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            if loop.time() + delay >= deadline:
                raise Unavailable(f"the message store did not answer for {patience:g} s (NATS down or electing "
                                  "a leader); retry", code="stream_unavailable") from None
            log.info("stream not answering, publishing again", subject=subject, error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
