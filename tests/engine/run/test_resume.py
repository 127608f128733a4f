"""Resume that cannot go stale: one embedder per run folder, model fingerprints from the weights."""

import json

import polars as pl
import pyarrow.parquet as pq

from engine.config import Config
from engine.models.fingerprint import fingerprint
from engine.run.local import score


def _rows(tag, n):
    return "".join(
        json.dumps({"instruction": f"{tag} question {i} " + "word " * (i % 7), "output": f"answer {tag} {i}"}) + "\n"
        for i in range(n)
    )


def _dims(out):
    dims = set()
    for f in sorted((out / "scores").glob("part-*.parquet")):
        t = pq.read_table(f, columns=["embedding"])
        dims.add(t.schema.field("embedding").type.list_size)
    return dims


def test_a_grown_corpus_keeps_the_embedder_auto_chose_first(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(_rows("a", 30))
    out = tmp_path / "run"
    cfg = Config()
    cfg.run.workers = 1
    cfg.embed.auto_cpu_max_rows = 50  # 30 rows: MiniLM; 30 + 80 rows: auto would now pick the static tier
    cfg.loss.enabled = "off"
    m1 = score([str(tmp_path / "in")], out, cfg)
    assert m1["resolved"]["embed"]["choice"] == "minilm"
    (tmp_path / "in" / "b.jsonl").write_text(_rows("b", 80))
    cfg2 = Config()
    cfg2.run.workers = 1
    cfg2.embed.auto_cpu_max_rows = 50
    cfg2.loss.enabled = "off"
    m2 = score([str(tmp_path / "in")], out, cfg2)
    emb = m2["resolved"]["embed"]
    assert emb["choice"] == "minilm" and emb["kept_earlier_choice"] and "auto would now choose static" in emb["reason"]
    assert m2["timings"]["shards_reused"] == 1 and _dims(out) == {384}
    # an explicit choice wins and re-embeds every shard: one model in the run folder, never two
    cfg3 = Config()
    cfg3.run.workers = 1
    cfg3.embed.embedder = "static"
    cfg3.loss.enabled = "off"
    m3 = score([str(tmp_path / "in")], out, cfg3)
    assert m3["timings"]["shards_reused"] == 0 and _dims(out) == {256}
    df = pl.read_parquet(out / "scores" / "*.parquet")
    assert df.height == 110 and df["id"].n_unique() == 110


def test_fingerprint_follows_the_weights_not_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\x00" * 1000)
    (model / "README.md").write_text("docs do not shape outputs")
    a = fingerprint(model)
    assert a.startswith("xxh3_128:") and fingerprint(model) == a
    assert json.loads((tmp_path / "cache" / "file_hashes.json").read_text())  # hashed once, cached by size+mtime
    (model / "README.md").write_text("other docs")
    assert fingerprint(model) == a
    (model / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 999)
    assert fingerprint(model) != a
    assert fingerprint(tmp_path / "missing") == ""


def test_new_weights_at_the_same_path_redo_the_shards(tmp_path, monkeypatch):
    """The embed section (with the weights' fingerprint) is in the resume key."""
    from engine.stages import embed as embed_stage

    (tmp_path / "a.jsonl").write_text(_rows("a", 10))
    calls = iter(["xxh3_128:" + "0" * 32, "xxh3_128:" + "0" * 32, "xxh3_128:" + "1" * 32])
    monkeypatch.setattr("engine.models.fingerprint.fingerprint", lambda path, cache_dir="": next(calls))
    seen = []
    for _ in range(3):
        cfg = Config()
        cfg.run.workers = 1
        cfg.embed.embedder = "static"
        cfg.loss.enabled = "off"
        seen.append(score([str(tmp_path / "a.jsonl")], tmp_path / "run", cfg)["timings"]["shards_reused"])
    assert seen == [0, 1, 0]
    assert embed_stage.model_path("minilm").endswith("model")
