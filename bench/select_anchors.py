"""Anchor side of the selection benchmark: apricot, submodlib and SemHash on the same embeddings, one per process.

    /work/anchor-venv/bin/python bench/select_anchors.py --emb E.npy --k 1000 --anchor apricot --out r.json

The anchors live in their own venv (see /work/notes/anchors.md for the install line); this file imports none of
them at module level, so ``facility_objective`` / ``kcenter_radius`` / ``run_anchor`` import from winnow's own venv.
``--emb`` is an (n, d) .npy of L2-normalised rows (float16 or float32; ``bench/select_data.py`` writes one).

Each run is a child process (this file with ``--_child``) under ``RLIMIT_AS = --mem-gib`` (16 GiB), so a dense
50k x 50k float64 matrix (18.6 GiB) fails with a MemoryError instead of taking the machine down, and under a
wall-clock ``--timeout`` (600 s). The parent measures the child's peak RSS with ``os.wait4`` and then scores the
selection with the shared yardsticks. Output (``--out``, and the last line of stdout) is one JSON object:
``selected`` (indices in selection order), ``seconds`` (embeddings in memory -> ranking out, similarity build
included), ``seconds_similarity``, ``seconds_import``, ``peak_rss_mib``, ``facility_objective``, ``kcenter_radius``,
``anchor_objective`` (the anchor's own sum of gains, where it reports gains), ``error`` (null or why it failed).

One similarity for every anchor: s(i, j) = max(0, cos(i, j)) = max(0, <x_i, x_j>) on the unit rows, the same as
``facility_objective``. How each anchor is given it:
- apricot: ``metric="precomputed"`` with that matrix in float64 (apricot converts anything else to float64).
  Its own ``metric="cosine"`` would NOT be the same: apricot's ``_calculate_pairwise_distances`` turns cosine into
  cos^2 (``1 - (1 - (1 - d)^2)`` then ``1 - .``), which squares the similarities and makes cos = -0.5 look like +0.25.
- submodlib: ``FacilityLocationFunction(mode="dense", sijs=S, separate_rep=False)`` with S in float32, maximised
  with ``LazyGreedy``. Its ``metric="cosine"`` kernel is plain cosine but keeps negative values; with a zero
  initial max (as in apricot) negatives never count, so clipping changes nothing and makes the matrix identical.
- semhash: it has no facility location and takes no similarity matrix. ``self_find_representative`` ranks rows by
  the mean cosine to their 100 nearest neighbours (usearch HNSW index, metric "cos", via vicinity), keeps the top
  ``candidate_limit`` rows ("auto" = clip(0.1 n, k, 1000)), and re-ranks them with pyversity's MMR
  (0.5 * density - 0.5 * max cos to the selected, raw cosine). ``--strategy cover`` uses pyversity's "COVER
  (Facility Location)", which is actually sum_j (sum_{i in S} max(0, cos))^0.5 mixed 50/50 with density, over the
  candidate pool only. We pass the embeddings through ``SemHash.from_embeddings`` with a stand-in encoder that
  raises if called, so no model is ever loaded or downloaded. When "auto" gives fewer than k candidates
  (k > 1000), the pool is raised to k: SemHash would otherwise return only 1000 rows.
``--knn K`` (apricot, submodlib) replaces the dense matrix by the exact K-nearest-neighbour graph (faiss
IndexFlatIP, self included), s = max(0, cos) on those K entries per row: the sparse form winnow's selectors use.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ANCHORS = ("apricot", "submodlib", "semhash")
# The anchor venv's python; WINNOW_ANCHOR_PYTHON overrides (run_anchor uses it when called from winnow's venv).
ANCHOR_PYTHON = os.environ.get("WINNOW_ANCHOR_PYTHON", "/work/anchor-venv/bin/python")
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------------------------
# Shared yardsticks (numpy only)
# ---------------------------------------------------------------------------------------------------------------


def max_cos_to_selected(emb: np.ndarray, selected, block: int = 4096, sel_block: int = 8192) -> np.ndarray:
    """(n,) float32: for every row j, max_{i in S} cos(i, j), computed exactly in (block x sel_block) tiles.

    Never forms n x n: peak extra memory is |S| x d float32 (the selected rows) plus one block x sel_block tile
    (4096 x 8192 float32 = 128 MiB). float32 products of float16/float32 unit rows: error ~1e-7 per cosine.
    Works on np.memmap input (10M rows are read block by block). Empty S gives -inf everywhere.
    """
    n = emb.shape[0]
    sel = np.asarray(selected, dtype=np.int64).reshape(-1)
    out = np.full(n, -np.inf, dtype=np.float32)
    if sel.size == 0:
        return out
    if sel.min() < 0 or sel.max() >= n:
        raise ValueError(f"selected indices must lie in [0, {n}); got min {sel.min()}, max {sel.max()}")
    # Read the selected rows in index order (sequential on a memmap); order does not matter for a max.
    srows = np.asarray(emb[np.sort(sel)], dtype=np.float32)
    for j0 in range(0, n, block):
        xj = np.asarray(emb[j0 : j0 + block], dtype=np.float32)
        m = out[j0 : j0 + len(xj)]
        for s0 in range(0, len(srows), sel_block):
            np.maximum(m, (xj @ srows[s0 : s0 + sel_block].T).max(axis=1), out=m)
    return out


def facility_objective(emb: np.ndarray, selected, block: int = 4096) -> float:
    """sum_j max_{i in S} max(0, cos(i, j)) over all n rows j (selected rows count 1 each): the dense FL value."""
    m = max_cos_to_selected(emb, selected, block)
    return float(np.maximum(m, 0.0).sum(dtype=np.float64))


def kcenter_radius(emb: np.ndarray, selected, block: int = 4096) -> float:
    """max_j min_{i in S} (1 - cos(i, j)): the worst-covered row's cosine distance to its nearest pick (inf if S = {})."""
    m = max_cos_to_selected(emb, selected, block)
    return float(1.0 - m.min()) if len(m) else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Anchors (run in the child; each imports its package lazily)
# ---------------------------------------------------------------------------------------------------------------


def _dense_sim(x: np.ndarray, dtype, block: int = 2048) -> np.ndarray:
    """max(0, x x^T) as an n x n matrix of ``dtype`` (the shared similarity, dense), filled in row blocks.

    One ``x @ x.T`` of 50k x 50k float32 segfaulted inside numpy/OpenBLAS under RLIMIT_AS = 16 GiB (signal 11,
    VmSize ~10 GiB, faulthandler: this line); row blocks into a preallocated matrix run (66 s at 50k on 2 cores)
    and allocate nothing beyond the n x n result.
    """
    xs = x.astype(dtype, copy=False)
    n = len(xs)
    s = np.empty((n, n), dtype=dtype)
    for i in range(0, n, block):
        rows = s[i : i + block]
        np.matmul(xs[i : i + block], xs.T, out=rows)
        np.maximum(rows, 0, out=rows)
    return s


def _knn_sim(x: np.ndarray, knn: int, dtype):
    """Exact kNN graph as csr (n x n): row i holds max(0, cos) to i's knn nearest rows (itself included)."""
    import faiss
    from scipy.sparse import csr_matrix

    n = len(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nbrs = index.search(x, knn)
    sims = np.maximum(sims, 0).astype(dtype)
    indptr = np.arange(0, n * knn + 1, knn, dtype=np.int64)
    return csr_matrix((sims.ravel(), nbrs.ravel().astype(np.int32), indptr), shape=(n, n))


def run_apricot(x: np.ndarray, k: int, knn: int = 0, **_) -> dict:
    import apricot

    t0 = time.perf_counter()
    if knn == 0:
        s = _dense_sim(x, np.float64)
    else:
        # apricot's gain for candidate i sums over the columns of row i (row i = "what i covers"); the kNN objective
        # sum_j max_{i in S, i in kNN(j)} s_ij needs row i = the j that have i among their neighbours: the transpose.
        # Untransposed, apricot optimises a different function (1,854 vs 2,258 at n=3000, k=100, knn=50).
        # submodlib's sparse mode gives the same answer either way, so it gets the graph as built.
        s = _knn_sim(x, knn, np.float64).T.tocsr()
    t1 = time.perf_counter()
    sel = apricot.FacilityLocationSelection(k, metric="precomputed", optimizer="lazy", verbose=False).fit(s)
    t2 = time.perf_counter()
    return {
        "selected": [int(i) for i in sel.ranking],
        "gains": [float(g) for g in sel.gains],
        "seconds_similarity": t1 - t0,
        "seconds": t2 - t0,
        "config": {
            "metric": "precomputed",
            "optimizer": "lazy",
            "similarity": "max(0,cos) float64",
            "knn": knn,
            "apricot": _version("apricot-select"),
        },
    }


def run_submodlib(x: np.ndarray, k: int, knn: int = 0, **_) -> dict:
    from submodlib import FacilityLocationFunction

    n = len(x)
    t0 = time.perf_counter()
    if knn == 0:
        s = _dense_sim(x, np.float32)
        t1 = time.perf_counter()
        f = FacilityLocationFunction(n=n, mode="dense", sijs=s, separate_rep=False)
    else:
        s = _knn_sim(x, knn, np.float64)
        t1 = time.perf_counter()
        f = FacilityLocationFunction(n=n, mode="sparse", sijs=s, num_neighbors=knn)
    res = f.maximize(
        budget=k, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False, show_progress=False
    )
    t2 = time.perf_counter()
    return {
        "selected": [int(i) for i, _ in res],
        "gains": [float(g) for _, g in res],
        "seconds_similarity": t1 - t0,
        "seconds": t2 - t0,
        "config": {
            "mode": "dense" if knn == 0 else "sparse",
            "optimizer": "LazyGreedy",
            "similarity": "max(0,cos) float32" if knn == 0 else "max(0,cos) kNN float64",
            "knn": knn,
            "submodlib": _version("submodlib-py"),
        },
    }


class _NoEncoder:
    """Stand-in for SemHash's model: the self_* methods never encode; anything that tries fails loudly."""

    def encode(self, inputs, **kwargs):
        raise RuntimeError("select_anchors: SemHash tried to encode; only precomputed embeddings are allowed")


def run_semhash(
    x: np.ndarray, k: int, candidate_limit: str = "auto", strategy: str = "mmr", diversity: float = 0.5, **_
) -> dict:
    from semhash import SemHash
    from semhash.utils import compute_candidate_limit

    n = len(x)
    records = [str(i) for i in range(n)]  # unique strings: no exact-duplicate folding, record -> row id
    t0 = time.perf_counter()
    sh = SemHash.from_embeddings(embeddings=x, records=records, model=_NoEncoder())
    t1 = time.perf_counter()
    auto = compute_candidate_limit(total=n, selection_size=k)
    if candidate_limit == "auto":
        limit = max(auto, min(k, n))  # auto caps at 1000 candidates; below k SemHash would return < k rows
    elif candidate_limit == "all":
        limit = n
    else:
        limit = int(candidate_limit)
    res = sh.self_find_representative(selection_size=k, candidate_limit=limit, diversity=diversity, strategy=strategy)
    t2 = time.perf_counter()
    return {
        "selected": [int(r) for r in res.selected],
        "gains": None,
        "seconds_similarity": t1 - t0,
        "seconds": t2 - t0,
        "config": {
            "method": "self_find_representative",
            "strategy": strategy,
            "diversity": diversity,
            "candidate_limit": limit,
            "auto_candidate_limit": auto,
            "ann_backend": "usearch",
            "similarity": "cos (usearch 'cos' for density; raw cos in MMR; max(0,cos) in COVER)",
            "semhash": _version("semhash"),
        },
    }


RUNNERS = {"apricot": run_apricot, "submodlib": run_submodlib, "semhash": run_semhash}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "missing"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(a: argparse.Namespace) -> int:
    """Runs one anchor under the memory cap and writes a raw result JSON to ``a.out``."""
    cap = int(a.mem_gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    res: dict = {"error": None}
    try:
        t0 = time.perf_counter()
        x = np.ascontiguousarray(np.load(a.emb, mmap_mode="r"), dtype=np.float32)
        runner = RUNNERS[a.anchor]
        if a.anchor == "apricot":
            import apricot  # noqa: F401  (import + numba setup timed apart from the run)
        elif a.anchor == "submodlib":
            import submodlib  # noqa: F401
        else:
            import semhash  # noqa: F401
        res["seconds_import"] = time.perf_counter() - t0
        res["rss_before_mib"] = _rss_mib()
        res.update(runner(x, a.k, knn=a.knn, candidate_limit=a.candidate_limit, strategy=a.strategy))
    except MemoryError as e:
        res["error"] = f"MemoryError under RLIMIT_AS={a.mem_gib:g} GiB: {e}"
    except Exception as e:  # noqa: BLE001 - an anchor crash is a result to record, not a benchmark failure
        res["error"] = f"{type(e).__name__}: {e}"
    res["child_peak_rss_mib"] = _rss_mib()
    Path(a.out).write_text(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent: one anchor in a capped, timed child; then the yardsticks
# ---------------------------------------------------------------------------------------------------------------


def run_anchor(
    emb_path: str | Path,
    k: int,
    anchor: str,
    knn: int = 0,
    candidate_limit: str = "auto",
    strategy: str = "mmr",
    mem_gib: float = 16.0,
    timeout: float = 600.0,
    python: str | None = None,
    score: bool = True,
) -> dict:
    """Run ``anchor`` on ``emb_path`` in a child of ``python`` (default ``ANCHOR_PYTHON``; the CLI passes its own
    interpreter) and return the result dict. Safe to call from winnow's own venv: only numpy is needed here.
    """
    if anchor not in ANCHORS:
        raise ValueError(f"--anchor must be one of {', '.join(ANCHORS)}; got {anchor!r}")
    python = python or ANCHOR_PYTHON
    emb_path = str(emb_path)
    with tempfile.TemporaryDirectory(prefix="select_anchor_") as tmp:
        raw = Path(tmp) / "raw.json"
        err = Path(tmp) / "stderr.txt"
        cmd = [
            python,
            str(Path(__file__).resolve()),
            "--_child",
            "--emb",
            emb_path,
            "--k",
            str(k),
            "--anchor",
            anchor,
            "--out",
            str(raw),
            "--knn",
            str(knn),
            "--candidate-limit",
            candidate_limit,
            "--strategy",
            strategy,
            "--mem-gib",
            str(mem_gib),
        ]
        t0 = time.perf_counter()
        with open(err, "w") as ferr:
            p = subprocess.Popen(cmd, stdout=ferr, stderr=subprocess.STDOUT, start_new_session=True)
        status, ru, timed_out = None, None, False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(p.pid, signal.SIGKILL)  # the child's own session: only what we started
                _, status, ru = os.wait4(p.pid, 0)
                timed_out = True
                break
            time.sleep(0.1)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen from waiting again
        wall = time.perf_counter() - t0
        have_raw = raw.exists()
        res = json.loads(raw.read_text()) if have_raw else {}
        tail = err.read_text()[-2000:].strip()
    res.setdefault("error", None)
    if timed_out:
        res["error"] = f"timeout after {timeout:g} s (killed)"
    elif not have_raw or p.returncode != 0:
        why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        res["error"] = res.get("error") or f"{why}; last output: {tail[-600:]}"
    x = np.load(emb_path, mmap_mode="r")
    out = {
        "anchor": anchor,
        "n": int(x.shape[0]),
        "d": int(x.shape[1]),
        "k": k,
        "knn": knn,
        "wall_seconds": wall,
        "peak_rss_mib": ru.ru_maxrss / 1024,  # the child's own peak (wait4), imports and input included
        "mem_cap_gib": mem_gib,
        **{
            key: res.get(key)
            for key in ("seconds", "seconds_similarity", "seconds_import", "rss_before_mib", "config", "error")
        },
        "selected": res.get("selected"),
    }
    gains = res.get("gains")
    out["anchor_objective"] = float(np.sum(gains)) if gains else None
    if score and out["selected"]:
        t = time.perf_counter()
        out["n_selected"] = len(out["selected"])
        out["n_unique"] = len(set(out["selected"]))
        m = max_cos_to_selected(x, out["selected"])
        out["facility_objective"] = float(np.maximum(m, 0.0).sum(dtype=np.float64))
        out["facility_objective_per_row"] = out["facility_objective"] / out["n"]
        out["kcenter_radius"] = float(1.0 - m.min())
        out["seconds_scoring"] = time.perf_counter() - t
    return out


def summary(r: dict) -> dict:
    """The result without the index list (for printing)."""
    return {k: v for k, v in r.items() if k != "selected"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emb", required=True, help="(n, d) .npy of L2-normalised rows")
    ap.add_argument("--k", type=int, required=True, help="rows to select")
    ap.add_argument("--anchor", required=True, choices=ANCHORS)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--knn", type=int, default=0, help="apricot/submodlib: kNN graph size (0 = dense n x n)")
    ap.add_argument(
        "--candidate-limit",
        default="auto",
        help="semhash: candidate pool ('auto' = SemHash's, raised to k; 'all' = n; or a number)",
    )
    ap.add_argument("--strategy", default="mmr", help="semhash: pyversity strategy (mmr, cover, dpp, msd, ssd)")
    ap.add_argument("--mem-gib", type=float, default=16.0, help="RLIMIT_AS of the anchor process, GiB")
    ap.add_argument("--timeout", type=float, default=600.0, help="wall-clock limit of the anchor process, s")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        return _child(a)
    r = run_anchor(
        a.emb,
        a.k,
        a.anchor,
        knn=a.knn,
        candidate_limit=a.candidate_limit,
        strategy=a.strategy,
        mem_gib=a.mem_gib,
        timeout=a.timeout,
        python=sys.executable,
    )
    Path(a.out).write_text(json.dumps(r))
    print(json.dumps(summary(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
