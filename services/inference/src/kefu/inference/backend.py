"""Model backends behind one interface (:class:`Backend`). The default, ``llama_cpp``, runs a GGUF model
in-process with llama-cpp-python, using the chat template stored in the GGUF metadata; ``openai``
forwards to any OpenAI-compatible upstream (vLLM, the llama.cpp server, Ollama) for when a customer
already serves models. Either way only the allow-listed, clamped :class:`GenerationParams` reach the
engine."""

from __future__ import annotations

import functools
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Only these sampling parameters reach the engine; anything else a client sends is dropped.
MAX_TOKENS_LIMIT = 1024
MAX_CONSTRAINT_CHARS = 16384


class BadParams(ValueError):
    """A job's parameters cannot be used (an invalid schema or grammar): reported as invalid_field."""


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    # Constrained output: a JSON Schema (text) or a GBNF grammar, at most one.
    json_schema: str = ""
    grammar: str = ""

    def clamped(self) -> GenerationParams:
        """The parameters the engine may see: bounded, and constraints checked (BadParams if invalid)."""
        if self.json_schema and self.grammar:
            raise BadParams("give a JSON schema or a grammar, not both")
        if len(self.json_schema) > MAX_CONSTRAINT_CHARS or len(self.grammar) > MAX_CONSTRAINT_CHARS:
            raise BadParams(f"a schema or grammar is at most {MAX_CONSTRAINT_CHARS} characters")
        if self.json_schema:
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as exc:
                raise BadParams(f"json_schema is not JSON: {exc.msg}") from None
            if not isinstance(schema, dict):
                raise BadParams("json_schema must be a JSON object")
        return GenerationParams(
            max_tokens=min(max(self.max_tokens or 256, 1), MAX_TOKENS_LIMIT),
            temperature=min(max(self.temperature, 0.0), 2.0),
            top_p=min(max(self.top_p or 1.0, 0.0), 1.0),
            seed=self.seed,
            stop=[s for s in self.stop if s][:8],
            json_schema=self.json_schema,
            grammar=self.grammar,
        )


@dataclass
class Piece:
    text: str
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UpstreamError(Exception):
    """The model upstream is unreachable or answered with an error (reported as ``unavailable``)."""


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Sapphire Rapids and later)."""
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@functools.cache
def avoid_amx_buffers() -> None:
    """Make every model this process loads skip llama.cpp's extra weight buffers where the CPU has AMX.

    There llama.cpp moves the weights into AMX buffers, and its AMX matrix product crashes the process on
    some of those machines (ggml-org/llama.cpp#20824, unfixed; seen here in the middle of a long
    prompt). llama-cpp-python does not expose the switch (``use_extra_bufts``), so the function it takes
    its default model parameters from is wrapped, once per process.
    """
    if not cpu_has_amx():
        return
    import llama_cpp.llama_cpp as capi

    defaults = capi.llama_model_default_params

    def without_extra_buffers():  # noqa: ANN202 (llama_cpp's ctypes struct)
        params = defaults()
        params.use_extra_bufts = False
        return params

    capi.llama_model_default_params = without_extra_buffers


def open_llama(model_path: str, **kwargs: object):  # noqa: ANN201 (llama_cpp.Llama, imported lazily)
    """A ``llama_cpp.Llama`` for ``model_path`` that is safe on every CPU (see :func:`avoid_amx_buffers`)."""
    from llama_cpp import Llama

    avoid_amx_buffers()
    return Llama(model_path=model_path, **kwargs)


@functools.lru_cache(maxsize=64)
def _compiled_grammar(json_schema: str, gbnf: str):  # noqa: ANN202
    """A compiled grammar, cached: the same schema comes with every job of a task."""
    from llama_cpp import LlamaGrammar

    if json_schema:
        return LlamaGrammar.from_json_schema(json_schema, verbose=False)
    return LlamaGrammar.from_string(gbnf, verbose=False)


class Backend(Protocol):
    # What the final chunk of a job and the health reply name as the model.
    model_name: str

    def generate(self, messages: list[dict[str, str]], params: GenerationParams,
                 cancelled: Callable[[], bool]) -> Iterator[Piece]:
        """Yield text pieces as the model produces them, then one with ``finish_reason`` set; stop
        within a piece once ``cancelled()`` turns true. Runs in a worker thread."""
        ...


class LlamaCppBackend:
    """One llama.cpp context; generations run one at a time in a worker thread.

    Prefix cache: the context keeps the KV of the last prompt, so a job whose prompt starts like the
    previous one (the system prompt, the same knowledge passages) evaluates only the rest — on this
    machine a 600-token prefix costs seconds to evaluate and nothing to reuse. ``cache_mb`` > 0 also
    keeps the states of several earlier prompts in RAM (saving one costs time after each job, so it
    pays only for long prefixes that alternate, e.g. one system prompt per tenant). ``prefix_cache=False``
    evaluates every prompt from scratch (for measuring the cache)."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, threads: int = 2, gpu_layers: int = 0,
                 prefix_cache: bool = True, cache_mb: int = 0, lora: Path | None = None,
                 lora_scale: float = 1.0) -> None:
        from llama_cpp import LlamaRAMCache

        self.path = path
        # A LoRA adapter (GGUF) applied on top of the model; the weights stay shared (memory-mapped).
        self.model_name = f"{path.name}+{lora.name}" if lora else path.name
        if lora is not None and not lora.is_file():
            raise ValueError(f"LoRA adapter {lora} does not exist")
        self.llm = open_llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_gpu_layers=gpu_layers, lora_path=str(lora) if lora else None,
                              lora_scale=lora_scale, verbose=False)
        self.prefix_cache = prefix_cache
        if prefix_cache and cache_mb > 0:
            self.llm.set_cache(LlamaRAMCache(capacity_bytes=cache_mb << 20))
        self.lock = threading.Lock()

    def _grammar(self, p: GenerationParams):  # noqa: ANN202 (llama_cpp.LlamaGrammar, imported lazily)
        """The compiled constraint, checked by llama.cpp's own parser first: an invalid grammar handed
        to the sampler crashes the process (it segfaults), so it must never get that far."""
        if not p.json_schema and not p.grammar:
            return None
        what = "JSON schema" if p.json_schema else "grammar"
        try:
            grammar = _compiled_grammar(p.json_schema, p.grammar)
        except Exception as exc:  # the schema converter asserts on what it does not know
            raise BadParams(f"the {what} cannot be used: {exc}") from None
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, grammar._grammar.encode(),
                                                       grammar._root.encode())
        if not sampler:
            raise BadParams(f"the {what} does not parse (GBNF)")
        llama_cpp.llama_sampler_free(sampler)
        return grammar

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def generate(self, messages: list[dict[str, str]], params: GenerationParams,
                 cancelled: Callable[[], bool]) -> Iterator[Piece]:
        """Yield text pieces as the model produces them; stops early when ``cancelled()`` turns true."""
        p = params.clamped()
        grammar = self._grammar(p)
        with self.lock:
            if not self.prefix_cache:
                self.llm.reset()  # forget the previous prompt: evaluate this one from its first token
            stream = self.llm.create_chat_completion(
                messages=messages,  # type: ignore[arg-type]
                max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                stop=p.stop or None, stream=True, grammar=grammar,
            )
            completion = 0
            finish = ""
            for chunk in stream:
                choice = chunk["choices"][0]  # type: ignore[index]
                delta = choice.get("delta", {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
                if delta:
                    completion += 1
                    yield Piece(delta)
                if cancelled():
                    finish = "cancelled"
                    stream.close()  # type: ignore[union-attr]
                    break
            prompt = sum(self.count_tokens(m.get("content", "")) for m in messages)
            yield Piece("", finish_reason=finish or "stop", prompt_tokens=prompt, completion_tokens=completion)


class OpenAIBackend:
    """An OpenAI-compatible chat completions upstream, streamed (server-sent events).

    ``base_url`` is the API root (``http://vllm:8000/v1``); ``api_key`` is sent as a bearer token and
    never logged. Each generation is one HTTP request, so replicas with several slots run jobs in
    parallel against an upstream that batches them."""

    def __init__(self, base_url: str, model: str, *, api_key: str = "", timeout: float = 60.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("the OpenAI upstream URL must start with http:// or https://")
        if not model:
            raise ValueError("the OpenAI upstream needs a model name")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.model_name = f"openai:{model}"
        self._api_key = api_key
        self.timeout = timeout

    def generate(self, messages: list[dict[str, str]], params: GenerationParams,
                 cancelled: Callable[[], bool]) -> Iterator[Piece]:
        p = params.clamped()
        body = {"model": self.model, "messages": messages, "max_tokens": p.max_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "seed": p.seed, "stream": True}
        if p.stop:
            body["stop"] = p.stop
        if p.json_schema:  # the llama.cpp server's form; vLLM and Ollama accept it too
            body["response_format"] = {"type": "json_object", "schema": json.loads(p.json_schema)}
        elif p.grammar:
            body["grammar"] = p.grammar
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 (http(s) checked above)
        except urllib.error.HTTPError as exc:
            raise UpstreamError(f"the model upstream answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UpstreamError(f"the model upstream is unreachable ({reason})") from None
        completion = 0
        finish = ""
        with response:
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue  # comments, keep-alives, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    raise UpstreamError("the model upstream sent a malformed event") from None
                if event.get("error"):
                    raise UpstreamError("the model upstream reported an error")
                choices = event.get("choices") or [{}]
                delta = (choices[0].get("delta") or {}).get("content") or ""
                finish = choices[0].get("finish_reason") or finish
                if delta:
                    completion += 1
                    yield Piece(delta)
                if cancelled():
                    finish = "cancelled"
                    break  # closing the response tells the upstream to stop
        # Upstreams do not all report usage when streaming: about 4 characters a token.
        prompt = sum(len(m.get("content", "")) for m in messages) // 4
        yield Piece("", finish_reason=finish or "stop", prompt_tokens=prompt, completion_tokens=completion)
