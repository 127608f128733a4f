"""Contamination: planted eval overlaps are flagged with set name and row id; clean rows are not."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.stages.contamination import ContaminationConfig, ContaminationStage, eval_set_name
from tests.conftest import SHARED_DATA

EVAL_A = [
    "Explain the difference between a list and a tuple in Python, and give an example of when you would use each one.",
    "Write a haiku about autumn leaves.",
    "Summarize the plot of the novel Moby Dick in three sentences for a middle school student who has not read it.",
]
EVAL_B = ["What is the capital of Australia and why was it chosen over Sydney and Melbourne as the capital city?"]


def _batch(prompts, responses, verdicts=None):
    n = len(prompts)
    return pa.record_batch(
        {
            "id": pa.array([f"t{i}" for i in range(n)], pa.large_string()),
            "prompt": pa.array(prompts, pa.large_string()),
            "response": pa.array(responses, pa.large_string()),
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "verdict": pa.array(verdicts or ["kept"] * n, pa.large_string()),
            "detail": pa.nulls(n, pa.large_string()),
        }
    )


@pytest.fixture
def eval_files(tmp_path):
    a = tmp_path / "setA" / "test.parquet"
    a.parent.mkdir()
    pq.write_table(pa.table({"instruction": EVAL_A, "id": ["a0", "a1", "a2"]}), a)
    b = tmp_path / "setB.jsonl"
    b.write_text("\n".join(json.dumps({"prompt": p}) for p in EVAL_B) + "\n")
    return [str(a), str(b)]


def test_planted_overlaps(eval_files):
    stage = ContaminationStage(ContaminationConfig(against=eval_files))
    prompts = [
        # 13-gram inside a longer prompt (copied eval text with a prefix): set A row a2
        "Please do this: summarize the plot of the novel Moby Dick in three sentences for a middle school student.",
        # reworded short eval prompt: minhash on the prompt (char shingles), set A row a1
        "Write a haiku about autumn leaves!",
        # eval text hidden in the response: 13-gram, set B row 0
        "Tell me a fact.",
        # clean rows
        "Write a poem about the sea.",
        "Explain tuples.",
        # already rejected: not re-judged
        "Write a haiku about autumn leaves.",
    ]
    responses = [
        "Ahab hunts the whale.",
        "Red and gold drift down",
        "Here: what is the capital of Australia and why was it chosen over Sydney and Melbourne as the capital city",
        "The sea is wide.",
        "A tuple is immutable.",
        "x",
    ]
    out = stage.process(_batch(prompts, responses, ["kept"] * 5 + ["too_short"]))
    v = out.column("verdict").to_pylist()
    d = out.column("detail").to_pylist()
    assert v == ["contaminated"] * 3 + ["kept", "kept", "too_short"]
    assert d[0] == "setA:a2 (13-gram)"
    assert d[1].startswith("setA:a1 (minhash J~")
    assert d[2] == "setB:0 (13-gram)"
    assert stage.stats == {"contaminated.setA": 2, "contaminated.setB": 1}


def test_gpt3_adaptive_n(eval_files):
    stage = ContaminationStage(ContaminationConfig(against=eval_files, min_ngram=8, minhash_threshold=0))
    ns = {s.name: s.ngram for s in stage.index.sets}
    assert ns == {"setA": 8, "setB": 13}  # setA's 5th-percentile prompt has 6 words -> clamped to 8
    out = stage.process(_batch(["a list and a tuple in python and give an example of"], ["ok"]))
    assert out.column("detail")[0].as_py() == "setA:a0 (8-gram)"


def test_set_names_and_errors(tmp_path):
    assert eval_set_name(tmp_path / "alpaca_eval" / "test.parquet") == "alpaca_eval"
    assert eval_set_name(tmp_path / "mine.jsonl.gz") == "mine"
    with pytest.raises(ValueError, match="does not exist"):
        ContaminationStage(ContaminationConfig(against=[str(tmp_path / "nope.parquet")]))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"foo": ["x"]}), bad)
    with pytest.raises(ValueError, match="instruction"):
        ContaminationStage(ContaminationConfig(against=[str(bad)]))


def test_no_eval_sets_is_noop():
    b = _batch(["a"], ["b"])
    assert ContaminationStage(ContaminationConfig()).process(b).equals(b)


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_eval").exists(), reason="../shared/data absent")
def test_real_eval_sets_find_known_overlap():
    # alpaca_eval contains the 252 self_instruct_user_oriented prompts (data card): each must hit.
    stage = ContaminationStage(ContaminationConfig(against=[str(SHARED_DATA / "alpaca_eval")]))
    t = pq.read_table(SHARED_DATA / "self_instruct_user_oriented" / "test.parquet")
    prompts = [i + ("\n" + x if x else "") for i, x in zip(t["instruction"].to_pylist(), t["input"].to_pylist())]
    out = stage.process(_batch(prompts, [""] * len(prompts)))
    hit = np.array(out.column("verdict").to_pylist()) == "contaminated"
    assert hit.mean() > 0.95, hit.mean()
    # the prompt alone (input dropped) still hits most rows through the MinHash test
    out = stage.process(_batch(t["instruction"].to_pylist(), [""] * len(prompts)))
    assert (np.array(out.column("verdict").to_pylist()) == "contaminated").mean() > 0.5
