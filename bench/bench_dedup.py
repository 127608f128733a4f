"""MinHash dedup benchmarks: (a) signatures vs datasketch, (b) end to end at scale, (c) accuracy vs brute force.

(a) Signatures including shingling on the same corpus in one process: winnow ``fast`` and ``datasketch``-compatible
    families (Numba, all threads: this machine has 2) against ``datasketch.MinHash.bulk`` (one Python thread) fed
    with Python 5-gram word shingles (``str.lower().split()``) and its default sha1 hash. Corpus: alpaca_52k
    (instruction + input + output) from ../shared/data when present, else generated text. datasketch runs on the
    first ``--ds-docs`` documents (it is ~100x slower); rates are documents per second.
(b) End to end: ``--e2e-docs`` generated documents (~1 KB each, planted exact and near duplicates at known edit
    counts) written as Parquet shards by a child process (not timed, not in this process's RSS), then timed:
    read Parquet batches -> MinHashStage (normalise, shingle, sign, write signatures) -> NearDedup global step
    (band, candidates, verify, union-find, survivors) -> write verdicts as Parquet. Reports wall seconds and
    peak RSS of this process, and recall on the planted pairs.
(c) Accuracy: ``--acc-docs`` real documents plus planted near duplicates with Jaccard spread over [0.5, 1];
    exact Jaccard of every pair by sparse matrix product (brute force); precision / recall of winnow's pairs
    (same cluster) for pairs with J >= 0.8, beside datasketch.MinHashLSH(threshold=0.8, num_perm=128) defaults.

Usage: python bench/bench_dedup.py [--part a,b,c] [--e2e-docs 1000000] [--ds-docs 3000] [--acc-docs 3000]
The last line printed is one JSON object; rows are appended to bench/results.csv.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, peak_rss_mib, print_json

OP = "dedup"


# ----------------------------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------------------------


def real_corpus():
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = SHARED_DATA / "alpaca_52k" / "train.parquet"
    if not path.exists():
        return None
    t = pq.read_table(path)
    L = pa.large_string()
    return pc.binary_join_element_wise(
        t["instruction"].cast(L), t["input"].cast(L), t["output"].cast(L), pa.scalar("\n", L)
    ).combine_chunks()


def _vocab(rng, size=30000):
    lens = np.clip(rng.poisson(4.2, size) + 1, 1, 14)
    letters = rng.integers(97, 123, lens.sum()).astype(np.uint8)
    off = np.zeros(size + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    return letters, off


def _render(word_ids, doc_off, letters, voff):
    """Vectorised: documents of vocabulary words joined by spaces -> Arrow large_string array."""
    import pyarrow as pa

    wl = (voff[1:] - voff[:-1])[word_ids] + 1  # word + space
    out_off = np.zeros(word_ids.size + 1, np.int64)
    np.cumsum(wl, out=out_off[1:])
    total = int(out_off[-1])
    buf = np.full(total, 32, np.uint8)
    # position of each output byte inside the vocabulary buffer, for the word bytes (not the trailing space)
    starts = np.repeat(voff[:-1][word_ids] - out_off[:-1], wl)
    idx = starts + np.arange(total)
    is_space = np.zeros(total, bool)
    is_space[out_off[1:] - 1] = True
    buf[~is_space] = letters[idx[~is_space]]
    doc_bytes = out_off[doc_off]
    return pa.LargeStringArray.from_buffers(
        len(doc_off) - 1, pa.py_buffer(doc_bytes.astype(np.int64)), pa.py_buffer(buf)
    )


def generate(n_docs: int, out_dir: Path, seed: int = 0, shard_docs: int = 50000, id_prefix: str = "d",
             shard_offset: int = 0):
    """Parquet shards of ~1 KB documents: 80% unique, 10% exact copies, 10% near copies with 1..12 word edits
    (5-gram Jaccard to the source ~0.95..0.55 for 170-word documents); truth.npz holds source and edit count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    letters, voff = _vocab(rng)
    zipf = rng.zipf(1.2, 10_000_000) % (voff.size - 1)  # Zipf-ish word frequencies, reused cyclically
    lens = rng.integers(130, 210, n_docs)
    kind = rng.choice(3, n_docs, p=[0.8, 0.1, 0.1])  # 0 unique, 1 exact copy, 2 near copy
    kind[:1000] = 0
    src = np.where(kind > 0, (rng.random(n_docs) * np.arange(n_docs)).astype(np.int64), -1)
    src = np.where(kind > 0, np.minimum(src, np.arange(n_docs) - 1), -1)
    src = np.where((kind > 0) & (src >= 0) & (kind[np.maximum(src, 0)] == 0), src, -1)  # copy only unique docs
    kind = np.where(src < 0, 0, kind)
    lens = np.where(src >= 0, lens[np.maximum(src, 0)], lens)
    edits = np.where(kind == 2, rng.integers(1, 13, n_docs), 0)
    doc_off = np.zeros(n_docs + 1, np.int64)
    np.cumsum(lens, out=doc_off[1:])
    words = zipf[rng.integers(0, zipf.size, int(doc_off[-1]), dtype=np.int32)].astype(np.int32)
    cp = np.flatnonzero(src >= 0)
    # copies take their source's words (sources are unique docs, generated above), then near copies get edits
    for i in cp:
        words[doc_off[i] : doc_off[i + 1]] = words[doc_off[src[i]] : doc_off[src[i] + 1]]
        if edits[i]:
            pos = doc_off[i] + rng.choice(lens[i], edits[i], replace=False)
            words[pos] = rng.integers(0, voff.size - 1, edits[i])
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, lo in enumerate(range(0, n_docs, shard_docs)):
        hi = min(n_docs, lo + shard_docs)
        sub_off = doc_off[lo : hi + 1] - doc_off[lo]
        txt = _render(words[doc_off[lo] : doc_off[hi]], sub_off, letters, voff)
        ids = pa.array([f"{id_prefix}{i}" for i in range(lo, hi)], pa.large_string())
        pq.write_table(pa.table({"id": ids, "text": txt}), out_dir / f"shard-{shard_offset + s:05d}.parquet",
                       compression="none")
    np.savez(out_dir / (f"truth-{id_prefix}.npz" if shard_offset else "truth.npz"), src=src, edits=edits, kind=kind,
             lens=lens)


# ----------------------------------------------------------------------------------------------------------------
# (a) signatures
# ----------------------------------------------------------------------------------------------------------------


def datasketch_signatures(texts: list[str], num_perm: int = 128):
    from datasketch import MinHash

    def shingles(t):
        w = t.lower().split()
        return [" ".join(w[i : i + 5]).encode() for i in range(max(1, len(w) - 4))]

    return MinHash.bulk((shingles(t) for t in texts), num_perm=num_perm)


def part_a(args, out):
    import pyarrow as pa

    from kernels.minhash import minhash, num_threads, permutations

    corpus = real_corpus()
    name = "alpaca_52k"
    if corpus is None:
        name = "generated"
        with tempfile.TemporaryDirectory() as d:
            generate(52000, Path(d))
            import pyarrow.parquet as pq

            corpus = pa.concat_arrays(
                [pq.read_table(p)["text"].combine_chunks() for p in sorted(Path(d).glob("*.parquet"))]
            )
    n = len(corpus)
    nbytes = int(corpus.buffers()[2].size)
    res = {"corpus": name, "docs": n, "mean_bytes": round(nbytes / n, 1), "threads": num_threads()}
    for fam, scheme, label in [
        ("fast", "affine32", "fast"),
        ("datasketch", "affine32", "compat_affine32"),
        ("datasketch", "legacy", "compat_legacy"),
    ]:
        perms = permutations(128, 1, fam, scheme)
        minhash(corpus.slice(0, 200), family=fam, scheme=scheme, perms=perms)  # compile
        best = np.inf
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            minhash(corpus, family=fam, scheme=scheme, perms=perms)
            best = min(best, time.perf_counter() - t0)
        res[f"{label}_docs_s"] = round(n / best)
        res[f"{label}_MB_s"] = round(nbytes / best / 1e6, 1)
    m = min(args.ds_docs, n)
    texts = corpus.slice(0, m).to_pylist()
    t0 = time.perf_counter()
    datasketch_signatures(texts)
    ds = m / (time.perf_counter() - t0)
    res["datasketch_docs_s"] = round(ds)
    res["datasketch_docs"] = m
    for label in ("fast", "compat_affine32", "compat_legacy"):
        res[f"{label}_x_datasketch"] = round(res[f"{label}_docs_s"] / ds, 1)
    dt = datatrove_rate(texts)
    if dt:
        res["datatrove_docs_s"] = round(dt)
    else:
        res["datatrove"] = "skipped: not installed cleanly in /tmp/dtv (see report)"
    for k in ("fast", "compat_affine32", "compat_legacy", "datasketch"):
        append_result(f"{OP}_signatures", k, n if k != "datasketch" else m, "docs_per_s", float(res[f"{k}_docs_s"]))
    out["a"] = res


def datatrove_rate(texts):
    """datatrove's MinhashDedupSignature in a throwaway venv (/tmp/dtv), if it installed; docs/s or None."""
    py = Path("/tmp/dtv/bin/python")
    if not py.exists():
        return None
    code = r"""
import sys, time, tempfile, json
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature, MinhashConfig
texts = json.load(open(sys.argv[1]))
docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
with tempfile.TemporaryDirectory() as d:
    st = MinhashDedupSignature(output_folder=d, config=MinhashConfig(), language="en")
    t0 = time.perf_counter()
    for _ in st.run(iter(docs), rank=0, world_size=1): pass
    print(len(docs) / (time.perf_counter() - t0))
"""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        import json

        json.dump(texts, f)
    try:
        r = subprocess.run([str(py), "-c", code, f.name], capture_output=True, text=True, timeout=600, check=False)
        return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None
    finally:
        os.unlink(f.name)


# ----------------------------------------------------------------------------------------------------------------
# (b) end to end
# ----------------------------------------------------------------------------------------------------------------


def part_b(args, out):
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.stages.dedup import DedupConfig, MinHashStage, NearDedup, load_signatures

    root = Path(args.work or tempfile.mkdtemp(prefix="winnow_bench_dedup_"))
    data = root / f"data_{args.e2e_docs}"
    if not (data / "truth.npz").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(args.e2e_docs), "--work", str(data)], check=True)
        print(f"generated {args.e2e_docs} docs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    shards = sorted(data.glob("shard-*.parquet"))
    work = root / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    cfg = DedupConfig(verify=args.verify)
    stage = MinHashStage(cfg)
    stage.signatures(pa.table({"prompt": ["a b"], "response": ["c d"]}))  # compile outside the timer
    t0 = time.perf_counter()
    c0 = time.process_time()
    n_rows = 0
    nbytes = 0
    shard_col, row_col = [], []
    for s, path in enumerate(shards):
        stage.begin_shard(s, work)
        row0 = 0
        for b in pq.ParquetFile(path).iter_batches(batch_size=args.batch_rows):
            n = b.num_rows
            txt = b.column("text")
            nbytes += txt.buffers()[2].size
            empty = pa.LargeStringArray.from_buffers(n, pa.py_buffer(np.zeros(n + 1, np.int64)), pa.py_buffer(b""))
            canon = pa.record_batch(
                {
                    "id": b.column("id"),
                    "prompt": empty,
                    "response": txt,
                    "row": pa.array(np.arange(row0, row0 + n, dtype=np.int64)),
                }
            )
            stage.process(canon)
            row0 += n
        shard_col.append(np.full(row0, s, np.int32))
        row_col.append(np.arange(row0, dtype=np.int64))
        n_rows += row0
    t_sign = time.perf_counter() - t0
    frame = pl.DataFrame({"_shard": np.concatenate(shard_col), "row": np.concatenate(row_col)}).with_columns(
        pl.lit("kept").alias("verdict")
    )
    t1 = time.perf_counter()
    cur = load_signatures(work / "minhash", with_shingles=args.verify == "exact")
    g = NearDedup(cfg)
    upd = g.apply(cur, frame)
    del cur
    t_global = time.perf_counter() - t1
    t2 = time.perf_counter()
    verdicts = (
        frame.join(upd, on=["_shard", "row"], how="left", suffix="_u")
        .with_columns(pl.coalesce("verdict_u", "verdict").alias("verdict"))
        .drop("verdict_u")
    )
    verdicts.write_parquet(root / "verdicts.parquet")
    t_write = time.perf_counter() - t2
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    load = os.getloadavg()[0]
    # planted truth: ordered by (shard, row) == document index
    truth = np.load(data / "truth.npz")
    vs = verdicts.sort(["_shard", "row"])
    v = vs["verdict"].to_numpy()
    cl = vs["minhash_cluster"].fill_null(-1).to_numpy()
    kind, edits, src = truth["kind"], truth["edits"], truth["src"]
    dup = v == "near_duplicate"
    # planted truth by cluster: a copy is found when it shares its source's cluster (which of the two survives is
    # the quality key's choice: the longer response). Families = a unique doc and its copies.
    family = np.where(src >= 0, src, np.arange(src.size))
    same = (src >= 0) & (cl == cl[np.maximum(src, 0)])
    fam_per_cluster = pl.DataFrame({"cl": cl, "fam": family}).group_by("cl").agg(pl.col("fam").n_unique())
    res = {
        "docs": n_rows,
        "mean_bytes": round(nbytes / n_rows, 1),
        "seconds_total": round(total, 2),
        "seconds_sign": round(t_sign, 2),
        "seconds_global": round(t_global, 2),
        "seconds_write": round(t_write, 2),
        "docs_s": round(n_rows / total),
        "cpu_seconds": round(cpu, 2),
        "loadavg_1min_after": round(load, 2),
        "verify": args.verify,
        "MB_s": round(nbytes / total / 1e6, 1),
        "peak_rss_mib": round(peak_rss_mib()),
        "stats": g.stats,
        "near_duplicate_verdicts": int(dup.sum()),
        "planted_exact_found": f"{int(same[kind == 1].sum())}/{int((kind == 1).sum())}",
        "clusters_merging_unrelated_families": int((fam_per_cluster["fam"] > 1).sum()),
    }
    for lo, hi in ((1, 2), (3, 4), (5, 6), (7, 9), (10, 12)):
        m = (kind == 2) & (edits >= lo) & (edits <= hi)
        res[f"planted_near_{lo}-{hi}_edits_found"] = f"{int(same[m].sum())}/{int(m.sum())}"
    # the Jaccard those edit counts mean, for a sample of planted pairs (exact, from the shingle sets)
    res["planted_jaccard_by_edits"] = planted_jaccard(shards, truth)
    append_result(f"{OP}_e2e", f"winnow_{args.verify}", n_rows, "seconds", float(total))
    append_result(f"{OP}_e2e", f"winnow_{args.verify}", n_rows, "cpu_seconds", float(cpu))
    append_result(f"{OP}_e2e", f"winnow_{args.verify}", n_rows, "peak_rss_mib", float(res["peak_rss_mib"]))
    out["b"] = res


def planted_jaccard(shards, truth, per_bin: int = 200) -> dict[str, float]:
    """Mean exact 5-gram Jaccard between planted near copies and their sources, per edit count (a sample)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kernels.minhash import shingle_hashes

    text = pa.concat_arrays([pq.read_table(p, columns=["text"])["text"].combine_chunks() for p in shards[:2]])
    n = len(text)
    kind, edits, src = truth["kind"][:n], truth["edits"][:n], truth["src"][:n]
    out = {}
    for e in (1, 2, 4, 6, 9, 12):
        idx = np.flatnonzero((kind == 2) & (edits == e))[:per_bin]
        if idx.size == 0:
            continue
        a, ao = shingle_hashes(text.take(pa.array(idx)), unique=True)
        b, bo = shingle_hashes(text.take(pa.array(src[idx])), unique=True)
        js = [
            np.intersect1d(a[ao[k] : ao[k + 1]], b[bo[k] : bo[k + 1]]).size
            / np.union1d(a[ao[k] : ao[k + 1]], b[bo[k] : bo[k + 1]]).size
            for k in range(idx.size)
        ]
        out[str(e)] = round(float(np.mean(js)), 3)
    return out


# ----------------------------------------------------------------------------------------------------------------
# (c) accuracy
# ----------------------------------------------------------------------------------------------------------------


def exact_pairs(texts, threshold: float):
    """All pairs (i < j) with exact shingle-set Jaccard >= threshold, by sparse X @ X.T (brute force over pairs
    sharing at least one shingle), and the Jaccard of every pair with any overlap."""
    import pyarrow as pa
    import scipy.sparse as sp

    from kernels.minhash import shingle_hashes

    vals, off = shingle_hashes(pa.array(texts, pa.large_string()), unique=True)
    _, col = np.unique(vals, return_inverse=True)
    rows = np.repeat(np.arange(len(texts)), np.diff(off))
    x = sp.csr_matrix((np.ones(vals.size, np.int32), (rows, col)), shape=(len(texts), col.max() + 1))
    inter = sp.triu(x @ x.T, k=1).tocoo()
    size = np.diff(off)
    j = inter.data / (size[inter.row] + size[inter.col] - inter.data)
    return inter.row.astype(np.int64), inter.col.astype(np.int64), j


def part_c(args, out):
    import pyarrow as pa
    from datasketch import MinHash, MinHashLSH

    from engine.stages.dedup import DedupConfig, near_duplicate_clusters
    from kernels.minhash import minhash

    rng = np.random.default_rng(1)
    corpus = real_corpus()
    if corpus is None:
        with tempfile.TemporaryDirectory() as d:
            generate(args.acc_docs, Path(d))
            import pyarrow.parquet as pq

            corpus = pq.read_table(next(Path(d).glob("*.parquet")))["text"].combine_chunks()
    pick = rng.choice(len(corpus), min(args.acc_docs, len(corpus)), replace=False)
    base = [corpus[int(i)].as_py() for i in pick]
    base = [t for t in base if len(t.split()) >= 40]  # documents long enough to edit to a target Jaccard
    texts = list(base)
    # planted near duplicates: substitute a fraction of words, Jaccard spread over ~[0.5, 1]
    for t in base[: len(base) // 2]:
        w = t.split()
        k = int(rng.integers(0, max(2, len(w) // 12)))
        for p in rng.choice(len(w), k, replace=False):
            w[p] = f"x{rng.integers(10**6)}"
        texts.append(" ".join(w))
    n = len(texts)
    thr = 0.8
    i, j, jac = exact_pairs(texts, thr)
    true = {(a, b) for a, b, s in zip(i, j, jac) if s >= thr}
    res = {"docs": n, "true_pairs_J>=0.8": len(true), "pairs_J_in_[0.7,0.8)": int(((jac >= 0.7) & (jac < 0.8)).sum())}

    def score(pred):
        tp = len(pred & true)
        return (round(tp / max(1, len(pred)), 4), round(tp / max(1, len(true)), 4))

    arr = pa.array(texts, pa.large_string())
    for verify in ("signature", "exact"):
        cfg = DedupConfig(verify=verify)
        b, r = cfg.bands()
        sig = minhash(arr)
        kw = {}
        if verify == "exact":
            from kernels.minhash import shingle_hashes

            kw["shingles"], kw["shingle_offsets"] = shingle_hashes(arr, unique=True, bits=32)
        surv = near_duplicate_clusters(sig, threshold=thr, num_bands=b, rows_per_band=r, **kw).survivor
        pred = set()
        for c in np.unique(surv[surv >= 0]):
            mem = np.flatnonzero(surv == c)
            pred |= {(int(x), int(y)) for xi, x in enumerate(mem) for y in mem[xi + 1 :]}
        p, rc = score(pred)
        res[f"winnow_{verify}_precision"], res[f"winnow_{verify}_recall"] = p, rc
        append_result(f"{OP}_accuracy", f"winnow_{verify}", n, "precision", p)
        append_result(f"{OP}_accuracy", f"winnow_{verify}", n, "recall", rc)
    # datasketch MinHashLSH with its default parameters, fed our bit-compatible signatures (same shingles)
    dsig = minhash(arr, family="datasketch", scheme="affine32")
    lsh = MinHashLSH(threshold=thr, num_perm=128)
    mhs = [MinHash(num_perm=128, hashvalues=dsig[k], scheme="affine32") for k in range(n)]
    for k, m in enumerate(mhs):
        lsh.insert(k, m)
    pred = set()
    for k, m in enumerate(mhs):
        for q in lsh.query(m):
            if q != k:
                pred.add((min(k, q), max(k, q)))
    p, rc = score(pred)
    res["datasketch_lsh_b_r"] = list(lsh.b_r) if hasattr(lsh, "b_r") else [lsh.b, lsh.r]
    res["datasketch_lsh_precision"], res["datasketch_lsh_recall"] = p, rc
    append_result(f"{OP}_accuracy", "datasketch_lsh", n, "precision", p)
    append_result(f"{OP}_accuracy", "datasketch_lsh", n, "recall", rc)
    out["c"] = res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="a,b,c", help="which parts: a (signatures), b (end to end), c (accuracy)")
    ap.add_argument("--e2e-docs", type=int, default=1_000_000, help="documents for (b) (default 1,000,000)")
    ap.add_argument("--batch-rows", type=int, default=65536, help="rows per Arrow batch in (b)")
    ap.add_argument("--verify", default="signature", help="(b): signature | exact candidate verification")
    ap.add_argument("--ds-docs", type=int, default=3000, help="documents datasketch signs in (a)")
    ap.add_argument("--acc-docs", type=int, default=3000, help="real documents in (c) (plus half as many planted)")
    ap.add_argument("--repeat", type=int, default=2, help="timing repeats in (a) (best is kept)")
    ap.add_argument("--work", default="", help="folder for generated data and the run (default: a temp folder)")
    ap.add_argument("--generate", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(args.generate, Path(args.work))
        return
    out: dict = {"op": OP}
    parts = set(args.part.split(","))
    if "a" in parts:
        part_a(args, out)
    if "c" in parts:
        part_c(args, out)
    if "b" in parts:
        part_b(args, out)
    print_json(out)


if __name__ == "__main__":
    main()
