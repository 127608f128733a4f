import json

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Config
from engine.run.local import score


def _cfg():
    c = Config()
    c.run.workers = 1
    return c


def _scores(out):
    return pl.concat(
        [pl.read_parquet(f) for f in sorted((out / "scores").glob("part-*.parquet"))], how="diagonal_relaxed"
    )


GOOD = st.builds(
    lambda i, o: json.dumps({"instruction": f"question {i}", "input": "", "output": o}),
    st.integers(0, 30),
    st.sampled_from(["an answer", "another answer", "", "  spaced  answer "]),
)
BAD = st.sampled_from(
    [
        '{"instruction": "broken',
        json.dumps({"instruction": "n", "output": 7}),
        json.dumps({"instruction": "no output"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"instruction": "x", "output": {"nested": True}}),
        "",
    ]
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(GOOD, BAD), min_size=1, max_size=60), block=st.sampled_from([64, 256, 1 << 20]))
def test_every_row_is_accounted_for(tmp_path_factory, lines, block):
    """Conservation: the verdicts sum to rows_in, which counts every non-blank line read."""
    d = tmp_path_factory.mktemp("prop")
    (d / "in.jsonl").write_text("\n".join(lines) + "\n")
    expected = sum(1 for line in lines if line.strip())
    cfg = _cfg()
    cfg.read.jsonl_block_bytes = block
    if expected == 0:
        from engine.errors import UserError

        with pytest.raises(UserError, match="no rows"):
            score([str(d / "in.jsonl")], d / "out", cfg)
        return
    m = score([str(d / "in.jsonl")], d / "out", cfg)
    assert m["rows_in"] == expected
    assert sum(m["verdicts"].values()) == expected
    df = _scores(d / "out")
    assert df.height == expected
    assert df["row"].n_unique() == expected


def test_exact_duplicates_across_shards_keep_the_first(tmp_path):
    a = [
        {"instruction": "q1", "output": "a1"},
        {"instruction": "q2", "output": "a2"},
        {"instruction": "q1", "output": "a1  "},
    ]
    b = [{"instruction": "q2", "output": "a2"}, {"instruction": "q3", "output": "a3"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    m = score([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tmp_path / "out", _cfg())
    assert m["verdicts"] == {"kept": 3, "exact_duplicate": 2}
    df = _scores(tmp_path / "out").sort(["source", "row"])
    ids = df["id"].to_list()
    assert df["verdict"].to_list() == ["kept", "kept", "exact_duplicate", "exact_duplicate", "kept"]
    assert df["duplicate_of"].to_list() == [None, None, ids[0], ids[1], None]


def test_normalisation_and_rules(tmp_path):
    rows = [
        {"instruction": "Caf\u0065\u0301?", "output": "Yes\r\nit is\u00a0open   \n\n\n\nbye\u200b"},
        {"instruction": "Echo me", "output": "Echo me"},
        {"instruction": "Empty", "output": "   "},
        {"instruction": "", "output": "orphan answer"},
    ]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg()
    score([str(tmp_path / "n.jsonl")], tmp_path / "out", cfg)
    df = _scores(tmp_path / "out").sort("row")
    assert df["prompt"][0] == "Caf\u00e9?"  # NFC
    assert df["response"][0] == "Yes\nit is open\n\nbye"
    assert df["output"][0] == rows[0]["output"]  # the input's own column is untouched
    assert df["verdict"].to_list() == ["kept", "response_equals_prompt", "empty_response", "empty_prompt"]


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    for s in range(4):
        rows = [{"instruction": f"s{s} q{i}", "output": f"answer {i}"} for i in range(50)]
        (tmp_path / f"s{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = [str(tmp_path / f"s{s}.jsonl") for s in range(4)]
    monkeypatch.setenv("WINNOW_CRASH_AFTER_SHARDS", "2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        score(inputs, tmp_path / "out", _cfg())
    assert len(list((tmp_path / "out" / "work" / "map").glob("done-*.json"))) == 2
    monkeypatch.delenv("WINNOW_CRASH_AFTER_SHARDS")
    m = score(inputs, tmp_path / "out", _cfg())
    assert m["timings"]["shards_reused"] == 2 and m["timings"]["shards_done"] == 2
    assert m["rows_in"] == 200
    resumed = _scores(tmp_path / "out").sort(["source", "row"])
    fresh = score(inputs, tmp_path / "fresh", _cfg())
    assert fresh["verdicts"] == m["verdicts"]
    assert resumed.select("id", "verdict").equals(
        _scores(tmp_path / "fresh").sort(["source", "row"]).select("id", "verdict")
    )
    again = score(inputs, tmp_path / "out", _cfg())
    assert again["timings"]["shards_done"] == 0 and again["rows_in"] == 200


def test_changed_types_mid_file_roll_to_a_new_part(tmp_path):
    lines = [json.dumps({"instruction": f"q{i}", "output": "a", "meta": 1}) for i in range(30)]
    lines += [json.dumps({"instruction": f"r{i}", "output": "b", "meta": "text now"}) for i in range(30)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg()
    cfg.read.jsonl_block_bytes = 500
    m = score([str(tmp_path / "m.jsonl")], tmp_path / "out", cfg)
    assert m["rows_in"] == 60 and m["verdicts"] == {"kept": 60}
    parts = sorted((tmp_path / "out" / "scores").glob("part-*.parquet"))
    assert len(parts) >= 2
    metas = [v for p in parts for v in pq.read_table(p, columns=["meta"]).column(0).to_pylist()]
    assert metas[:30] == [1] * 30 and metas[30:] == ["text now"] * 30


def test_parallel_workers_match_serial(tmp_path):
    for s in range(3):
        rows = [{"instruction": f"q{i % 20}", "output": f"a{i % 20}"} for i in range(40)]
        (tmp_path / f"p{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg()
    serial = score([str(tmp_path)], tmp_path / "serial", cfg)  # a run folder inside the input folder is skipped
    cfg.run.workers = 2
    par = score([str(tmp_path)], tmp_path / "par", cfg)
    assert serial["verdicts"] == par["verdicts"] == {"kept": 20, "exact_duplicate": 100}
