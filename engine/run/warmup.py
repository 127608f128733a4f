"""Compile every kernel once per machine, before the map workers start (and at install time).

Numba compiles a kernel on its first call and caches the machine code on disk (``cache=True``). Without a warm-up,
each map worker compiles the same kernels side by side on its first shard: measured here on an empty cache,
building and first-calling the map stages cost 43 s (clean 17 s, minhash 8 s, tokens 7 s, embed 9 s, normalise
1.4 s), against a 9.5 s warm run of 50k rows. The warm-up runs the stages on a two-row batch, split over
``processes`` processes (compilation holds the GIL: threads would not overlap it), then the global stages on the
result through a ``MemoryContext``; workers then load the cached code in milliseconds.

``python -m engine.run.warmup`` (``make install`` runs it) does the same with the default config, so a new user's
first run finds the kernels compiled and the static embedding table built.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import sys
import time
from typing import Any

import pyarrow as pa

from engine import registry


def warm_batch() -> pa.RecordBatch:
    from engine.io.schema import canonicalize

    raw = pa.record_batch({
        "instruction": ["Say hi twice, please.", "Name a colour and say why you like it."],
        "input": ["", "In one sentence."],
        # a non-ASCII row too: the static tier pools it on another path (HF tokenizer + embed_pool)
        "output": ["hi hi", "Blue is a colour: it is the colour of the sea and of a café's awning in summer."],
        "__row": pa.array([0, 1], pa.int64()),
    })  # fmt: skip
    return canonicalize(raw, "alpaca", "<warm-up>", None)


def _run_map(config: Any, names: list[str] | None) -> pa.Table:
    batch = warm_batch()
    for spec in registry.active(config, registry.MAP):
        if names is None or spec.name in names:
            batch = spec.build(config).process(batch)
    return pa.Table.from_batches([batch])


def _full_fold(config_dict: dict) -> bytes:
    """The whole fold on the warm-up batch, as Arrow IPC bytes (run in a pool process: the driver never builds the
    map stages, so it holds none of their models or tables)."""
    from engine.config import config_from_dict

    t = _run_map(config_from_dict(config_dict), None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def _warm_group(config_dict: dict, names: list[str]) -> float:
    from engine.config import config_from_dict

    t0 = time.perf_counter()
    _run_map(config_from_dict(config_dict), names)
    return time.perf_counter() - t0


def _groups(config: Any, processes: int) -> list[list[str]]:
    """Active map stages dealt into ``processes`` groups, heaviest compile first (measured order)."""
    heavy = ["clean", "embed", "minhash", "tokens", "normalize"]
    names = [s.name for s in registry.active(config, registry.MAP)]
    names.sort(key=lambda n: heavy.index(n) if n in heavy else len(heavy))
    groups: list[list[str]] = [[] for _ in range(max(1, processes))]
    for i, n in enumerate(names):
        groups[i % len(groups)].append(n)
    return [g for g in groups if g]


def warm(config: Any, processes: int = 1) -> dict[str, float]:
    """Compile the kernels of the stages that run under ``config``; returns seconds per step."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if processes > 1:
        groups = _groups(config, processes)
        ctx = mp.get_context("forkserver")
        with cf.ProcessPoolExecutor(max_workers=len(groups), mp_context=ctx) as ex:
            for g, s in zip(groups, ex.map(_warm_group, [config.to_dict()] * len(groups), groups)):
                out["+".join(g)] = round(s, 2)
            t1 = time.perf_counter()
            # the whole fold once (cache hits after the groups above), in a pool process
            table = pa.ipc.open_stream(ex.submit(_full_fold, config.to_dict()).result()).read_all()
    else:
        t1 = time.perf_counter()
        table = _run_map(config, None)
    out["map"] = round(time.perf_counter() - t1, 2)
    t2 = time.perf_counter()
    from engine.run.context import MemoryContext

    table = table.append_column("_shard", pa.array([0] * table.num_rows, pa.int32()))
    ctx = MemoryContext(table, config)
    for spec in registry.active(config, registry.GLOBAL):
        if getattr(spec.cls, "warm_up", True):
            spec.build(config).run(ctx)
    out["global"] = round(time.perf_counter() - t2, 2)
    out["total"] = round(time.perf_counter() - t0, 2)
    return out


def ship_static_table(config: Any) -> str:
    """Install the default static table into the share folder: the trained table shipped in the package
    (engine/models/data/static_minilm_tuned.npz, decoded) when it was trained against this MiniLM, else the
    distilled one (distilling it if needed); see ``engine.models.static.static_table_source``."""
    import shutil

    from engine.models.encoder import default_model_path
    from engine.models.static import load_static_table, shipped_static_dir

    sec = config.embed
    _t, _w, folder = load_static_table(default_model_path(), sec.static_dim, sec.static_sif, sec.static_dir)
    dest = shipped_static_dir() / folder.name
    if folder != dest:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return str(dest)


def warm_select() -> float:
    """Compile the selection kernels (every selector, both greedy loops, both k-center paths, DSIR hashing) on a small
    random set, so that a first ``select`` does not spend seconds compiling."""
    from types import SimpleNamespace

    import numpy as np

    from engine.select import base
    from engine.select.budget import Limits
    from engine.select.relevance import dsir_scores

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cands = base.Candidates(np.arange(600), rng.random(600).astype(np.float32), np.ones(600), emb=x.astype(np.float16))
    for method, extra in (
        ("facility", {}),
        ("facility", {"epsilon": 0.1}),
        ("kcenter", {"kcenter": "exact"}),
        ("kcenter", {"kcenter": "graph"}),
        ("deita", {}),
        ("topk", {}),
        ("random", {}),
    ):
        cfg = SimpleNamespace(
            **{
                "quality_weight": 1.0,
                "neighbours": 8,
                "epsilon": 0.0,
                "tau": 0.9,
                "kcenter": "auto",
                "score": "",
                "ascending": False,
                **extra,
            }
        )
        base.get(method)(cfg).select(cands, 20, Limits.none(600))
    dsir_scores([["a warm up text", "another one"]], ["target text"])
    return round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    from engine.config import Config

    ap = argparse.ArgumentParser(prog="python -m engine.run.warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--ship", action="store_true", help="also install the static table under <prefix>/share/winnow")
    args = ap.parse_args(argv)
    cfg = Config()
    cfg.embed.embedder = "static"  # what `auto` picks past 20,000 rows on a CPU
    registry.resolve(cfg, {"n_rows": None, "work_dir": ""})
    where = ship_static_table(cfg) if args.ship else None
    got = warm(cfg, processes=min(2, os.cpu_count() or 1))
    got["select"] = warm_select()
    got["total"] += got["select"]
    print(
        f"winnow: kernels compiled ({got['total']:.0f} s)" + (f"; static table in {where}" if where else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
