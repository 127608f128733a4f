"""Model fingerprints: a hash of a model's weight and config files, so a resume never mixes models.

The resume key and the manifest hold ``fingerprint(path)``: xxh3-128 over the sorted (relative name, bytes) of every
file in the model folder whose suffix says it shapes the outputs (weights, configs, tokenizer, vocabularies), not a
path or a package version: replacing the weights at the same path changes it. Hashing is at memory speed (~0.1 s
for MiniLM's 90 MB, ~0.3 s for SmolLM2-135M) and cached per (path, size, mtime) of each file (engine/io/hashing.py), so a
rerun pays for a stat per file.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.io.hashing import file_hashes

_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".txt", ".model", ".npy", ".npz", ".onnx")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def fingerprint(path: str | os.PathLike, cache_dir: str = "") -> str:
    """``xxh3_128:<hex>`` of the model at ``path`` (a folder or one file); '' when the path does not exist."""
    import xxhash

    root = Path(path)
    if not root.exists():
        return ""
    files = _files(root)
    digests = file_hashes([str(p) for p in files], cache_dir=cache_dir)
    total = xxhash.xxh3_128()
    for p, digest in zip(files, digests):
        rel = p.name if root.is_file() else str(p.relative_to(root))
        total.update(f"{rel}\0{digest}\0".encode())
    return "xxh3_128:" + total.hexdigest()
