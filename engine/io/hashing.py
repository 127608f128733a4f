"""Content hashes of files: xxh3-128 of the bytes, computed once per (path, size, mtime) and cached.

One function for every user: the input shards' hashes (ids and the resume key, engine/run/shards.py), the check that
an input is unchanged before ``selected.jsonl`` copies its lines (engine/select/selection.py), and model fingerprints
(engine/models/fingerprint.py). The cache (``file_hashes.json`` in the user cache dir, ``$WINNOW_CACHE`` /
``$XDG_CACHE_HOME/winnow``) makes a rerun pay a ``stat`` per file instead of reading the corpus again; xxh3 itself
runs at memory speed, so a first run pays for reading each input once.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from pathlib import Path

PREFIX = "xxh3_128:"
MAX_ENTRIES = 50_000  # the cache keeps the newest entries; one per path (a rewritten file replaces its old entry)


def _digest(path: str, block: int = 8 << 20) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return PREFIX + h.hexdigest()


def _cache_file(cache_dir: str = "") -> Path:
    from engine.models.embed_cache import user_cache_dir

    return user_cache_dir(cache_dir) / "file_hashes.json"


def _key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def file_hashes(paths: list[str], threads: int = 4, cache_dir: str = "") -> list[str]:
    """``xxh3_128:<hex>`` of each file, from the cache where its size and mtime are unchanged (new ones computed in
    ``threads`` threads and added to the cache)."""
    cache_file = _cache_file(cache_dir)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    keys = [_key(p) for p in paths]
    found = {k: cache[k] for k in keys if k in cache}
    todo = sorted({k: p for k, p in zip(keys, paths) if k not in found}.items())
    if todo:
        with cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as ex:
            digests = list(ex.map(lambda kp: _digest(kp[1]), todo))
        fresh = {k.rsplit("|", 2)[0] for k, _p in todo}
        cache = {k: v for k, v in cache.items() if k.rsplit("|", 2)[0] not in fresh}
        found.update((k, d) for (k, _p), d in zip(todo, digests))
        cache.update((k, found[k]) for k, _p in todo)
        if len(cache) > MAX_ENTRIES:
            cache = dict(list(cache.items())[-MAX_ENTRIES:])
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs the hashing again next time
    return [found[k] for k in keys]


def file_hash(path: str, cache_dir: str = "") -> str:
    return file_hashes([path], 1, cache_dir)[0]
