"""Static tier vs MiniLM: 10-NN agreement per held-out set, encode speed on the same rows, and what the static tier
costs a facility-location selection, for the plain distilled table and the trained one, MiniLM the anchor.

    nice -n 10 .venv/bin/python bench/bench_static_agreement.py                    # cached MiniLM vectors
    nice -n 10 .venv/bin/python bench/bench_static_agreement.py --speed-rows 1000 --select-rows 4000

Rows: the held-out chunks of bench/train_static.py (``eval_*``: datasets and rows the trained table never saw),
with the MiniLM vectors that ``train_static.py embed`` cached (``--cache``; computed here with the repo's MiniLM path
when a set is missing or was embedded by another encoder, as its parquet metadata says). Each tier encodes the
texts through ``StaticEmbedder.encode`` (the inference path: Numba WordPiece + ``kernels.embed_pool``, every token
of the row, no truncation), the table swapped between "distilled" (``load_static_table(tuned=False)``) and "trained".

- Agreement: for each set, each row's 10 nearest neighbours (cosine, exact, self excluded) under the tier vs under
  MiniLM; the mean share in common.
- Speed: MiniLM (``EncoderEmbedder``, bf16 autocast where the CPU has it) and each static table encode the same
  ``--speed-rows`` held-out alpaca rows in this process, static best of ``--repeats``; rows/s and ratio.
- Thresholds: the pairs at cosine >= 0.95 / 0.85 under MiniLM (the encoder tier's semantic-dedup / split
  thresholds) against each static table's pairs at 0.85-0.99, pooled over the sets: precision and recall.
- Selection: facility location (engine/select facility, lazy greedy on the kNN graph, quality weight 0) picks
  ``--fraction`` of ``--select-rows`` held-out alpaca rows from each tier's vectors; every selection is scored by
  the same objective, ``sum_j max_{i in S} cos_MiniLM(i, j)`` (dense, exact), against the selection made on MiniLM
  vectors (1.0) and a seeded random selection of the same size (the floor).

Prints JSON last; appends rows to bench/results.csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, append_result, print_json

K = 10


def knn(v: np.ndarray, k: int = K) -> np.ndarray:
    """(n, k) indices of each row's k nearest rows by cosine (unit rows), self excluded, exact."""
    v = np.asarray(v, np.float32)
    out = np.zeros((len(v), k), np.int64)
    for lo in range(0, len(v), 2048):
        s = v[lo : lo + 2048] @ v.T
        s[np.arange(len(s)), np.arange(lo, lo + len(s))] = -np.inf
        out[lo : lo + len(s)] = np.argpartition(-s, k, axis=1)[:, :k]
    return out


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = K) -> float:
    """Mean share of each row's k nearest neighbours under ``a`` that are also among its k nearest under ``b``."""
    na, nb = knn(a, k), knn(b, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb, strict=True)]))


def static_with(table: np.ndarray, weights: np.ndarray, s, bigram_keys: np.ndarray | None = None):
    """The StaticEmbedder ``s`` with its table (and bigram keys: none by default) swapped (the encode path stays the
    inference path)."""
    s.table = np.ascontiguousarray(table, dtype=np.float32)
    s.weights = np.ascontiguousarray(weights, dtype=np.float32)
    s.bigram_keys = np.zeros(0, np.int64) if bigram_keys is None else np.asarray(bigram_keys, np.int64)
    s.vocab = len(s.table) - len(s.bigram_keys)
    s.memo = None  # the per-word memo holds vectors of the previous table
    return s


def facility_objective(sim_rows: np.ndarray, picked: np.ndarray) -> float:
    """sum_j max_{i in S} sim(i, j) under a dense (n, n) similarity."""
    return float(sim_rows[picked].max(0).sum())


THRESHOLDS = (0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


def pairs_above(v: np.ndarray, t: float, tag: str) -> set:
    """{(tag, i, j)} for i < j with cosine >= t (dense, one set at a time)."""
    v = np.asarray(v, np.float32)
    sim = np.triu(v @ v.T, 1)
    i, j = np.nonzero(sim >= t)
    return {(tag, int(a), int(b)) for a, b in zip(i, j, strict=True)}


def pr(got: set, ref: set) -> dict:
    hit = len(got & ref)
    return {
        "pairs": len(got),
        "precision": round(hit / max(1, len(got)), 3),
        "recall": round(hit / max(1, len(ref)), 3),
    }


def select_facility(emb: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    from types import SimpleNamespace

    from engine.select import base
    from engine.select.budget import Limits

    n = len(emb)
    cands = base.Candidates(
        np.arange(n), np.zeros(n, np.float32), np.ones(n), emb=np.asarray(emb, np.float32).astype(np.float16)
    )
    cfg = SimpleNamespace(quality_weight=0.0, neighbours=16, epsilon=0.0, tau=0.9, kcenter="auto", score="",
                          ascending=False)  # fmt: skip
    return base.get("facility")(cfg, seed=seed).select(cands, k, Limits.none(n)).order


def eval_sets(
    cache: Path, encoder_key: str | None, encode_minilm, cached_only: bool = False
) -> dict[str, tuple[list[str], np.ndarray]]:
    """{set name: (texts, MiniLM vectors)} for the held-out chunks; re-embedded when the cache's model key differs."""
    import pyarrow.parquet as pq

    from bench.train_static import EVAL_SETS, read_chunk, read_texts

    out = {}
    for name, folder_split, rows, kind in EVAL_SETS:
        path = cache / f"{name}.parquet"
        if path.exists():
            key = (pq.read_schema(path).metadata or {}).get(b"model_key", b"").decode()
            if encoder_key is None or key == encoder_key:
                texts, _, vec = read_chunk(path)
                out[name.removeprefix("eval_")] = (texts, vec)
                continue
        if cached_only:
            continue
        texts = [x for x in read_texts(folder_split, rows, kind) if x.strip()]
        out[name.removeprefix("eval_")] = (texts, encode_minilm(texts))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(ROOT.parent / "notes" / "static_cache"))
    p.add_argument("--speed-rows", type=int, default=1000, help="alpaca rows both tiers encode for speed")
    p.add_argument("--select-rows", type=int, default=4000, help="alpaca rows the facility selections pick from")
    p.add_argument("--fraction", type=float, default=0.1, help="selection size as a share of --select-rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and Numba threads for the speed figures")
    p.add_argument("--set", default="alpaca", help="the held-out set the speed and selection figures use")
    p.add_argument("--cached-only", action="store_true", help="skip held-out sets the cache lacks (no MiniLM)")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)

    import numba
    import torch

    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(args.threads)
    from engine.models.encoder import EncoderEmbedder, default_model_path
    from engine.models.static import StaticEmbedder, load_static_table, read_bigram_keys, static_table_source

    model = default_model_path()
    minilm = EncoderEmbedder(model, num_threads=args.threads)
    sets = eval_sets(Path(args.cache), minilm.model_key, minilm.encode, args.cached_only)
    tables = {"distilled": load_static_table(model, tuned=False)[:2] + (None,)}
    key, trained = static_table_source(model, 256, 1e-4)
    if trained is not None:
        table, weights, folder = load_static_table(model)
        tables["trained"] = (table, weights, read_bigram_keys(folder))
    s = StaticEmbedder(model, device="cpu")
    res: dict = {"op": "static_agreement", "trained_key": key if trained else None, "threads": args.threads}

    # Agreement per held-out set
    vecs: dict[str, dict[str, np.ndarray]] = {}
    for tier, (table, weights, keys) in tables.items():
        static_with(table, weights, s, keys)
        vecs[tier] = {name: s.encode(texts) for name, (texts, _) in sets.items()}
    agreement = {}
    for name, (texts, ref) in sets.items():
        row = {"rows": len(texts)}
        for tier in tables:
            row[tier] = round(knn_overlap(vecs[tier][name], ref), 4)
        if "trained" in row:
            row["ratio"] = round(row["trained"] / max(row["distilled"], 1e-9), 3)
        agreement[name] = row
    res["knn10_overlap"] = agreement
    for tier in tables:
        res[f"knn10_overlap_mean_{tier}"] = round(float(np.mean([a[tier] for a in agreement.values()])), 4)

    # Speed on the same rows, MiniLM the anchor in this run
    speed_texts = sets[args.set][0][: args.speed_rows]
    minilm.encode(speed_texts[:16])
    c = time.perf_counter()
    minilm.encode(speed_texts)
    t_minilm = time.perf_counter() - c
    res["speed_rows"] = len(speed_texts)
    res["minilm_rows_s"] = round(len(speed_texts) / t_minilm, 2)
    for tier, (table, weights, keys) in tables.items():
        static_with(table, weights, s, keys)
        best = np.inf
        for _ in range(args.repeats):
            s.memo = None  # the word memo's warm-up is in the time
            c = time.perf_counter()
            s.encode(speed_texts)
            best = min(best, time.perf_counter() - c)
        res[f"{tier}_rows_s"] = round(len(speed_texts) / best, 1)
        res[f"{tier}_vs_minilm"] = round(t_minilm / best, 1)

    # Selection quality: facility location on each tier's vectors, scored under MiniLM similarity
    texts, ref = sets[args.set]
    n = min(args.select_rows, len(texts))
    ref = ref[:n]
    k = max(1, round(args.fraction * n))
    sim = ref.astype(np.float32) @ ref.astype(np.float32).T
    picks = {"minilm": select_facility(ref, k)}
    for tier in tables:
        picks[tier] = select_facility(vecs[tier][args.set][:n], k)
    picks["random"] = np.random.default_rng(0).choice(n, k, replace=False)
    objective = {name: facility_objective(sim, idx) for name, idx in picks.items()}
    floor, top = objective["random"], objective["minilm"]
    res["select"] = {
        "set": args.set,
        "rows": n,
        "k": k,
        **{f"objective_{name}": round(v, 2) for name, v in objective.items()},
        **{f"ratio_{name}": round(v / top, 4) for name, v in objective.items()},
        # share of the gap between random and MiniLM's own selection that each tier closes
        **{f"gap_closed_{t}": round((objective[t] - floor) / max(top - floor, 1e-9), 4) for t in tables},
        **{f"picks_shared_{t}": round(len(set(picks[t]) & set(picks["minilm"])) / k, 4) for t in tables},
    }
    # Thresholds: pairs at >= the MiniLM tier's threshold are the reference (semantic dedup 0.95, split 0.85); a
    # static tier's pairs at each candidate threshold, pooled over the sets: precision and recall against them.
    res["thresholds"] = {}
    for purpose, ref_t in (("semdedup", 0.95), ("split", 0.85)):
        rows = {}
        for tier in tables:
            ref_pairs, tier_pairs = set(), {t: set() for t in THRESHOLDS}
            for name, (_, ref_v) in sets.items():
                ref_pairs |= pairs_above(ref_v, ref_t, name)
                v = vecs[tier][name]
                for t in THRESHOLDS:
                    tier_pairs[t] |= pairs_above(v, t, name)
            rows[tier] = {f"{t:.2f}": pr(tier_pairs[t], ref_pairs) for t in THRESHOLDS}
            rows["reference_pairs"] = len(ref_pairs)
        res["thresholds"][f"{purpose}_vs_minilm_{ref_t}"] = rows
    if not args.no_csv:
        for tier in tables:
            append_result("static_agreement", tier, len(sets), "knn10_overlap_mean", res[f"knn10_overlap_mean_{tier}"])
            append_result("static_agreement", tier, len(speed_texts), "ratio_vs_minilm", res[f"{tier}_vs_minilm"])
            append_result("static_agreement", tier, n, "facility_ratio_vs_minilm", res["select"][f"ratio_{tier}"])
    print_json(res)
    return res


if __name__ == "__main__":
    main()
