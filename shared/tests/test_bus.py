import asyncio

import pytest
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig

from kefu.proto.bus.v1 import common_pb2, turn_pb2
from kefu.shared import errors
from kefu.shared.bus import Bus, ensure_kv, ensure_object_store, ensure_stream, subject_token

pytestmark = pytest.mark.integration


async def test_request_reply_with_protobuf(bus: Bus, unique):
    subject = unique("test.echo.")

    async def echo(req: turn_pb2.StartConversationRequest, _msg):
        return turn_pb2.StartConversationReply(conversation_id=req.visitor_id, tenant=req.tenant)

    await bus.serve(subject, turn_pb2.StartConversationRequest, echo)
    reply = await bus.request(subject, turn_pb2.StartConversationRequest(tenant="t", visitor_id="v"),
                              turn_pb2.StartConversationReply)
    assert (reply.conversation_id, reply.tenant) == ("v", "t")


async def test_errors_cross_the_bus_typed(bus: Bus, unique):
    subject = unique("test.err.")

    async def fail(req, _msg):
        if req.tenant == "boom":
            raise RuntimeError("a bug")
        raise errors.NotFound("no such thing", code="unknown_conversation")

    await bus.serve(subject, turn_pb2.StartConversationRequest, fail)
    with pytest.raises(errors.NotFound) as exc:
        await bus.request(subject, turn_pb2.StartConversationRequest(), turn_pb2.StartConversationReply)
    assert exc.value.code == "unknown_conversation" and exc.value.message == "no such thing"
    # An unexpected exception is answered as internal, never left hanging.
    with pytest.raises(errors.Internal):
        await bus.request(subject, turn_pb2.StartConversationRequest(tenant="boom"), turn_pb2.StartConversationReply,
                          timeout=5)


async def test_malformed_protobuf_is_a_typed_bad_request(bus: Bus, unique):
    subject = unique("test.pb.")
    await bus.serve(subject, common_pb2.HealthRequest, lambda req, msg: asyncio.sleep(0, common_pb2.HealthReply()))
    reply = await bus.nc.request(subject, b"\xff\xff\xff", timeout=5)
    err = errors.from_headers(reply.headers)
    assert isinstance(err, errors.BadRequest) and err.code == "invalid_protobuf"


async def test_nobody_serving_is_unavailable_and_slow_is_deadline(bus: Bus, unique):
    with pytest.raises(errors.Unavailable):
        await bus.request(unique("test.none."), common_pb2.HealthRequest(), common_pb2.HealthReply, timeout=2)
    subject = unique("test.slow.")

    async def slow(req, msg):
        await asyncio.sleep(2)
        return common_pb2.HealthReply()

    await bus.serve(subject, common_pb2.HealthRequest, slow)
    with pytest.raises(errors.DeadlineExceeded):
        await bus.request(subject, common_pb2.HealthRequest(), common_pb2.HealthReply, timeout=0.3)


async def test_handlers_run_concurrently(bus: Bus, unique):
    subject = unique("test.conc.")

    async def slow(req, msg):
        await asyncio.sleep(0.5)
        return common_pb2.HealthReply(status="ok")

    await bus.serve(subject, common_pb2.HealthRequest, slow)
    t0 = asyncio.get_running_loop().time()
    replies = await asyncio.gather(*(bus.request(subject, common_pb2.HealthRequest(), common_pb2.HealthReply)
                                     for _ in range(20)))
    assert all(r.status == "ok" for r in replies)
    assert asyncio.get_running_loop().time() - t0 < 3  # 20 x 0.5 s one after another would take 10 s


async def test_jetstream_setup_is_idempotent_and_updates(bus: Bus, unique):
    name = unique("S")
    config = StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.MEMORY, max_msgs_per_subject=1)
    await ensure_stream(bus.js, config)
    await ensure_stream(bus.js, config)
    config.max_msgs_per_subject = 5
    await ensure_stream(bus.js, config)
    assert (await bus.js.stream_info(name)).config.max_msgs_per_subject == 5
    kv = await ensure_kv(bus.js, KeyValueConfig(bucket=unique("kv"), storage=StorageType.MEMORY))
    await kv.put("k", b"v")
    again = await ensure_kv(bus.js, KeyValueConfig(bucket=kv._name, storage=StorageType.MEMORY))
    assert (await again.get("k")).value == b"v"
    store = await ensure_object_store(bus.js, ObjectStoreConfig(bucket=unique("obj"), storage=StorageType.MEMORY))
    await store.put("a.png", b"\x89PNG")
    assert (await (await ensure_object_store(bus.js, ObjectStoreConfig(bucket=store._name))).get("a.png")).data == b"\x89PNG"


async def test_inbox_receives_a_stream_of_messages(bus: Bus):
    async with bus.inbox() as (subject, sub):
        for i in range(3):
            await bus.publish(subject, common_pb2.HealthReply(status=str(i)))
        got = [common_pb2.HealthReply.FromString((await sub.next_msg(timeout=2)).data).status for _ in range(3)]
    assert got == ["0", "1", "2"]


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", "x>", "a" * 129, "tab\there", "%FF", "a/b", "\ufffd"])
def test_subject_tokens_reject_what_would_change_the_subject(bad):
    with pytest.raises(errors.BadRequest):
        subject_token(bad)
    assert subject_token("tenant-1_中文") == "tenant-1_中文"


async def test_fail_fast_refuses_at_once_while_nats_is_away_and_recovers(tmp_path):
    """The gateway's mode: with the broker gone a request is refused (typed, retryable) at once instead of
    waiting in the reconnect buffer for its deadline; the connection hooks say when it went and came back."""
    from kefu.shared.natsserver import NatsServer, free_port

    server = NatsServer(tmp_path / "js", port=free_port()).start()
    bus = await Bus.connect([server.url], "fail-fast")
    try:
        bus.fail_fast = True
        changes: list[str] = []
        bus.on_connection_change(lambda: changes.append("down"), lambda: changes.append("up"))

        async def echo(req, msg):
            return common_pb2.HealthReply(status="ok")

        await bus.serve("test.ff.echo", common_pb2.HealthRequest, echo)
        assert (await bus.request("test.ff.echo", common_pb2.HealthRequest(), common_pb2.HealthReply)).status == "ok"
        server.stop()
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.05)
        assert changes == ["down"]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(errors.Unavailable) as exc:
            await bus.request("test.ff.echo", common_pb2.HealthRequest(), common_pb2.HealthReply, timeout=10)
        assert exc.value.code == "service_unavailable" and loop.time() - t0 < 0.5
        server.start()
        for _ in range(200):
            if changes[-1] == "up":
                break
            await asyncio.sleep(0.05)
        assert changes == ["down", "up"]
        assert (await bus.request("test.ff.echo", common_pb2.HealthRequest(), common_pb2.HealthReply)).status == "ok"
    finally:
        await bus.close()
        server.stop()
