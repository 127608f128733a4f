"""engine/stages/loss.py with a tiny random Llama (2 layers, 211-word vocabulary) and a word-level tokenizer with a ChatML
template, both built here and saved to a tmp folder: no downloads. The scorer (backbone + kernels.xent, batched,
sorted by length) must equal a naive per-sequence ``model(...).logits`` + ``cross_entropy`` computation whose
response positions are found independently (from token counts, not from the scorer's character spans)."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from engine.stages import loss as L
from kernels import xent as X

WORDS = str.split(
    "give three tips for staying healthy eat well sleep enough exercise daily what is two plus four the answer "
    "write a poem about sea waves blue deep and wide translate hello into french bonjour summarize this text it "
    "was long short name colors red green yellow explain why sky sunlight scatters more than other wavelengths "
    "you are helpful assistant thanks ok sure here list of numbers one five six seven eight nine ten"
)
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    folder = tmp_path_factory.mktemp("tiny_llama")
    specials = ["<|im_start|>", "<|im_end|>", "[UNK]", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + [f"w{i}" for i in range(200)]))}
    vocab = dict(list(vocab.items())[:211])  # a prime vocabulary size: no power-of-two shortcut in the head
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="[UNK]"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=vocab["<|im_end|>"],
        eos_token_id=vocab["<|im_end|>"],
    )
    model = LlamaForCausalLM(cfg)
    # Larger head weights than the 0.02 init spread the losses (~2-9 nats), so the ratio test has teeth.
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return str(folder), m, tok


def _scorer(tiny, **kw):
    folder, model, tok = tiny
    return L.LossScorer(L.LossConfig(model=folder, device="cpu", **kw), model=model, tokenizer=tok)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _naive_nll(model, ids):
    """Per-position NLL: nll[p] = -log P(ids[p] | ids[:p]) from full logits, the way Cherry / Superfiltering do."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="none")
    return np.concatenate([[np.nan], nll.numpy()])


def _naive_row(model, tok, messages, max_tokens):
    """(loss given prompt, loss alone, tokens, truncated) with response positions found from token counts."""
    full = _ids(tok, tok.apply_chat_template(messages, tokenize=False))
    cond_nll = _naive_nll(model, full[:max_tokens])
    cond, alone, cut = [], [], False
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tok, tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)))
        n = len(_ids(tok, m["content"])) + 1  # content words + <|im_end|>
        pos = np.arange(start, start + n)
        kept = pos[pos < max_tokens]
        cut |= len(kept) < n
        alone_ids = _ids(tok, tok.apply_chat_template([m], tokenize=False))
        a_start = len(alone_ids) - n  # the alone text ends with content + <|im_end|> (the trailing "\n" is no token)
        a_nll = _naive_nll(model, alone_ids)
        cond.extend(cond_nll[kept])
        alone.extend(a_nll[a_start : a_start + len(kept)])
    if not cond:
        return np.nan, np.nan, 0, cut
    return np.mean(cond), np.mean(alone), len(cond), cut


ROWS = [
    ("give three tips for staying healthy", "eat well sleep enough exercise daily"),
    ("what is two plus four", "six"),
    ("write a poem about sea waves", "blue waves deep and wide " * 6),
    ("translate hello into french", "bonjour"),
    ("name three colors", "red green yellow"),
    ("explain why the sky is blue " * 3, "sunlight scatters more blue than other wavelengths"),
]


def _table(rows, extra=None):
    cols = {"prompt": [p for p, _ in rows], "response": [r for _, r in rows], "format": ["alpaca"] * len(rows)}
    cols.update(extra or {})
    return pa.table(cols)


@pytest.mark.parametrize("batch_tokens", [4096, 40])  # one batch for all, or ~1 sequence per batch
def test_losses_equal_naive_logits(tiny, batch_tokens):
    _, model, tok = tiny
    scorer = _scorer(tiny, max_tokens=256, batch_tokens=batch_tokens)
    table = _table(ROWS)
    cols, stats = L.score_subset(scorer, table, np.arange(len(ROWS)))
    assert stats == {"scored": len(ROWS), "truncated": 0, "no_tokens": 0, "skipped_budget": 0}
    for i, (p, r) in enumerate(ROWS):
        want_c, want_a, want_n, _ = _naive_row(
            model, tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}], 256
        )
        got_c = cols["loss_response_given_prompt"][i].as_py()
        got_a = cols["loss_response"][i].as_py()
        assert got_c == pytest.approx(want_c, rel=1e-4), (i, got_c, want_c)
        assert got_a == pytest.approx(want_a, rel=1e-4), (i, got_a, want_a)
        assert cols["response_tokens"][i].as_py() == want_n
        assert cols["ifd"][i].as_py() == pytest.approx(got_c / got_a, rel=1e-12)
        assert cols["loss_truncated"][i].as_py() is False
    # The losses differ between rows and between the two conditions: the comparison above is not vacuous.
    lc = np.array(cols["loss_response_given_prompt"].to_pylist())
    la = np.array(cols["loss_response"].to_pylist())
    assert len(set(np.round(lc, 6))) == len(ROWS) and np.all(np.abs(lc - la) > 1e-3)


def test_scorer_never_calls_full_logits(tiny, monkeypatch):
    _, model, _ = tiny
    scorer = _scorer(tiny)

    def boom(*a, **k):
        raise AssertionError("the scorer must not call model(...).logits")

    monkeypatch.setattr(model, "forward", boom)
    calls = []
    real = X.xent
    monkeypatch.setattr(X, "xent", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    _, stats = L.score_subset(scorer, _table(ROWS[:2]), np.arange(2))
    assert stats["scored"] == 2 and calls
    # Only response positions reach the head: 2 rows x 2 conditions x (content + <|im_end|>) tokens.
    assert sum(s[0] for s in calls) == 2 * ((6 + 1) + (1 + 1))


def test_truncation_reported_and_consistent(tiny):
    _, model, tok = tiny
    max_tokens = 27  # row 0 needs 26 tokens; row 2 (50) is cut mid-response; row 5's response starts at 30
    scorer = _scorer(tiny, max_tokens=max_tokens)
    cols, stats = L.score_subset(scorer, _table(ROWS), np.arange(len(ROWS)))
    want_cut = []
    for i, (p, r) in enumerate(ROWS):
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        want_c, want_a, want_n, cut = _naive_row(model, tok, msgs, max_tokens)
        want_cut.append(cut)
        assert cols["loss_truncated"][i].as_py() is cut
        if want_n == 0:
            assert cols["loss_response"][i].as_py() is None and cols["response_tokens"][i].as_py() == 0
            continue
        assert cols["response_tokens"][i].as_py() == want_n
        assert cols["loss_response_given_prompt"][i].as_py() == pytest.approx(want_c, rel=1e-4)
        assert cols["loss_response"][i].as_py() == pytest.approx(want_a, rel=1e-4)
    assert want_cut[2] and want_cut[5] and not want_cut[0]
    assert stats["truncated"] == sum(want_cut)
    assert stats["no_tokens"] == 1  # row 5: its 18-word prompt leaves no room for the response
    assert stats["scored"] + stats["no_tokens"] == len(ROWS)


def test_multi_turn_scores_every_assistant_turn(tiny):
    _, model, tok = tiny
    convs = [
        [
            {"role": "user", "content": "what is two plus four"},
            {"role": "assistant", "content": "six"},
            {"role": "user", "content": "and five plus four"},
            {"role": "assistant", "content": "nine thanks"},
        ],
        [{"from": "human", "value": "name colors"}, {"from": "gpt", "value": "red green"}],
    ]
    table = pa.table(
        {
            "prompt": ["x", "name colors"],
            "response": ["nine thanks", "red green"],
            "format": ["chat", "sharegpt"],
            "messages": pa.array(
                [convs[0], None], pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
            ),
            "conversations": pa.array(
                [None, convs[1]], pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
            ),
        }
    )
    cols, stats = L.score_subset(_scorer(tiny), table, np.arange(2))
    assert stats["scored"] == 2
    want_c, want_a, want_n, _ = _naive_row(model, tok, convs[0], 256)
    assert cols["response_tokens"][0].as_py() == want_n == (1 + 1) + (2 + 1)
    assert cols["loss_response_given_prompt"][0].as_py() == pytest.approx(want_c, rel=1e-4)
    assert cols["loss_response"][0].as_py() == pytest.approx(want_a, rel=1e-4)
    sg = [{"role": "user", "content": "name colors"}, {"role": "assistant", "content": "red green"}]
    want_c, want_a, want_n, _ = _naive_row(model, tok, sg, 256)
    assert cols["loss_response_given_prompt"][1].as_py() == pytest.approx(want_c, rel=1e-4)
    assert cols["response_tokens"][1].as_py() == want_n == 3


def test_stage_scores_kept_rows_within_a_row_budget(tiny):
    scorer = _scorer(tiny)
    stage = L.LossStage(L.LossConfig(loss_budget="3"), scorer=scorer)
    verdict = ["kept", "too_short", "kept", "kept", "kept", "kept"]
    batch = pa.RecordBatch.from_pydict({**_table(ROWS).to_pydict(), "verdict": verdict})
    out = next(stage(iter([batch])))
    assert out.num_rows == len(ROWS) and out.column("verdict").to_pylist() == verdict
    got = out.column("loss_response").to_pylist()
    # Three kept rows in input order (0, 2, 3) are scored; the rejected row and the rows past the budget are null.
    assert [g is not None for g in got] == [True, False, True, True, False, False]
    assert out.column("response_tokens").to_pylist()[1] is None
    assert stage.stats == {"skipped_verdict": 1, "scored": 3, "truncated": 0, "no_tokens": 0, "skipped_budget": 2}
    # The budget is spent: a second batch gets only nulls.
    out2 = next(stage(iter([batch])))
    assert out2.column("ifd").null_count == len(ROWS)


def test_minutes_budget_of_zero_scores_nothing(tiny):
    cols, stats = L.score_subset(_scorer(tiny), _table(ROWS), np.arange(len(ROWS)), L.parse_loss_budget("0m"))
    assert stats["scored"] == 0 and stats["skipped_budget"] == len(ROWS)
    assert cols["loss_response"].null_count == len(ROWS)


def test_global_stage_scores_kept_rows_by_priority(tiny):
    scorer = _scorer(tiny)

    class Ctx:
        def frame(self, columns):
            t = _table(ROWS).to_pydict()
            df = pl.DataFrame(
                {
                    "_shard": [0] * 6,
                    "row": list(range(6)),
                    "verdict": ["kept", "kept", "exact_duplicate", "kept", "kept", "kept"],
                    "uncertainty": [0.1, 0.9, 0.99, 0.5, None, 0.7],
                    **t,
                }
            )
            for c in columns:
                if c not in df.columns:
                    df = df.with_columns(pl.lit(None).alias(c))
            return df.select(["_shard", "row", "verdict"] + columns)

    st = L.LossGlobalStage(L.LossConfig(loss_budget="2", priority="uncertainty"), scorer=scorer)
    out = st.run(Ctx())
    scored = out.filter(pl.col("loss_response").is_not_null())["row"].sort().to_list()
    assert scored == [1, 5]  # the two most uncertain kept rows; row 2 is a duplicate
    assert st.stats["candidates"] == 5 and st.stats["scored"] == 2 and st.stats["skipped_budget"] == 3


def test_parse_loss_budget():
    assert L.parse_loss_budget(-1) == L.Budget()
    assert L.parse_loss_budget("2000").rows == 2000
    assert L.parse_loss_budget(500).rows == 500
    assert L.parse_loss_budget("10m").seconds == 600.0
    assert L.parse_loss_budget("1.5min").seconds == 90.0
    with pytest.raises(ValueError, match="row count"):
        L.parse_loss_budget("ten")


def test_cuda_without_gpu_raises(tiny):
    X.set_cuda_override(False)
    try:
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            _scorer(tiny, max_tokens=8).__class__(L.LossConfig(model=tiny[0], device="cuda"))
    finally:
        X.set_cuda_override(None)


def test_local_folder_loads_by_path(tiny):
    folder, model, tok = tiny
    scorer = L.LossScorer(L.LossConfig(model=folder, device="cpu"))
    cols, _ = L.score_subset(scorer, _table(ROWS[:1]), np.arange(1))
    want_c, _, _, _ = _naive_row(
        model, tok, [{"role": "user", "content": ROWS[0][0]}, {"role": "assistant", "content": ROWS[0][1]}], 512
    )
    assert cols["loss_response_given_prompt"][0].as_py() == pytest.approx(want_c, rel=1e-4)
    with pytest.raises(RuntimeError, match="neither 'smollm2' nor a local folder"):
        L.LossScorer(L.LossConfig(model="/no/such/model", device="cpu"))


def test_shared_prefix_cache_changes_nothing(tiny):
    # The tiny template opens every sequence with the same 8 tokens (system turn + <|im_start|>): they are computed
    # once and served from a key/value cache; the losses must not move.
    on, off = _scorer(tiny, batch_tokens=64), _scorer(tiny, batch_tokens=64, share_prefix=False)
    got, _ = L.score_subset(on, _table(ROWS), np.arange(len(ROWS)))
    want, _ = L.score_subset(off, _table(ROWS), np.arange(len(ROWS)))
    assert on.prefix_tokens_reused > 0 and off.prefix_tokens_reused == 0
    for name in ("loss_response", "loss_response_given_prompt"):
        np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(), rtol=1e-5)
