"""Snapshots of the indexes on disk, so a restart loads them and replays only the newer KB messages.

A snapshot is one file written atomically (temp file + rename). It records the KB sequence it reflects,
the stream's creation time (a recreated stream invalidates it) and the embedder's checksum (vectors
from another model are worthless). Anything that does not match is ignored and the stream is replayed
from the start.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kefu.retrieval.dense import DenseIndex
from kefu.retrieval.index import TenantIndex
from kefu.retrieval.lexical import BM25

FORMAT = 2


@dataclass
class Snapshot:
    seq: int
    stream_created: str
    embedder: str
    indexes: dict[str, TenantIndex]


def _tenant_state(index: TenantIndex) -> dict[str, Any]:
    return {
        "dim": index.dim, "hnsw_threshold": index.hnsw_threshold, "next_id": index.next_id,
        "chunks": index.chunks, "tokens": index.tokens, "by_doc": index.by_doc,
        "exact": dict(index.exact), "postings": dict(index.lexical.postings), "lengths": index.lexical.lengths,
        "dense": index.dense.to_bytes(), "hnsw": index.dense.hnsw,
        "tombstones": index.dense.tombstones,
    }


def _tenant_from(state: dict[str, Any]) -> TenantIndex:
    index = TenantIndex(state["dim"], state["hnsw_threshold"])
    index.next_id, index.chunks, index.tokens, index.by_doc = (state["next_id"], state["chunks"], state["tokens"],
                                                               state["by_doc"])
    index.exact.update(state["exact"])
    index.lexical = BM25.restore(state["postings"], state["lengths"])
    index.dense = DenseIndex.from_bytes(state["dense"], state["dim"], state["hnsw_threshold"], state["hnsw"],
                                        state["tombstones"])
    return index


def save(path: Path, snap: Snapshot) -> int:
    """Write ``snap`` to ``path`` atomically; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "seq": snap.seq, "stream_created": snap.stream_created, "embedder": snap.embedder,
               "tenants": {t: _tenant_state(i) for t, i in snap.indexes.items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".snapshot-")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path.stat().st_size


def load(path: Path, *, stream_created: str, embedder: str) -> Snapshot | None:
    """The snapshot at ``path`` if it belongs to this stream and embedder, else None."""
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)  # the data dir is the service's own, written only by save()
    except FileNotFoundError:
        return None
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError):
        return None  # a damaged file: replaying the stream rebuilds everything
    if (payload.get("format") != FORMAT or payload.get("stream_created") != stream_created
            or payload.get("embedder") != embedder):
        return None
    indexes = {t: _tenant_from(s) for t, s in payload["tenants"].items()}
    return Snapshot(payload["seq"], stream_created, embedder, indexes)
