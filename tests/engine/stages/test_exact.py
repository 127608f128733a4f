"""Exact dedup and label conflicts: planted groups of copies, one survivor or none, every row accounted for."""

import numpy as np
import polars as pl
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.run.context import MemoryContext
from engine.stages.exact import ExactDedup, ExactDedupConfig, content_hash


def _table(texts, labels=None, verdicts=None, shards=None):
    n = len(texts)
    prompt = pa.array([""] * n, pa.large_string())
    response = pa.array(texts, pa.large_string())
    cols = {
        "id": pa.array([f"r{i}" for i in range(n)], pa.large_string()),
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "content_hash": pa.array(content_hash(prompt, response), pa.uint64()),
        "verdict": pa.array(verdicts or ["kept"] * n, pa.large_string()),
    }
    if labels is not None:
        cols["label"] = pa.array(labels, pa.large_string())
    if shards is not None:
        cols["_shard"] = pa.array(shards, pa.int32())
    return pa.table(cols)


def _verdicts(texts, labels=None, verdicts=None, cfg=None, shards=None):
    """(verdict, duplicate_of, detail) per row after exact dedup, plus the stage's stats."""
    ctx = MemoryContext(_table(texts, labels, verdicts, shards))
    st_ = ExactDedup(cfg)
    upd = st_.run(ctx)
    n = len(texts)
    v = list(verdicts or ["kept"] * n)
    dup, det = [None] * n, [None] * n
    if upd is not None:
        for r in upd.iter_rows(named=True):
            if v[r["row"]] == "kept":
                v[r["row"]], dup[r["row"]], det[r["row"]] = r["verdict"], r["duplicate_of"], r["detail"]
    return v, dup, det, st_.stats


def test_planted_groups():
    texts = ["alpha"] * 3 + ["beta"] * 3 + ["gamma"] * 2 + ["delta"] * 4 + ["eps"] * 2 + ["zeta"] + ["eta"] * 3
    labels = (
        ["pos", "pos", "pos"]  # same label: plain exact duplicates
        + ["neg", "pos", "neg"]  # strict majority neg (2 of 3): r3 kept, r5 duplicate, r4 conflict
        + ["pos", "neg"]  # tie: both label_conflict, nothing kept
        + ["a", "a", "b", "c"]  # a holds 2 of 4: not more than half, all four label_conflict
        + [None, None]  # unlabelled copies: plain exact duplicates
        + ["pos"]  # no copy
        + [None, "pos", "neg"]
    )  # labelled copies disagree 1:1 (the unlabelled row has no vote): all conflict
    v, dup, det, stats = _verdicts(texts, labels)
    assert v[:3] == ["kept", "exact_duplicate", "exact_duplicate"] and dup[1:3] == ["r0", "r0"]
    assert v[3:6] == ["kept", "label_conflict", "exact_duplicate"] and dup[4:6] == ["r3", "r3"]
    assert det[4] == "label pos against the majority label neg (kept: r3); others: r3=neg, r5=neg"
    assert v[6:8] == ["label_conflict"] * 2 and dup[6:8] == [None, None]
    assert det[6] == "label pos: no label held by more than half of the 2 copies; others: r7=neg"
    assert v[8:12] == ["label_conflict"] * 4 and dup[8:12] == [None] * 4
    assert v[12:14] == ["kept", "exact_duplicate"] and dup[13] == "r12"
    assert v[14] == "kept"
    assert v[15:18] == ["label_conflict"] * 3 and "r15=(none)" in det[16]
    assert stats == {
        "exact_duplicate": 4,
        "label_conflict": 10,
        "label_conflict_groups": 4,
        "clusters_with_duplicates": 6,
    }
    # conservation: every row has exactly one verdict; a group keeps at most one row
    assert len(v) == len(texts)
    for t in set(texts):
        assert sum(1 for i, x in enumerate(texts) if x == t and v[i] == "kept") <= 1


def test_without_labels_first_copy_kept_across_shards():
    texts = ["one", "two", "one", "two", "three"]
    v, dup, _det, _ = _verdicts(texts, shards=[0, 0, 1, 1, 1])
    assert v == ["kept", "kept", "exact_duplicate", "exact_duplicate", "kept"] and dup[2:4] == ["r0", "r1"]


def test_rejected_rows_take_no_part():
    # r0 was rejected earlier: the group is r1 (pos) vs r2 (neg), a tie; r0's label has no vote
    texts = ["same text"] * 3
    v, dup, _det, _ = _verdicts(texts, ["pos", "pos", "neg"], ["too_short", "kept", "kept"])
    assert v == ["too_short", "label_conflict", "label_conflict"] and dup == [None, None, None]


def test_detail_is_capped():
    texts = ["same"] * 12
    labels = ["a"] * 6 + ["b"] * 6
    v, _dup, det, _ = _verdicts(texts, labels, cfg=ExactDedupConfig(conflict_detail_rows=3))
    assert v == ["label_conflict"] * 12
    assert det[0] == "label a: no label held by more than half of the 12 copies; others: r1=a, r2=a, r3=a (+8 more)"
    assert det[11].endswith("others: r0=a, r1=a, r2=a (+8 more)")


def test_label_is_not_part_of_the_hash():
    p = pa.array(["", ""], pa.large_string())
    r = pa.array(["the same text", "the same text"], pa.large_string())
    h = content_hash(p, r)
    assert h[0] == h[1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["a", "b", "c", None])), min_size=1, max_size=40))
def test_property_majority_rule(rows):
    """Per group: kept row exists iff no two labels or a strict majority; it carries the majority label; the other
    rows are exact duplicates (same label or none) or label conflicts (another label) of it."""
    texts = [f"text {g}" for g, _ in rows]
    labels = [lab for _, lab in rows]
    v, dup, _det, _ = _verdicts(texts, labels)
    assert set(v) <= {"kept", "exact_duplicate", "label_conflict"}
    for g in {g for g, _ in rows}:
        idx = [i for i, (h, _) in enumerate(rows) if h == g]
        labs = [labels[i] for i in idx if labels[i] is not None]
        counts = {x: labs.count(x) for x in set(labs)}
        win = [x for x, c in counts.items() if 2 * c > len(labs)]
        kept = [i for i in idx if v[i] == "kept"]
        if len(counts) <= 1:
            assert kept == [idx[0]]
            assert all(v[i] == "exact_duplicate" and dup[i] == f"r{idx[0]}" for i in idx[1:])
        elif win:
            k = next(i for i in idx if labels[i] == win[0])
            assert kept == [k]
            for i in idx:
                if i != k:
                    want = "exact_duplicate" if labels[i] in (None, win[0]) else "label_conflict"
                    assert v[i] == want and dup[i] == f"r{k}"
        else:
            assert kept == [] and all(v[i] == "label_conflict" and dup[i] is None for i in idx)


def test_classification_run_flags_label_conflicts(tmp_path):
    """Through the runner: classification rows (text + label) are compared on the text; the same text with another
    label is a label_conflict, not a second kept row."""
    import pyarrow.parquet as pq

    import engine.run.local as runner
    from engine.config import Config

    texts = [
        "the service was quick and the staff were friendly today",
        "the service was quick and the staff were friendly today",
        "the service was quick and the staff were friendly today",
        "i waited an hour and nobody answered the phone at all",
        "i waited an hour and nobody answered the phone at all",
        "prices went up again this month and i am not happy",
    ]
    labels = [1, 1, 0, 0, 1, 0]
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "cls.parquet")
    cfg = Config()
    cfg.run.workers = 1
    cfg.embed.embedder = "none"
    m = runner.score([str(tmp_path / "cls.parquet")], tmp_path / "out", cfg)
    df = pl.read_parquet(tmp_path / "out" / "scores" / "*.parquet").sort("row")
    assert df["format"].unique().to_list() == ["classification"]
    assert df["response"][0] == texts[0] and df["prompt"][0] == ""
    v = df["verdict"].to_list()
    assert v[:3] == ["kept", "exact_duplicate", "label_conflict"]
    assert v[3:5] == ["label_conflict", "label_conflict"]
    assert v[5] == "kept"
    assert df["duplicate_of"][2] == df["id"][0]
    assert m["verdicts"]["label_conflict"] == 3 and sum(m["verdicts"].values()) == len(texts)
