"""Thousands of malformed inputs — HTTP bodies, visitor and agent WebSocket frames, gRPC messages — each
answered with a typed error (never a 500, never a hang, never a crash); afterwards the gateway still
serves normal requests. Inputs come from a seeded generator, so a failure reproduces exactly."""

import asyncio
import contextlib
import json
import random

import aiohttp
import grpc
import pytest
from aiohttp import WSMsgType

from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.proto.v1 import conversations_pb2, conversations_pb2_grpc
from kefu.shared.service import start_in_background

pytestmark = [pytest.mark.integration, pytest.mark.model]

SEED = 20261202
JSON_LIMIT = 64 * 1024
TYPED_HTTP = {400: {"invalid_json", "invalid_utf8", "invalid_field", "missing_field", "bad_request"},
              403: {"forbidden"}, 404: {"not_found", "unknown_conversation", "unknown_agent"},
              405: {"method_not_allowed"},
              413: {"payload_too_large"}}
TYPED_GRPC = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.NOT_FOUND}
WRONG_VALUES = (5, -1, 1.5, True, False, [], {}, [1, "a"], {"a": 1}, "", 10**30)


def malformed_json(rng: random.Random) -> list[bytes]:
    """Bodies (and text frames) none of which is a valid request to any route."""
    out: list[bytes] = []
    for depth in (100, 1000, 5000, 100_000):
        out += [b"[" * depth, b"[" * depth + b"]" * depth, b'{"text":' * depth + b"1" + b"}" * depth,
                b'{"text": ' + b"[" * depth + b"]" * depth + b"}"]
    out += [b'{"text": 1' + b"0" * 5000 + b"}", b'{"text": 1e999999}', b'{"text": -1e400}', b'{"text": NaN}',
            b"1" + b"0" * 10000, b'{"text": "\\ud800"}', b'{"text": "\\udfff\\ud800"}', b'{"text": "a\x00b"}',
            b'{"text": "\xff\xfe"}', b"\xef\xbb\xbf{}", b"", b" ", b"null", b"true", b"[]", b'"text"', b"{", b"}",
            b'{"text" "x"}', b"{'text': 'x'}", b'{"text": "x",}', b'{"type": "message", "text": "x"']
    for value in WRONG_VALUES:
        for key in ("text", "type", "conversation_id", "visitor_id", "password", "agent_id", "tenant"):
            out.append(json.dumps({key: value, "text": value, "type": "message"}).encode())
    for value in (0, "x", [], None, {}):
        out.append(json.dumps(value).encode())
    valid = json.dumps({"text": "你好，我的订单呢", "client_msg_id": "c1", "type": "message"}, ensure_ascii=False)
    for cut in range(1, len(valid.encode()) - 1, 3):  # truncated: every prefix is invalid
        out.append(valid.encode()[:cut])
    for _ in range(120):
        blob = rng.randbytes(rng.randint(1, 400))
        out.append(blob if rng.random() < 0.5 else b"{" + blob)
    for _ in range(40):  # valid UTF-8 text that is not JSON
        out.append("".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 80))).encode("utf-8", "replace"))
    for size in (JSON_LIMIT + 1, 2 * JSON_LIMIT, 1024 * 1024):  # too large (and invalid even if it were not)
        out.append(b'{"text": 5, "pad": "' + b"x" * size + b'"}')
    return out


def valid_start(body: bytes) -> bool:
    if not body:
        return True
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("visitor_id", ""), str)


@contextlib.asynccontextmanager
async def fuzz_gateway(stack):
    """A gateway replica whose rate limits do not stand between the inputs and their validation."""
    high = {f"rate_{k}_{x}": 1e6 for k in ("messages", "ip_messages", "tenant_messages", "starts", "tenant_starts",
                                           "uploads", "ip_uploads", "tenant_uploads", "logins", "account_logins")
            for x in ("per_second", "burst")}
    svc = GatewayService(GatewaySettings(nats_url=stack.nats_url, data_dir=stack.data_dir, http_port=0, grpc_port=0,
                                         log_level="error", **high))
    stop = asyncio.Event()
    task = await start_in_background(svc, stop)
    try:
        yield svc
    finally:
        stop.set()
        await task


async def gather_in_batches(coros, size=32):
    results = []
    for i in range(0, len(coros), size):
        results += await asyncio.gather(*coros[i:i + size])
    return results


async def test_malformed_inputs_get_typed_errors_and_the_gateway_survives(stack, unique):
    rng = random.Random(SEED)
    bodies = malformed_json(rng)
    tenant = unique("fz")
    async with fuzz_gateway(stack) as gw, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        base = f"http://127.0.0.1:{gw.http_port}"
        admin = {"Authorization": f"Bearer {stack.admin}"}
        async with s.post(f"{base}/v1/tenants/{tenant}/conversations", json={}) as r:
            conv = await r.json()
        cid, visitor = conv["conversation_id"], {"Authorization": f"Bearer {conv['visitor_token']}"}
        sent = 0

        # HTTP bodies, on every route that reads one.
        routes = [("POST", f"/v1/conversations/{cid}/messages", visitor),
                  ("POST", f"/v1/conversations/{cid}/messages", {**visitor, "Accept": "text/event-stream"}),
                  ("POST", f"/v1/tenants/{tenant}/conversations", {}),
                  ("PUT", f"/v1/tenants/{tenant}/documents/fz", admin),
                  ("PUT", f"/v1/tenants/{tenant}/agents/fz", admin),
                  ("POST", "/v1/agent/login", {}),
                  ("POST", "/v1/agents", admin)]

        async def http(method, path, headers, body, content_type="application/json", may_succeed=False):
            async with s.request(method, base + path, data=body,
                                 headers={"Content-Type": content_type, **headers}) as r:
                text = await r.read()
            try:
                err = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": f"untyped: {text[:80]!r}"}
            if may_succeed and r.status in (200, 201):
                return 400, "bad_request", body  # a well-formed request after all (a tenant named "中文")
            return r.status, err.get("code"), body

        calls = [http(m, p, h, b) for m, p, h in routes for b in bodies]
        segments = ["é", "%FF", "%C3%28", "a.b", "x" * 300, "%00", "..", "*", ">", "%20", "a%2Fb", "中文", "\ufeff"]
        queries = ["at_seq=x", "at_seq=-1", "at_seq=99999999999999999999", "at_seq=", "k=abc&q=x", "k=0&q=x",
                   "k=1000&q=x", "q=" + "x" * 8000, "at_seq=1e5", "at_seq=%FF"]
        for seg in segments:
            calls += [http("GET", f"/v1/conversations/{seg}", visitor, b""),
                      http("POST", f"/v1/conversations/{seg}/messages", visitor, b'{"text": "hi"}'),
                      http("GET", f"/v1/conversations/{seg}/state?at_seq=1", admin, b""),
                      http("GET", f"/v1/tenants/{seg}/agents", admin, b"", may_succeed=True),
                      http("DELETE", f"/v1/tenants/{tenant}/agents/{seg}", admin, b""),
                      http("POST", f"/v1/tenants/{seg}/conversations", {}, b"{}", may_succeed=True)]
        for query in queries:
            calls += [http("GET", f"/v1/conversations/{cid}/state?{query}", admin, b""),
                      http("GET", f"/v1/tenants/{tenant}/search?{query}", admin, b"", may_succeed=True)]
        # A request line past 8190 bytes is refused by aiohttp's HTTP parser itself, before any handler:
        # a plain-text 400, the one answer here that is not the JSON error.
        async with s.get(f"{base}/v1/tenants/{tenant}/search?q={'x' * 9000}", headers=admin) as r:
            assert r.status == 400
        calls += [http("POST", f"/v1/conversations/{cid}/images", visitor, b,
                       content_type=rng.choice(["multipart/form-data; boundary=x", "multipart/form-data", "image/png",
                                                "application/json"])) for b in bodies[::2]]
        for status, code, body in await gather_in_batches(calls):
            if status == 201:  # a conversation start reads only visitor_id: any other object is a valid start
                assert valid_start(body), body
                continue
            assert code in TYPED_HTTP.get(status, ()), (status, code, body)
        sent += len(calls)

        # WebSocket frames: the visitor socket and the agent console, one error frame per bad frame.
        frames = [b for b in bodies if len(b) <= JSON_LIMIT]
        for path, token in (("/v1/ws", conv["visitor_token"]), ("/v1/agent/ws", stack.admin)):
            async with s.ws_connect(f"{base}{path}?token={token}", max_msg_size=0) as ws:
                if path == "/v1/agent/ws":
                    assert (await ws.receive_json(timeout=10))["type"] == "queue"
                for frame in frames:
                    try:
                        text = frame.decode("utf-8")
                    except UnicodeDecodeError:
                        await ws.send_bytes(frame)  # not UTF-8: a binary frame (a text frame is below)
                    else:
                        await ws.send_str(text)
                    answer = await ws.receive_json(timeout=10)
                    assert answer["type"] == "error" and answer["code"] in TYPED_HTTP[400], (frame[:60], answer)
                for _ in range(50):
                    await ws.send_bytes(rng.randbytes(rng.randint(1, 200)))
                    assert (await ws.receive_json(timeout=10))["code"] == "bad_request"
                sent += len(frames) + 50
            # A frame over the limit closes the socket with 1009 (message too big), as the protocol says;
            # a text frame that is not UTF-8 with 1007; the next connection works as before.
            for payload, opcode, close_code in ((b'{"pad": "' + b"x" * (JSON_LIMIT + 1) + b'"}', WSMsgType.TEXT, 1009),
                                                (b'{"text": "\xff\xfe"}', WSMsgType.TEXT, 1007),
                                                (rng.randbytes(JSON_LIMIT + 10), WSMsgType.BINARY, 1009)):
                async with s.ws_connect(f"{base}{path}?token={token}") as ws:
                    await ws._writer.send_frame(payload, opcode)  # raw: the client would refuse invalid UTF-8
                    while (await ws.receive(timeout=10)).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
                        pass
                    assert ws.close_code == close_code, (path, opcode, ws.close_code)
                sent += 1

        # gRPC: bytes that are not the request message, through raw method calls.
        garbage = [rng.randbytes(rng.randint(1, 300)) for _ in range(150)]
        garbage += [bytes([0x0A, 0x50]) + b"ab",  # a length past the end
                    bytes([0x0A, 0x02, 0xFF, 0xFE]),  # a string field that is not UTF-8
                    bytes([0x08, 0x96, 0x01]),  # field 1 (a string) as a varint
                    bytes([0x11]) + b"\x00" * 8,  # field 2 as fixed64
                    bytes([0x0A, 0x05]) + b"x" * 5 + bytes([0xFF] * 11),  # a bad varint after a good field
                    b"\x0b" * 50,  # start-group tags without ends
                    b""]
        # Well-formed messages whose values are wrong: identifiers no subject may hold, texts out of bounds.
        bad_ids = ["", " ", "a.b", "a*", ">", "a b", "\x00", "é" * 200, "x" * 129, "\ufffd", "../etc", cid + "."]
        bad_texts = ["", "   ", "\n\t", "x" * 4001, "字" * 5000]
        wellformed = [("Conversations/Get", conversations_pb2.GetRequest(conversation_id=i)) for i in bad_ids]
        wellformed += [("Conversations/Start", conversations_pb2.StartRequest(tenant=i, visitor_id="v")) for i in bad_ids]
        wellformed += [("Conversations/StateAt", conversations_pb2.StateAtRequest(conversation_id=cid, at_seq=n))
                       for n in (0, 2**63, 2**64 - 1)]
        wellformed += [(f"Conversations/{m}", conversations_pb2.SendMessageRequest(conversation_id=c, text=t))
                       for m in ("SendMessage", "Converse") for c in (cid, *bad_ids[:4]) for t in bad_texts]
        meta = (("authorization", f"Bearer {conv['visitor_token']}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as ch:
            async def unary(method, data):
                try:
                    await ch.unary_unary(method)(data, metadata=meta, timeout=10)
                    return grpc.StatusCode.OK, "", method, data
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), dict(exc.trailing_metadata() or ()).get("kefu-error-code"), method, data

            async def streamed(method, data):
                try:
                    if method.endswith("Converse"):
                        async def requests():
                            yield data

                        call = ch.stream_stream(method)(requests(), metadata=meta, timeout=10)
                    else:
                        call = ch.unary_stream(method)(data, metadata=meta, timeout=10)
                    async for _ in call:
                        pass
                    return grpc.StatusCode.OK, "", method, data
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), dict(exc.trailing_metadata() or ()).get("kefu-error-code"), method, data

            calls = [unary(f"/kefu.v1.{m}", g) for m in ("Conversations/Get", "Conversations/StateAt",
                                                         "Conversations/Start", "Knowledge/Upsert",
                                                         "Knowledge/Delete", "Knowledge/Search") for g in garbage]
            calls += [streamed(f"/kefu.v1.Conversations/{m}", g) for m in ("SendMessage", "Converse") for g in garbage]
            for method, msg in wellformed:
                if method.endswith("Converse"):  # its stream carries ConverseRequest, the same fields
                    msg = conversations_pb2.ConverseRequest(conversation_id=msg.conversation_id, text=msg.text)
                run = streamed if method.endswith(("SendMessage", "Converse")) else unary
                calls.append(run(f"/kefu.v1.{method}", msg.SerializeToString()))
            for code, kefu_code, method, data in await gather_in_batches(calls):
                if code == grpc.StatusCode.OK:  # bytes that happen to be a valid Start: a conversation
                    assert method.endswith("Start"), (method, data)
                    continue
                assert code in TYPED_GRPC and kefu_code, (method, data, code, kefu_code)
            sent += len(calls)

            # Still serving, on every surface.
            got = await conversations_pb2_grpc.ConversationsStub(ch).Get(
                conversations_pb2.GetRequest(conversation_id=cid), metadata=meta, timeout=10)
            assert got.conversation_id == cid and not got.turns
        async with s.get(f"{base}/v1/conversations/{cid}", headers=visitor) as r:
            assert r.status == 200 and (await r.json())["turns"] == []  # none of it became a turn
        async with s.post(f"{base}/v1/conversations/{cid}/messages", json={"text": "转人工"}, headers=visitor) as r:
            assert r.status == 200 and (await r.json())["reply"]["source"] == "handoff"
        print("fuzz inputs", sent)
        assert sent >= 2000, sent
