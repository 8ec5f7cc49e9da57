"""The vector index: FAISS inner product over normalised vectors, exact or IVF.

Small collections use an exact flat index; past ``ivf_threshold`` vectors a rebuild trains an
IVF quantiser (``nlist`` ≈ 4·√n clusters) and searches ``nprobe`` of them. Files are written
atomically (temporary file, fsync, rename) and verified by checksum on load, so a crash or a
truncated copy is reported — never silently served.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from bot.files import atomic_write


class IndexCorrupt(Exception):
    """The index file cannot be trusted; rebuild it."""


@dataclass(slots=True)
class IndexInfo:
    kind: str  # "flat" | "ivf"
    count: int
    dim: int
    nlist: int | None
    nprobe: int | None


class VectorIndex:
    def __init__(self, index: faiss.Index, *, nprobe: int = 16) -> None:
        self.index = index
        self.nprobe = nprobe
        self._apply_nprobe()

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def empty(cls, dim: int, *, nprobe: int = 16) -> VectorIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), nprobe=nprobe)

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        *,
        dim: int,
        ivf_threshold: int = 20_000,
        nlist: int | None = None,
        nprobe: int = 16,
        seed: int = 1234,
    ) -> VectorIndex:
        """A fresh index over ``vectors``: exact below ``ivf_threshold``, IVF from there on."""
        n = len(ids)
        if n < ivf_threshold:
            index = cls.empty(dim, nprobe=nprobe)
            if n:
                index.add(ids, vectors)
            return index
        nlist = nlist or max(16, min(65536, int(4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        # FAISS wants 39+ points per centroid; more buys little and costs training time.
        sample = min(n, max(nlist * 64, 50_000))
        rng = np.random.default_rng(seed)
        train = vectors if sample == n else vectors[rng.choice(n, sample, replace=False)]
        ivf.train(np.ascontiguousarray(train, dtype=np.float32))
        index = cls(ivf, nprobe=nprobe)
        index.add(ids, vectors)
        return index

    def _apply_nprobe(self) -> None:
        ivf = self._ivf()
        if ivf is not None:
            ivf.nprobe = min(self.nprobe, ivf.nlist)

    def _ivf(self) -> faiss.IndexIVF | None:
        try:
            return faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return None

    # -- using -------------------------------------------------------------------------------

    @property
    def info(self) -> IndexInfo:
        ivf = self._ivf()
        return IndexInfo(
            kind="ivf" if ivf is not None else "flat",
            count=int(self.index.ntotal),
            dim=int(self.index.d),
            nlist=int(ivf.nlist) if ivf is not None else None,
            nprobe=int(ivf.nprobe) if ivf is not None else None,
        )

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        # faiss's SWIG wrapper takes an array and makes the selector itself.
        return int(self.index.remove_ids(np.asarray(ids, dtype=np.int64)))  # type: ignore[arg-type]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.index.ntotal == 0:
            shape = (len(queries), 0)
            return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.int64)
        return self.index.search(queries, min(k, int(self.index.ntotal)))

    def clone(self) -> VectorIndex:
        return VectorIndex(faiss.clone_index(self.index), nprobe=self.nprobe)

    # -- files -------------------------------------------------------------------------------

    def save(self, path: Path) -> str:
        """Write atomically; returns the file's SHA-256."""
        data = faiss.serialize_index(self.index).tobytes()
        atomic_write(path, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: Path, *, sha256: str | None = None, nprobe: int = 16) -> VectorIndex:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IndexCorrupt(f"index file {path} is missing") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise IndexCorrupt(f"index file {path} is corrupt or half-written (checksum mismatch)")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexCorrupt(f"index file {path} cannot be read: {exc}") from None
        return cls(index, nprobe=nprobe)
