"""engine/train/sft.py on a tiny random Llama (2 layers, 131-word vocabulary) with a word-level tokenizer and a ChatML
template, both built in a tmp folder: no downloads. Planted truth: the trained tokens are exactly the response words
plus the end of turn (found here from word lists, not from the module's character spans); a repetitive planted task
is learned (held-out response loss falls); the saved folder reloads with plain ``AutoModelForCausalLM`` and gives
the logits of the trained model (the merged LoRA equals base + adapter)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from engine.errors import UserError
from engine.train import sft as S
from engine.train.finetune import FinetuneConfig, finetune
from tests.tiny_chat_lm import CHATML, build_tiny_chat_llama

ROOT = Path(__file__).resolve().parents[3]
WORDS = str.split(
    "you are a helpful assistant what is two plus four six count to five one three name colors red green blue "
    "say hello bonjour the sky answer yes no repeat after me cat dog"
)
TEMPLATE = CHATML


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sft_llama")
    # A 0.02-init head caps every logit near 0.6 whatever the hidden state: LoRA (which leaves the head alone) could
    # barely move the loss. A larger head lets a few steps show learning, as on a real model.
    vocab = build_tiny_chat_llama(folder, WORDS, fillers=80, hidden=32, max_positions=128, head_scale=20)
    return str(folder), vocab


def _rows(n: int, seed: int, prefix: str) -> pl.DataFrame:
    """A planted task a 2-layer model learns in a few steps: each prompt's answer is a fixed word repeated."""
    rng = np.random.default_rng(seed)
    tasks = [("what is two plus four", "six"), ("name colors", "red"), ("say hello", "bonjour"),
             ("count to five", "one"), ("repeat after me cat", "cat")]  # fmt: skip
    rows = []
    for i in range(n):
        p, w = tasks[int(rng.integers(len(tasks)))]
        k = int(rng.integers(3, 8))
        rows.append({"id": f"{prefix}{i}", "prompt": p, "response": " ".join([w] * k), "label": None})
    return pl.DataFrame(rows, schema={"id": pl.String, "prompt": pl.String, "response": pl.String, "label": pl.String})


def _cfg(folder, **kw):
    base = {"task": "sft", "model": folder, "lr": 5e-3, "batch_size": 8, "max_length": 64, "max_steps": 12,
            "epochs": 5, "patience": 0, "device": "cpu", "lora_r": 8, "lora_alpha": 16, "seed": 0}  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def test_labels_mask_exactly_the_prompt(tiny):
    from transformers import AutoTokenizer

    folder, vocab = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    rows = pl.DataFrame({"id": ["a", "b"], "prompt": ["what is two plus four", ""], "response": ["six six", "hello"],
                         "label": [None, None]})  # fmt: skip
    ids, masks, dropped = S.encode(tok, rows, max_length=64)
    assert dropped == 0
    inv = {i: w for w, i in vocab.items()}
    words = [[inv[t] for t in x] for x in ids]
    # Rendered by hand from the template: system turn, user turn, assistant header, response, end of turn.
    assert words[0] == ["<|im_start|>", "system", "you", "are", "a", "helpful", "assistant", "<|im_end|>",
                        "<|im_start|>", "user", "what", "is", "two", "plus", "four", "<|im_end|>",
                        "<|im_start|>", "assistant", "six", "six", "<|im_end|>"]  # fmt: skip
    assert masks[0] == [0] * 18 + [1, 1, 1]
    # No prompt: no user turn; the response alone is trained.
    assert [w for w, m in zip(words[1], masks[1]) if m] == ["hello", "<|im_end|>"]
    assert words[1][: masks[1].index(1)] == ["<|im_start|>", "system", "you", "are", "a", "helpful", "assistant",
                                             "<|im_end|>", "<|im_start|>", "assistant"]  # fmt: skip
    # Cut inside the prompt: nothing left to train on, the row is dropped; cut inside the response: kept, shorter.
    _, masks2, dropped2 = S.encode(tok, rows, max_length=19)
    assert dropped2 == 0 and masks2[0] == [0] * 18 + [1] and masks2[1] == masks[1]
    ids3, _, dropped3 = S.encode(tok, rows, max_length=10)
    assert dropped3 == 2 and ids3 == []


def test_trl_builds_labels_from_our_mask(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    ids, masks, _ = S.encode(tok, _rows(6, 1, "t"), max_length=64)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = _cfg(folder)
    recipe = {"lr": 1e-3, "batch_size": 2, "max_length": 64, "planned_steps": 1, "epoch_evals": False}
    trainer = S.make_trainer(model, tok, S._dataset(ids, masks), None, cfg, recipe, tmp_path / "w")
    got = trainer.train_dataset
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in got}
    assert len(by_ids) == len(set(map(tuple, ids)))
    for x, m in zip(ids, masks):
        assert by_ids[tuple(x)] == [t if k else -100 for t, k in zip(x, m)]


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_learns_saves_and_reloads(tiny, tmp_path, adapter):
    from transformers import AutoModelForCausalLM

    folder, _ = tiny
    out = tmp_path / "model"
    out.mkdir()
    lr = 3e-2 if adapter == "lora" else 3e-3
    cfg = _cfg(folder, adapter=adapter, lr=lr, max_steps=20)
    m = S.train_sft(_rows(64, 0, "tr"), _rows(16, 1, "va"), _rows(16, 2, "te"), cfg, out)
    assert m["steps"] == 20  # --max-steps honoured (64 rows / 8 = 8 steps per epoch, 5 epochs allowed)
    for split in ("val", "test"):
        e = m[split]
        assert e["loss_after"] < e["loss_before"] - 0.5, (split, e)
        assert e["ppl_after"] == pytest.approx(np.exp(e["loss_after"]), rel=1e-3)
        assert e["tokens"] > 16
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and max(r["step"] for r in log) <= 20
    assert not (out / ".trainer").exists()

    # The saved folder loads without peft and scores the held-out rows as the trained model did.
    re = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TEMPLATE
    ids, masks, _ = S.encode(tok, _rows(16, 1, "va"), 64)
    loss, n = S.response_loss(re, ids, masks, torch.device("cpu"), tok.pad_token_id)
    assert n == m["val"]["tokens"] and loss == pytest.approx(m["val"]["loss_after"], abs=1e-4)
    if adapter == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, out / "adapter").eval()
        x = torch.tensor([ids[0]])
        with torch.no_grad():
            assert torch.allclose(re(x).logits, peft(x).logits, atol=1e-4)


def test_cli_end_to_end_and_errors(tiny, tmp_path):
    folder, _ = tiny
    paths = {}
    for name, (n, seed) in {"train": (24, 0), "val": (8, 1), "test": (8, 2)}.items():
        df = _rows(n, seed, name).select(pl.col("prompt").alias("instruction"), pl.lit("").alias("input"),
                                         pl.col("response").alias("output"))  # fmt: skip
        paths[name] = tmp_path / f"{name}.jsonl"
        df.write_ndjson(paths[name])
    out = tmp_path / "m"

    def cli(*args):
        return subprocess.run([sys.executable, "cli.py", "finetune", str(paths["train"]), "--task", "sft",
                               "--val", str(paths["val"]), "--test", str(paths["test"]), *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip

    r = cli("--out", out, "--model", folder, "--max-steps", 2, "--batch-size", 4, "--adapter", "full", "--device",
            "cpu", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    # --quiet: nothing printed, neither TRL's progress bar and log dicts nor transformers' loading / saving bars.
    assert r.stdout.strip() == "", r.stdout[-2000:]
    for noise in ("it/s]", "s/it]", "'loss'", "Loading weights", "Writing model", "%|"):
        assert noise not in r.stderr, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    # Planted rows repeat, so some training rows are exact copies of val/test rows: finetune drops them first.
    assert m["task"] == "sft" and m["steps"] == 2 and m["rows"]["train"] + m["rows"]["leak_dropped"] == 24
    assert m["rows_encoded"]["train"] == m["rows"]["train"]
    assert set(m["val"]) == {"loss_before", "ppl_before", "loss_after", "ppl_after", "tokens"}
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()

    with pytest.raises(UserError, match="--model .*nope: no such folder"):
        finetune(paths["train"], tmp_path / "m2", _cfg(str(tmp_path / "nope")), str(paths["val"]), str(paths["test"]))


def test_user_errors(tiny, tmp_path):
    folder, _ = tiny
    rows = _rows(4, 0, "x")
    with pytest.raises(UserError, match="--max-length"):
        # Every prompt is longer than 12 tokens (system turn + user turn): nothing to train on.
        S.train_sft(rows, rows, rows, _cfg(folder, max_length=12), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="--model .*empty: not a model folder"):
        S.load_base(str(empty))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            S.resolve_device("cuda")


def test_early_stopping_on_validation_loss(tiny, tmp_path):
    folder, _ = tiny
    # lr 1e-12: the validation loss cannot improve after the first epoch, so patience 1 stops after epoch 2 of 4.
    cfg = _cfg(folder, lr=1e-12, max_steps=-1, epochs=4, patience=1)
    m = S.train_sft(_rows(16, 0, "tr"), _rows(8, 1, "va"), _rows(8, 2, "te"), cfg, tmp_path)
    assert m["early_stopping"] == {"used": True, "stopped": True, "best_epoch": 1.0, "patience": 1}
    assert m["steps"] == 4 and m["epochs_run"] == 2.0  # 16 rows / 8 = 2 steps per epoch
    evals = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in evals) == 2


def test_response_nll_equals_naive_per_row_logits(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, masks, _ = S.encode(tok, _rows(7, 3, "n"), 64)
    # batch_tokens 60: several length-sorted, right-padded batches.
    sums, counts = S.response_nll(model, ids, masks, torch.device("cpu"), tok.pad_token_id, batch_tokens=60)
    for x, m, s, c in zip(ids, masks, sums, counts):
        with torch.no_grad():
            logits = model(torch.tensor([x])).logits[0].double()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(x[1:]), reduction="none")
        want = nll[torch.tensor(m[1:], dtype=torch.bool)]
        assert c == len(want) == sum(m) and s == pytest.approx(float(want.sum()), rel=1e-5)
    loss, n = S.response_loss(model, ids, masks, torch.device("cpu"), tok.pad_token_id)
    assert n == counts.sum() and loss == pytest.approx(sums.sum() / n, rel=1e-6)  # other batches: float32 order
