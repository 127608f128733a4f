"""select --label-issues drop: rows flagged label_issue never leave as selected, and --balance proportional keeps the
label mix of the rows that remain."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import SelectConfig
from engine.select.selection import select


def _scores(d, n=300, seed=0, mixed=False, emb=False):
    rng = np.random.default_rng(seed)
    labels = np.array(["a"] * 150 + ["b"] * 90 + ["c"] * 60, dtype=object)
    issue = np.zeros(n, bool)
    issue[rng.choice(np.flatnonzero(labels == "a"), 60, replace=False)] = True  # issues pile up in one class
    if mixed:
        labels[::3] = None  # instruction rows beside the labelled ones
    s = lambda v: pa.array(v, pa.large_string())
    extra = {}
    if emb:
        x = rng.normal(size=(n, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        extra["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel().astype(np.float16)), 16)
    (d / "scores").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": s([f"r-{i}" for i in range(n)]), "prompt": s([""] * n), "response": s([f"text {i}" for i in range(n)]),
        "label": s(labels.tolist()), "source": s(["in.parquet"] * n), "row": pa.array(range(n), pa.int64()),
        "format": s(["classification"] * n), "verdict": s(["kept"] * n),
        "response_chars": pa.array([10] * n, pa.int32()), "prompt_chars": pa.array([0] * n, pa.int32()),
        "label_issue": pa.array(issue), "label_quality": pa.array(rng.random(n)), **extra,
    }), d / "scores" / "part-00000-0000.parquet")  # fmt: skip
    return issue


def test_drop_label_issues_with_proportional_quotas(tmp_path):
    issue = _scores(tmp_path)
    cfg = SelectConfig(method="random", budget="100", balance="proportional", label_issues="drop")
    m = select(tmp_path, tmp_path / "sel", cfg, seed=1)
    assert m["label_issues_dropped"] == 60
    chosen = pq.read_table(tmp_path / "sel" / "selected.parquet", columns=["id"]).column("id").to_pylist()
    flagged = {f"r-{i}" for i in np.flatnonzero(issue)}
    assert len(chosen) == 100 and not flagged & set(chosen)
    assert m["labels_after"] == {"a": 38, "b": 37, "c": 25}  # the mix after the drop: 90/90/60


def test_auto_on_labelled_scores_drops_issues_and_keeps_the_mix(tmp_path):
    issue = _scores(tmp_path)
    m = select(tmp_path, tmp_path / "sel", SelectConfig(method="auto", budget="100"), seed=1)
    chosen = pq.read_table(tmp_path / "sel" / "selected.parquet", columns=["id"]).column("id").to_pylist()
    assert m["label_issues_dropped"] == 60 and m["balance"] == "proportional"
    assert not {f"r-{i}" for i in np.flatnonzero(issue)} & set(chosen)


def test_auto_method_by_labels_and_embeddings(tmp_path):
    # labelled: stratified within proportional quotas (random without embeddings); a mixed corpus (some rows without
    # a label): as for unlabelled rows, facility (topk by quality without embeddings), no quotas
    want = {(False, True): ("stratified", "proportional"), (False, False): ("random", "proportional"),
            (True, True): ("facility", "none"), (True, False): ("topk", "none")}  # fmt: skip
    for (mixed, emb), (method, balance) in want.items():
        d = tmp_path / f"m{int(mixed)}e{int(emb)}"
        _scores(d, mixed=mixed, emb=emb)
        m = select(d, d / "sel", SelectConfig(method="auto", budget="100"), seed=1)
        assert (m["method"], m["balance"], m["selected"]) == (method, balance, 100), (mixed, emb)


def test_keep_is_the_plain_method(tmp_path):
    _scores(tmp_path)
    m = select(tmp_path, tmp_path / "sel", SelectConfig(method="random", budget="100", label_issues="keep"), seed=1)
    assert m["label_issues_dropped"] is None
    saved = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert saved["selected"] == 100
