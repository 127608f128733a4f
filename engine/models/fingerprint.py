"""Model fingerprints: a hash of a model's weight and config files, so a resume never mixes models.

The resume key and the manifest hold ``fingerprint(path)``: xxh3-128 over the sorted (relative name, bytes) of every
file in the model folder whose suffix says it shapes the outputs (weights, configs, tokenizer, vocabularies), not a
path or a package version: replacing the weights at the same path changes it. Hashing is at memory speed (~0.1 s
for MiniLM's 90 MB, ~0.3 s for SmolLM2-135M) and cached per (path, size, mtime) of each file in the user cache
(``fingerprints.json``), so a rerun pays for a stat per file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.models.embed_cache import user_cache_dir

_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".txt", ".model", ".npy", ".npz", ".onnx")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _file_hash(p: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: str | os.PathLike, cache_dir: str = "") -> str:
    """``xxh3_128:<hex>`` of the model at ``path`` (a folder or one file); '' when the path does not exist."""
    import xxhash

    root = Path(path)
    if not root.exists():
        return ""
    cache_file = user_cache_dir(cache_dir) / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    total = xxhash.xxh3_128()
    changed = False
    for p in _files(root):
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            digest = cache[key] = _file_hash(p)
            changed = True
        rel = p.name if root.is_file() else str(p.relative_to(root))
        total.update(f"{rel}\0{digest}\0".encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs the hashing again next time
    return "xxh3_128:" + total.hexdigest()
