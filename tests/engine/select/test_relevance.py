"""engine/select/relevance.py: task relevance against a target set, by planted truth. The pool holds two topics
generated from templates (cooking vs. programming, in English and in Chinese); the target is held-out rows of one
topic; DSIR and kNN must both rank that topic's candidates above the other's. Target files are read by winnow's own
readers, and a bad one is a one-line UserError naming it."""

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from engine.config import Config
from engine.errors import UserError
from engine.run.local import score
from engine.select import relevance as R
from engine.stages.embed import embedding_text, embeddings_to_numpy

# ---------------------------------------------------------------------------------------------------------------
# Planted topics. Both share the question frame ("how do I", "please explain", "step by step"), so the topics differ
# in their content words only.

_FRAME_Q = ["How do I {v} {o}?", "Please explain how to {v} {o}.", "What is the best way to {v} {o} step by step?",
            "Can you show me how to {v} {o} quickly?"]  # fmt: skip
_FRAME_A = ["First {v} {o}, then {v2} it {m}.", "You should {v} {o} and {v2} it {m}, step by step.",
            "Start to {v} {o}; after that {v2} it {m}."]  # fmt: skip
_TOPICS = {
    "cooking": {
        "v": ["boil", "fry", "bake", "roast", "simmer", "chop", "season", "grill", "whisk", "marinate"],
        "o": ["the potatoes", "fresh pasta", "a chicken breast", "the onions", "garlic bread", "a tomato soup",
           "brown rice", "the salmon fillet", "two eggs", "a beef stew", "the carrots", "pancake batter"],
        "m": ["in olive oil", "with butter and salt", "in a hot oven", "over low heat", "in a cast iron pan",
           "with fresh herbs", "for ten minutes", "until golden"],
    },
    "programming": {
        "v": ["compile", "debug", "refactor", "parse", "serialize", "iterate", "sort", "deploy", "profile", "test"],
        "o": ["a Python list", "the JSON config", "a linked list", "the HTTP request", "a recursive function",
           "the database query", "a binary tree", "the unit tests", "a hash map", "the regex pattern",
           "a C++ class", "the API endpoint"],
        "m": ["with a for loop", "using a lambda", "in the terminal", "with type hints", "in a Docker container",
           "using recursion", "with git bisect", "in O(n log n) time"],
    },
}  # fmt: skip

_ZH = {
    "cooking": {
        "v": ["炒", "煮", "蒸", "烤", "炖", "切", "腌"],
        "o": ["鸡蛋", "土豆", "米饭", "牛肉", "青菜", "面条", "鱼片", "豆腐"],
        "m": ["用大火", "加一点盐和酱油", "放进锅里", "用小火慢慢", "加葱姜蒜"],
    },
    "programming": {
        "v": ["编译", "调试", "重构", "解析", "排序", "部署", "测试"],
        "o": ["这个函数", "数组", "链表", "接口", "数据库查询", "配置文件", "二叉树", "循环变量"],
        "m": ["用递归", "在终端里", "用单元测试", "加类型注解", "在容器里"],
    },
}
_ZH_Q = ["请问怎么{v}{o}？", "能不能一步一步地讲讲如何{v}{o}？", "我想知道{v}{o}的最好方法。"]
_ZH_A = ["先把{o}准备好，然后{m}{v}。", "你可以{m}{v}{o}，一步一步来。", "第一步{m}{v}{o}，最后检查结果。"]


def _rows(topic: str, n: int, seed: int, zh: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    voc = (_ZH if zh else _TOPICS)[topic]
    qs, ans = (_ZH_Q, _ZH_A) if zh else (_FRAME_Q, _FRAME_A)

    def pick(key):
        return voc[key][rng.integers(len(voc[key]))]

    out = []
    for _ in range(n):
        q = qs[rng.integers(len(qs))].format(v=pick("v"), o=pick("o"))
        a = ans[rng.integers(len(ans))].format(v=pick("v"), v2=pick("v"), o=pick("o"), m=pick("m"))
        out.append({"instruction": q, "output": a})
    return out


def _text(r: dict) -> str:
    return r["instruction"] + "\n" + r["output"]


def _pool(n_per_topic=120, zh=False, seed=0):
    """(candidate texts, is_topic_a) with topics interleaved, and held-out topic-A target texts."""
    a = [_text(r) for r in _rows("cooking", n_per_topic, seed, zh)]
    b = [_text(r) for r in _rows("programming", n_per_topic, seed + 1, zh)]
    target = [_text(r) for r in _rows("cooking", 40, seed + 2, zh)]
    texts, truth = [], []
    for x, y in zip(a, b):
        texts += [x, y]
        truth += [1, 0]
    return texts, np.array(truth), target


# ---------------------------------------------------------------------------------------------------------------
# DSIR


@pytest.mark.parametrize("zh", [False, True], ids=["english", "chinese"])
def test_dsir_ranks_the_target_topic_first(zh):
    texts, truth, target = _pool(zh=zh)
    batches = [texts[i : i + 37] for i in range(0, len(texts), 37)]
    s = R.dsir_scores(batches, target, buckets=4096)
    assert s.dtype == np.float32 and s.shape == (len(texts),)
    assert roc_auc_score(truth, s) > 0.9
    # Only the order means something: add-one smoothing over 4,096 buckets puts most of a 40-row target's mass on
    # unseen buckets, so even on-topic rows can have a negative mean log ratio.
    assert s[truth == 1].min() > s[truth == 0].max() if zh else s[truth == 1].mean() > s[truth == 0].mean()
    # the same numbers from one batch, an Arrow chunked array, a factory, and the percentile form
    assert np.array_equal(R.dsir_scores([texts], target, buckets=4096), s)
    chunked = pa.chunked_array([pa.array(b, pa.large_string()) for b in batches])
    assert np.array_equal(R.dsir_scores(chunked, target, buckets=4096), s)
    assert np.array_equal(R.dsir_scores(lambda: iter(batches), target, buckets=4096), s)
    rel = R.relevance("dsir", candidate_texts=batches, target_texts=target, buckets=4096)
    assert rel.dtype == np.float32 and rel.min() == 0 and rel.max() == 1
    assert roc_auc_score(truth, rel) > 0.9


def test_dsir_is_length_normalised_and_matches_its_definition():
    target = ["bake the bread in the oven", "bake a cake in the oven", "roast the potatoes in the oven"]
    once = "bake the bread in a hot oven"
    pool = [once, " ".join([once] * 6), "the code compiles in the terminal", "fix the code", "oven"]
    B = 1 << 12
    s = R.dsir_scores([pool], target, buckets=B)
    # by hand: the reference's totals, add-one smoothed, then the mean log ratio over each text's n-grams
    from kernels.ngram_hash import ngram_totals_reference, ngrams_reference

    tc, rc = ngram_totals_reference(target, B), ngram_totals_reference(pool, B)
    lr = (np.log(tc + 1.0) - np.log(tc.sum() + B)) - (np.log(rc + 1.0) - np.log(rc.sum() + B))
    want = [np.mean([lr[b] for b in ngrams_reference(t, B)]) for t in pool]
    np.testing.assert_allclose(s, want, rtol=1e-5)
    # six copies of a text score about as one copy (the raw sum would be ~6x): length is not relevance
    assert abs(s[1] - s[0]) < 0.1 * abs(s[0])


def test_dsir_needs_re_iterable_candidates_and_a_target():
    with pytest.raises(TypeError, match="twice"):
        R.dsir_scores(iter([["a b"]]), ["a"])
    with pytest.raises(ValueError, match="target set is empty"):
        R.dsir_scores([["a b"]], [])
    flaky = iter([[["a"], ["b"]], [["a"]]])
    with pytest.raises(ValueError, match="same batches"):
        R.dsir_scores(lambda: next(flaky), ["a"])


# ---------------------------------------------------------------------------------------------------------------
# kNN


def _planted_vectors(n_per=300, t=50, d=48, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, d))

    def draw(c, m):
        x = centers[c] + noise * rng.normal(size=(m, d)) * np.sqrt(np.sum(centers[c] ** 2) / d)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cand = np.concatenate([draw(0, n_per), draw(1, n_per)])
    truth = np.r_[np.ones(n_per), np.zeros(n_per)]
    return cand.astype(np.float16), draw(0, t).astype(np.float32), truth


def test_knn_ranks_the_target_cluster_first_and_equals_brute_force():
    cand, target, truth = _planted_vectors()
    s = R.knn_scores(cand, target, k=10)
    assert s.dtype == np.float32 and s.shape == (len(cand),)
    assert roc_auc_score(truth, s) > 0.9
    sims = cand.astype(np.float32) @ target.T
    want = -np.sort(-sims, axis=1)[:, :10].mean(axis=1)
    np.testing.assert_allclose(s, want, atol=1e-5)
    assert np.array_equal(R.knn_scores(cand, target, k=10, chunk_rows=77), s)  # chunking changes nothing
    # k larger than the target: clamped to t (the mean over every target row)
    np.testing.assert_allclose(R.knn_scores(cand[:5], target[:3], k=10), sims[:5, :3].mean(axis=1), atol=1e-5)
    rel = R.relevance("knn", cand_emb=cand, target_emb=target)
    assert roc_auc_score(truth, rel) > 0.9 and rel.min() == 0 and rel.max() == 1


def test_knn_rejects_mismatched_or_empty_embeddings():
    cand, target, _ = _planted_vectors(n_per=5, t=3)
    with pytest.raises(ValueError, match="width"):
        R.knn_scores(cand, target[:, :10])
    with pytest.raises(ValueError, match="non-empty"):
        R.knn_scores(cand, target[:0])


# ---------------------------------------------------------------------------------------------------------------
# Percentiles and the combined weight


def test_rank_percentile():
    assert R.rank_percentile(np.array([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert R.rank_percentile(np.array([1.0, 1.0, 5.0])).tolist() == [0.25, 0.25, 1.0]  # ties: average rank
    assert R.rank_percentile(np.array([np.nan, 0.0])).tolist() == [0.0, 1.0]  # NaN ranks lowest
    assert R.rank_percentile(np.array([7.0])).tolist() == [0.5]
    assert R.rank_percentile(np.zeros(0)).shape == (0,)


def test_both_is_the_mean_of_the_two_percentiles():
    texts, truth, target = _pool(n_per_topic=60)
    cand, temb, _ = _planted_vectors(n_per=60, t=20)  # topic A first here; reorder to the interleaved pool
    order = np.empty(120, int)
    order[truth == 1], order[truth == 0] = np.arange(60), np.arange(60, 120)
    cand = cand[order]
    both = R.relevance("both", candidate_texts=[texts], target_texts=target, cand_emb=cand, target_emb=temb)
    knn = R.relevance("knn", cand_emb=cand, target_emb=temb)
    dsir = R.relevance("dsir", candidate_texts=[texts], target_texts=target)
    np.testing.assert_allclose(both, (knn + dsir) / 2)
    assert roc_auc_score(truth, both) > 0.9
    with pytest.raises(ValueError, match="kind"):
        R.relevance("bm25", candidate_texts=[texts], target_texts=target)
    with pytest.raises(ValueError, match="cand_emb"):
        R.relevance("both", candidate_texts=[texts], target_texts=target)
    with pytest.raises(ValueError, match="120 candidate embeddings but 3"):
        R.relevance("both", candidate_texts=[texts[:3]], target_texts=target, cand_emb=cand, target_emb=temb)


# ---------------------------------------------------------------------------------------------------------------
# Target files


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_read_texts_reads_every_format_through_the_readers(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Boil  eggs", "output": "For 8 minutes.\r\n"},
                                           {"instruction": "Fry onions", "input": "two of them", "output": "Slowly."}])  # fmt: skip
    chat = tmp_path / "c.json"
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "Roast a chicken?"},
                                              {"role": "assistant", "content": "At 200 C."}]}]))  # fmt: skip
    cls = tmp_path / "k.parquet"
    pq.write_table(pa.table({"text": ["simmer the stew", "bake bread"], "label": ["pos", "neg"]}), cls)
    txt = tmp_path / "t.arrow"
    with pa.ipc.new_file(str(txt), pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": ["grill the fish", ""]}))
    got = R.read_texts([alpaca, str(chat), str(cls), str(txt)])
    assert got == [
        "Boil  eggs\nFor 8 minutes.",  # normalised as the normalize stage does (CRLF, trailing newline)
        "Fry onions\n\ntwo of them\nSlowly.",  # alpaca: instruction + "\n\n" + input is the prompt
        "Roast a chicken?\nAt 200 C.",
        "simmer the stew",  # classification: the text alone, never the label
        "bake bread",
        "grill the fish",  # the empty text row is skipped
    ]
    assert R.read_texts([str(tmp_path / "*.parquet")]) == ["simmer the stew", "bake bread"]  # globs as `score` reads


def test_malformed_target_rows_are_skipped(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"instruction": "Chop garlic", "output": "Finely."}\n{not json\n{"instruction": "x"}\n')
    assert R.read_texts([str(p)]) == ["Chop garlic\nFinely."]


def _bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet at all")
    _jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "junk.jsonl").write_text("{nope\n[1, 2\n")
    (tmp_path / "empty_dir").mkdir()
    return {
        "missing": str(tmp_path / "missing.jsonl"),
        "unsupported": str(tmp_path / "notes.txt"),
        "corrupt parquet": str(tmp_path / "broken.parquet"),
        "no known format": str(tmp_path / "cols.jsonl"),
        "every row malformed": str(tmp_path / "junk.jsonl"),
        "empty folder": str(tmp_path / "empty_dir"),
        "glob without match": str(tmp_path / "*.nothing"),
    }


def test_a_bad_target_file_is_one_line_naming_it(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"instruction": "Bake", "output": "Yes."}])
    bad = _bad_files(tmp_path)
    for why, path in bad.items():
        with pytest.raises(UserError) as e:
            R.read_texts([good, path])
        msg = str(e.value)
        assert msg.startswith("--target ") and path in msg and "\n" not in msg, (why, msg)
    with pytest.raises(UserError, match="first: junk.jsonl line 1: malformed JSON"):
        R.read_texts([bad["every row malformed"]])
    # columns no format names: --map makes them readable, as for `score`
    assert R.read_texts([str(tmp_path / "cols.jsonl")], mapping={"prompt": "question", "response": "answer"}) == [
        "q\na"
    ]


# ---------------------------------------------------------------------------------------------------------------
# A real run: the target embedded by the run's own embedder, end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("relevance_run")
    rows = []
    a, b = _rows("cooking", 40, 10), _rows("programming", 40, 11)
    for x, y in zip(a, b):
        rows += [x, y]
    _jsonl(d / "pool.jsonl", rows)
    _jsonl(d / "target.jsonl", _rows("cooking", 15, 12))
    c = Config()
    c.run.workers = 1
    c.embed.embedder = "static"
    c.loss.enabled = "off"
    score([str(d / "pool.jsonl")], d / "run", c)
    return d


def _kept(run):
    df = pl.concat([pl.read_parquet(f) for f in sorted((run / "scores").glob("part-*.parquet"))])
    return df.filter(pl.col("verdict") == "kept")


def test_embed_target_texts_reproduces_the_runs_own_vectors(tiny_run):
    run = tiny_run / "run"
    kept = _kept(run)
    table = kept.select("prompt", "response", "label", "embedding").to_arrow()
    stored, valid = embeddings_to_numpy(table.column("embedding"))
    assert valid.all()
    texts = embedding_text(table).to_pylist()
    vec = R.embed_target_texts(run, texts)
    assert vec.dtype == np.float32 and vec.shape == stored.shape
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vec, stored.astype(np.float32), atol=2e-3)  # float16 storage
    assert R.embed_target_texts(run, []).shape == (0, stored.shape[1])


def test_target_relevance_end_to_end(tiny_run):
    run = tiny_run / "run"
    ids = R.candidate_ids(run)
    kept = _kept(run)
    assert ids.tolist() == kept["id"].to_list()
    truth = np.array([1 if any(w in p for w in ("pasta", "potato", "chicken", "onion", "bread", "soup", "rice",
                                                 "salmon", "egg", "stew", "carrot", "pancake")) else 0
                      for p in kept["prompt"].to_list()])  # fmt: skip
    assert 0 < truth.sum() < len(truth)
    cand, _ = embeddings_to_numpy(kept.select("embedding").to_arrow().column("embedding"))
    target = R.read_texts([str(tiny_run / "target.jsonl")])
    temb = R.embed_target_texts(run, target)
    batches = R.candidate_text_batches(run, batch_rows=16)
    assert sum(len(b) for b in batches()) == len(ids)
    for kind in ("knn", "dsir", "both"):
        rel = R.relevance(kind, candidate_texts=batches, target_texts=target, cand_emb=cand, target_emb=temb)
        assert roc_auc_score(truth, rel) > 0.9, kind


def test_embed_target_texts_needs_a_run_that_embedded(tmp_path, tiny_run):
    with pytest.raises(UserError, match="not a winnow run folder"):
        R.embed_target_texts(tmp_path, ["x"])
    run = tmp_path / "run"
    (run / "scores").mkdir(parents=True)
    m = json.loads((tiny_run / "run" / "manifest.json").read_text())
    m["resolved"]["embed"]["choice"] = "none"
    m["config"]["embed"]["embedder"] = "none"
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="embedded nothing"):
        R.embed_target_texts(run, ["x"])
    m["resolved"]["embed"]["choice"] = m["config"]["embed"]["embedder"] = "static"
    m["resolved"]["embed"]["fingerprint"] = "xxh3_128:0000"
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="not be comparable"):
        R.embed_target_texts(run, ["x"])
