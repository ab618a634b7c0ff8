"""The inference service: pulls generation jobs from the LLM work queue when it has a free slot and
streams the chunks to each job's inbox."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Literal

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from pydantic import Field, SecretStr

from kefu.inference.backend import (
    Backend,
    BadParams,
    GenerationParams,
    LlamaCppBackend,
    OpenAIBackend,
    Piece,
    UpstreamError,
)
from kefu.inference.ocr import OcrEngine
from kefu.proto.bus.v1 import llm_pb2
from kefu.shared import metrics
from kefu.shared.bus import Bus, decode, ensure_kv, ensure_object_store, ensure_stream, subject_token
from kefu.shared.config import KefuSettings
from kefu.shared.crypto import Keyring
from kefu.shared.errors import BadRequest, KefuError, NotFound
from kefu.shared.models import DEFAULT_LLM, resolve
from kefu.shared.service import Service
from kefu.shared.streams import (
    LLM_CANCEL,
    LLM_GENERATE,
    STREAM_LLM,
    llm_budget_kv,
    llm_stream,
    media_context,
    media_store,
)

CONSUMER = "inference"
HEARTBEAT_S = 1.0
# After the first chunk (sent at once), text is sent at most every FLUSH_S: a reader sees no difference
# at 100 tokens/s, and the engine keeps the cores the messages would take (2 cores here).
FLUSH_S = 0.03


class InferenceSettings(KefuSettings):
    # llama_cpp (the bundled GGUF model, in-process) or openai (an OpenAI-compatible upstream).
    llm_backend: Literal["llama_cpp", "openai"] = "llama_cpp"
    llm_model: str = ""
    # KEFU_LLM_OPENAI_URL (API root, e.g. http://vllm:8000/v1), _MODEL and _API_KEY, for llm_backend=openai.
    llm_openai_url: str = ""
    llm_openai_model: str = ""
    llm_openai_api_key: SecretStr = SecretStr("")
    llm_openai_timeout: float = Field(default=60.0, gt=0)
    llm_threads: int = Field(default=2, ge=1)
    # Layers offloaded to the GPU (-1: all) by a llama-cpp-python built for one (CUDA, Metal, Vulkan);
    # a CPU build runs them on the CPU whatever this says.
    llm_gpu_layers: int = Field(default=0, ge=-1)
    llm_ctx: int = Field(default=2048, ge=256)
    # Jobs this replica runs at once; llama.cpp holds one sequence per context.
    llm_slots: int = Field(default=1, ge=1)
    # A job whose replica stops acknowledging progress (it sends one every second) goes to another.
    llm_ack_wait: float = Field(default=10.0, gt=2)
    # Reuse the KV of a prompt prefix shared with the previous job; _MB > 0 also keeps several in RAM.
    llm_prefix_cache: bool = True
    llm_prefix_cache_mb: int = Field(default=0, ge=0)
    # Jobs waiting or running at once across all replicas; past it a job is refused as "busy".
    llm_queue_limit: int = Field(default=64, ge=1)
    # Tokens (prompt + completion) a tenant's jobs may use per minute across all replicas; 0: no limit.
    llm_tenant_tokens_per_minute: int = Field(default=0, ge=0)
    # LoRA adapters per tenant: "acme=/models/acme.gguf,globex=/models/globex.gguf@0.5" (scale after @).
    llm_lora: str = ""
    # Serve kefu.inference.ocr (RapidOCR, loaded at start-up).
    ocr_enabled: bool = True

    def lora_adapters(self) -> dict[str, tuple[Path, float]]:
        """tenant -> (adapter path, scale), from ``llm_lora``."""
        out = {}
        for item in filter(None, (part.strip() for part in self.llm_lora.split(","))):
            tenant, sep, rest = item.partition("=")
            path, _, scale = rest.partition("@")
            if not sep or not tenant.strip() or not path.strip():
                raise ValueError(f"KEFU_LLM_LORA: {item!r} is not tenant=path[@scale]")
            try:
                out[tenant.strip()] = (Path(path.strip()).expanduser(), float(scale) if scale else 1.0)
            except ValueError:
                raise ValueError(f"KEFU_LLM_LORA: {item!r} has a scale that is not a number") from None
        return out


class InferenceService(Service):
    name = "inference"
    settings_class = InferenceSettings
    settings: InferenceSettings

    def __init__(self, settings: InferenceSettings | None = None) -> None:
        super().__init__(settings)
        self.backend: Backend | None = None
        # Tenants with their own LoRA adapter get their own engine (same weights, memory-mapped).
        self.tenant_backends: dict[str, Backend] = {}
        self.cancelled: set[str] = set()
        self.jobs_done = 0
        self._stopping = False
        self.ocr: OcrEngine | None = None
        self.media: ObjectStore | None = None
        self.budget: KeyValue | None = None
        self.keyring = Keyring(None, None)

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        # Media and queued jobs are sealed by their writers when encryption at rest is on.
        self.keyring = Keyring.from_settings(bus.js, self.settings)
        if self.settings.ocr_enabled:
            self.ocr = await asyncio.to_thread(OcrEngine)
            self.media = await ensure_object_store(bus.js, media_store())
            await bus.serve("kefu.inference.ocr", llm_pb2.OcrRequest, self._ocr, queue="ocr", max_inflight=8)
        self.backend = await self._backend()
        self.log.info("model ready", backend=self.settings.llm_backend, model=self.backend.model_name)
        s = self.settings
        for tenant, (adapter, scale) in s.lora_adapters().items():
            if not isinstance(self.backend, LlamaCppBackend):
                raise ValueError("KEFU_LLM_LORA needs KEFU_LLM_BACKEND=llama_cpp")
            # The model checked once (above); each adapter's engine maps the same file.
            self.tenant_backends[tenant] = await asyncio.to_thread(
                LlamaCppBackend, self.backend.path, n_ctx=s.llm_ctx, threads=s.llm_threads,
                gpu_layers=s.llm_gpu_layers, prefix_cache=s.llm_prefix_cache, lora=adapter, lora_scale=scale)
            self.log.info("lora adapter ready", tenant=tenant, model=self.tenant_backends[tenant].model_name)
        await ensure_stream(bus.js, llm_stream(self.settings.llm_queue_limit))
        self.budget = await ensure_kv(bus.js, llm_budget_kv())
        psub = await bus.js.pull_subscribe(
            LLM_GENERATE, durable=CONSUMER, stream=STREAM_LLM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.llm_ack_wait,
                                  max_deliver=3, max_ack_pending=-1),
        )
        # Unsubscribed after the workers stop (the stack unwinds in reverse), so drain finds no backlog.
        stack.push_async_callback(psub.unsubscribe)
        cancel_sub = await bus.nc.subscribe(LLM_CANCEL, cb=self._on_cancel)
        stack.push_async_callback(cancel_sub.unsubscribe)
        workers = [asyncio.create_task(self._worker(bus, psub)) for _ in range(self.settings.llm_slots)]
        if self.metrics is not None:
            self.metrics.on_scrape(self._queue_depth)

        async def stop_workers() -> None:
            self._stopping = True
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

        stack.push_async_callback(stop_workers)

    async def _backend(self) -> Backend:
        s = self.settings
        if s.llm_backend == "openai":
            if not s.llm_openai_url or not s.llm_openai_model:
                raise ValueError("KEFU_LLM_BACKEND=openai needs KEFU_LLM_OPENAI_URL and KEFU_LLM_OPENAI_MODEL")
            return OpenAIBackend(s.llm_openai_url, s.llm_openai_model, api_key=s.llm_openai_api_key.get_secret_value(),
                                 timeout=s.llm_openai_timeout)
        path = resolve(DEFAULT_LLM, s.data_dir, s.llm_model)
        return await asyncio.to_thread(LlamaCppBackend, path, n_ctx=s.llm_ctx, threads=s.llm_threads,
                                       gpu_layers=s.llm_gpu_layers, prefix_cache=s.llm_prefix_cache,
                                       cache_mb=s.llm_prefix_cache_mb)

    @staticmethod
    def _budget_key(tenant: str) -> str:
        return f"{subject_token(tenant)}.{int(time.time() // 60)}"

    async def _within_budget(self, tenant: str) -> bool:
        """Whether ``tenant`` has tokens left this minute (always, without a budget)."""
        limit = self.settings.llm_tenant_tokens_per_minute
        if not limit or self.budget is None:
            return True
        try:
            entry = await self.budget.get(self._budget_key(tenant))
        except KeyNotFoundError:
            return True
        return int(entry.value or b"0") < limit

    async def _spend(self, tenant: str, tokens: int) -> None:
        """Add ``tokens`` to the tenant's count for this minute (compare-and-set: replicas share it)."""
        assert self.budget is not None
        key = self._budget_key(tenant)
        for _ in range(10):
            try:
                try:
                    entry = await self.budget.get(key)
                except KeyNotFoundError:
                    await self.budget.create(key, str(tokens).encode())
                    return
                await self.budget.update(key, str(int(entry.value or b"0") + tokens).encode(), last=entry.revision)
                return
            except (KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                continue  # another replica spent at the same time: read again
            except Exception as exc:
                self.log.warning("budget not updated", tenant=tenant, error=str(exc))
                return

    async def _queue_depth(self) -> None:
        assert self.bus is not None
        info = await self.bus.js.consumer_info(STREAM_LLM, CONSUMER)
        metrics.llm_queue_depth().set(info.num_pending or 0)

    def health_details(self) -> dict[str, str]:
        return {"model": self.backend.model_name if self.backend else "", "jobs_done": str(self.jobs_done)}

    async def _ocr(self, req: llm_pb2.OcrRequest, _: Msg) -> llm_pb2.OcrReply:
        assert self.ocr is not None and self.media is not None
        try:
            obj = await self.media.get(req.media_id)
        except (ObjectNotFoundError, NotFoundError):
            raise NotFound(f"no media {req.media_id!r}") from None
        image = await self.keyring.open(obj.data or b"", media_context(req.media_id))
        try:
            found = await asyncio.to_thread(self.ocr.recognize, image)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_image") from None
        return llm_pb2.OcrReply(text=found.text, confidence=found.confidence, lines=[
            llm_pb2.OcrLine(text=line.text, confidence=line.confidence, box=[v for point in line.box for v in point])
            for line in found.lines])

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.data.decode(errors="replace")
        self.cancelled.add(job_id)
        asyncio.get_running_loop().call_later(300, self.cancelled.discard, job_id)

    async def _worker(self, bus: Bus, psub: object) -> None:
        # A worker asks for a job only when it is free: ready-worker balancing across replicas.
        # The flag, not only cancellation, ends the loop: fetch() can turn a cancellation into a timeout.
        while not self._stopping:
            try:
                msgs = await psub.fetch(1, timeout=2)  # type: ignore[attr-defined]
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # broker restarting: try again shortly
                self.log.warning("fetch failed", error=str(exc))
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                try:
                    await self._run_job(bus, msg)
                finally:
                    with suppress(Exception):
                        await msg.ack()

    async def _run_job(self, bus: Bus, msg: Msg) -> None:
        try:
            job = decode(llm_pb2.GenerateRequest, await self.keyring.open(msg.data, LLM_GENERATE))
        except KefuError as exc:
            self.log.warning("dropped unreadable job", code=exc.code, error=exc.message)
            return
        if not job.reply_inbox:
            self.log.warning("dropped job without reply inbox", job_id=job.job_id)
            return
        if job.deadline_ms and job.deadline_ms < time.time() * 1000:
            self.log.info("dropped expired job", job_id=job.job_id)
            return
        if job.job_id in self.cancelled:  # e.g. redelivered after its replica died and its requester gave up
            self.log.info("dropped cancelled job", job_id=job.job_id)
            return
        alive = asyncio.create_task(self._heartbeat(bus, msg, job))
        try:
            await self._generate(bus, job)
        finally:
            alive.cancel()

    def _failure(self, job: llm_pb2.GenerateRequest, exc: Exception) -> tuple[str, str]:
        """The error code and message a failed job reports to its requester."""
        if isinstance(exc, BadParams):
            return "invalid_field", str(exc)
        if isinstance(exc, UpstreamError):
            self.log.warning("upstream failed", job_id=job.job_id, error=str(exc))
            return "unavailable", str(exc)
        self.log.error("generation failed", job_id=job.job_id, error=str(exc))
        return "internal", "generation failed"

    async def _heartbeat(self, bus: Bus, msg: Msg, job: llm_pb2.GenerateRequest) -> None:
        """Tell the requester the job is alive, and JetStream not to redeliver it, every second."""
        while True:
            with suppress(Exception):
                await bus.publish(job.reply_inbox, llm_pb2.GenerateChunk(job_id=job.job_id, heartbeat=True))
                await msg.in_progress()
            await asyncio.sleep(HEARTBEAT_S)

    async def _generate(self, bus: Bus, job: llm_pb2.GenerateRequest) -> None:
        if job.tenant and not await self._within_budget(job.tenant):
            metrics.count_error(self.name, "budget_exhausted")
            await bus.publish(job.reply_inbox, llm_pb2.GenerateChunk(
                job_id=job.job_id, done=True, finish_reason="error", error_code="budget_exhausted",
                error_message=f"tenant {job.tenant!r} used its tokens for this minute"))
            return
        assert self.backend is not None
        backend = self.tenant_backends.get(job.tenant, self.backend)
        params = GenerationParams(max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                                  seed=job.seed, stop=list(job.stop), json_schema=job.json_schema,
                                  grammar=job.grammar)
        messages = [{"role": m.role, "content": m.content} for m in job.messages
                    if m.role in ("system", "user", "assistant")]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        deadline = job.deadline_ms / 1000 if job.deadline_ms else time.time() + 300

        def cancelled() -> bool:
            return job.job_id in self.cancelled or time.time() > deadline

        def produce() -> None:
            try:
                for piece in backend.generate(messages, params, cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except Exception as exc:  # reported to the requester, never swallowed
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        producer = loop.run_in_executor(None, produce)
        index = 0
        used = 0
        t0 = time.perf_counter()
        first_token_ms = 0
        generated = 0
        carry = ""  # text held back to go out with the next chunk
        last_sent = 0.0
        while (item := await queue.get()) is not None:
            if isinstance(item, Exception):
                code, message = self._failure(job, item)
                metrics.count_error(self.name, code)
                await bus.publish(job.reply_inbox, llm_pb2.GenerateChunk(
                    job_id=job.job_id, index=index, done=True, finish_reason="error", error_code=code,
                    error_message=message))
                break
            assert isinstance(item, Piece)
            text, carry = carry + item.text, ""
            if text and not first_token_ms:
                first_token_ms = max(1, round((time.perf_counter() - t0) * 1000))
            done = bool(item.finish_reason)
            if not done and index and time.perf_counter() - last_sent < FLUSH_S:
                carry = text  # a chunk went out moments ago: this text joins the next one
                continue
            chunk = llm_pb2.GenerateChunk(job_id=job.job_id, index=index, text=text, done=done,
                                          model=backend.model_name if done else "", finish_reason=item.finish_reason,
                                          prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens)
            if done:
                chunk.first_token_ms = first_token_ms
                chunk.duration_ms = round((time.perf_counter() - t0) * 1000)
            used = item.prompt_tokens + item.completion_tokens
            generated = item.completion_tokens
            await bus.publish(job.reply_inbox, chunk)
            last_sent = time.perf_counter()
            index += 1
        await producer
        elapsed = time.perf_counter() - t0
        if first_token_ms:
            metrics.llm_time_to_first_token().observe(first_token_ms / 1000)
        metrics.llm_tokens().inc(generated)
        metrics.llm_generation().observe(elapsed)
        if job.tenant and self.settings.llm_tenant_tokens_per_minute:
            await self._spend(job.tenant, used)
        self.jobs_done += 1
        self.log.info("job done", job_id=job.job_id, chunks=index, s=round(elapsed, 2))
