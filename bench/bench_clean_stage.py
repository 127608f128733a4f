"""The whole clean map stage (``CleanStage.process``): this tree against a pinned earlier commit, same rows, one process.

    .venv/bin/python bench/bench_clean_stage.py                    # 50,000 generated ~1 KB rows, 1 Numba thread
    .venv/bin/python bench/bench_clean_stage.py --source alpaca    # real English instructions (5% non-ASCII rows)
    .venv/bin/python bench/bench_clean_stage.py --profile          # also where the new stage's time goes

Rows: ``--source docs`` reads bench/_data/score/docs_1000000/shard-00000.parquet (column ``text``: ~1 KB generated
documents, format ``text``) or generates such a shard under bench/_data/clean_stage/ when it is absent;
``--source alpaca`` reads ../shared/data/alpaca_52k (format ``alpaca``). Either is read in ``--batch``-row record
batches and canonicalised as the runner does (engine/io/schema.py ``canonicalize``, then NormalizeStage and
RulesStage); those batches are the input of both stages.

The reference is the stage and kernel as of ``--baseline`` (kernels/text_stats.py and engine/stages/clean.py from
git, written under bench/_data/clean_stage/<commit>/ and imported from there, so their Numba cache persists): the
per-code-point kernel for every row and every regex over every row. Both run ``--repeats`` times, interleaved; times
are CPU seconds of this process (``time.process_time``: other jobs share the machine; wall seconds alongside), best
of the repeats. Numba threads are set with ``numba.set_num_threads`` and Arrow's with ``pa.set_cpu_count`` as the
runner does (1 per worker process on 2 cores). Every output column and the stage counters must be identical, or the
script exits non-zero. Prints one JSON object last; appends rows to bench/results.csv.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, SHARED_DATA, append_result, print_json

STR = pa.large_string()
DOCS = ROOT / "bench" / "_data" / "score" / "docs_1000000" / "shard-00000.parquet"
WORK = ROOT / "bench" / "_data" / "clean_stage"
BASELINE = "197179760c4ef079537db21f927dc3667c04fc00"  # the tree before the ASCII path and the split regexes


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["docs", "alpaca"], default="docs", help="rows (default: docs)")
    p.add_argument("--rows", type=int, default=50_000, help="rows (default: 50000; a docs shard holds 50000)")
    p.add_argument("--batch", type=int, default=8192, help="rows per record batch (default: 8192, the runner's)")
    p.add_argument("--threads", type=int, default=1, help="Numba and Arrow threads (default: 1, as in each worker)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved passes per stage, best kept (default: 3)")
    p.add_argument("--baseline", default=BASELINE, help="git commit of the reference stage and kernel")
    p.add_argument("--profile", action="store_true", help="also time the parts of the new stage")
    p.add_argument("--no-csv", action="store_true", help="do not append to bench/results.csv")
    return p.parse_args(argv)


def canonical_batches(source: str, rows: int, batch: int) -> tuple[list[pa.RecordBatch], str]:
    """Record batches as the runner hands them to the clean stage, and the input's format."""
    from engine.io.readers import discover, read_shard
    from engine.io.schema import canonicalize
    from engine.stages.normalize import NormalizeStage
    from engine.stages.rules import RulesStage

    if source == "alpaca":
        path, fmt = SHARED_DATA / "alpaca_52k" / "train.parquet", "alpaca"
    else:
        path, fmt = DOCS, "text"
        if not path.exists():
            path = WORK / "docs" / "shard-00000.parquet"
            if not path.exists():
                from bench.bench_dedup import generate

                generate(max(rows, 1000), path.parent)
    shards, _ = discover([str(path)])
    norm, rules = NormalizeStage(), RulesStage()
    out, have = [], 0
    for b in read_shard(shards[0], batch):
        b = b.slice(0, rows - have)
        out.append(rules.process(norm.process(canonicalize(b, fmt, shards[0].path, None))))
        have += b.num_rows
        if have >= rows:
            break
    return out, fmt


def baseline_stage(commit: str):
    """CleanStage class of ``commit``: its clean.py importing its text_stats.py, both from ``git show``."""
    folder = WORK / commit[:12]
    folder.mkdir(parents=True, exist_ok=True)
    files = {"kernels/text_stats.py": "_baseline_text_stats.py", "engine/stages/clean.py": "_baseline_clean.py"}
    for src, dst in files.items():
        try:
            text = subprocess.run(["git", "show", f"{commit}:{src}"], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"bench_clean_stage: cannot read {src} at commit {commit} ({e}); pass --baseline COMMIT")
        text = text.replace("from kernels.text_stats import", "from _baseline_text_stats import")
        if not (folder / dst).exists() or (folder / dst).read_text() != text:
            (folder / dst).write_text(text)
    sys.path.insert(0, str(folder))
    from engine import registry

    real = registry.register
    registry.register = lambda **kw: lambda cls: cls  # the old class is not a stage of this run
    try:
        return importlib.import_module("_baseline_clean").CleanStage
    finally:
        registry.register = real


def timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def profile(stage, batches) -> dict:
    """CPU seconds of the new stage's parts, by wrapping what process() calls (one pass)."""
    from engine.stages import clean

    spent: dict[str, float] = {}
    saved = {}

    def wrap(owner, name, key):
        fn = getattr(owner, name)
        saved[(owner, name)] = fn

        def inner(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.process_time() - t

        setattr(owner, name, inner)

    wrap(clean, "text_stats", "text_stats kernel")
    wrap(clean, "contains_literals", "contains_literals kernel")
    wrap(clean, "contains_prompt", "contains_prompt kernel")
    wrap(pc, "match_substring_regex", "regex match (RE2)")
    wrap(pc, "extract_regex", "regex extract (details)")
    wrap(type(stage), "_add_signals", "signal columns (numpy -> Arrow)")
    wrap(clean, "reject", "reject (verdict, detail)")
    t = time.process_time()
    for b in batches:
        stage.process(b)
    total = time.process_time() - t
    for (owner, name), fn in saved.items():
        setattr(owner, name, fn)
    spent["other (Arrow compute, numpy)"] = total - sum(spent.values())
    spent["total"] = total
    return {k: round(v, 4) for k, v in spent.items()}


def main(argv=None) -> dict:
    args = _args(argv)
    import numba

    threads = max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    pa.set_cpu_count(threads)
    from engine.stages.clean import CleanStage
    from kernels.text_stats import text_stats

    batches, fmt = canonical_batches(args.source, args.rows, args.batch)
    n = sum(b.num_rows for b in batches)
    nbytes = sum(
        int(pc.sum(pc.binary_length(b.column(c))).as_py() or 0) for b in batches for c in ("prompt", "response")
    )
    ascii_rows = sum(int(pc.sum(pc.string_is_ascii(b.column("response"))).as_py() or 0) for b in batches)
    Old = baseline_stage(args.baseline)
    old_ts = sys.modules["_baseline_text_stats"].text_stats
    old, new = Old(), CleanStage()  # compiles or loads both kernels' caches, outside the timings

    def run(stage):
        return [stage.process(b) for b in batches]

    best = {"old": [1e9, 1e9], "new": [1e9, 1e9]}
    outs = {}
    for _ in range(args.repeats):
        for key, stage in (("old", old), ("new", new)):
            stage.stats = {}
            out, cpu, wall = timed(lambda s=stage: run(s))
            best[key] = [min(best[key][0], cpu), min(best[key][1], wall)]
            outs[key] = (out, dict(stage.stats))
    (o_out, o_stats), (n_out, n_stats) = outs["old"], outs["new"]
    differ = [f"batch {i} column {name}" for i, (a, b) in enumerate(zip(o_out, n_out))
              for name in a.schema.names if not a.column(name).equals(b.column(name))]  # fmt: skip
    if o_out[0].schema.names != n_out[0].schema.names:
        differ.append("column names")
    if o_stats != n_stats:
        differ.append(f"stats {o_stats} vs {n_stats}")

    # the kernel alone on the responses, old and new
    resp = [b.column("response") for b in batches]
    kern = {"old": 1e9, "new": 1e9}
    for _ in range(args.repeats):
        for key, fn in (("old", old_ts), ("new", text_stats)):
            _, cpu, _ = timed(lambda f=fn: [f(r) for r in resp])
            kern[key] = min(kern[key], cpu)

    old_rps, new_rps = n / best["old"][0], n / best["new"][0]
    result = {
        "op": "clean_stage",
        "source": args.source,
        "format": fmt,
        "rows": n,
        "mb": round(nbytes / 1e6, 2),
        "ascii_response_rows": round(ascii_rows / max(n, 1), 4),
        "threads": numba.get_num_threads(),
        "baseline": args.baseline[:12],
        "old_cpu_s": round(best["old"][0], 3),
        "new_cpu_s": round(best["new"][0], 3),
        "old_rows_per_s": round(old_rps),
        "new_rows_per_s": round(new_rps),
        "speedup": round(new_rps / old_rps, 3),
        "speedup_wall": round(best["old"][1] / best["new"][1], 3),
        "kernel_old_cpu_s": round(kern["old"], 3),
        "kernel_new_cpu_s": round(kern["new"], 3),
        "kernel_speedup": round(kern["old"] / kern["new"], 3),
        "identical": not differ,
        "target_speedup": 1.8,
    }
    if args.profile:
        result["profile_new_cpu_s"] = profile(new, batches)
    if not args.no_csv:
        op = f"clean_stage_{args.source}"
        append_result(op, f"baseline_{args.baseline[:7]}", n, "rows_per_s", float(old_rps))
        append_result(op, "numba_ascii_split_regex", n, "rows_per_s", float(new_rps))
        append_result(op, "new_vs_baseline", n, "speedup", float(new_rps / old_rps))
    print_json(result)
    if differ:
        sys.exit(f"outputs differ from the baseline: {differ[:10]}")
    return result


if __name__ == "__main__":
    main()
