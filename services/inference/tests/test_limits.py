"""The LLM queue limit (the broker refuses jobs past it: "busy" at once, never a pile-up) and the
per-tenant token budget shared by the replicas, with the real model on a real nats-server."""

import asyncio
import time
import uuid

import nats.js.errors
import pytest

from kefu.inference.app import InferenceService, InferenceSettings
from kefu.proto.bus.v1 import llm_pb2
from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background
from kefu.shared.streams import LLM_CANCEL, LLM_GENERATE

pytestmark = [pytest.mark.integration, pytest.mark.model]


def job(inbox: str, tenant: str = "", max_tokens: int = 16, content: str = "Say hello.") -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(job_id=uuid.uuid4().hex, max_tokens=max_tokens, reply_inbox=inbox, temperature=0,
                                   tenant=tenant, deadline_ms=int((time.time() + 120) * 1000),
                                   messages=[llm_pb2.ChatMessage(role="user", content=content)])


async def last_chunk(sub) -> llm_pb2.GenerateChunk:
    while True:
        chunk = llm_pb2.GenerateChunk.FromString((await sub.next_msg(timeout=60)).data)
        if chunk.done:
            return chunk


@pytest.fixture
async def limited(models_data_dir, tmp_path):
    with NatsServer(tmp_path / "js") as nats:
        stop = asyncio.Event()
        service = InferenceService(InferenceSettings(
            nats_url=nats.url, data_dir=models_data_dir, log_level="warning", ocr_enabled=False,
            llm_queue_limit=2, llm_tenant_tokens_per_minute=20))
        task = await start_in_background(service, stop)
        bus = await Bus.connect([nats.url], "test")
        try:
            yield bus
        finally:
            await bus.close()
            stop.set()
            await task


async def test_a_full_queue_refuses_new_jobs_at_once(limited):
    bus = limited
    async with bus.inbox() as (inbox, sub):
        long = [job(inbox, max_tokens=300, content="Write a long story about a lamp.") for _ in range(2)]
        for j in long:
            await bus.js.publish(LLM_GENERATE, j.SerializeToString())
        t0 = time.perf_counter()
        with pytest.raises(nats.js.errors.APIError, match="maximum messages"):
            await bus.js.publish(LLM_GENERATE, job(inbox).SerializeToString())
        assert time.perf_counter() - t0 < 1  # refused, not queued behind the long jobs
        for j in long:
            await bus.nc.publish(LLM_CANCEL, j.job_id.encode())
    # Once the queue drains, jobs are accepted again.
    for _ in range(100):
        async with bus.inbox() as (inbox, sub):
            try:
                await bus.js.publish(LLM_GENERATE, job(inbox, max_tokens=4).SerializeToString())
            except nats.js.errors.APIError:
                await asyncio.sleep(0.1)
                continue
            assert not (await last_chunk(sub)).error_code
            return
    pytest.fail("the queue never drained")


async def test_a_tenant_past_its_token_budget_is_refused_and_others_are_not(limited):
    bus = limited
    async with bus.inbox() as (inbox, sub):
        await bus.js.publish(LLM_GENERATE, job(inbox, tenant="acme", max_tokens=32).SerializeToString())
        first = await last_chunk(sub)
        assert not first.error_code and first.prompt_tokens + first.completion_tokens > 20
        await bus.js.publish(LLM_GENERATE, job(inbox, tenant="acme").SerializeToString())
        refused = await last_chunk(sub)
        assert refused.error_code == "budget_exhausted" and "acme" in refused.error_message
        await bus.js.publish(LLM_GENERATE, job(inbox, tenant="globex", max_tokens=4).SerializeToString())
        assert not (await last_chunk(sub)).error_code
