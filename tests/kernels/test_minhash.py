"""MinHash kernels: bit-exact against the Python reference and against datasketch itself."""

import numpy as np
import pyarrow as pa
import pytest

from kernels import minhash as M
from kernels.strings import hash_rows_numba, utf8_view

TEXTS = [
    "Hello World, this is a test of the MinHash kernel!  Really.",
    "短文本测试，中文句子没有空格。这是第二句，还有第三句。",
    "Name a fruit.",
    "",
    "   ...  ",
    "The quick brown fox jumps over the lazy dog; the quick brown fox jumps again — and «again».",
    "Ünïcödé wörds ARE kept AS bytes in the normalised text, OK? yes it is kept",
    "x",
    "日本語とEnglishが混ざった文章です。Mixed script text with some words here.",
    "one two three four five",
    "tab\tseparated\nlines\r\nand   spaces  one two three four five six seven",
]
COMBOS = [("fast", "affine32"), ("datasketch", "affine32"), ("datasketch", "affine64"), ("datasketch", "legacy")]


def _random_texts(n, seed):
    rng = np.random.default_rng(seed)
    words = ["alpha", "Beta", "gamma", "delta", "数据", "去重", "é", "x1", "y2", "zz", "ü", "한국"]
    seps = [" ", "  ", ", ", ".\n", "\t", " — ", "!"]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 40))
        parts = []
        for _ in range(k):
            parts.append(words[rng.integers(len(words))])
            parts.append(seps[rng.integers(len(seps))])
        out.append("".join(parts))
    return out


def test_hash_bytes_reference_matches_hash_span():
    samples = [b"", b"a", b"abcdefgh", b"abcdefghi", "日本語テキスト".encode(), bytes(range(256))]
    arr = pa.array(samples, pa.large_binary())
    data, off = utf8_view(arr)
    got = hash_rows_numba(data, off, np.uint64(M.DEFAULT_HASH_SEED))
    want = np.array([M.hash_bytes_reference(s) for s in samples], np.uint64)
    assert np.array_equal(got, want)


def test_shingles_match_reference():
    texts = TEXTS + _random_texts(60, 1)
    arr = pa.array(texts, pa.large_string())
    for mode, code in (("auto", M.MODE_AUTO), ("word", M.MODE_WORD), ("char", M.MODE_CHAR)):
        h, o = M.shingle_hashes(arr, mode=mode)
        for i, t in enumerate(texts):
            want = [M.hash_shingle_reference(s) for s in M.shingles_reference(t, mode=code)]
            assert list(h[o[i] : o[i + 1]]) == want, (mode, i, t)


def test_shingle_rules():
    assert M.shingles_reference("Hello, WORLD! one two three") == [b"hello world one two three"]
    assert M.shingles_reference("Name a fruit.")[:2] == [b"name ", b"ame a"]  # short: character 5-grams
    cjk = M.shingles_reference("中文句子没有空格")
    assert cjk[0] == "中文句子没".encode() and len(cjk) == 4
    assert M.shingles_reference("  ...  ") == []
    assert M.shingles_reference("abc") == [b"abc"]


@pytest.mark.parametrize("family,scheme", COMBOS)
@pytest.mark.parametrize("num_perm", [1, 7, 128])
def test_numba_equals_reference(family, scheme, num_perm):
    texts = TEXTS + _random_texts(25, num_perm)
    got = M.minhash(pa.array(texts), num_perm=num_perm, seed=3, family=family, scheme=scheme)
    want = M.minhash_reference(texts, num_perm=num_perm, seed=3, family=family, scheme=scheme)
    assert got.dtype == want.dtype and got.shape == (len(texts), num_perm)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("scheme", ["affine32", "affine64", "legacy"])
@pytest.mark.parametrize("seed", [1, 42])
def test_datasketch_equality(scheme, seed):
    datasketch = pytest.importorskip("datasketch")
    texts = TEXTS + _random_texts(20, seed)
    sig = M.minhash(pa.array(texts), num_perm=128, seed=seed, family="datasketch", scheme=scheme)
    hf = M.shingle_hashfunc(M.DEFAULT_HASH_SEED, scheme)
    for i, t in enumerate(texts):
        m = datasketch.MinHash(num_perm=128, seed=seed, hashfunc=hf, scheme=scheme)
        sh = M.shingles_reference(t)
        if sh:
            m.update_batch(sh)
        assert m.hashvalues.dtype == sig.dtype
        assert np.array_equal(m.hashvalues, sig[i]), (scheme, i, t)


def test_datasketch_default_scheme_is_affine32():
    # The compat family's default scheme must be what a plain datasketch.MinHash(num_perm, seed, hashfunc) uses.
    datasketch = pytest.importorskip("datasketch")
    t = "the quick brown fox jumps over the lazy dog again and again"
    m = datasketch.MinHash(num_perm=64, seed=5, hashfunc=M.shingle_hashfunc(scheme="affine32"))
    m.update_batch(M.shingles_reference(t))
    sig = M.minhash(pa.array([t]), num_perm=64, seed=5, family="datasketch")
    assert np.array_equal(m.hashvalues, sig[0])


def test_estimate_tracks_jaccard():
    rng = np.random.default_rng(0)
    base = [f"w{i}" for i in rng.integers(0, 10**6, 400)]
    other = base.copy()
    for p in rng.choice(400, 20, replace=False):
        other[p] = "zz"
    a, b = " ".join(base), " ".join(other)
    sa = {s for s in M.shingles_reference(a)}
    sb = {s for s in M.shingles_reference(b)}
    j = len(sa & sb) / len(sa | sb)
    sig = M.minhash(pa.array([a, b]), num_perm=512)
    est = (sig[0] == sig[1]).mean()
    assert abs(est - j) < 4 * np.sqrt(j * (1 - j) / 512) + 0.01


def test_band_keys_and_params():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 2, 3, 4]], np.uint32)
    k = M.band_keys(sig, 2, 2)
    assert k[0, 0] == k[1, 0] and k[0, 1] != k[1, 1] and k[0, 1] == k[2, 1] and k[0, 0] != k[2, 0]
    assert k[0, 0] != M.band_keys(np.array([[3, 4, 1, 2]], np.uint32), 2, 2)[0, 1]  # band index is in the key
    assert M.lsh_params(0.8, 128, 0.5, 0.5) == (9, 13)  # datasketch's _optimal_param at its defaults
    assert M.lsh_params(0.8, 128) == (16, 8)
    assert abs(M.candidate_probability(0.8, 16, 8) - 0.947) < 1e-3


def test_ngram_lookup_matches_shingle_hashes():
    texts = ["one two three four five six seven eight nine ten", "a b c", "four five six seven eight nine ten eleven"]
    ev, _off = M.shingle_hashes(pa.array(["xx four five six seven eight yy"]), ngram=5, mode="word")
    from engine.stages.contamination import build_lookup_table

    table = build_lookup_table(ev, np.arange(ev.size))
    val, n = M.ngram_lookup(pa.array(texts), [5], table)
    assert list(val >= 0) == [True, False, True] and list(n) == [5, 0, 5]
    val, n = M.ngram_lookup(pa.array(texts), [6], table)
    assert (val < 0).all()


def test_device_cuda_raises():
    with pytest.raises(RuntimeError, match="no GPU path"):
        M.minhash(pa.array(["a"]), device="cuda")


def test_shingle_hashes_32bit_sets():
    texts = TEXTS + _random_texts(20, 9)
    v, off = M.shingle_hashes(pa.array(texts), unique=True, bits=32)
    assert v.dtype == np.uint32
    for i, t in enumerate(texts):
        want = sorted({M.hash_shingle_reference(s) & 0xFFFFFFFF for s in M.shingles_reference(t)})
        assert list(v[off[i] : off[i + 1]]) == want


def test_minhash_return_sets_equals_shingle_sets():
    arr = pa.array(TEXTS + _random_texts(30, 4), pa.large_string())
    sig, (sets, off) = M.minhash(arr, return_sets=True)
    assert np.array_equal(sig, M.minhash(arr))
    want, want_off = M.shingle_hashes(arr, unique=True, bits=32)
    assert np.array_equal(off, want_off) and np.array_equal(sets, want)


SHORT = {"short_words": 50, "short_min_words": 5, "tiny_words": 10}


def _short_texts(seed):
    """Rows of 0-60 words around the path boundaries (4/5 words, 9/10, 49/50), mixed separators and scripts."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "Beta", "gamma", "数据", "é", "x1", "zz", "ü", "한국", "delta"]
    seps = [" ", ", ", ".\n", "\t", " — "]
    out = []
    for k in [0, 1, 4, 5, 9, 10, 11, 49, 50, 60] + list(rng.integers(0, 60, 30)):
        out.append("".join(words[rng.integers(len(words))] + seps[rng.integers(len(seps))] for _ in range(int(k))))
    return out


def test_short_path_matches_reference():
    texts = TEXTS + _short_texts(2)
    arr = pa.array(texts, pa.large_string())
    h, o = M.shingle_hashes(arr, **SHORT)
    sig, kind = M.minhash(arr, num_perm=32, return_kind=True, **SHORT)
    for i, t in enumerate(texts):
        want = [M.hash_shingle_reference(s) for s in M.shingles_reference(t, **SHORT)]
        assert list(h[o[i] : o[i + 1]]) == want, (i, t)
        assert kind[i] == M.shingle_kind_reference(t, short_words=50, short_min_words=5, tiny_words=10), (i, t)
    assert np.array_equal(sig, M.minhash_reference(texts, num_perm=32, **SHORT))
    # every path occurs, and the boundaries fall where the docstring says (normalised word counts)
    assert set(kind) == {M.KIND_WORD, M.KIND_SHORT, M.KIND_TINY, M.KIND_CHAR, M.KIND_EMPTY}
    nw = [len(M.normalize_reference(t).split(" ")) if M.normalize_reference(t) else 0 for t in texts]
    for k, w, t in zip(kind, nw, texts):
        if k == M.KIND_SHORT:
            assert 10 <= w < 50
        elif k == M.KIND_TINY:
            assert 5 <= w < 10
        elif k == M.KIND_WORD:
            assert w >= 50, t


def test_short_rows_are_word_sets():
    t = "the cat sat on the mat and looked at the rain"  # 11 words, "the" three times
    assert sorted(M.shingles_reference(t, **SHORT)) == sorted(b.encode() for b in t.split())
    assert M.shingle_kind_reference(t, short_words=50, short_min_words=5, tiny_words=10) == M.KIND_SHORT
    # off by default: the kernel's historic rule (word 5-grams)
    assert M.shingles_reference(t)[0] == b"the cat sat on the"
    v, o = M.shingle_hashes(pa.array([t]), unique=True, **SHORT)
    assert o[1] == 9 and len(set(v.tolist())) == 9  # distinct words
    # a repeated shingle counts once in the 64-bit sets too (its padding was once a float-rounded extra value)
    v, o = M.shingle_hashes(pa.array(["a b c d e a b c d e"]), unique=True)
    assert o[1] == 5 and np.array_equal(v, np.unique(v))


def test_shingle_sets_equals_unique_32bit_hashes():
    arr = pa.array(TEXTS + _short_texts(5), pa.large_string())
    for kw in ({}, SHORT):
        a, ao = M.shingle_sets(arr, **kw)
        b, bo = M.shingle_hashes(arr, unique=True, bits=32, **kw)
        assert np.array_equal(a, b) and np.array_equal(ao, bo)


def test_band_keys_of_a_row_subset():
    sig = M.minhash(pa.array(TEXTS + _random_texts(30, 8)), num_perm=64)
    rows = np.array([3, 0, 17, 17, 40])
    assert np.array_equal(M.band_keys(sig, 8, 8, rows), M.band_keys(sig[rows], 8, 8))


def test_shingle_rule_limits():
    with pytest.raises(ValueError, match="short_ngram"):
        M.minhash(pa.array(["a b c"]), short_words=50, short_ngram=0)
    with pytest.raises(ValueError, match="short_min_words"):
        M.shingle_hashes(pa.array(["a b c"]), short_words=50, short_min_words=1, short_ngram=2)
