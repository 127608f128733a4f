"""kernels/text_stats.py: the Numba kernel against the plain-Python reference, and planted values by hand."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.strings import hash_span
from kernels.text_stats import (
    _ASCII_MAX_BYTES,
    C_NUMBER,
    C_SPACE,
    C_SYMBOL,
    JUNK_SIGNALS,
    RARE_BIGRAM_SCORE,
    REPETITION_SIGNALS,
    SCRIPT_ID,
    SIGNALS,
    _hash_fast,
    _hash_word,
    bigram_scores,
    char_tables,
    contains_literals,
    contains_literals_reference,
    contains_prompt,
    contains_prompt_reference,
    gopher_repetition_reference,
    junk_stats,
    junk_stats_reference,
    text_stats,
    text_stats_reference,
)
from tests.conftest import SHARED_DATA

STR = pa.large_string()
# Pieces that exercise every branch: CJK words, fullwidth punctuation, Unicode spaces (NBSP, U+3000, U+2028,
# the \x1c-\x1f separators str.isspace accepts), bullets, ellipses, fences, URL prefixes, 2/3/4-byte UTF-8.
PIECES = list("ab c\n\n  ...…#-*•`hw.tps:/é") + [
    "http://", "https://", "www.", "```", "你", "好", "。", "，", "ー", "々", "\u3000", "\xa0", "\x1c", "\u2028",
    "Ж", "ا", "ก", "한", "😀", "\t", "\r\n", "the cat ", "the cat sat ", "猫",
]  # fmt: skip


def assert_same(a: dict, b: dict, texts: list[str]) -> None:
    """Every signal equal (fractions within 1e-9), naming the first text where one differs."""
    for k in SIGNALS + ("script_letters",):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape, k
        if x.dtype.kind == "f":
            bad = ~np.isclose(x, y, rtol=0, atol=1e-9)
        else:
            bad = x != y if x.ndim == 1 else (x != y).any(axis=1)
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            raise AssertionError(f"{k} differs on {bad.sum()} rows; first {i}: {texts[i][:120]!r}: {x[i]} vs {y[i]}")


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 80))))
    for _ in range(n // 4):  # repetitive word sequences: the n-gram rules' territory
        out.append(" ".join(rng.choice(["a", "bb", "the", "cat", "你", "x."]) for _ in range(rng.randint(0, 60))))
    return out


def test_kernel_matches_reference_on_generated_texts():
    texts = random_texts(1200, seed=0) + ["", " ", "\n\n", "a", "你"]
    assert_same(text_stats(texts), text_stats_reference(texts), texts)


def test_repetition_only_reference_agrees():
    texts = random_texts(300, seed=7)
    ours, ref = text_stats(texts), gopher_repetition_reference(texts)
    for k in REPETITION_SIGNALS:
        assert np.allclose(ours[k], ref[k], rtol=0, atol=1e-9), k


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_52k").exists(), reason="shared datasets absent")
def test_kernel_matches_reference_on_real_texts():
    import polars as pl

    texts = []
    for name, col in [("alpaca_52k", "output"), ("alpaca_chinese", "output"), ("t0_train_50k", "instruction")]:
        texts += (
            pl.read_parquet(SHARED_DATA / name / "train.parquet", columns=[col])[col].sample(400, seed=1).to_list()
        )
    assert_same(text_stats(texts), text_stats_reference(texts), texts)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), min_size=1, max_size=8))
def test_kernel_matches_reference_property(texts):
    assert_same(text_stats(texts), text_stats_reference(texts), texts)


def test_long_texts_and_chunk_boundaries():
    """Texts of 100k words next to tiny ones (scratch sized per chunk of 256 rows for the longest row)."""
    rng = random.Random(1)
    big = " ".join(rng.choice(["a", "bb", "the", "cat", "你好", "x.", "\n"]) for _ in range(100_000))
    texts = random_texts(300, seed=11)
    texts[5] = big
    texts[260] = "你" * 50_000 + "ab " * 30_000
    assert_same(text_stats(texts), text_stats_reference(texts), texts)


def test_planted_values():
    texts = [
        "a b a b a b",  # 0
        "x1 x2 x3 x4 x5 y x1 x2 x3 x4 x5",  # 1
        "foo\nbar\nfoo\n\n  foo  \n",  # 2
        "你好你好你好",  # 3
        "我爱Python编程",  # 4
        "see http://a.b and https://c.d/x, www.e.f; http:// nothing",  # 5
        "```py\nx\n```\n```",  # 6
        "- one\n* two\n• three\nfour...\nfive…",  # 7
        "# A ## B ... C",  # 8
    ]
    s = text_stats(texts)
    # 0: "a b" occurs 3 times and covers all 6 word characters; the 3-grams "a b a" and "b a b" tie at 2 and the
    # first seen wins: positions 0 and 2 cover words 0..4 = 5 of 6 characters.
    assert s["n_words"][0] == 6 and s["top_2gram_frac"][0] == 1.0 and s["top_3gram_frac"][0] == 5 / 6
    # 1: the 5-gram x1..x5 occurs twice: 10 of 11 words, 20 of 21 characters; no 6-gram repeats
    assert s["dup_5gram_frac"][1] == 20 / 21 and s["dup_6gram_frac"][1] == 0.0
    assert s["top_2gram_frac"][1] == 8 / 21  # "x1 x2" twice, tying with 3 later 2-grams: the first seen wins
    # 2: stripped non-empty lines foo, bar, foo, foo: two duplicates of 3 characters over 21 characters
    assert s["n_lines"][2] == 4 and s["frac_dup_line"][2] == 0.5 and s["frac_dup_line_chars"][2] == 6 / 21
    # 3: every Han character is a word: six one-character words, "你好" three times
    assert s["n_words"][3] == 6 and s["mean_word_len"][3] == 1.0 and s["top_2gram_frac"][3] == 1.0
    assert s["script"][3] == SCRIPT_ID["han"] and s["frac_script"][3] == 1.0
    # 4: 我 | 爱 | Python | 编 | 程; letters: 6 Latin, 4 Han -> Latin dominant at 0.6
    assert s["n_words"][4] == 5 and s["script"][4] == SCRIPT_ID["latin"] and s["frac_script"][4] == 0.6
    assert s["script_letters"][4][SCRIPT_ID["han"]] == 4
    # 5: three URLs ("http://" followed by a space is not one)
    assert s["n_urls"][5] == 3
    # 6: three fences (odd: an unclosed block)
    assert s["n_code_fences"][6] == 3
    # 7: three bullet lines and two ellipsis lines out of five
    assert s["frac_bullet_lines"][7] == 3 / 5 and s["frac_ellipsis_lines"][7] == 2 / 5
    # 8: three '#' and one ellipsis over 6 words: max(3, 1) / 6; '#' and '.' are punctuation (Po)
    assert s["symbol_word_ratio"][8] == 3 / 6
    assert s["frac_punct"][8] == 6 / 14 and s["frac_space"][8] == 5 / 14


def test_whitespace_table_is_str_isspace():
    cls, _ = char_tables()
    ours = np.nonzero(cls & C_SPACE)[0]
    want = [i for i in range(0x110000) if chr(i).isspace()]
    assert ours.tolist() == want


def test_nulls_sliced_and_small_offsets():
    arr = pa.array(["hello world", None, "你好 世界", "x x x x"], STR)
    s = text_stats(arr)
    assert s["n_words"].tolist() == [2, 0, 4, 4]
    sliced = text_stats(arr.slice(2, 2))
    assert sliced["n_words"].tolist() == [4, 4]
    small = text_stats(arr.cast(pa.string()))  # int32 offsets
    assert small["n_words"].tolist() == [2, 0, 4, 4]


def test_device_cuda_is_refused_with_advice():
    with pytest.raises(ValueError, match="device='cpu'"):
        text_stats(["x"], device="cuda")


def test_contains_prompt_kernel_matches_reference():
    rng = random.Random(3)
    base = random_texts(400, seed=5)
    responses, prompts = [], []
    for t in base:
        responses.append(t)
        r = rng.random()
        if r < 0.2:
            prompts.append(t)  # equal
        elif r < 0.7:
            start = rng.randint(0, len(t))
            prompts.append(t[start : start + rng.randint(0, 30)])  # a substring: contained
        else:
            prompts.append(rng.choice(base))  # unrelated, mostly
    ours = contains_prompt(pa.array(responses, STR), pa.array(prompts, STR))
    ref = contains_prompt_reference(responses, prompts)
    assert np.array_equal(ours, ref)
    assert set(np.unique(ref)) == {0, 1, 2}  # the sample exercises all three outcomes


def test_contains_prompt_planted():
    r = pa.array(["Say  HELLO\nworld now", "hello world", "hello", "abc", ""], STR)
    p = pa.array(["hello world", "Hello   World ", "hello world", "", "x"], STR)
    assert contains_prompt(r, p).tolist() == [1, 2, 0, 0, 0]


# ---- the ASCII path (_row_stats_ascii) against the general path and the reference -----------------------------
# Pieces for ASCII-only rows, which take the ASCII path: every whitespace byte str.isspace accepts, the special bytes
# (newline, '.', '`', '#', ':'), URL prefixes whole and cut, bullets, symbols that are not punctuation.
ASCII_PIECES = list("ab c\n\n  ...#-*`hw.tps:/x9$+<=>^|~!?,;'\"") + [
    "http://", "https://", "www.", "https:", "http:/", "wwww.", "hhttp://x", "https//", "a.b", "```", "....",
    "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "the cat ", "the cat sat ", "- item\n", "  * x ...\n",
    "def f(x):\n    return x\n", "#include <a>\n", "\n\n\n",
]  # fmt: skip


def ascii_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["".join(rng.choice(ASCII_PIECES) for _ in range(rng.randint(0, 80))) for _ in range(n)]
    words = ["a", "bb", "the", "cat", "x.", "www.a", "1", "#"]
    out += [" ".join(rng.choice(words) for _ in range(rng.randint(0, 300))) for _ in range(n // 4)]
    out += ["\n".join(rng.choice(["same line", "  same line  ", "other", "...", "- a"]) for _ in range(40))
            for _ in range(n // 10)]  # fmt: skip
    return out


def assert_identical(a: dict, b: dict, texts: list[str]) -> None:
    """Every output bit-identical (the two kernel paths must agree exactly, not within a tolerance)."""
    for k in SIGNALS + ("script_letters",):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        bad = x != y if x.ndim == 1 else (x != y).any(axis=1)
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            raise AssertionError(f"{k} differs on {bad.sum()} rows; first {i}: {texts[i][:120]!r}: {x[i]} vs {y[i]}")


def test_ascii_path_matches_general_path_and_reference():
    texts = ascii_texts(1500, seed=2) + ["", " ", "\n", "a", "#", ".", "...", "```", "http://x", "www.x", " \t\n "]
    assert all(t.isascii() for t in texts)
    fast = text_stats(texts)
    assert_identical(fast, text_stats(texts, ascii_path=False), texts)
    assert_same(fast, text_stats_reference(texts), texts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(ASCII_PIECES), max_size=50).map("".join), min_size=1, max_size=8))
def test_ascii_path_property(texts):
    fast = text_stats(texts)
    assert_identical(fast, text_stats(texts, ascii_path=False), texts)
    assert_same(fast, text_stats_reference(texts), texts)


def test_mixed_rows_and_the_ascii_size_limit():
    """ASCII rows next to non-ASCII ones (CJK, accents, emoji, Unicode spaces), code, repeated lines, empty rows,
    and ASCII rows just under, at and over the ASCII path's 16-bit limit (the last two take the general path)."""
    rng = random.Random(4)
    unit = "the cat sat on the mat. www.x.y ... # ```\n"
    at_limit = (unit * (_ASCII_MAX_BYTES // len(unit) + 1))[:_ASCII_MAX_BYTES]
    texts = [
        "", "plain ascii words here", "naïve café", "你好 world", "😀 x", "a\u00a0b", "x\u3000y", "line\u2028two",
        "```python\nprint('hi')\n```\n", "same\nsame\nsame\n", "  \n\t\n", at_limit[:-1], at_limit,
        at_limit + "z", at_limit[:-3] + "你", " ".join(["repeat me now"] * 2000),
    ] + random_texts(200, seed=9) + ascii_texts(200, seed=10)  # fmt: skip
    rng.shuffle(texts)
    fast = text_stats(texts)
    assert_identical(fast, text_stats(texts, ascii_path=False), texts)
    assert_same(fast, text_stats_reference(texts), texts)


def test_word_hashes_equal_hash_span():
    """_hash_fast (one masked load for the tail) and _hash_word (no branch on the length under 16 bytes) give
    hash_span's value for every length and offset, up to the last byte of the buffer (where they fall back)."""
    from numba import njit

    @njit
    def all_three(data, seed):
        n = data.shape[0]
        out = np.zeros((n + 1, 41, 3), dtype=np.uint64)
        for s in range(n + 1):
            for ln in range(min(40, n - s) + 1):
                out[s, ln, 0] = hash_span(data, s, s + ln, seed)
                out[s, ln, 1] = _hash_fast(data, s, s + ln, seed)
                out[s, ln, 2] = _hash_word(data, s, s + ln, seed)
        return out

    rng = random.Random(5)
    data = np.frombuffer(bytes(rng.randrange(256) for _ in range(97)), dtype=np.uint8)
    h = all_three(data, np.uint64(0x5EED3012))
    assert np.array_equal(h[..., 0], h[..., 1]) and np.array_equal(h[..., 0], h[..., 2])
    assert len(np.unique(h[:, 1:, 0])) > 1000  # the spans really differ


LITERALS = tuple(x.encode() for x in ("<", "&", "lorem ipsum", "as a", "i'm ", "作为", "\u017f", "zz"))


def test_contains_literals_matches_reference():
    rng = random.Random(6)
    pieces = ["As A", "I'M ", "i'm", "LOREM IPSUM", "lorem ipsu", "<", "&", "作为", "作", "\u017f", "Z", "z", "a",
              "s", " ", "x", "你"]  # fmt: skip
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 14))) for _ in range(3000)]
    texts += ["", "<", "zz", "z", "ZZ", "x<", "as a", "as", "AS A", None]
    arr = pa.array(texts, STR)
    got = contains_literals(arr, LITERALS)
    want = contains_literals_reference(texts, LITERALS)
    assert np.array_equal(got, want)
    for j in range(len(LITERALS)):  # every literal found somewhere, and missed somewhere
        assert 0 < np.count_nonzero(want & np.uint64(1 << j)) < len(texts), LITERALS[j]
    todo = np.arange(len(texts)) % 3 == 0
    assert np.array_equal(contains_literals(arr, LITERALS, todo), np.where(todo, want, 0))
    assert np.array_equal(contains_literals(arr.slice(5, 20), LITERALS), want[5:25])
    with pytest.raises(ValueError, match="lower case"):
        contains_literals(arr, (b"As",))


# ---- junk_stats (issue 9) ------------------------------------------------------------------------------------------
# Pieces for the Latin-word state machine (strip, split at ' - ’, skip #/@ tokens, acronyms, elongations), the
# repetition words (punctuation at the ends, CJK, case) and the content count (symbols, invisibles).
JUNK_PIECES = list("abcqxzXYZ -'.,#@1_()!?\n") + [
    "’", "é", "\u0301", "“", "”", "…", "你", "好", "。", "😀", "\u200b", "\u3000", "½", "∑", "$", "the ", "cat ",
    "Th", "NASA ", "ok ", "soooo ", "qx", "jz", "wk", "sz", "Checking ", "checking, ",
]  # fmt: skip


def assert_junk_same(texts, max_unit: int = 3) -> None:
    got, want = junk_stats(texts, max_unit=max_unit), junk_stats_reference(texts, max_unit=max_unit)
    for k in JUNK_SIGNALS:
        bad = np.flatnonzero(got[k] != want[k])
        assert not len(bad), (k, [(texts[i], got[k][i], want[k][i]) for i in bad[:5]])


def test_junk_stats_matches_reference_on_generated_texts():
    rng = random.Random(21)
    texts = ["".join(rng.choice(JUNK_PIECES) for _ in range(rng.randint(0, 40))) for _ in range(4000)]
    texts += random_texts(400, seed=22)
    texts += [" ".join([rng.choice(["a", "b.", "B", "你", "x!", "1"])] * rng.randint(1, 9)) for _ in range(300)]
    texts += ["a-.-b", "a.-b", "a-.b", "a.-", "word.-", "'hello'", "rock'n'roll", "hi😀", "hi😀there", "cafe\u0301",
              "-5", "x_val", "#tag word", "@user hi", "don’t", "", " ", "哈哈哈哈", "a b a b a"]  # fmt: skip
    for max_unit in (1, 3, 8):
        assert_junk_same(texts, max_unit)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(JUNK_PIECES), max_size=30).map("".join), min_size=1, max_size=8))
def test_junk_stats_property(texts):
    assert_junk_same(texts)


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_52k").exists(), reason="shared datasets absent")
def test_junk_stats_matches_reference_on_real_texts():
    import polars as pl

    texts = []
    for name, col in [("alpaca_52k", "output"), ("alpaca_chinese", "output"), ("tweeteval_emoji", "text")]:
        path = SHARED_DATA / name / "train.parquet"
        texts += pl.read_parquet(path, columns=[col])[col].sample(1000, seed=1).to_list()
    assert_junk_same(texts)


def test_junk_stats_planted_values():
    texts = ["Checking, checking. CHECKING!", "gvhbzesqrfjz", "The cat sat.", "...!!", "", "0 0 0", "#qxzj @qxzj",
             "NASA HTML qxzjv", "soooo", "a b c a b c a", "好好好", "Nah nah nah ✋🏼😭", "x_qz don’t", "\u200b"]  # fmt: skip
    s = junk_stats(texts)
    # "#qxzj @qxzj": "#" and "@" are punctuation, stripped from the repetition words (2 words, unit 1)
    assert s["rep_unit"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 3, 1, 0, 0, 0]
    assert s["rep_words"].tolist() == [3, 0, 0, 0, 0, 0, 2, 0, 0, 7, 3, 0, 0, 0]
    assert s["n_content"].tolist()[3:6] == [0, 0, 3] and s["n_content"][13] == 0 and s["n_nonspace"][13] == 1
    assert s["n_content"][11] == 12  # 9 letters, two emoji and the skin-tone modifier between them (Sk)
    assert s["latin_letters"].tolist() == [24, 12, 9, 0, 0, 0, 0, 5, 5, 7, 0, 9, 4, 0]
    # "soooo": one bigram (s-o), the repeated o's skipped; "x_qz" is not a word, "don’t" is "don" + "t"
    assert s["latin_bigrams"][8] == 1 and s["latin_bigrams"][12] == 2
    scores = bigram_scores()
    the_cat = [("t", "h"), ("h", "e"), ("c", "a"), ("a", "t"), ("s", "a"), ("a", "t")]
    assert s["bigram_score"][2] == sum(int(scores[ord(a) - 97, ord(b) - 97]) for a, b in the_cat)
    assert s["rare_bigrams"][1] >= 4 and s["bigram_score"][1] < -1.5 * s["latin_bigrams"][1]


def test_junk_stats_todo_nulls_and_arguments():
    arr = pa.array(["lol lol lol", None, "qxzj qxzj", "!!!"], STR)
    full = junk_stats(arr)
    todo = np.array([True, True, False, True])
    part = junk_stats(arr, todo)
    for k in JUNK_SIGNALS:
        assert np.array_equal(part[k], np.where(todo, full[k], 0)), k
    assert junk_stats(arr.slice(2, 2))["rep_unit"].tolist() == [1, 0]
    assert junk_stats(arr.cast(pa.string()))["rep_unit"].tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="1..64"):
        junk_stats(arr, max_unit=0)


def test_bigram_table_and_character_classes():
    scores = bigram_scores()
    assert scores.shape == (26, 26) and scores.dtype == np.int8
    at = lambda ab: int(scores[ord(ab[0]) - 97, ord(ab[1]) - 97])
    assert at("th") == 4 and at("er") >= 3 and at("qx") == -8 and at("jz") <= RARE_BIGRAM_SCORE
    assert at("sz") >= 0 and at("zw") >= 0 and at("xi") >= 0  # Polish, German, pinyin digraphs raised to 0
    cls, _ = char_tables()
    for ch in "😀$∑©":
        assert cls[ord(ch)] & C_SYMBOL and not cls[ord(ch)] & C_NUMBER, ch
    for ch in "½Ⅻ²7":
        assert cls[ord(ch)] & C_NUMBER, ch
    assert not cls[0x200B] & (C_SYMBOL | C_NUMBER) and not cls[ord("!")] & (C_SYMBOL | C_NUMBER)
