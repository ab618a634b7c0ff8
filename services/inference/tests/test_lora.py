"""Per-tenant LoRA adapters: a GGUF adapter (written here with the gguf package, in llama.cpp's adapter
format) changes the answers of its tenant's jobs only, on the real model."""

import asyncio
import time
import uuid

import numpy as np
import pytest

from kefu.inference.app import InferenceService, InferenceSettings
from kefu.proto.bus.v1 import llm_pb2
from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background
from kefu.shared.streams import LLM_GENERATE

pytestmark = [pytest.mark.integration, pytest.mark.model]


def write_adapter(path, rank=4, alpha=8.0, layers=30, width=576):
    """A LoRA adapter on every layer's query projection of SmolLM2-135M (random, so it shows)."""
    import gguf

    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_a", rng.normal(0, 0.5, (rank, width)).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_b", rng.normal(0, 0.5, (width, rank)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


async def answer(bus, tenant):
    async with bus.inbox() as (inbox, sub):
        job = llm_pb2.GenerateRequest(job_id=uuid.uuid4().hex, max_tokens=12, reply_inbox=inbox, temperature=0,
                                      tenant=tenant, deadline_ms=int((time.time() + 60) * 1000),
                                      messages=[llm_pb2.ChatMessage(role="user", content="Say hello to the customer.")])
        await bus.js.publish(LLM_GENERATE, job.SerializeToString())
        chunks = []
        while not chunks or not chunks[-1].done:
            chunk = llm_pb2.GenerateChunk.FromString((await sub.next_msg(timeout=60)).data)
            if not chunk.heartbeat:
                chunks.append(chunk)
    assert not chunks[-1].error_code, chunks[-1]
    return "".join(c.text for c in chunks), chunks[-1].model


async def test_a_tenants_adapter_changes_only_its_own_answers(models_data_dir, tmp_path):
    adapter = write_adapter(tmp_path / "acme-lora.gguf")
    with NatsServer(tmp_path / "js") as nats:
        stop = asyncio.Event()
        service = InferenceService(InferenceSettings(nats_url=nats.url, data_dir=models_data_dir, log_level="warning",
                                                     ocr_enabled=False, llm_lora=f"acme={adapter}"))
        task = await start_in_background(service, stop)
        bus = await Bus.connect([nats.url], "test")
        try:
            base_text, base_model = await answer(bus, "globex")
            acme_text, acme_model = await answer(bus, "acme")
            assert base_model == "SmolLM2-135M-Instruct.Q4_1.gguf" and acme_model == f"{base_model}+acme-lora.gguf"
            assert acme_text != base_text and base_text == (await answer(bus, ""))[0]
        finally:
            await bus.close()
            stop.set()
            await task


def test_the_setting_is_parsed_or_refused_clearly():
    s = InferenceSettings(llm_lora="acme=/m/a.gguf, globex=/m/g.gguf@0.5")
    assert {t: (str(p), scale) for t, (p, scale) in s.lora_adapters().items()} == \
        {"acme": ("/m/a.gguf", 1.0), "globex": ("/m/g.gguf", 0.5)}
    for bad in ("acme", "=x.gguf", "acme=x.gguf@loud"):
        with pytest.raises(ValueError, match="KEFU_LLM_LORA"):
            InferenceSettings(llm_lora=bad).lora_adapters()
