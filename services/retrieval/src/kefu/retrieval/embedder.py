"""Sentence embeddings with a local sentence-transformers model (default all-MiniLM-L6-v2)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np


class Embedder:
    """Loads the model once (at service start-up) and encodes in a worker thread."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, threads))
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension() or 384)
        self._lock = asyncio.Lock()

    def encode_sync(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    async def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # One encode at a time: torch already uses every thread it was given.
        async with self._lock:
            return await asyncio.to_thread(self.encode_sync, texts)
