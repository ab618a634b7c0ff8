import time
import uuid

import nats.errors
import pytest

from kefu.proto.bus.v1 import llm_pb2
from kefu.shared.streams import LLM_CANCEL, LLM_GENERATE

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def run_job(bus, inbox, sub, *, max_tokens=24, deadline_s=60.0, content="Say hello to the customer."):
    job = llm_pb2.GenerateRequest(
        job_id=uuid.uuid4().hex, max_tokens=max_tokens, reply_inbox=inbox, temperature=0, seed=1,
        deadline_ms=int((time.time() + deadline_s) * 1000),
        messages=[llm_pb2.ChatMessage(role="user", content=content)])
    await bus.js.publish(LLM_GENERATE, job.SerializeToString())
    return job


async def collect(sub, timeout=60, heartbeats=None):
    """The job's chunks (heartbeats, which carry no index, are counted into ``heartbeats`` if given)."""
    chunks = []
    while True:
        chunk = llm_pb2.GenerateChunk.FromString((await sub.next_msg(timeout=timeout)).data)
        if chunk.heartbeat:
            if heartbeats is not None:
                heartbeats.append(chunk)
            continue
        chunks.append(chunk)
        if chunk.done:
            return chunks


async def test_tokens_stream_to_the_inbox_in_order(stack, bus):
    async with bus.inbox() as (inbox, sub):
        job = await run_job(bus, inbox, sub)
        chunks = await collect(sub)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.job_id == job.job_id for c in chunks)
    assert len(chunks) > 3 and "".join(c.text for c in chunks).strip()
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].completion_tokens <= 24
    # The last chunk carries usage and timing.
    assert chunks[-1].prompt_tokens > 0 and 0 < chunks[-1].first_token_ms <= chunks[-1].duration_ms


async def test_same_seed_same_text(stack, bus):
    texts = []
    for _ in range(2):
        async with bus.inbox() as (inbox, sub):
            await run_job(bus, inbox, sub, max_tokens=16)
            texts.append("".join(c.text for c in await collect(sub)))
    assert texts[0] == texts[1]


async def test_cancel_stops_generation_early(stack, bus):
    async with bus.inbox() as (inbox, sub):
        job = await run_job(bus, inbox, sub, max_tokens=400, content="Write a very long story about a lamp.")
        first = llm_pb2.GenerateChunk.FromString((await sub.next_msg(timeout=60)).data)
        assert not first.done
        await bus.nc.publish(LLM_CANCEL, job.job_id.encode())
        chunks = [first, *await collect(sub)]
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 400


async def test_expired_and_malformed_jobs_are_dropped_and_service_keeps_working(stack, bus):
    await bus.js.publish(LLM_GENERATE, b"\xff\x00garbage")
    async with bus.inbox() as (inbox, sub):
        await run_job(bus, inbox, sub, deadline_s=-1)
        async with bus.inbox() as (inbox2, sub2):
            await run_job(bus, inbox2, sub2, max_tokens=4)
            assert (await collect(sub2))[-1].done
        with pytest.raises(nats.errors.TimeoutError):  # the expired job produced nothing
            await sub.next_msg(timeout=0.5)


async def test_a_running_job_sends_heartbeats_so_a_dead_replica_is_noticed(stack, bus):
    heartbeats = []
    async with bus.inbox() as (inbox, sub):
        job = await run_job(bus, inbox, sub, max_tokens=200, content="Write a long story about a lamp.")
        chunks = await collect(sub, heartbeats=heartbeats)
    assert heartbeats and all(h.job_id == job.job_id and not h.text and not h.done for h in heartbeats)
    assert [c.index for c in chunks] == list(range(len(chunks)))  # heartbeats take no place in the order


async def test_a_json_schema_constrains_the_output(stack, bus):
    import json

    schema = {"type": "object", "properties": {"product": {"type": "string"}, "quantity": {"type": "integer"}},
              "required": ["product", "quantity"]}
    async with bus.inbox() as (inbox, sub):
        job = llm_pb2.GenerateRequest(
            job_id=uuid.uuid4().hex, max_tokens=64, reply_inbox=inbox, temperature=0, json_schema=json.dumps(schema),
            deadline_ms=int((time.time() + 60) * 1000), messages=[llm_pb2.ChatMessage(
                role="user", content="I want to buy two X100 phones. Give the product and the quantity as JSON.")])
        await bus.js.publish(LLM_GENERATE, job.SerializeToString())
        chunks = await collect(sub)
    out = json.loads("".join(c.text for c in chunks))
    assert isinstance(out["product"], str) and isinstance(out["quantity"], int)


async def test_an_invalid_grammar_is_a_typed_error_and_never_reaches_the_engine(stack, bus):
    # llama.cpp's sampler crashes the process on a grammar it cannot parse: the service checks first.
    for constraint in ({"grammar": "root ::= ( unclosed"}, {"json_schema": '{"type": "nonsense"}'},
                       {"json_schema": "not json"}):
        async with bus.inbox() as (inbox, sub):
            job = llm_pb2.GenerateRequest(job_id=uuid.uuid4().hex, max_tokens=8, reply_inbox=inbox,
                                          deadline_ms=int((time.time() + 60) * 1000), **constraint,
                                          messages=[llm_pb2.ChatMessage(role="user", content="Is it blue?")])
            await bus.js.publish(LLM_GENERATE, job.SerializeToString())
            [last] = await collect(sub)
        assert last.done and last.error_code == "invalid_field", constraint
    async with bus.inbox() as (inbox, sub):  # still serving
        job = llm_pb2.GenerateRequest(job_id=uuid.uuid4().hex, max_tokens=8, reply_inbox=inbox,
                                      grammar='root ::= "yes" | "no"', deadline_ms=int((time.time() + 60) * 1000),
                                      messages=[llm_pb2.ChatMessage(role="user", content="Is the sky blue?")])
        await bus.js.publish(LLM_GENERATE, job.SerializeToString())
        assert "".join(c.text for c in await collect(sub)) in ("yes", "no")
