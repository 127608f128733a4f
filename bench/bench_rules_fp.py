"""False positives and recall of the short-text junk rules (engine/stages/clean.py: no_content, placeholder,
repeated_words, random_letters) on the real shared datasets.

    .venv/bin/python bench/bench_rules_fp.py                  # every dataset in ../shared/data, and the planted pool
    .venv/bin/python bench/bench_rules_fp.py --show 10        # also print up to 10 rejected rows per rule and dataset
    .venv/bin/python bench/bench_rules_fp.py --derive-table   # print kernels/text_stats.py's _BIGRAM_TABLE

Rows go through what the runner runs before them (engine/io/schema.py ``canonicalize``, NormalizeStage, RulesStage)
and then CleanStage, with the default configuration. Instruction sets (``instruction`` + ``output``) are alpaca rows,
TweetEval and Financial PhraseBank classification rows (judged on their text); alpaca_eval is judged on its GPT-4
answers and the prompt-only evaluation sets (ifeval, mt_bench, vicuna_bench, eval_prompts_koala_lima_wizardlm) on
their prompts, as ``text`` rows: human-written text the rules must not reject either. Per dataset: rows, the rows
each new rule rejects (the first rejecting reason wins, as in a run; the junk rules run first in the clean stage, so
they see every row the basic rules kept) and their share, and the share of rows any rule rejects (context).
``placeholder`` existed before issue 9; its count is all of it, old alternatives included.

Planted pool: ``--pool-rows`` junk rows (a quarter each: random letters, one word or a 2-3 word unit repeated, empty /
whitespace / punctuation only, placeholder text; 1..200 words, log-uniform so that short texts, the hard case, are
45% of them; ``--lengths uniform`` for uniform) mixed into ``--pool-base`` (default
financial_phrasebank, as classification rows: no prompt, so no exemption applies). Recall: junk rows rejected, and
rejected with their kind's reason; the base rows' rejections in the pool are listed too.

Prints a table, then one JSON object last; appends to bench/results.csv. Without ../shared/data it prints
``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json

STR = pa.large_string()
NEW_RULES = ("no_content", "placeholder", "repeated_words", "random_letters")
# the columns of the table: placeholder9 = rows rejected as placeholder by an alternative issue 9 added
COLUMNS = ("no_content", "placeholder9", "repeated_words", "random_letters")
# the reasons a planted junk row of each kind may get (empty ones are the basic rules' before the clean stage)
EXPECTED = {
    "random_letters": {"random_letters"},
    "repeated_words": {"repeated_words"},
    "empty": {"empty_text", "empty_response", "no_content"},
    "placeholder": {"placeholder"},
}
PROMPT_ONLY = ("ifeval", "mt_bench", "vicuna_bench", "eval_prompts_koala_lima_wizardlm")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED_DATA), help="folder of the shared datasets (default: ../shared/data)")
    p.add_argument("--show", type=int, default=0, help="print up to N rejected rows per new rule and dataset")
    p.add_argument("--pool-base", default="financial_phrasebank", help="real set the planted junk is mixed into")
    p.add_argument("--pool-rows", type=int, default=2000, help="planted junk rows (default: 2000)")
    p.add_argument("--lengths", choices=["log", "uniform"], default="log",
                   help="planted rows' word counts on 1..200: log-uniform (default; 45%% have under 10 words) or "
                        "uniform")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the planted pool (default: 0)")
    p.add_argument("--derive-table", action="store_true", help="print the letter-bigram table literal and exit")
    p.add_argument("--no-csv", action="store_true", help="do not append to bench/results.csv")
    return p.parse_args(argv)


# ---- the letter-bigram table -------------------------------------------------------------------------------------
def derive_table(data: Path) -> str:
    """kernels/text_stats.py ``_BIGRAM_TABLE`` from alpaca_52k and t0_train_50k (see the comment there)."""
    from kernels.text_stats import latin_words_reference

    shares = []
    for name in ("alpaca_52k", "t0_train_50k"):
        table = pq.read_table(data / name / "train.parquet", columns=["instruction", "input", "output"])
        counts = np.zeros((26, 26), dtype=np.int64)
        for col in table.column_names:
            for text in table.column(col).to_pylist():
                for w in latin_words_reference(text or ""):
                    low = w.lower()
                    for a, b in itertools.pairwise(low):
                        if a != b:
                            counts[ord(a) - 97, ord(b) - 97] += 1
        shares.append(counts / counts.sum())
    p = (shares[0] + shares[1]) / 2
    with np.errstate(divide="ignore"):
        score = np.clip(np.round(np.log2(650 * p)), -8, 4)
    score[p == 0] = -8
    np.fill_diagonal(score, -8)  # never looked up: a letter equal to the one before it is skipped
    rows = ["".join(chr(ord("a") + int(v) + 8) for v in r) for r in score]
    return "\n".join(f'    "{r}"  # {chr(97 + i)}' for i, r in enumerate(rows))


# ---- datasets ----------------------------------------------------------------------------------------------------
def dataset_batches(folder: Path, batch_rows: int = 8192):
    """Canonical record batches of one dataset folder (every split), before any stage."""
    from engine.io.readers import discover, read_shard
    from engine.io.schema import canonicalize

    name = folder.name
    shards, _ = discover([str(folder)])
    for sh in shards:
        cols = pq.ParquetFile(sh.path).schema_arrow.names
        for b in read_shard(sh, batch_rows):
            if name in PROMPT_ONLY:  # judge the human-written prompt as a text row
                b = b.append_column("text", b.column("instruction"))
                yield canonicalize(b, "text", sh.path, None, name)
            elif name == "alpaca_eval":
                m = {"prompt": "instruction", "response": "output_gpt4_1106_preview"}
                yield canonicalize(b, "mapped", sh.path, m, name)
            elif "output" in cols:
                yield canonicalize(b, "alpaca", sh.path, None, name)
            elif "text" in cols and "label" in cols:
                yield canonicalize(b, "classification", sh.path, None, name)


class Pipeline:
    """normalize -> rules -> clean, as the runner folds them (the stages' own counters are not used)."""

    def __init__(self):
        from engine.stages.clean import CleanStage
        from engine.stages.normalize import NormalizeStage
        from engine.stages.rules import RulesStage

        self.stages = [NormalizeStage(), RulesStage(), CleanStage()]
        self.seconds = 0.0

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for s in self.stages:
            t = time.process_time()
            batch = s.process(batch)
            self.seconds += time.process_time() - t
        return batch


def measure(pipe: Pipeline, folder: Path, show: int) -> dict:
    from engine.stages.clean import PLACEHOLDER_ISSUE9, PLACEHOLDER_TODO

    issue9 = rf"(?i)^\s*(?:{PLACEHOLDER_ISSUE9})\.?\s*$|{PLACEHOLDER_TODO}"
    verdicts: collections.Counter = collections.Counter()
    shown = collections.defaultdict(list)
    placeholder9 = 0
    for b in dataset_batches(folder):
        out = pipe(b)
        v = np.array(out.column("verdict").to_pylist(), dtype=object)
        verdicts.update(v.tolist())
        new9 = (v == "placeholder") & pc.fill_null(pc.match_substring_regex(out.column("response"), issue9),
                                                    False).to_numpy(zero_copy_only=False)  # fmt: skip
        placeholder9 += int(new9.sum())
        if show:
            col = np.where(new9, "placeholder9", v)
            for i in np.flatnonzero(np.isin(col, COLUMNS)):
                if len(shown[col[i]]) < show:
                    shown[col[i]].append((out.column("response")[i].as_py(), out.column("detail")[i].as_py(),
                                          out.column("prompt")[i].as_py()))  # fmt: skip
    rows = sum(verdicts.values())
    new = {r: verdicts.get(r, 0) for r in NEW_RULES} | {"placeholder9": placeholder9}
    return {
        "rows": rows,
        "new": new,
        "new_rate": sum(new[r] for r in COLUMNS) / max(rows, 1),
        "all_rate": (rows - verdicts.get("kept", 0)) / max(rows, 1),
        "verdicts": dict(verdicts),
        "shown": dict(shown),
    }


# ---- planted pool ------------------------------------------------------------------------------------------------
PLACEHOLDERS = ["N/A", "TODO", "TBD", "test test", "Testing, testing, 1 2 3", "<noinput>", "[insert answer here]",
                "Your answer here", "TODO: write the answer", "暂无", "asdf", "foo bar", "blah blah blah", "dummy text",
                "<text goes here>", "n/a.", "FIXME: fill in later", "测试测试", "placeholder"]  # fmt: skip
LOREM = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
         "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua"]  # fmt: skip
WORDS = ["Checking", "hello", "good", "lol", "buy now", "click here", "great", "yes", "spam", "ok ok", "the end",
         "free money now", "subscribe", "wow", "no", "A", "meow", "好", "la", "again and again"]  # fmt: skip
PUNCT = [".", "...", "!!!", "?", "???", "-", "--", "*", "#", "…", "。", "！", "•", "—", "()", "[]", '""', ",", ";"]


def plant(kind: str, n_words: int, rng: random.Random) -> str:
    if kind == "random_letters":
        case = rng.choice(["lower"] * 6 + ["title"] * 2 + ["upper", "mixed"])
        if rng.random() < 0.1:  # no spaces: one long token
            words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 12) * n_words))]
        else:
            words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))
                     for _ in range(n_words)]  # fmt: skip
        if case == "title":
            words = [w.capitalize() for w in words]
        elif case == "upper":
            words = [w.upper() for w in words]
        elif case == "mixed":
            words = ["".join(ch.upper() if rng.random() < 0.5 else ch for ch in w) for w in words]
        return " ".join(words)
    if kind == "repeated_words":
        unit = rng.choice(WORDS).split()
        reps = max(3, -(-n_words // len(unit)))  # at least three times
        sep = rng.choice([" ", " ", ", ", "! ", "\n", ". "])
        out = sep.join(" ".join(unit) for _ in range(reps))
        return out.upper() if rng.random() < 0.1 else out
    if kind == "empty":
        r = rng.random()
        if r < 0.2:
            return ""
        if r < 0.4:
            return rng.choice([" ", "  ", "\n", "\t \n", "\u3000"])
        return " ".join(rng.choice(PUNCT) for _ in range(n_words))
    if kind == "placeholder":
        if rng.random() < 0.5:  # lorem ipsum text of n words
            return " ".join(LOREM[i % len(LOREM)] for i in range(max(2, n_words))).capitalize() + "."
        return rng.choice(PLACEHOLDERS)
    raise ValueError(kind)


def pool(pipe: Pipeline, data: Path, base: str, n_junk: int, seed: int, lengths: str = "log") -> dict:
    rng = random.Random(seed)
    kinds = list(EXPECTED)

    def n_words() -> int:
        return rng.randint(1, 200) if lengths == "uniform" else min(200, int(np.exp(rng.uniform(0, np.log(201)))))

    junk = [(kinds[i % len(kinds)], n_words()) for i in range(n_junk)]
    real = pa.concat_tables([pa.Table.from_batches([b]) for b in dataset_batches(data / base)])
    fmt = real.column("format")[0].as_py() if real.num_rows else "classification"
    if fmt != "classification":
        raise SystemExit(f"--pool-base {base}: pick a classification set (its rows are judged on their text alone)")
    texts = real.column("response").to_pylist()
    texts += [plant(k, nw, rng) for k, nw in junk]
    order = list(range(len(texts)))
    rng.shuffle(order)
    with tempfile.TemporaryDirectory() as tmp:  # through the reader, as a run reads a shard
        path = Path(tmp) / "pool.parquet"
        pq.write_table(pa.table({"text": pa.array([texts[i] for i in order], STR),
                                 "label": pa.array([rng.randint(0, 2) for _ in order], pa.int64())}), path)  # fmt: skip
        out = pa.concat_tables(pa.Table.from_batches([pipe(b)]) for b in dataset_batches(Path(tmp)))
    verdict = out.column("verdict").to_pylist()
    n_real = real.num_rows
    per_kind = {k: {"rows": 0, "rejected": 0, "with_reason": 0} for k in kinds}
    by_len = collections.defaultdict(lambda: [0, 0])
    missed = []
    base_rejected = collections.Counter()
    for pos, i in enumerate(order):
        v = verdict[pos]
        if i < n_real:
            if v != "kept":
                base_rejected[v] += 1
            continue
        kind, nw = junk[i - n_real]
        st = per_kind[kind]
        st["rows"] += 1
        st["rejected"] += v != "kept"
        st["with_reason"] += v in EXPECTED[kind]
        bucket = "1" if nw == 1 else "2-3" if nw <= 3 else "4-9" if nw <= 9 else "10-49" if nw <= 49 else "50-200"
        by_len[(kind, bucket)][0] += 1
        by_len[(kind, bucket)][1] += v in EXPECTED[kind]
        if v not in EXPECTED[kind] and len(missed) < 20:
            missed.append((kind, v, texts[i][:80]))
    total = sum(s["rows"] for s in per_kind.values())
    return {
        "base": base,
        "base_rows": n_real,
        "junk_rows": total,
        "recall": sum(s["rejected"] for s in per_kind.values()) / max(total, 1),
        "recall_with_reason": sum(s["with_reason"] for s in per_kind.values()) / max(total, 1),
        "per_kind": per_kind,
        "by_length": {f"{k}:{b}": f"{h}/{n}" for (k, b), (n, h) in sorted(by_len.items())},
        "missed": missed,
        "base_rejected": dict(base_rejected),
    }


def main(argv=None) -> dict:
    args = _args(argv)
    data = Path(args.data)
    if not data.is_dir():
        result = {
            "op": "rules_fp",
            "skipped": f"{data} is absent: the false-positive measurement needs the shared sets",
        }
        print_json(result)
        return result
    if args.derive_table:
        print(derive_table(data))
        return {}
    pipe = Pipeline()
    per = {}
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and any(p.glob("*.parquet"))):
        per[folder.name] = measure(pipe, folder, args.show)
    head = (f"{'dataset':34s} {'rows':>7s} " + " ".join(f"{r:>14s}" for r in COLUMNS)
            + f" {'new %':>7s} {'placeholder':>11s} {'all %':>7s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, m in per.items():
        cells = " ".join(f"{m['new'][r]:>14d}" for r in COLUMNS)
        print(
            f"{name:34s} {m['rows']:>7d} {cells} {100 * m['new_rate']:>7.3f} {m['new']['placeholder']:>11d} "
            f"{100 * m['all_rate']:>7.3f}"
        )
    print("\nall rejections by verdict (context):")
    for name, m in per.items():
        top = sorted(((k, v) for k, v in m["verdicts"].items() if k != "kept"), key=lambda kv: -kv[1])
        print(f"  {name:34s} " + ", ".join(f"{k} {v}" for k, v in top))
    if args.show:
        for name, m in per.items():
            for rule, rows in m["shown"].items():
                for resp, detail, prompt in rows:
                    print(f"[{name}] {rule}: {resp[:90]!r} ({detail}) <= {(prompt or '')[-70:]!r}")
    pl = (
        pool(pipe, data, args.pool_base, args.pool_rows, args.seed, args.lengths)
        if (data / args.pool_base).is_dir()
        else None
    )
    if pl:
        print(
            f"\nplanted pool: {pl['junk_rows']} junk rows in {pl['base_rows']} {pl['base']} rows: recall "
            f"{pl['recall']:.4f}, with the kind's reason {pl['recall_with_reason']:.4f}"
        )
        for k, s in pl["per_kind"].items():
            print(f"  {k:15s} {s['with_reason']}/{s['rows']} with reason, {s['rejected']}/{s['rows']} rejected")
        print("  by length (with reason):", pl["by_length"])
        print("  base rows rejected in the pool:", pl["base_rejected"])
        for m in pl["missed"]:
            print("  missed:", m)
    worst = max(per.items(), key=lambda kv: kv[1]["new_rate"])
    rows = sum(m["rows"] for m in per.values())
    result = {
        "op": "rules_fp",
        "datasets": len(per),
        "rows": rows,
        "max_new_rate": round(worst[1]["new_rate"], 6),
        "max_new_rate_dataset": worst[0],
        "target_max_new_rate": 0.005,
        "new_rejected": {r: sum(m["new"][r] for m in per.values()) for r in COLUMNS},
        "all_rejected_rate": round(sum(m["all_rate"] * m["rows"] for m in per.values()) / max(rows, 1), 5),
        "pool_recall": round(pl["recall"], 4) if pl else None,
        "pool_recall_with_reason": round(pl["recall_with_reason"], 4) if pl else None,
        "target_recall": 0.95,
        "stage_cpu_s": round(pipe.seconds, 2),
    }
    if not args.no_csv:
        append_result("rules_fp", "clean_short_text_rules", rows, "max_new_rule_rate", float(result["max_new_rate"]))
        if pl:
            append_result("rules_fp", "clean_short_text_rules", pl["junk_rows"], "planted_recall", float(pl["recall"]))
    print_json(result)
    return result


if __name__ == "__main__":
    main()
