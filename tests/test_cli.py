import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "cli.py", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = cli("run", "--out", out, "--quiet", "--workers", "1")
    assert r.returncode == 0, r.stderr
    return out


def test_demo_end_to_end_finds_the_planted_truth(demo_run):
    m = json.loads((demo_run / "manifest.json").read_text())
    truth = json.loads((demo_run / "demo" / "truth.json").read_text())
    assert sum(m["verdicts"].values()) == m["rows_in"]
    df = pl.concat(
        [pl.read_parquet(f) for f in sorted((demo_run / "scores").glob("part-*.parquet"))], how="diagonal_relaxed"
    )
    assert df.height == m["rows_in"]
    df = df.with_columns(pl.col("source").str.split("/").list.last().alias("file"))
    verdict = {(f, r): v for f, r, v in df.select("file", "row", "verdict").iter_rows()}
    ids = {(f, r): i for f, r, i in df.select("file", "row", "id").iter_rows()}
    dup_of = {(f, r): d for f, r, d in df.select("file", "row", "duplicate_of").iter_rows()}
    for (f, r), (sf, sr) in truth["exact_duplicate_of"]:
        assert verdict[(f, r)] == "exact_duplicate", (f, r)
        # duplicate_of names the first copy (the planted source, or an earlier planted copy of it)
        assert dup_of[(f, r)] in {ids[(sf, sr)]} | {ids[tuple(k)] for k, _ in truth["exact_duplicate_of"]}
    for f, r in truth["empty_response"]:
        assert verdict[(f, r)] == "empty_response"
    for f, r in truth["response_equals_prompt"]:
        assert verdict[(f, r)] == "response_equals_prompt"
    for cat, v in (
        ("refusal", "refusal"),
        ("truncated", "truncated"),
        ("repetition", "gopher_repetition"),
        ("placeholder", "placeholder"),
    ):
        got = [verdict[tuple(k)] for k in truth[cat]]
        assert got and set(got) == {v}, (cat, got)
    assert sorted(k for k, v in verdict.items() if v == "malformed") == sorted(map(tuple, truth["malformed"]))
    cluster = {(f, r): c for f, r, c in df.select("file", "row", "minhash_cluster").iter_rows()}
    kept_per_cluster = df.filter(pl.col("verdict") == "kept").group_by("minhash_cluster").len()
    kept_per_cluster = dict(kept_per_cluster.iter_rows())
    for (f, r), (sf, sr) in truth["near_duplicate_of"]:
        # the planted copy and its source share a cluster with exactly one survivor (the better of the two)
        assert cluster[(f, r)] == cluster[(sf, sr)] is not None, (f, r)
        assert kept_per_cluster[cluster[(f, r)]] == 1
        assert {verdict[(f, r)], verdict[(sf, sr)]} == {"kept", "near_duplicate"}
    for f, r in truth["contaminated"]:
        assert verdict[(f, r)] in ("contaminated", "exact_duplicate"), (f, r)
    assert m["contamination"] == {"eval_prompts": sum(1 for v in verdict.values() if v == "contaminated")}
    found = {k for k, v in verdict.items() if v == "exact_duplicate"}
    planted = set(map(tuple, truth["exact_duplicate"]))
    junk = {tuple(x) for c in ("refusal", "placeholder") for x in truth[c]}
    assert planted <= found and found - planted <= junk  # junk rows may collide among themselves (same refusal)
    sel = json.loads((demo_run / "selected" / "manifest.json").read_text())
    assert sel["selected"] == int(0.2 * m["verdicts"]["kept"])


def test_selected_jsonl_is_in_the_input_format(demo_run):
    lines = (demo_run / "selected" / "selected.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    sel = pq.read_table(demo_run / "selected" / "selected.parquet")
    assert len(recs) == sel.num_rows > 0
    assert set(sel.column("verdict").to_pylist()) == {"kept"}
    kinds = {tuple(sorted(r)) for r in recs}
    assert ("input", "instruction", "output") in kinds  # alpaca rows as alpaca
    assert ("id", "messages") in kinds  # chat rows as chat
    assert ("label", "label_name", "text") in kinds  # classification rows as classification
    assert all(isinstance(r["label"], int) for r in recs if "label" in r)


def test_select_topk_and_token_budget(demo_run, tmp_path):
    r = cli("select", demo_run, "--out", tmp_path / "top", "--score", "response_chars", "--budget", "50", "-q")
    assert r.returncode == 0, r.stderr
    top = pq.read_table(tmp_path / "top" / "selected.parquet").column("response_chars").to_pylist()
    allk = pl.concat(
        [pl.read_parquet(f) for f in (demo_run / "scores").glob("part-*.parquet")], how="diagonal_relaxed"
    ).filter(pl.col("verdict") == "kept")
    assert len(top) == 50 and min(top) >= sorted(allk["response_chars"].to_list())[-50]
    r = cli("select", demo_run, "--out", tmp_path / "tok", "--budget", "tokens:20000", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert 0 < m["tokens_selected"] <= 20000
    r1 = cli("select", demo_run, "--out", tmp_path / "r1", "--budget", "10%", "--seed", "3", "-q")
    r2 = cli("select", demo_run, "--out", tmp_path / "r2", "--budget", "0.1", "--seed", "3", "-q")
    assert r1.returncode == r2.returncode == 0
    a = pq.read_table(tmp_path / "r1" / "selected.parquet").column("id").to_pylist()
    b = pq.read_table(tmp_path / "r2" / "selected.parquet").column("id").to_pylist()
    assert a == b and len(a) == int(0.1 * len(allk))


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    r = cli("score", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "nope.jsonl: no such file" in r.stderr
    assert "Traceback" not in r.stderr
    pq.write_table(pa.table({"text": ["x"] * 2000}), tmp_path / "c.parquet")
    data = (tmp_path / "c.parquet").read_bytes()
    (tmp_path / "c.parquet").write_bytes(data[:100])
    r = cli("score", tmp_path / "c.parquet", "--out", tmp_path / "o")
    assert r.returncode == 2 and "c.parquet: not a readable Parquet file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "e.jsonl").write_text("")
    r = cli("score", tmp_path / "e.jsonl", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no rows" in r.stderr
    (tmp_path / "q.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    r = cli("score", tmp_path / "q.jsonl", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--map" in r.stderr
    r = cli("score", tmp_path / "q.jsonl", "--out", tmp_path / "o", "--map", "prompt=question,response=answer", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("select", tmp_path / "o", "--out", tmp_path / "s", "--budget", "lots")
    assert r.returncode == 2 and "--budget lots" in r.stderr
    r = cli("select", tmp_path / "o", "--out", tmp_path / "s", "--score", "nonexistent")
    assert r.returncode == 2 and "no such column" in r.stderr


def test_help_on_every_subcommand():
    for sub in ("score", "select", "run", "inspect"):
        r = cli(sub, "--help")
        assert r.returncode == 0 and "usage" in r.stdout
    assert (
        "(default: 32768; -1 = no limit)" in cli("score", "--help").stdout.replace("\n", " ").replace("  ", " ")
        or "-1 = no limit" in cli("score", "--help").stdout
    )


def test_split_keeps_clusters_together(demo_run, tmp_path):
    r = cli("split", demo_run, "--to", tmp_path / "sp", "--fractions", "0.8,0.1,0.1", "-q")
    assert r.returncode == 0, r.stderr
    parts = {n: pl.read_parquet(tmp_path / "sp" / f"{n}.parquet") for n in ("train", "val", "test")}
    kept = json.loads((demo_run / "manifest.json").read_text())["verdicts"]["kept"]
    assert sum(p.height for p in parts.values()) == kept
    clusters = [set(p["minhash_cluster"].drop_nulls().to_list()) for p in parts.values()]
    assert not (clusters[0] & clusters[1]) and not (clusters[0] & clusters[2]) and not (clusters[1] & clusters[2])
    assert parts["train"].height > parts["val"].height > 0
    r = cli("split", demo_run, "--fractions", "0.5,0.6,0.1")
    assert r.returncode == 2 and "summing to 1" in r.stderr
