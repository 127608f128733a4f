"""kernels/ngram_hash.py: the Numba kernels bit-exact against the plain-Python reference (CSR, totals), the score
equal to it in float64, and the tokenisation rules on examples whose words are written out by hand."""

import numpy as np
import pyarrow as pa
import pytest

from kernels import ngram_hash as K

TEXTS = [
    "Hello World, hello again!",
    "我爱北京天安门。北京是中国的首都",
    "",
    "   ...  ",
    "İstanbul ΟΔΟΣ Straße x1_y2 हिन्दी भाषा Ⅻ",
    None,
    "日本語とEnglishが混ざった文章です。",
    "one",
    "tab\tseparated\nlines\r\nand   spaces; 3.14 + 42 = 45.14",
    "emoji 🙂 between 🙂🙂 words — «quoted» (parens) [brackets]",
]


def _random_texts(n, seed):
    rng = np.random.default_rng(seed)
    words = ["alpha", "Beta", "GAMMA", "数据", "去重", "é", "x1", "y2", "Ünï", "한국어", "ß", "ﬁ", "Σίσυφος", "42"]
    seps = [" ", "  ", ", ", ".\n", "\t", " — ", "!", "_", "", "。"]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 30))
        out.append("".join(words[rng.integers(len(words))] + seps[rng.integers(len(seps))] for _ in range(k)))
    return out


def _equal_csr(got, want):
    for name, g, w in zip(("indptr", "ids", "counts"), got, want):
        assert g.dtype == w.dtype, name
        assert np.array_equal(g, w), f"{name} differs at {np.flatnonzero(g != w)[:10] if g.shape == w.shape else ''}"


@pytest.mark.parametrize("buckets", [1, 7, 97, 1000, 1 << 16])
def test_csr_and_totals_are_bit_exact_against_the_reference(buckets):
    texts = TEXTS + _random_texts(300, seed=buckets)
    data, offsets = K.texts_view(texts)
    _equal_csr(K.ngram_hash(data, offsets, buckets), K.ngram_hash_reference(texts, buckets))
    assert np.array_equal(K.ngram_totals(data, offsets, buckets), K.ngram_totals_reference(texts, buckets))


@pytest.mark.parametrize("buckets", [5, 97, 1 << 16])
def test_score_equals_the_reference(buckets):
    texts = TEXTS + _random_texts(200, seed=7)
    lr = np.random.default_rng(buckets).normal(size=buckets)
    got = K.ngram_score(*K.texts_view(texts), lr)
    want = K.ngram_score_reference(texts, lr)
    assert got.dtype == np.float64 and got.shape == (len(texts),)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_score_is_the_count_weighted_mean_over_the_csr_row():
    texts = _random_texts(100, seed=3)
    lr = np.random.default_rng(0).normal(size=257)
    indptr, ids, counts = K.ngram_hash(*K.texts_view(texts), 257)
    for i in range(len(texts)):
        c, b = counts[indptr[i] : indptr[i + 1]], ids[indptr[i] : indptr[i + 1]]
        want = (c * lr[b]).sum() / c.sum() if c.sum() else 0.0
        assert K.ngram_score(*K.texts_view([texts[i]]), lr)[0] == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_words_lowercase_split_on_non_word_characters_and_cjk_characters_are_words():
    assert K.words_reference("Hello World, hello again!") == ["hello", "world", "hello", "again"]
    assert K.words_reference("x1_y2 3.14") == ["x1", "y2", "3", "14"]
    assert K.words_reference("我爱北京。") == ["我", "爱", "北", "京"]
    assert K.words_reference("日本語とEnglishが") == ["日", "本", "語", "と", "english", "が"]
    assert K.words_reference("İstanbul ΟΔΟΣ Ⅻ") == ["istanbul", "οδοσ", "ⅻ"]
    assert K.words_reference("हिन्दी") == ["हिन्दी"]  # combining marks stay inside the word
    assert K.words_reference("🙂 — ...") == []
    # n-gram count 2m - 1; lower case and punctuation make no difference to the buckets
    assert len(K.ngrams_reference("a b c")) == 5 and K.ngrams_reference("") == []
    assert K.ngrams_reference("Hello, WORLD!") == K.ngrams_reference("hello world")
    assert K.ngrams_reference("hello world") != K.ngrams_reference("world hello")  # bigrams are ordered


def test_kernel_tokenises_like_the_reference_on_single_rows():
    # CSR row sums are the n-gram counts: 2m - 1 for m words
    for t in TEXTS:
        _indptr, _ids, counts = K.ngram_hash(*K.texts_view([t]), 1 << 20)
        m = len(K.words_reference(t or ""))
        assert int(counts.sum()) == max(2 * m - 1, 0), t


def test_batches_and_views_agree():
    texts = _random_texts(50, seed=11)
    lr = np.random.default_rng(1).normal(size=64)
    whole = K.ngram_score(*K.texts_view(texts), lr)
    parts = np.concatenate([K.ngram_score(*K.texts_view(texts[i : i + 7]), lr) for i in range(0, 50, 7)])
    assert np.array_equal(whole, parts)
    # Arrow string and large_string arrays, a sliced array and a list give the same view
    arr = pa.array(["pad"] + texts, pa.string()).slice(1)
    assert np.array_equal(K.ngram_score(*K.texts_view(arr), lr), whole)
    totals = np.zeros(64, np.int64)
    for i in range(0, 50, 7):
        K.ngram_totals(*K.texts_view(texts[i : i + 7]), out=totals)
    assert np.array_equal(totals, K.ngram_totals(*K.texts_view(texts), 64))


def test_empty_input_and_rows_without_words():
    data, offsets = K.texts_view([])
    indptr, ids, counts = K.ngram_hash(data, offsets, 10)
    assert indptr.tolist() == [0] and len(ids) == 0 and len(counts) == 0
    assert K.ngram_score(*K.texts_view(["", "...", None]), np.ones(10)).tolist() == [0.0, 0.0, 0.0]


def test_bad_arguments():
    data, offsets = K.texts_view(["a"])
    with pytest.raises(ValueError, match="CPU only"):
        K.ngram_hash(data, offsets, 10, device="cuda")
    with pytest.raises(ValueError, match="buckets"):
        K.ngram_hash(data, offsets, 0)
    with pytest.raises(ValueError, match="1-D"):
        K.ngram_score(data, offsets, np.ones((2, 2)))
    with pytest.raises(ValueError, match="int64"):
        K.ngram_totals(data, offsets, out=np.zeros(4, np.int32))
