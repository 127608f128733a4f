"""``select`` end to end on a scored run: only kept rows, the selection columns, the manifest, determinism per seed,
oversampling by repetition, and task relevance."""

import json

import numpy as np
import polars as pl
import pytest

from engine.config import Config, SelectConfig
from engine.errors import UserError
from engine.run.local import score
from engine.select.selection import select

TOPICS = {
    "cooking": [
        "Simmer the onions slowly in butter until golden",
        "Knead the dough and let it rise overnight",
        "Roast the peppers then peel off the skin",
        "Whisk eggs with sugar for a light sponge cake",
    ],
    "code": [
        "Write a Python function that reverses a linked list",
        "Explain recursion with a factorial example",
        "Use a hash map to count word frequencies",
        "Sort the array in place with quicksort",
    ],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sel")
    rows = []
    for topic, stems in TOPICS.items():
        for i in range(40):
            stem = stems[i % len(stems)]
            rows.append(
                {
                    "instruction": f"{stem} (variant {i}, {topic})",
                    "output": f"Answer {i} for {topic}: " + " ".join(f"step{j}{i}" for j in range(5 + i % 7)),
                }
            )
    rows.append({"instruction": "", "output": ""})  # junk: rejected, never selected
    rows.append(dict(rows[0]))  # an exact copy: rejected, never selected
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(0)
    words = [
        "plot",
        "actor",
        "scene",
        "music",
        "ending",
        "camera",
        "script",
        "cast",
        "humour",
        "pace",
        "story",
        "dialogue",
        "costume",
        "sound",
        "light",
        "editing",
        "villain",
        "hero",
        "twist",
        "score",
    ]
    lab = [
        {
            "text": f"the {' '.join(rng.choice(words, 6, replace=False))} was "
            f"{'great' if i % 9 else 'awful'} {' '.join(rng.choice(words, 4, replace=False))}",
            "label": "pos" if i % 9 else "neg",
        }
        for i in range(90)
    ]
    (tmp / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lab))
    (tmp / "target.jsonl").write_text(
        "".join(json.dumps({"instruction": s, "output": "ok"}) + "\n" for s in TOPICS["cooking"])
    )
    cfg = Config()
    cfg.run.workers = 1
    cfg.embed.embedder = "static"
    cfg.loss.enabled = "off"
    out = tmp / "run"
    score([str(tmp / "alpaca.jsonl"), str(tmp / "reviews.jsonl")], out, cfg)
    return tmp, out


def _sel(out, tmp, name, **kw):
    m = select(out, tmp / name, SelectConfig(**kw), seed=kw.pop("seed", 0) if "seed" in kw else 0)
    return m, pl.read_parquet(tmp / name / "selected.parquet")


@pytest.mark.parametrize("method", ["facility", "kcenter", "deita", "topk", "random", "stratified"])
def test_only_kept_rows_with_selection_columns(run, method):
    tmp, out = run
    m, df = _sel(out, tmp, f"s_{method}", method=method, budget="50")
    n = df.height
    # deita refuses rows within tau of an accepted one, so it may return fewer than the budget
    assert m["method"] == method and m["selected"] == n and (n == 50 or (method == "deita" and 0 < n < 50))
    assert (df["verdict"] == "kept").all() and df["id"].n_unique() == n
    assert sorted(df["selection_rank"].to_list()) == list(range(n))
    assert df["quality"].is_between(0, 1).all()
    assert m["quality"] and "labels_before" in m and "sources_after" in m
    lines = (tmp / f"s_{method}" / "selected.jsonl").read_text().splitlines()
    assert len(lines) == n  # the input's own rows, once each
    _again, df2 = _sel(out, tmp, f"s2_{method}", method=method, budget="50")
    assert df2.sort("selection_rank")["id"].to_list() == df.sort("selection_rank")["id"].to_list()


def test_partitions_are_recorded_as_run(run):
    # --partitions 3 runs facility as GreeDi rounds; stratified is linear in the rows and ignores them, and says so
    tmp, out = run
    m, df = _sel(out, tmp, "parts_facility", method="facility", budget="30", partitions=3)
    assert m["partitions"] == 3 and df.height == 30
    m, df = _sel(out, tmp, "parts_stratified", method="stratified", budget="30", partitions=3)
    assert m["partitions"] == 1 and df.height == 30 and m["method_info"]["strata"] >= 3


def test_auto_is_facility_and_topk_with_a_score(run):
    tmp, out = run
    m, _ = _sel(out, tmp, "auto", budget="10")
    assert m["method"] == "facility" and m["objective"] > 0
    m, df = _sel(out, tmp, "auto_topk", budget="10", score="n_words")
    assert m["method"] == "topk"
    assert df.sort("selection_rank")["n_words"].to_list() == sorted(df["n_words"].to_list(), reverse=True)


def test_balance_equal_oversamples_the_small_label(run):
    tmp, out = run
    m, df = _sel(out, tmp, "bal", method="facility", budget="40", balance="equal")
    # labels: '' (instruction rows), neg (about 10 kept), pos (about 80): 14/13/13 quotas; neg is repeated to 13
    assert m["quotas"] == {"": 14, "neg": 13, "pos": 13}
    scores = pl.concat([pl.read_parquet(f, columns=["label", "verdict"]) for f in (out / "scores").glob("*.parquet")])
    n_neg = scores.filter((pl.col("label") == "neg") & (pl.col("verdict") == "kept")).height
    assert 0 < n_neg < 13 and m["oversampled"] == {"neg": {"rows": n_neg, "quota": 13}}
    neg = df.filter(pl.col("label") == "neg")
    assert neg.height == n_neg and neg["selection_repeats"].sum() == 13
    assert m["selected_with_repeats"] == 40
    lines = (tmp / "bal" / "selected.jsonl").read_text().splitlines()
    assert len(lines) == 40 and sum('"neg"' in ln for ln in lines) == 13


def test_source_cap_and_tokens(run):
    tmp, out = run
    m, _df = _sel(out, tmp, "cap", method="facility", budget="60", source_cap="20")
    assert max(m["cap_values_after"].values()) <= 20 and m["selected"] == 40  # two inputs, 20 each
    m, _df = _sel(out, tmp, "tok", method="facility", budget="tokens:300")
    assert m["tokens_selected"] <= 300 and m["budget_kind"] == "tokens"


def test_target_relevance_prefers_the_target_topic(run):
    tmp, out = run
    # 40 cooking rows of 160 candidates: keeping the most relevant 25% must keep exactly them, so every row that topk
    # then picks by quality is a cooking row. (With 30%, 8 other rows join them and may outrank them on quality.)
    m, df = _sel(
        out,
        tmp,
        "tgt",
        method="topk",
        budget="20",
        target=[str(tmp / "target.jsonl")],
        target_mode="restrict",
        target_keep=0.25,
    )
    assert m["relevance"]["target_rows"] == 4 and df["relevance"].is_not_nan().all()
    assert m["relevance"]["restricted_to"] == 40
    cooking = df["prompt"].str.contains("cooking").sum()
    assert cooking == 20, df["prompt"].to_list()


def test_balance_with_a_token_budget_is_a_user_error(run, tmp_path):
    _tmp, out = run
    with pytest.raises(UserError, match="needs a count"):
        select(out, tmp_path / "x", SelectConfig(balance="equal", budget="tokens:100"))
    assert not (tmp_path / "x").exists()


def test_auto_without_embeddings_ranks_by_quality(tmp_path):
    rows = [{"instruction": f"question {i} about topic {i % 7}", "output": "answer " * (1 + i % 9)} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config()
    cfg.run.workers = 1
    cfg.embed.embedder = "none"
    cfg.loss.enabled = "off"
    score([str(tmp_path / "a.jsonl")], tmp_path / "run", cfg)
    m = select(tmp_path / "run", tmp_path / "sel", SelectConfig(budget="5"))
    assert m["method"] == "topk" and m["selected"] == 5
    with pytest.raises(UserError, match="no embedding column"):
        select(tmp_path / "run", tmp_path / "sel2", SelectConfig(method="facility", budget="5"))
