"""engine/stages/loss.py with a tiny random Llama (2 layers, 211-word vocabulary) and a word-level tokenizer with a ChatML
template, both built here and saved to a tmp folder: no downloads. The scorer (backbone + kernels.xent, batched,
sorted by length) must equal a naive per-sequence ``model(...).logits`` + ``cross_entropy`` computation whose
response positions are found independently (from token counts, not from the scorer's character spans)."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from engine.models import chat_template as CT
from engine.models import lm_scorer as S
from engine.run.context import MemoryContext
from engine.stages import loss as L
from kernels import xent as X
from tests.tiny_chat_lm import CHATML, build_tiny_chat_llama

WORDS = str.split(
    "give three tips for staying healthy eat well sleep enough exercise daily what is two plus four the answer "
    "write a poem about sea waves blue deep and wide translate hello into french bonjour summarize this text it "
    "was long short name colors red green yellow explain why sky sunlight scatters more than other wavelengths "
    "you are helpful assistant thanks ok sure here list of numbers one five six seven eight nine ten"
)
TEMPLATE = CHATML


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    # Larger head weights than the 0.02 init spread the losses (~2-9 nats), so the ratio test has teeth.
    build_tiny_chat_llama(folder, WORDS, fillers=200, vocab_size=211, hidden=64, max_positions=256, head_scale=40)
    tok = AutoTokenizer.from_pretrained(folder)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return str(folder), m, tok


def _scorer(tiny, **kw):
    folder, model, tok = tiny
    return S.LossScorer(L.LossConfig(model=folder, device="cpu", **kw), model=model, tokenizer=tok)


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
        assert cols["loss_tokens"][i].as_py() == want_n
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
            assert cols["loss_response"][i].as_py() is None and cols["loss_tokens"][i].as_py() == 0
            continue
        assert cols["loss_tokens"][i].as_py() == want_n
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
    assert cols["loss_tokens"][0].as_py() == want_n == (1 + 1) + (2 + 1)
    assert cols["loss_response_given_prompt"][0].as_py() == pytest.approx(want_c, rel=1e-4)
    assert cols["loss_response"][0].as_py() == pytest.approx(want_a, rel=1e-4)
    sg = [{"role": "user", "content": "name colors"}, {"role": "assistant", "content": "red green"}]
    want_c, want_a, want_n, _ = _naive_row(model, tok, sg, 256)
    assert cols["loss_response_given_prompt"][1].as_py() == pytest.approx(want_c, rel=1e-4)
    assert cols["loss_tokens"][1].as_py() == want_n == 3


def test_minutes_budget_of_zero_scores_nothing(tiny):
    cols, stats = L.score_subset(_scorer(tiny), _table(ROWS), np.arange(len(ROWS)), L.parse_loss_budget("0m"))
    assert stats["scored"] == 0 and stats["skipped_budget"] == len(ROWS)
    assert cols["loss_response"].null_count == len(ROWS)


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
            S.LossScorer(L.LossConfig(model=tiny[0], device="cuda"))
    finally:
        X.set_cuda_override(None)


def test_local_folder_loads_by_path(tiny):
    folder, model, tok = tiny
    scorer = S.LossScorer(L.LossConfig(model=folder, device="cpu"))
    cols, _ = L.score_subset(scorer, _table(ROWS[:1]), np.arange(1))
    want_c, _, _, _ = _naive_row(
        model, tok, [{"role": "user", "content": ROWS[0][0]}, {"role": "assistant", "content": ROWS[0][1]}], 512
    )
    assert cols["loss_response_given_prompt"][0].as_py() == pytest.approx(want_c, rel=1e-4)
    with pytest.raises(RuntimeError, match="neither 'smollm2' nor a local folder"):
        S.LossScorer(L.LossConfig(model="/no/such/model", device="cpu"))


def test_shared_prefix_cache_changes_nothing(tiny):
    # The tiny template opens every sequence with the same 8 tokens (system turn + <|im_start|>): they are computed
    # once and served from a key/value cache; the losses must not move.
    on, off = _scorer(tiny, batch_tokens=64), _scorer(tiny, batch_tokens=64, share_prefix=False)
    got, _ = L.score_subset(on, _table(ROWS), np.arange(len(ROWS)))
    want, _ = L.score_subset(off, _table(ROWS), np.arange(len(ROWS)))
    assert on.prefix_tokens_reused > 0 and off.prefix_tokens_reused == 0
    for name in ("loss_response", "loss_response_given_prompt"):
        np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- the global stage
def _ctx(rows, verdicts, shards, extra=None):
    t = _table(rows, extra)
    t = t.append_column("_shard", pa.array(shards, pa.int32())).append_column("row", pa.array(range(len(rows))))
    return MemoryContext(t.append_column("verdict", pa.array(verdicts)))


class CountingContext(MemoryContext):
    """Counts the pieces of text the stage reads back."""

    pieces = 0

    def iter_frames(self, columns, kept_only=False, where=None, keys=None):
        for f in super().iter_frames(columns, kept_only, where, keys):
            self.pieces += "response" in columns
            yield f


def _by_key(out: pl.DataFrame) -> dict[int, dict]:
    return {r["row"]: r for r in out.iter_rows(named=True)}


def test_global_stage_streams_kept_rows_within_a_row_budget(tiny):
    # Rows 0-6 over shards 0, 0, 1, 1, 1, 2, 2; row 1 is rejected, row 2 has an empty response (nothing to score,
    # so it costs no budget). A budget of 3 scores rows 0, 3, 4 and stops before shard 2 is even read.
    rows = [ROWS[0], ROWS[1], ("empty answer", ""), ROWS[2], ROWS[3], ROWS[4], ROWS[5]]
    verdicts = ["kept", "too_short", "kept", "kept", "kept", "kept", "kept"]
    ctx = _ctx(rows, verdicts, [0, 0, 1, 1, 1, 2, 2])
    ctx.__class__ = CountingContext
    scorer = _scorer(tiny, chunk_rows=2)
    st = L.LossGlobalStage(L.LossConfig(loss_budget="3", chunk_rows=2), scorer=scorer)
    out = st.run(ctx)
    assert out.columns == ["_shard", "row", *L.LOSS_COLUMNS]
    assert dict(zip(out.columns, out.dtypes)) == {"_shard": pl.Int32, "row": pl.Int64, "loss_response": pl.Float64,
                                                  "loss_response_given_prompt": pl.Float64, "ifd": pl.Float64,
                                                  "loss_tokens": pl.Int32, "loss_truncated": pl.Boolean}  # fmt: skip
    got = _by_key(out)
    assert sorted(got) == [0, 2, 3, 4]  # attempted rows only; row 5, 6 past the budget, row 1 rejected
    assert got[2]["loss_tokens"] == 0 and got[2]["loss_response"] is None and got[2]["loss_truncated"] is False
    assert st.stats == {"candidates": 6, "scored": 3, "truncated": 0, "no_tokens": 1, "skipped_budget": 2,
                        "prefix_tokens_reused": st.stats["prefix_tokens_reused"]}  # fmt: skip
    assert ctx.pieces == 2  # shard 2's text was never read
    # The same numbers as scoring the rows directly.
    want, _ = L.score_subset(_scorer(tiny), _table(rows), np.array([0, 3, 4]))
    for r in (0, 3, 4):
        for name in ("loss_response", "loss_response_given_prompt", "ifd", "loss_tokens"):
            assert got[r][name] == pytest.approx(want[name][r].as_py(), rel=1e-6), (r, name)
    info = st.manifest_info()
    assert info["xent_paths_used"].get("cpu float32") == "torch-chunked" and info["render"]["rows_cached"] > 0


@pytest.mark.parametrize("fetch_rows", [1, 50])  # one text pass per row, or one for all
def test_global_stage_scores_kept_rows_by_priority(tiny, monkeypatch, fetch_rows):
    rows = [ROWS[0], ROWS[1], ROWS[1], ("empty answer", ""), ROWS[3], ROWS[4], ROWS[5]]
    verdicts = ["kept", "kept", "exact_duplicate", "kept", "kept", "kept", "kept"]
    prio = [0.1, 0.9, 0.99, 0.95, 0.5, None, 0.7]
    ctx = _ctx(rows, verdicts, [1, 0, 0, 1, 1, 0, 1], {"uncertainty": prio})
    planned = []
    real = S.build_plan
    monkeypatch.setattr(
        S, "build_plan", lambda tok, convs, *a, **k: planned.extend(convs) or real(tok, convs, *a, **k)
    )
    scorer = _scorer(tiny)
    cfg = L.LossConfig(loss_budget="3", priority="uncertainty", fetch_rows=fetch_rows)
    st = L.LossGlobalStage(cfg, scorer=scorer)
    got = _by_key(st.run(ctx))
    # Priority order of the kept rows: 3 (no response: costs nothing), 1, 6, 4, 0, 5 (null last); 2 is a duplicate.
    assert sorted(k for k, v in got.items() if v["loss_response"] is not None) == [1, 4, 6]
    assert sorted(got) == [1, 3, 4, 6]
    assert [c[-1]["content"] if c else None for c in planned] == [None, rows[1][1], rows[6][1], rows[4][1]]
    assert st.stats["candidates"] == 6 and st.stats["scored"] == 3 and st.stats["skipped_budget"] == 2
    want, _ = L.score_subset(_scorer(tiny), _table(rows), np.array([1, 4, 6]))
    for r in (1, 4, 6):
        assert got[r]["loss_response_given_prompt"] == pytest.approx(want["loss_response_given_prompt"][r].as_py())


def test_global_stage_without_candidates_loads_nothing():
    st = L.LossGlobalStage(L.LossConfig(model="/no/such/model"))
    assert st.run(_ctx(ROWS[:2], ["too_short", "exact_duplicate"], [0, 0])) is None
    assert st.stats == {"candidates": 0} and st.manifest_info() == {}


def test_registered_global_stage():
    from engine import registry

    spec = registry.spec("loss")
    assert spec.kind == "global" and spec.cls is L.LossGlobalStage and L.LossGlobalStage.name == "loss"
    assert tuple(spec.columns) == tuple(L.LOSS_COLUMNS)
    flags = {o.flag: o for o in spec.options}
    assert (
        flags["--loss"].value == "on" and flags["--no-loss"].value == "off" and flags["--loss-max-tokens"].type is int
    )
    assert spec.is_enabled(type("C", (), {"loss": L.LossConfig(enabled="on")})())
    assert not spec.is_enabled(type("C", (), {"loss": L.LossConfig(enabled="auto")})())


def test_resolve_turns_auto_into_on_or_off():
    def cfg(enabled):
        return type("C", (), {"loss": L.LossConfig(enabled=enabled)})()

    for facts, want in (({"cuda": True}, "on"), ({"cuda": False}, "off")):
        c = cfg("auto")
        got = L._resolve(c, facts)
        assert c.loss.enabled == want and got["enabled"] == want and "auto" in got["reason"]
    for mode in ("on", "off", "ON"):
        c = cfg(mode)
        assert L._resolve(c, {"cuda": True})["enabled"] == mode.lower() == c.loss.enabled
    X.set_cuda_override(False)  # without facts: kernels.xent's probe (imported by this test module)
    try:
        c = cfg("auto")
        assert L._resolve(c, {})["enabled"] == "off"
    finally:
        X.set_cuda_override(None)
    with pytest.raises(ValueError, match="auto, on or off"):
        L._resolve(cfg("maybe"), {})


def test_row_budget_skips_rows_without_tokens_across_chunks(tiny):
    # One row per chunk, the planner a chunk ahead: the budget of 3 still means the first 3 rows with tokens.
    rows = [("a", ""), ROWS[0], ("b", ""), ("c", ""), ROWS[1], ROWS[2], ROWS[3]]
    cols, stats = L.score_subset(_scorer(tiny, chunk_rows=1), _table(rows), np.arange(len(rows)), L.Budget(rows=3))
    assert [v is not None for v in cols["loss_response"].to_pylist()] == [False, True, False, False, True, True, False]
    assert stats == {"scored": 3, "truncated": 0, "no_tokens": 3, "skipped_budget": 1}


def test_planner_runs_one_chunk_ahead_in_a_thread(tiny, monkeypatch):
    import threading

    scorer = _scorer(tiny, chunk_rows=1)
    events, started = [], {i: threading.Event() for i in range(len(ROWS))}
    real_plan, real_run = S.build_plan, scorer._run_plan

    def plan(tok, convs, *a, **k):
        i = ROWS.index((convs[0][0]["content"], convs[0][1]["content"]))
        events.append(("plan", i, threading.current_thread() is threading.main_thread()))
        started[i].set()
        return real_plan(tok, convs, *a, **k)

    def run(p, deadline):
        i = sum(e[0] == "run" for e in events)
        events.append(("run", i, threading.current_thread() is threading.main_thread()))
        if i == 0:
            # Chunk 1 is planned while chunk 0 is in the model, and chunk 2 not before chunk 1 is taken.
            assert started[1].wait(10)
            assert not started[2].wait(0.2)
        return real_run(p, deadline)

    monkeypatch.setattr(S, "build_plan", plan)
    monkeypatch.setattr(scorer, "_run_plan", run)
    _, stats = L.score_subset(scorer, _table(ROWS), np.arange(len(ROWS)))
    assert stats["scored"] == len(ROWS)
    assert all(not main for kind, _, main in events if kind == "plan")
    assert all(main for kind, _, main in events if kind == "run")
    # Never more than one chunk ahead: plan i starts after run i - 2 has finished, i.e. after run i - 1 started.
    for k, (kind, i, _) in enumerate(events):
        if kind == "plan":
            assert sum(e[0] == "run" for e in events[:k]) >= i - 1


def test_planner_error_reaches_the_caller(tiny, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(S, "build_plan", boom)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        L.score_subset(_scorer(tiny), _table(ROWS), np.arange(len(ROWS)))


# ---------------------------------------------------------------------------------------------------- rendering
def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Single- and multi-turn conversations, with and without system turns, empty prompts and empty contents."""
    rng = np.random.default_rng(seed)

    def text():
        k = int(rng.integers(0, 9))
        words = " ".join(rng.choice(WORDS, k)) if k else ""
        return words if rng.random() < 0.8 else f"  {words}\n"  # some with whitespace a template could trim

    shapes = [["assistant"], ["user", "assistant"], ["system", "user", "assistant"],
              ["user", "assistant", "user", "assistant"], ["system", "user", "assistant", "user", "assistant"],
              ["user", "assistant", "user", "assistant", "user", "assistant"]]  # fmt: skip
    out = []
    for _ in range(n):
        roles = shapes[int(rng.integers(len(shapes)))]
        out.append([{"role": r, "content": text()} for r in roles])
    return out


def _tokenizer(tiny, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[0])
    tok.chat_template = template
    return tok


CONTENT_IF = TEMPLATE.replace("message['content']", "(message['content'] if message['content'] else '(empty)')")


@pytest.mark.parametrize("template", [TEMPLATE, CONTENT_IF, None], ids=["chatml", "tests-empty", "no-template"])
def test_shape_cache_renders_like_the_template(tiny, template):
    tok = _tokenizer(tiny, template)
    convs = _conversations(400)
    assert any(c[0]["content"] == "" for c in convs if c[0]["role"] == "user")
    r = CT.ChatRenderer(tok)
    for c in convs:
        assert r.render(c) == CT.render(tok, c)
        alone = [m for m in c if m["role"] == "assistant"][:1]
        assert r.render(alone) == CT.render(tok, alone)
    info = r.info()
    assert info["shapes_per_row"] == 0 and info["rows_per_row"] == info["shapes"] <= 30
    assert info["rows_cached"] == 2 * len(convs) - info["shapes"]


def test_shape_cache_falls_back_for_a_template_that_trims(tiny):
    tok = _tokenizer(tiny, TEMPLATE.replace("message['content']", "message['content'] | trim"))
    convs = [[{"role": "user", "content": "name three colors"}, {"role": "assistant", "content": "red"}],
             [{"role": "user", "content": "  name colors \n"}, {"role": "assistant", "content": " green "}]]  # fmt: skip
    r = CT.ChatRenderer(tok)
    got = [r.render(c) for c in convs]
    assert got == [CT.render(tok, c) for c in convs]
    # The first conversation has nothing to trim (it alone would have passed), the probe still caught the template.
    assert "<|im_start|>user\nname colors<|im_end|>" in got[1][0]
    assert r.info() == {"shapes": 0, "shapes_per_row": 1, "rows_cached": 0, "rows_per_row": 2}
    # Assistant contents are never seen by the template: the span holds the content untrimmed, in both paths.
    text, [(a, b)] = got[1]
    assert text[a:b] == " green "


def test_shape_cache_keeps_the_missing_assistant_error(tiny):
    tok = _tokenizer(tiny, TEMPLATE.replace("message['content']", "(message['content'] if message['role'] != "
                                            "'assistant' else '')"))  # fmt: skip
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "six"}]
    with pytest.raises(ValueError, match="every assistant turn exactly once"):
        CT.ChatRenderer(tok).render(conv)
