"""The outputs selection, training and Ray join on: unique ids, the user's columns untouched, every column of every
shard in selected.parquet, each row of selected.jsonl exactly as it was read."""

import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import Config, SelectConfig
from engine.run.local import score
from engine.select.selection import select


def _cfg():
    c = Config()
    c.run.workers = 1
    c.embed.embedder = "static"
    c.loss.enabled = "off"
    return c


def _scores(out):
    return pl.concat(
        [pl.read_parquet(f) for f in sorted((out / "scores").glob("part-*.parquet"))], how="diagonal_relaxed"
    )


def _all(budget="1.0"):
    return SelectConfig(method="random", budget=budget)


def test_ids_are_unique_across_shards_that_share_source_ids_and_names(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        rows = [
            {"id": i, "instruction": f"question number {i} about {sub}", "output": f"answer {i}"} for i in range(30)
        ]
        (tmp_path / sub / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a byte-identical copy under another name: its rows are exact duplicates of a's, never the same ids
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.jsonl").write_bytes((tmp_path / "a" / "train.jsonl").read_bytes())
    out = tmp_path / "run"
    m = score([str(tmp_path / d) for d in ("a", "b", "c")], out, _cfg())
    df = _scores(out)
    assert m["rows_in"] == 90 and df["id"].n_unique() == 90
    assert sorted(df["orig_id"].unique().to_list()) == list(range(30))  # the source's own id, kept aside
    dup = df.filter(pl.col("duplicate_of").is_not_null())
    assert dup.height == 30 and (dup["duplicate_of"] != dup["id"]).all()
    assert set(dup["duplicate_of"]) <= set(df.filter(pl.col("verdict") == "kept")["id"])
    # ids are stable across a rerun into another folder
    score([str(tmp_path / d) for d in ("a", "b", "c")], tmp_path / "run2", _cfg())
    assert _scores(tmp_path / "run2")["id"].to_list() == df["id"].to_list()


def test_user_columns_named_like_score_columns_keep_their_values(tmp_path):
    user = {
        "n_words": -7,
        "embedding": "my own",
        "content_hash": "h",
        "prompt_chars": "pc",
        "response_chars": 0.5,
        "minhash_cluster": "m",
        "frac_dup_line": [1, 2],
        "label_quality": "lq",
        "label_issue": "li",
        "verdict": "mine",
        "source": "web",
        "orig_source": "older",
    }
    topics = [
        "volcanoes",
        "jazz history",
        "tax law",
        "bread baking",
        "chess openings",
        "coral reefs",
        "rail travel",
        "bee keeping",
        "glass blowing",
        "tide pools",
        "kite design",
        "moon phases",
    ]
    answers = [
        "Lava rises when pressure builds.",
        "It began in New Orleans clubs.",
        "Deductions lower taxable income.",
        "Yeast needs warmth and time.",
        "Control the centre early.",
        "Warm seas bleach them.",
        "Night trains save hotel costs.",
        "Hives need dry shelter.",
        "The furnace runs very hot.",
        "Crabs hide under rocks.",
        "Longer tails add stability.",
        "A cycle lasts about 29 days.",
    ]
    lines = [
        json.dumps({"instruction": f"Tell me something about {t}", "output": a, **user})
        for t, a in zip(topics, answers)
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    score([str(tmp_path / "in.jsonl")], out, _cfg())
    df = _scores(out)
    for k, v in user.items():
        assert df[f"orig_{k}" if k != "orig_source" else "orig_orig_source"].to_list() == [v] * 12, k
    assert df["verdict"].to_list() == ["kept"] * 12 and df["n_words"].min() > 0
    sel = tmp_path / "sel"
    select(out, sel, _all())
    got = (sel / "selected.jsonl").read_text().splitlines()
    assert got == lines  # each row exactly as read: the user's n_words, verdict, source ...


def test_selected_parquet_has_every_shards_columns_and_jsonl_is_exact(tmp_path):
    alpaca = [json.dumps({"instruction": f"alpaca task {i} in words", "output": f"done {i} well"}) for i in range(10)]
    chat = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"chat question {i} here"},
                    {"role": "assistant", "content": f"chat answer {i} there"},
                ],
                "tag": i,
            }
        )
        for i in range(40)
    ]
    (tmp_path / "a_alpaca.jsonl").write_text("\n".join(alpaca) + "\n")
    # CRLF line ends and a BOM-free chat shard: lines are copied byte for byte, line ends normalised to \n
    (tmp_path / "b_chat.jsonl").write_text("\n".join(chat) + "\n")
    out = tmp_path / "run"
    score([str(tmp_path)], out, _cfg())
    sel = tmp_path / "sel"
    m = select(out, sel, _all())
    assert m["selected"] == 50 and m["jsonl_rebuilt_from_scores"] == []
    t = pq.read_table(sel / "selected.parquet")
    assert t.num_rows == 50 and {"messages", "tag", "instruction", "output"} <= set(t.column_names)
    msgs = t.column("messages").to_pylist()
    assert sum(m is not None for m in msgs) == 40
    assert (sel / "selected.jsonl").read_text().splitlines() == alpaca + chat
    # an input that changed since scoring: its rows are rebuilt from the scored columns, and the manifest says so
    (tmp_path / "a_alpaca.jsonl").write_text("\n".join(alpaca[:3]) + "\n")
    m = select(out, tmp_path / "sel2", _all())
    assert m["jsonl_rebuilt_from_scores"] == [str(tmp_path / "a_alpaca.jsonl")]
    rebuilt = [json.loads(x) for x in (tmp_path / "sel2" / "selected.jsonl").read_text().splitlines()[:10]]
    assert rebuilt == [json.loads(x) for x in alpaca]


def test_parquet_rows_come_back_under_their_own_names(tmp_path):
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "music",
        "garden",
        "window",
        "letter",
        "orange",
        "silver",
        "market",
        "forest",
        "candle",
        "pocket",
    ]
    texts = [" ".join(words[(i * k) % len(words)] for k in (1, 3, 5, 7, 11)) + f" {i}" for i in range(20)]
    t = pa.table(
        {
            "text": texts,
            "label": [i % 3 for i in range(20)],
            "id": [f"u{i}" for i in range(20)],
            "n_words": list(range(20)),
        }
    )
    pq.write_table(t, tmp_path / "cls.parquet")
    out = tmp_path / "run"
    score([str(tmp_path / "cls.parquet")], out, _cfg())
    select(out, tmp_path / "sel", _all())
    got = [json.loads(x) for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert got == t.to_pylist()


def test_map_id_uses_the_users_ids_and_a_repeat_names_both_rows(tmp_path):
    import pytest

    from engine.errors import UserError

    rows = [
        {"uid": f"k{i}", "instruction": f"distinct question {i} " + "x" * i, "output": f"reply {i}"} for i in range(8)
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg()
    cfg.read.map = {"prompt": "instruction", "response": "output", "id": "uid"}
    score([str(tmp_path / "a.jsonl")], tmp_path / "run", cfg)
    assert sorted(_scores(tmp_path / "run")["id"]) == sorted(r["uid"] for r in rows)
    (tmp_path / "b.jsonl").write_text(json.dumps({**rows[0], "output": "other"}) + "\n")
    with pytest.raises(UserError, match=r"id 'k0' repeats \(a.jsonl line 1 and b.jsonl line 1"):
        score([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tmp_path / "run2", cfg)
