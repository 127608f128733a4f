"""Which shards a run must (re)do: input fingerprints and the resume key.

A finished shard leaves ``work/map/done-SSSSS.json`` (written last, atomically) holding its stats and its key. A
rerun reuses a shard only when its key matches: the input file (path, size, content hash, id prefix), the config sections
that change what a shard holds (derived from the stage registry, with ``auto`` settings already resolved), the skipped
stages and the winnow version. A shard without a marker (a kill mid-shard) is redone from scratch, so a resume
neither loses nor duplicates rows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engine import __version__, registry
from engine.io.hashing import file_hashes
from engine.io.readers import Shard


def with_identity(shards: list[Shard], threads: int = 4) -> list[Shard]:
    """``shards`` with their content hashes (engine/io/hashing.py: cached by size and mtime) and run-unique id
    prefixes set."""
    import dataclasses

    from engine.io.schema import id_prefix

    todo = [sh.path for sh in shards if not sh.content_hash]
    computed = iter(file_hashes(todo, threads))
    hashes = [sh.content_hash or next(computed) for sh in shards]
    seen: dict[str, int] = {}
    out = []
    for sh, h in zip(shards, hashes):
        k = seen.get(h, 0)
        seen[h] = k + 1
        out.append(dataclasses.replace(sh, content_hash=h, id_prefix=id_prefix(h, k)))
    return out


def shard_key(shard: Shard, config: Any) -> str:
    sections = registry.resume_sections(config)
    blob = (
        f"{shard.path}|{shard.size}|{shard.content_hash or shard.mtime_ns}|{shard.id_prefix}|{sections}|{config.section_hash(*sections)}|"
        f"{sorted(config.run.skip_stages)}|{__version__}"
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def clean_map_dir(map_dir: Path, n_shards: int) -> None:
    """Drop the files of shard indices past the current input list (temp files are the driver's to remove)."""
    for pattern in ("done-*.json", "part-*.parquet", "part-*.arrow", "work-*.arrow"):
        for f in map_dir.glob(pattern):
            if int(f.name.split("-")[1].split(".")[0]) >= n_shards:
                f.unlink()


def reusable(map_dir: Path, shards: list[Shard], config: Any) -> tuple[dict[int, dict], list[int]]:
    """({shard index: its stats} for finished shards whose key matches, [indices still to do])."""
    done: dict[int, dict] = {}
    pending: list[int] = []
    for i, sh in enumerate(shards):
        marker = map_dir / f"done-{i:05d}.json"
        if marker.exists():
            try:
                st = json.loads(marker.read_text())
            except (OSError, ValueError):
                st = None
            files = (
                (st or {}).get("parts", [])
                + ([st["work"]] if st and st.get("work") else [])
                + (st or {}).get("work_parts", [])
            )  # the Ray engine: one work file per part
            if st and st.get("key") == shard_key(sh, config) and all((map_dir / p).exists() for p in files):
                st["reused"] = True
                done[i] = st
                continue
            marker.unlink()
        pending.append(i)
    return done, pending
