"""The CONTRACT HTTP/SSE/WebSocket API against the five real services on a real nats-server."""

import asyncio
import json
import uuid

import aiohttp
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.model]


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, admin: str) -> None:
        self.s, self.base, self.admin = session, base, admin

    async def call(self, method, path, body=None, token=None, raw=None, headers=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body, ensure_ascii=False).encode() if body is not None else None)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.s.request(method, self.base + path, data=data, headers=h) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None), r.headers

    async def put_doc(self, tenant, doc_id, title, text):
        st, js, _ = await self.call("PUT", f"/v1/tenants/{tenant}/documents/{doc_id}", {"title": title, "text": text},
                                    token=self.admin)
        assert st == 200, js
        return js

    async def start(self, tenant):
        st, js, _ = await self.call("POST", f"/v1/tenants/{tenant}/conversations", {"visitor_id": "v"})
        assert st == 201, js
        return js["conversation_id"], js["visitor_token"]

    async def ask(self, cid, token, text, **extra):
        return await self.call("POST", f"/v1/conversations/{cid}/messages", {"text": text, **extra}, token=token)


@pytest.fixture
async def api(stack):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield Api(s, stack.http, stack.admin)


def is_error(st, js, status, code=None):
    return st == status and isinstance(js, dict) and "code" in js.get("error", {}) and (
        code is None or js["error"]["code"] == code)


async def test_health_and_readiness(api):
    assert (await api.call("GET", "/healthz"))[0] == 200
    for _ in range(20):  # the first probes can race the services' own start-up work on this shared loop
        st, js, _ = await api.call("GET", "/readyz")
        if st == 200:
            break
        await asyncio.sleep(0.5)
    assert st == 200 and set(js["services"]) == {"dialogue", "retrieval", "inference", "plugins"}


async def test_answer_from_an_uploaded_document_with_citation(api, unique):
    tenant = unique("shop")
    put = await api.put_doc(tenant, "lamp-price", "Desk lamp L2",
                            "The L2 desk lamp costs 129 yuan and has three brightness levels.")
    assert put["doc_id"] == "lamp-price" and put["version"] > 0
    await api.put_doc(tenant, "kettle", "电水壶 K5", "K5 电水壶容量 1.7 升，售价 199 元，保修 18 个月。")
    cid, tok = await api.start(tenant)
    st, js, _ = await api.ask(cid, tok, "How much is the L2 desk lamp?")
    assert st == 200 and js["seq"] == 1
    assert "129" in js["reply"]["text"] and js["reply"]["citations"] == ["lamp-price"]
    assert js["reply"]["source"] in ("kb", "llm")
    st, js, _ = await api.ask(cid, tok, "K5 电水壶保修多久？")
    assert "18" in js["reply"]["text"] and js["reply"]["citations"] == ["kettle"]
    st, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=tok)
    assert st == 200 and state["tenant"] == tenant and state["mode"] == "bot"
    assert [(t["seq"], t["role"]) for t in state["turns"]] == [(1, "visitor"), (2, "bot"), (3, "visitor"), (4, "bot")]
    assert state["turns"][1]["source"] in ("kb", "llm") and state["seq"] == 4


async def test_never_invents_an_answer_when_the_kb_is_silent(api, unique):
    tenant = unique("empty")
    await api.put_doc(tenant, "lamp", "Desk lamp L2", "The L2 desk lamp costs 129 yuan.")
    cid, tok = await api.start(tenant)
    st, js, _ = await api.ask(cid, tok, "Do you sell bicycles?")
    assert st == 200 and js["reply"]["citations"] == [] and not any(ch.isdigit() for ch in js["reply"]["text"])


async def test_sse_streams_deltas_then_done(api, unique):
    tenant = unique("sse")
    await api.put_doc(tenant, "kettle", "电水壶 K5", "K5 电水壶容量 1.7 升，售价 199 元，保修 18 个月。")
    cid, tok = await api.start(tenant)
    events = []
    async with api.s.post(f"{api.base}/v1/conversations/{cid}/messages", json={"text": "K5 电水壶保修多久？"},
                          headers={"Authorization": f"Bearer {tok}", "Accept": "text/event-stream"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        event = None
        async for line in r.content:
            line = line.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and kinds[0] == "delta"
    done = events[-1][1]
    assert "".join(d["text"] for e, d in events if e == "delta") == done["reply"]["text"]
    assert "18" in done["reply"]["text"] and done["reply"]["citations"] == ["kettle"]


async def test_client_msg_id_makes_a_message_idempotent(api, unique):
    tenant = unique("idem")
    await api.put_doc(tenant, "lamp", "Desk lamp L2", "The L2 desk lamp costs 129 yuan.")
    cid, tok = await api.start(tenant)
    mid = str(uuid.uuid4())
    first = await api.ask(cid, tok, "How much is the L2 desk lamp?", client_msg_id=mid)
    again = await api.ask(cid, tok, "How much is the L2 desk lamp?", client_msg_id=mid)
    assert first[0] == again[0] == 200 and first[1] == again[1]
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=tok)
    assert [t["role"] for t in state["turns"]] == ["visitor", "bot"]


async def test_concurrent_retries_of_one_message_make_one_turn(api, unique):
    tenant = unique("race")
    await api.put_doc(tenant, "lamp", "Desk lamp L2", "The L2 desk lamp costs 129 yuan.")
    cid, tok = await api.start(tenant)
    mid = str(uuid.uuid4())
    results = await asyncio.gather(*(api.ask(cid, tok, "How much is the L2 desk lamp?", client_msg_id=mid)
                                     for _ in range(3)))
    assert all(st == 200 for st, _, _ in results)
    assert len({json.dumps(js, sort_keys=True) for _, js, _ in results}) == 1
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=tok)
    assert [t["role"] for t in state["turns"]] == ["visitor", "bot"]


async def test_time_travel_is_admin_only(api, unique):
    cid, tok = await api.start(unique("tt"))
    await api.ask(cid, tok, "first message")
    await api.ask(cid, tok, "second message")
    st, past, _ = await api.call("GET", f"/v1/conversations/{cid}/state?at_seq=1", token=api.admin)
    assert st == 200 and [t["text"] for t in past["turns"]] == ["first message"] and past["seq"] == 1
    st, js, _ = await api.call("GET", f"/v1/conversations/{cid}/state?at_seq=1", token=tok)
    assert is_error(st, js, 403)
    for bad in ("?at_seq=x", "?at_seq=-1", "", "?at_seq=999"):
        st, js, _ = await api.call("GET", f"/v1/conversations/{cid}/state{bad}", token=api.admin)
        assert is_error(st, js, 400), bad


async def test_handoff_switches_to_human_mode(api, unique):
    cid, tok = await api.start(unique("ho"))
    st, js, _ = await api.ask(cid, tok, "转人工")
    assert st == 200 and js["reply"]["source"] == "handoff"
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=tok)
    assert state["mode"] == "human"
    st, js, _ = await api.ask(cid, tok, "还在吗？")
    assert js["reply"]["source"] == "handoff"  # the bot no longer answers from the KB


async def test_two_unanswerable_questions_in_a_row_go_to_a_person(api, unique):
    tenant = unique("fail")
    await api.put_doc(tenant, "lamp", "Desk lamp L2", "The L2 desk lamp costs 129 yuan.")
    cid, tok = await api.start(tenant)
    st, first, _ = await api.ask(cid, tok, "Do you sell bicycles?")
    assert first["reply"]["source"] == "kb" and first["reply"]["citations"] == []
    st, second, _ = await api.ask(cid, tok, "What about skateboards?")
    assert second["reply"]["source"] == "handoff"
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=api.admin)
    assert state["mode"] == "human"
    assert state["handoff_summary"].startswith("reason: repeated_failure") and "bicycles" in state["handoff_summary"]
    assert state["turns"][1]["provenance"]["decision"] == "no_answer"  # admins see what produced each reply
    _, visitor_view, _ = await api.call("GET", f"/v1/conversations/{cid}", token=tok)
    assert "handoff_summary" not in visitor_view and "provenance" not in visitor_view["turns"][1]


async def test_an_upset_visitor_goes_to_a_person(api, unique):
    cid, tok = await api.start(unique("upset"))
    st, js, _ = await api.ask(cid, tok, "你们这服务太差了，我要投诉！")
    assert js["reply"]["source"] == "handoff"
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=api.admin)
    assert state["mode"] == "human" and state["handoff_summary"].startswith("reason: upset")


async def test_memory_answers_a_follow_up_about_the_product_named_before(api, unique):
    tenant = unique("mem")
    await api.put_doc(tenant, "x100", "X100 Smartphone", "The X100 costs 3,299 yuan. Warranty: 1 year.")
    await api.put_doc(tenant, "x200", "X200 Smartphone", "The X200 costs 4,999 yuan. Warranty: 2 years.")
    cid, tok = await api.start(tenant)
    await api.ask(cid, tok, "I bought an X200 last month")
    st, js, _ = await api.ask(cid, tok, "How long is its warranty?")
    assert "2 years" in js["reply"]["text"] and js["reply"]["citations"] == ["x200"]
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=api.admin)
    assert state["slots"]["product"] == "X200" and "date" in state["slots"]
    assert state["turns"][3]["provenance"]["query"].startswith("X200 ")


async def test_a_visitor_goes_back_to_an_older_product_after_the_topic_moved_on(api, unique):
    tenant = unique("recall")
    await api.put_doc(tenant, "x100", "X100 手机", "X100 手机售价 3299 元，整机保修 1 年。")
    await api.put_doc(tenant, "k5", "K5 电水壶", "K5 电水壶售价 129 元，整机保修 18 个月。")
    await api.put_doc(tenant, "refund", "退款时效", "退款审核通过后 1-3 个工作日原路退回。")
    cid, tok = await api.start(tenant)
    for question in ("我想买个手机，X100 多少钱？", "K5 电水壶多少钱？", "退款多久到账？", "K5 保修多久？", "退款多久到账？"):
        await api.ask(cid, tok, question)
    # The product slot is K5 now; the memory vectors still know the phone.
    st, js, _ = await api.ask(cid, tok, "之前那个手机保修多久？")
    assert st == 200 and "1 年" in js["reply"]["text"] and js["reply"]["citations"] == ["x100"], js
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=tok)
    assert state["slots"]["product"] == "X100" and state["summary"].startswith("Earlier: ")


async def test_a_busy_model_does_not_delay_a_grounded_answer(api, unique, bus):
    """The LLM queue is full: the broker refuses the job at once and the cited sentence answers."""
    import time

    import nats.js.errors

    from kefu.proto.bus.v1 import llm_pb2
    from kefu.shared.streams import LLM_CANCEL, LLM_GENERATE, llm_stream

    tenant = unique("busy")
    await api.put_doc(tenant, "l2", "L2 Lamp", "The L2 desk lamp costs 129 yuan.")
    cid, tok = await api.start(tenant)
    filler = llm_pb2.GenerateRequest(job_id=unique("filler"), max_tokens=400, reply_inbox=unique("nobody"),
                                     deadline_ms=int((time.time() + 60) * 1000),
                                     messages=[llm_pb2.ChatMessage(role="user", content="Write a long story.")])
    await bus.js.update_stream(llm_stream(max_jobs=1))
    try:
        for _ in range(300):  # our long job takes the one place (once any earlier job is done)
            try:
                await bus.js.publish(LLM_GENERATE, filler.SerializeToString())
                break
            except nats.js.errors.APIError:
                await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        st, js, _ = await api.ask(cid, tok, "How much is the L2 lamp?")
        assert st == 200 and "129 yuan" in js["reply"]["text"] and js["reply"]["source"] == "kb"
        assert time.perf_counter() - t0 < 5  # not queued behind the 400-token job
    finally:
        await bus.nc.publish(LLM_CANCEL, filler.job_id.encode())
        await bus.js.update_stream(llm_stream())
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=api.admin)
    assert state["turns"][-1]["provenance"]["generation_error"] == "busy"


async def test_a_visitor_who_leaves_stops_the_models_work_and_still_gets_the_reply_recorded(api, unique, bus):
    import time

    from kefu.proto.bus.v1 import llm_pb2
    from kefu.shared.streams import LLM_CANCEL, LLM_GENERATE

    tenant = unique("gone")
    await api.put_doc(tenant, "l2", "L2 Lamp", "The L2 desk lamp costs 129 yuan.")
    cid, tok = await api.start(tenant)
    # A long job holds the replica, so this turn's generation waits in the queue when the visitor leaves.
    filler = llm_pb2.GenerateRequest(job_id=unique("filler"), max_tokens=400, reply_inbox=unique("nobody"),
                                     deadline_ms=int((time.time() + 60) * 1000),
                                     messages=[llm_pb2.ChatMessage(role="user", content="Write a long story.")])
    await bus.js.publish(LLM_GENERATE, filler.SerializeToString())
    try:
        headers = {"Authorization": f"Bearer {tok}", "Accept": "text/event-stream", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            # The visitor closes the page while the reply is being made (before its first word).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(session.post(f"{api.base}/v1/conversations/{cid}/messages", headers=headers,
                                                    data=json.dumps({"text": "How much is the L2 lamp?"})), 0.5)
            left = time.monotonic()
        for _ in range(60):
            _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=api.admin)
            bot = [t for t in state["turns"] if t["role"] == "bot"]
            if bot:
                break
            await asyncio.sleep(0.1)
        assert bot, "no reply recorded"
        assert time.monotonic() - left < 3  # not the 4 s wait for a free model
        assert bot[0]["provenance"]["generation_error"] == "visitor_left" and "129 yuan" in bot[0]["text"]
    finally:
        await bus.nc.publish(LLM_CANCEL, filler.job_id.encode())


async def test_auth_is_enforced_everywhere(api, unique):
    tenant = unique("auth")
    cid, tok = await api.start(tenant)
    cid2, tok2 = await api.start(tenant)
    doc = f"/v1/tenants/{tenant}/documents/d"
    assert is_error(*(await api.call("PUT", doc, {"text": "x"}))[:2], 401)
    assert is_error(*(await api.call("PUT", doc, {"text": "x"}, token="wrong"))[:2], 403)
    assert is_error(*(await api.call("PUT", doc, {"text": "x"}, token=tok))[:2], 403)
    assert is_error(*(await api.call("GET", f"/v1/tenants/{tenant}/search?q=x", token=tok))[:2], 403)
    assert is_error(*(await api.call("DELETE", doc))[:2], 401)
    assert is_error(*(await api.call("GET", f"/v1/conversations/{cid}", token=tok2))[:2], 403)
    assert is_error(*(await api.ask(cid, tok2, "hi"))[:2], 403)
    assert is_error(*(await api.ask(cid, None, "hi"))[:2], 401)
    assert is_error(*(await api.ask(cid, "v1.forged.token", "hi"))[:2], 401, "invalid_token")
    st, js, _ = await api.call("GET", f"/v1/conversations/{cid}", token=api.admin)
    assert st == 200 and js["conversation_id"] == cid


async def test_bad_input_gets_typed_errors(api, unique):
    cid, tok = await api.start(unique("bad"))
    path = f"/v1/conversations/{cid}/messages"
    assert is_error(*(await api.call("POST", path, raw=b"{not json", token=tok))[:2], 400, "invalid_json")
    assert is_error(*(await api.call("POST", path, raw=b'{"text": "\xff\xfe"}', token=tok))[:2], 400, "invalid_utf8")
    assert is_error(*(await api.call("POST", path, raw=b'{"text": "\\ud800"}', token=tok))[:2], 400, "invalid_utf8")
    assert is_error(*(await api.call("POST", path, raw=b"[1, 2]", token=tok))[:2], 400, "invalid_json")
    assert is_error(*(await api.call("POST", path, {"nope": 1}, token=tok))[:2], 400, "missing_field")
    assert is_error(*(await api.call("POST", path, {"text": 5}, token=tok))[:2], 400, "invalid_field")
    assert is_error(*(await api.call("POST", path, {"text": "   "}, token=tok))[:2], 400)
    assert is_error(*(await api.call("POST", path, {"text": "x" * 2_000_000}, token=tok))[:2], 413)
    assert is_error(*(await api.call("POST", path, {"text": "x" * 5000}, token=tok))[:2], 400)
    st, js, _ = await api.call("POST", "/v1/conversations/does-not-exist/messages", {"text": "hi"}, token=tok)
    assert is_error(st, js, 403)
    st, js, _ = await api.call("GET", f"/v1/conversations/{uuid.uuid4().hex}", token=api.admin)
    assert is_error(st, js, 404, "unknown_conversation")
    assert is_error(*(await api.call("POST", "/v1/tenants/a.b/conversations", {}))[:2], 400)
    assert is_error(*(await api.call("POST", "/v1/tenants/%FF/conversations", {}))[:2], 400)
    assert is_error(*(await api.call("PUT", "/v1/tenants/t/documents/d", raw=b'{"text": "\\udc00"}',
                                     token=api.admin))[:2], 400, "invalid_utf8")
    assert is_error(*(await api.call("GET", "/no/such/route"))[:2], 404)
    assert is_error(*(await api.call("PATCH", "/healthz"))[:2], 405)
    st, js, _ = await api.call("GET", f"/v1/tenants/{unique('t')}/search?q=x&k=0", token=api.admin)
    assert is_error(st, js, 400)
    # None of that disturbed the conversation.
    _, state, _ = await api.call("GET", f"/v1/conversations/{cid}", token=tok)
    assert state["turns"] == []


async def test_search_and_delete_through_the_api(api, unique):
    tenant = unique("kb")
    await api.put_doc(tenant, "a", "Shipping", "Orders ship within 2 days from Shanghai.")
    await api.put_doc(tenant, "b", "Returns", "Returns are accepted within 7 days.")
    st, js, _ = await api.call("GET", f"/v1/tenants/{tenant}/search?q=shipping%20time&k=1", token=api.admin)
    assert st == 200 and [h["doc_id"] for h in js["hits"]] == ["a"]
    assert {"doc_id", "chunk_id", "title", "text", "score"} <= set(js["hits"][0])
    st, js, _ = await api.call("DELETE", f"/v1/tenants/{tenant}/documents/a", token=api.admin)
    assert st == 200
    st, js, _ = await api.call("GET", f"/v1/tenants/{tenant}/search?q=shipping&k=5", token=api.admin)
    assert [h["doc_id"] for h in js["hits"]] == ["b"]


async def test_visitor_websocket(api, unique, stack):
    tenant = unique("ws")
    await api.put_doc(tenant, "lamp", "Desk lamp L2", "The L2 desk lamp costs 129 yuan.")
    cid, tok = await api.start(tenant)
    async with api.s.ws_connect(f"{api.base}/v1/ws?token={tok}") as ws:
        await ws.send_str("not json")
        assert (await ws.receive_json(timeout=10))["code"] == "invalid_json"
        await ws.send_json({"type": "message", "text": "How much is the L2 desk lamp?"})
        frames = []
        while not frames or frames[-1]["type"] != "reply":
            frames.append(await ws.receive_json(timeout=60))
    assert frames[0]["type"] == "delta" and "129" in frames[-1]["reply"]["text"]
    assert frames[-1]["reply"]["citations"] == ["lamp"]
    async with api.s.get(f"{api.base}/v1/ws?token=bad") as r:
        assert r.status == 401
