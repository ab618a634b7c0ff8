"""Model backends. The default runs a GGUF model in-process with llama-cpp-python, using the chat
template stored in the GGUF metadata."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Only these sampling parameters reach the engine; anything else a client sends is dropped.
MAX_TOKENS_LIMIT = 1024


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def clamped(self) -> GenerationParams:
        return GenerationParams(
            max_tokens=min(max(self.max_tokens or 256, 1), MAX_TOKENS_LIMIT),
            temperature=min(max(self.temperature, 0.0), 2.0),
            top_p=min(max(self.top_p or 1.0, 0.0), 1.0),
            seed=self.seed,
            stop=[s for s in self.stop if s][:8],
        )


@dataclass
class Piece:
    text: str
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LlamaCppBackend:
    """One llama.cpp context; generations run one at a time in a worker thread."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, threads: int = 2) -> None:
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def generate(self, messages: list[dict[str, str]], params: GenerationParams,
                 cancelled: Callable[[], bool]) -> Iterator[Piece]:
        """Yield text pieces as the model produces them; stops early when ``cancelled()`` turns true."""
        p = params.clamped()
        with self.lock:
            stream = self.llm.create_chat_completion(
                messages=messages,  # type: ignore[arg-type]
                max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                stop=p.stop or None, stream=True,
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
            yield Piece("", finish_reason=finish or "stop", completion_tokens=completion)
