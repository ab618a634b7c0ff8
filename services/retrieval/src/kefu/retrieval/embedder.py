"""Sentence embeddings with a local sentence-transformers model (default all-MiniLM-L6-v2).

Concurrent query encodes are micro-batched: whatever arrives while one forward pass runs goes into the
next one together, so 32 concurrent searches cost a few batched passes instead of 32 single ones.
Documents are encoded in slices, so queries never wait behind a whole import.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from pathlib import Path

import numpy as np

DOC_SLICE = 64
MAX_QUERY_BATCH = 64
# Under load, how long a batch waits for more queries: without it, batches alternate between one query
# (encoded alone, as expensively as a dozen) and everything that piled up meanwhile.
BATCH_WINDOW_S = 0.003


class Embedder:
    """Loads the model once (at service start-up) and encodes in a worker thread."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # No progress bar on stderr: in a container every log line is a JSON object.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, threads))
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension() or 384)
        self._lock = asyncio.Lock()
        # Every encode on one thread: torch keeps its per-thread state warm, and they never overlap.
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._queries: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.query_batches = 0

    def encode_sync(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    async def _run(self, texts: list[str]) -> np.ndarray:
        # One forward pass at a time: torch already uses every thread it was given.
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self.encode_sync, texts)

    async def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Vectors for document chunks, encoded slice by slice so queries can run in between."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [await self._run(texts[i:i + DOC_SLICE]) for i in range(0, len(texts), DOC_SLICE)]
        return np.concatenate(parts)

    async def encode_query(self, text: str) -> np.ndarray:
        """The vector of one query, batched with the queries that arrive meanwhile."""
        if self._worker is None or self._worker.done():
            self._queries = asyncio.Queue()
            self._worker = asyncio.create_task(self._batch_queries())
        assert self._queries is not None
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queries.put_nowait((text, future))
        return await future

    async def _batch_queries(self) -> None:
        assert self._queries is not None
        busy = False
        while True:
            batch = [await self._queries.get()]
            if busy:  # the last batch had company: give this one a moment to fill up
                deadline = asyncio.get_running_loop().time() + BATCH_WINDOW_S
                while len(batch) < MAX_QUERY_BATCH:
                    try:
                        remaining = deadline - asyncio.get_running_loop().time()
                        batch.append(await asyncio.wait_for(self._queries.get(), max(remaining, 0)))
                    except TimeoutError:
                        break
            while not self._queries.empty() and len(batch) < MAX_QUERY_BATCH:
                batch.append(self._queries.get_nowait())
            busy = len(batch) > 1
            try:
                # Queries are encoded on the event loop itself: a batch takes ~10 ms, less than the
                # thread hand-off would add, and the searches that arrive meanwhile wait in the
                # socket to form the next batch.
                async with self._lock:
                    vectors = self.encode_sync([text for text, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.query_batches += 1
            for (_, fut), vec in zip(batch, vectors, strict=True):
                if not fut.done():
                    fut.set_result(vec)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
