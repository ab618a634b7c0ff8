"""Dense vectors in faiss: exact inner product while a tenant is small, HNSW past ``hnsw_threshold``
chunks (bench/retrieval.py measures where exact search stops being fast enough).

Updates are incremental through faiss id maps. The exact index removes vectors in place; HNSW cannot,
so a removed id becomes a tombstone that searches skip, and the graph is rebuilt from the stored
vectors once tombstones pass a quarter of it.
"""

from __future__ import annotations

import faiss
import numpy as np

# One query at a time: faiss's OpenMP threads would only spin and take the cores the embedder needs.
faiss.omp_set_num_threads(1)

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96


class DenseIndex:
    def __init__(self, dim: int, hnsw_threshold: int = 20_000) -> None:
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.index: faiss.IndexIDMap2 = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.hnsw = False
        self.tombstones: set[int] = set()

    def __len__(self) -> int:
        return int(self.index.ntotal) - len(self.tombstones)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
        if not self.hnsw and self.index.ntotal >= self.hnsw_threshold:
            self._rebuild(hnsw=True)

    def remove(self, ids: list[int]) -> None:
        if not ids:
            return
        if not self.hnsw:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            return
        self.tombstones.update(ids)
        if len(self.tombstones) * 4 > self.index.ntotal:
            self._rebuild(hnsw=len(self) >= self.hnsw_threshold // 2)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, cosine) of the ``k`` nearest live vectors."""
        if not len(self):
            return []
        want = min(k + len(self.tombstones), int(self.index.ntotal))
        scores, ids = self.index.search(np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32), want)
        out = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True)
               if i >= 0 and int(i) not in self.tombstones]
        return out[:k]

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        id_map = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vectors = self.index.index.reconstruct_n(0, self.index.ntotal)
        keep = np.array([i not in self.tombstones for i in id_map.tolist()], dtype=bool)
        return id_map[keep], vectors[keep]

    def _rebuild(self, hnsw: bool) -> None:
        ids, vectors = self._live()
        if hnsw:
            inner = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            inner = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIDMap2(inner)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self.index, self.hnsw, self.tombstones = index, hnsw, set()

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int, hnsw_threshold: int, hnsw: bool, tombstones: set[int]) -> DenseIndex:
        dense = cls(dim, hnsw_threshold)
        dense.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        dense.hnsw, dense.tombstones = hnsw, tombstones
        if hnsw:
            faiss.downcast_index(dense.index.index).hnsw.efSearch = HNSW_EF_SEARCH
        return dense
