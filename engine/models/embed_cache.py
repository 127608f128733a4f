"""Where embeddings are kept between runs: ``EmbeddingCache`` (the run's ``OUT/work/embed_cache``, vectors by text
hash) and ``user_cache_dir`` (the per-user folder that holds distilled static tables and bench caches).

Cache layout: ``<root>/<model key>/`` holds (keys, vectors) npy pairs; the key is a 64-bit hash of the exact text
embedded (the content the vector is a function of), the model key names the tier, the weights' fingerprint, the max
length and the dtype. A rerun (or a repeat of the same text) embeds nothing twice.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np


def user_cache_dir(override: str = "") -> Path:
    if override:
        return Path(override)
    if os.environ.get("WINNOW_CACHE"):
        return Path(os.environ["WINNOW_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "winnow"


class EmbeddingCache:
    """Vectors by key under ``root/<model_key>/``: files ``emb-<id>.npy`` (float16, n x d) + ``keys-<id>.npy``
    (uint64, n). Each ``add`` writes one new pair (unique names, keys last, atomic renames), so concurrent writers
    (Ray actors) never clash and a reader sees only complete pairs. Lookups binary-search each file's sorted keys:
    memory is 16 B per cached row (keys + order); the vectors stay on disk, memory-mapped."""

    def __init__(self, root: str | Path, model_key: str, dim: int, dtype=np.float16):
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", model_key)[:150]
        self.dir = Path(root) / safe
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            tmp = self.dir / f".meta-{uuid.uuid4().hex}"
            tmp.write_text(json.dumps({"model_key": model_key, "dim": dim}))
            os.replace(tmp, meta)
        self.dim = dim
        # float16 for embeddings; float32 where a reloaded model must reproduce the cached features' predictions
        # (engine/train/classify.py's head features).
        self.dtype = np.dtype(dtype)
        self._files: list[tuple[np.ndarray, np.ndarray, Path]] = []  # (sorted keys, order, emb path)
        self._mmaps: dict[int, np.ndarray] = {}
        for kf in sorted(self.dir.glob("keys-*.npy")):
            ef = kf.with_name("emb-" + kf.name[len("keys-") :])
            if ef.exists():
                self._register(np.load(kf), ef)

    def _register(self, keys: np.ndarray, emb_path: Path) -> None:
        order = np.argsort(keys, kind="stable")
        self._files.append((keys[order], order, emb_path))

    def __len__(self) -> int:
        return sum(len(k) for k, _, _ in self._files)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, (n, dim) float16 with found rows filled) for uint64 ``keys``."""
        found = np.zeros(len(keys), bool)
        out = np.zeros((len(keys), self.dim), self.dtype)
        for fi, (sk, order, ef) in enumerate(self._files):
            todo = np.flatnonzero(~found)
            if len(todo) == 0:
                break
            pos = np.searchsorted(sk, keys[todo])
            pos_c = np.minimum(pos, len(sk) - 1)
            hit = (pos < len(sk)) & (sk[pos_c] == keys[todo])
            if not hit.any():
                continue
            if fi not in self._mmaps:
                self._mmaps[fi] = np.load(ef, mmap_mode="r")
            rows = order[pos_c[hit]]
            take = np.argsort(rows)  # read the memory map in file order
            dst = todo[hit]
            out[dst[take]] = self._mmaps[fi][rows[take]]
            found[dst] = True
        return found, out

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        tag = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        ef, kf = self.dir / f"emb-{tag}.npy", self.dir / f"keys-{tag}.npy"
        vec = np.ascontiguousarray(vectors, dtype=self.dtype)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        for path, arr in ((ef, vec), (kf, keys)):
            tmp = path.with_name("." + path.name)
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)
        self._register(keys, ef)
