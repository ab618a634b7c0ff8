"""The ``openai`` backend against a real OpenAI-compatible upstream: llama.cpp's own server
(``python -m llama_cpp.server``) serving the bundled model."""

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from kefu.inference.app import InferenceService, InferenceSettings
from kefu.inference.backend import GenerationParams, LlamaCppBackend, OpenAIBackend, UpstreamError
from kefu.proto.bus.v1 import llm_pb2
from kefu.shared.bus import Bus
from kefu.shared.models import DEFAULT_LLM, resolve
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background
from kefu.shared.streams import LLM_GENERATE

pytestmark = [pytest.mark.integration, pytest.mark.model]

MESSAGES = [{"role": "system", "content": "You are a customer service assistant."},
            {"role": "user", "content": "Say hello to the customer in one sentence."}]

SERVER = ("import runpy; from kefu.inference.backend import avoid_amx_buffers; avoid_amx_buffers(); "
          "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.fixture(scope="module")
def gguf(models_data_dir: Path) -> Path:
    return resolve(DEFAULT_LLM, models_data_dir)

@pytest.fixture(scope="module")
def upstream(gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "server.log"
    with open(log, "wb") as out:
        # llama.cpp's server as its own module would run it, with the same engine settings as the
        # in-process backend (no AMX weight buffers where the CPU has AMX: they crash llama.cpp there).
        proc = subprocess.Popen([sys.executable, "-c", SERVER, "--model", str(gguf), "--model_alias",
                                 "smollm2", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                                 "--n_threads", "2"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)

def run(backend, messages=MESSAGES, max_tokens=24, cancelled=lambda: False):
    return list(backend.generate(messages, GenerationParams(max_tokens=max_tokens, temperature=0, seed=1), cancelled))

def test_the_upstream_gives_the_same_greedy_answer_as_the_engine_in_process(gguf, upstream):
    local = "".join(p.text for p in run(LlamaCppBackend(gguf)))
    pieces = run(OpenAIBackend(upstream, "smollm2"))
    assert local.strip() and "".join(p.text for p in pieces) == local
    assert pieces[-1].finish_reason in ("stop", "length") and 0 < pieces[-1].completion_tokens <= 24

def test_cancelling_stops_the_upstream_stream_within_a_piece(upstream):
    asked = 0

    def cancelled() -> bool:
        nonlocal asked
        asked += 1
        return asked > 3

    pieces = run(OpenAIBackend(upstream, "smollm2"), [{"role": "user", "content": "Write a long story about a lamp."}],
                 max_tokens=400, cancelled=cancelled)
    assert pieces[-1].finish_reason == "cancelled" and len(pieces) <= 5


def test_an_unreachable_or_wrong_upstream_is_a_typed_error():
    with pytest.raises(UpstreamError, match="unreachable"):
        run(OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "smollm2"))
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("file:///etc/passwd", "smollm2")

async def test_the_service_streams_from_the_upstream_and_reports_it_down(upstream, tmp_path):
    with NatsServer(tmp_path / "js") as nats:
        stop = asyncio.Event()
        settings = InferenceSettings(nats_url=nats.url, data_dir=tmp_path, log_level="warning", ocr_enabled=False,
                                     llm_backend="openai", llm_openai_url=upstream, llm_openai_model="smollm2",
                                     llm_openai_api_key="sk-secret-never-logged")
        service = InferenceService(settings)
        task = await start_in_background(service, stop)
        bus = await Bus.connect([nats.url], "test")
        try:
            chunks = await generate(bus)
            assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) > 3
            assert chunks[-1].done and chunks[-1].model == "openai:smollm2" and not chunks[-1].error_code
            assert "sk-secret" not in repr(settings) and service.health_details()["model"] == "openai:smollm2"
            # The upstream goes away: the job ends with a typed error, not a hang.
            service.backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "smollm2")
            chunks = await generate(bus)
            assert chunks[-1].done and chunks[-1].error_code == "unavailable" and "unreachable" in chunks[-1].error_message
        finally:
            await bus.close()
            stop.set()
            await task

async def generate(bus: Bus) -> list[llm_pb2.GenerateChunk]:
    async with bus.inbox() as (inbox, sub):
        job = llm_pb2.GenerateRequest(job_id=uuid.uuid4().hex, max_tokens=24, reply_inbox=inbox, temperature=0,
                                      deadline_ms=int((time.time() + 60) * 1000),
                                      messages=[llm_pb2.ChatMessage(role=m["role"], content=m["content"])
                                                for m in MESSAGES])
        await bus.js.publish(LLM_GENERATE, job.SerializeToString())
        chunks = []
        while not chunks or not chunks[-1].done:
            chunk = llm_pb2.GenerateChunk.FromString((await sub.next_msg(timeout=60)).data)
            if not chunk.heartbeat:
                chunks.append(chunk)
        return chunks
