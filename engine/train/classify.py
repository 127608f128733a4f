"""Sequence classification: ``train_classifier(train, val, test, config, out)`` fine-tunes
``AutoModelForSequenceClassification`` on a local encoder (the shipped all-MiniLM-L6-v2 by default) and writes a
``save_pretrained`` folder that reloads with ``AutoModelForSequenceClassification.from_pretrained(out)`` and predicts
the labels reported in ``metrics.json`` (``id2label`` / ``label2id`` are in its config).

**Strategies** (``--strategy``):
- ``head``: the encoder is frozen, so its output is a fixed function of the text: it is computed once per text and
  cached (``<user cache>/classify_features/<model fingerprint, max length>/``, keyed by a hash of the text), and only
  the classification head trains, on those features, in a plain loop (below). A second run on the same texts (another
  arm or seed of ``cli.py compare``) encodes nothing.
- ``last-k``: the top ``--last-k`` encoder layers and the head train; ``full``: every weight; ``gradual``: epoch e
  (0-based) trains the head and the top e + 1 layers (the embeddings join once every layer has), ULMFiT's gradual
  unfreezing. The optimiser holds every parameter from the start; a frozen one has no gradient, so AdamW skips it.
  ``train_log.jsonl`` records which layers trained in each epoch.

**What the head is.** The head must be the model's own head, or the saved folder would not reproduce the metrics.
For BERT that is ``classifier(dropout(tanh(pooler(h_CLS))))``, so the cache holds the last layer's [CLS] hidden state
(float32, so that the reloaded model's predictions equal the ones measured) and the head trains the pooler's dense
layer and the classifier together (a one-hidden-layer MLP on [CLS]). MiniLM was trained with mean pooling, not
[CLS]; a head on mean-pooled features cannot be expressed by ``BertForSequenceClassification`` (it would need custom
code, ``auto_map``, that plain offline ``from_pretrained`` does not load). Measured on financial_phrasebank
(winnow's stratified 70/15/15 split, 3,333 training rows, class-weighted, test macro-F1;
``bench/bench_compare.py --parts heads``): logistic regression on the mean-pooled embeddings 0.741, on [CLS] 0.700,
this head on [CLS] 0.679. So the head costs about 6 points against a mean-pooling probe that could not be saved as a
plain model; the choice here is a folder any ``from_pretrained`` loads and that predicts what was measured, and
``cli.py compare`` compares arms under one recipe, so the gap is the same for every arm.
DistilBERT (pre_classifier + classifier on [CLS]) and RoBERTa-style heads (dense + out_proj on <s>) are handled the
same way; another architecture needs a non-head strategy.

**Why a plain loop for ``head`` and ``transformers.Trainer`` for the others.** On cached features one epoch over
3,000 rows is a few milliseconds of 384 x 384 matmuls; Trainer would run the frozen encoder again every step (50
rows/s on 2 CPU cores, the whole cost) and its per-step machinery (checkpoints for early stopping, logging) would
dominate the rest. The encoder strategies use Trainer as a user would: a ``compute_loss`` override for class weights,
a weighted sampler for ``--imbalance resample``, ``EarlyStoppingCallback`` on the validation loss with the best
epoch's weights restored, and a callback for gradual unfreezing and the log.

**Imbalance**: ``weight`` = cross-entropy weighted n / (C n_c) per class; ``resample`` = rows drawn with probability
proportional to 1 / n_c (with replacement, n per epoch); ``none``. **Early stopping**: after each epoch the
validation loss (weighted like the training loss) is measured; after ``--patience`` epochs without a better one
training stops and the best epoch's weights are kept.

**Outputs** in ``out``: the model folder (weights, config with id2label, tokenizer), ``train_log.jsonl`` (one JSON
object per epoch: losses, trainable layers, seconds), ``val_predictions.parquet`` and ``test_predictions.parquet``
(``id``, ``label``, ``pred``: what ``cli.py compare``'s paired bootstrap reads). Metrics per split: accuracy,
macro-F1, precision / recall / F1 / support per class, the confusion matrix (rows = true label, columns = predicted,
in ``labels`` order).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import polars as pl

from engine.errors import UserError

STRATEGIES = ("head", "last-k", "full", "gradual")
# Defaults when --lr / --batch-size are -1: the head is a small MLP on fixed features (Adam at 1e-3 converges in tens
# of epochs); the encoder strategies use the usual BERT fine-tuning rates.
DEFAULT_LR = {"head": 1e-3, "last-k": 1e-4, "full": 5e-5, "gradual": 1e-4}
DEFAULT_BATCH = {"head": 64, "last-k": 16, "full": 16, "gradual": 16}
DEFAULT_MAX_LENGTH = 128
# On cached features an epoch is milliseconds; --epochs (default 3, sized for encoder fine-tuning) would leave the head
# underfit, so the head runs at least this many epochs and early stopping on the validation loss ends it.
HEAD_MIN_EPOCHS = 100
# ---------------------------------------------------------------------------------------------------------------
# Labels and metrics
# ---------------------------------------------------------------------------------------------------------------


def _label_key(x: str):
    try:
        return (0, float(x), x)
    except ValueError:
        return (1, 0.0, x)


def label_set(*frames: pl.DataFrame) -> list[str]:
    """Every label of the frames, numbers in numeric order, then text."""
    seen: set[str] = set()
    for f in frames:
        seen.update(str(v) for v in f["label"].drop_nulls().unique().to_list())
    return sorted(seen, key=_label_key)


def metrics_of(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision / recall / F1 / support and the confusion matrix (rows true, columns
    predicted) of integer label codes into ``labels``. A class never predicted has precision 0; macro-F1 averages the
    classes present in y_true or y_pred (a class absent from both says nothing)."""
    c = len(labels)
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    conf = np.bincount(y_true * c + y_pred, minlength=c * c).reshape(c, c)
    tp = np.diag(conf).astype(np.float64)
    support = conf.sum(1)
    predicted = conf.sum(0)
    prec = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    rec = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(c), where=(prec + rec) > 0)
    present = (support + predicted) > 0
    per_class = {
        lab: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, lab in enumerate(labels)
    }
    n = len(y_true)
    return {
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class": per_class,
        "confusion": conf.tolist(),
        "labels": list(labels),
        "rows": int(n),
    }


def _codes(df: pl.DataFrame, label2id: dict[str, int], what: str) -> np.ndarray:
    lab = df["label"]
    if lab.null_count():
        bad = df.filter(pl.col("label").is_null())["id"][0]
        raise UserError(
            f"{what}: {lab.null_count()} row(s) have no label (e.g. {bad}); classification needs a label "
            "on every row (--task sft for unlabelled data)"
        )
    return np.array([label2id[str(v)] for v in lab.to_list()], np.int64)


def _class_weights(y: np.ndarray, c: int, imbalance: str) -> np.ndarray | None:
    if imbalance != "weight":
        return None
    counts = np.bincount(y, minlength=c).astype(np.float64)
    w = np.divide(len(y), c * counts, out=np.zeros(c), where=counts > 0)
    return w


def _sample_weights(y: np.ndarray, c: int) -> np.ndarray:
    counts = np.bincount(y, minlength=c).astype(np.float64)
    return 1.0 / counts[y]


# ---------------------------------------------------------------------------------------------------------------
# The model and its head
# ---------------------------------------------------------------------------------------------------------------


def _model_path(config) -> str:
    if config.model:
        p = config.model
        if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, "config.json")):
            raise UserError(
                f"--model {p}: not a local model folder (config.json, weights, tokenizer); nothing is downloaded"
            )
        return p
    from engine.models.encoder import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:
        raise UserError(str(e).replace("--embedder PATH", "--model PATH")) from None


# (model folder, labels) -> (tokenizer, model as loaded, before any training): cli.py compare trains arms x seeds
# of one model in one process, and building the model again each time cost more than training the head on a loaded
# machine. A run gets a deep copy (90 MB memcpy for MiniLM) with its head re-initialised from its own seed.
_LOADED: dict[tuple[str, tuple[str, ...]], tuple] = {}


def _load(path: str, labels: list[str], seed: int):
    import copy

    import torch

    key = (os.path.abspath(path), tuple(labels))
    if key in _LOADED:
        tok, pristine = _LOADED[key]
        model = copy.deepcopy(pristine)
        torch.manual_seed(seed)
        for name, mod in model.named_modules():  # the newly initialised head, as from_pretrained would draw it
            if not name.startswith(model.base_model_prefix) and name and hasattr(mod, "reset_parameters"):
                model._init_weights(mod)
        return tok, model
    tok, model = _load_fresh(path, labels, seed)
    _LOADED.clear()
    _LOADED[key] = (tok, copy.deepcopy(model))
    return tok, model


def _load_fresh(path: str, labels: list[str], seed: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the head, by design
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            problem_type="single_label_classification",
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"--model {path}: cannot load as a sequence classifier ({str(e).splitlines()[0]})") from None
    return tok, model


def _encoder_layers(model) -> list:
    """The encoder's transformer blocks, bottom to top."""
    base = model.base_model
    for attr in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "h"):
        obj = base
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise UserError(f"--model: cannot find the encoder layers of {type(model).__name__}; use --strategy full")


def _head_parts(model):
    """(head modules, forward(h_cls) -> logits, the head's first Linear) of the model's own classification head on
    the [CLS] state, or None when the architecture's head is not one of the known shapes."""
    import torch

    name = type(model).__name__
    base = model.base_model
    if name.startswith("Bert") and getattr(base, "pooler", None) is not None:
        mods = [base.pooler, model.classifier]

        def fwd(h):
            return model.classifier(model.dropout(base.pooler(h[:, None, :])))

        return mods, fwd, base.pooler.dense
    if name.startswith("DistilBert"):
        mods = [model.pre_classifier, model.classifier]

        def fwd(h):
            return model.classifier(model.dropout(torch.relu(model.pre_classifier(h))))

        return mods, fwd, model.pre_classifier
    if hasattr(model, "classifier") and hasattr(model.classifier, "out_proj"):  # RoBERTa, XLM-R, Camembert ...
        return [model.classifier], lambda h: model.classifier(h[:, None, :]), model.classifier.dense
    return None


def _texts(df: pl.DataFrame) -> tuple[list[str], list[str] | None]:
    """(first texts, second texts or None): a classification row's text is ``response``; rows with a prompt are
    encoded as (prompt, response) pairs."""
    resp = df["response"].fill_null("").to_list()
    prompt = df["prompt"].fill_null("").to_list()
    if any(prompt):
        return prompt, resp
    return resp, None


def _tokenize(tok, df: pl.DataFrame, max_length: int):
    a, b = _texts(df)
    return tok(a, b, truncation=True, max_length=max_length, padding=False)


# ---------------------------------------------------------------------------------------------------------------
# Cached features for the head
# ---------------------------------------------------------------------------------------------------------------


def _text_hashes(df: pl.DataFrame) -> np.ndarray:
    import xxhash

    keys = (df["prompt"].fill_null("") + "\x1f" + df["response"].fill_null("")).to_list()
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(k.encode("utf-8", "surrogatepass")) for k in keys), np.uint64, count=len(keys)
    )


def cls_features(
    model,
    tok,
    df: pl.DataFrame,
    max_length: int,
    device: str,
    model_path: str,
    cache: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """(n, hidden) float32: the last layer's state at position 0 for each row, through the frozen encoder of
    ``model``, cached by (model fingerprint, max length, text)."""
    import torch

    from engine.models.embed_cache import EmbeddingCache, user_cache_dir
    from engine.models.encoder import model_fingerprint

    n = df.height
    dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim)
    keys = _text_hashes(df)
    store = None
    if cache:
        key = f"cls-{os.path.basename(os.path.normpath(model_path))}-{model_fingerprint(model_path)}-L{max_length}"
        store = EmbeddingCache(user_cache_dir() / "classify_features", key, dim, dtype=np.float32)
        found, out = store.lookup(keys)
    else:
        found, out = np.zeros(n, bool), np.zeros((n, dim), np.float32)
    todo = np.flatnonzero(~found)
    if len(todo):
        # one row per distinct text (a repeated text is encoded once)
        ukeys, first, inv = np.unique(keys[todo], return_index=True, return_inverse=True)
        rows = todo[first]
        enc = _tokenize(tok, df[rows], max_length)["input_ids"]
        lens = np.array([len(x) for x in enc])
        order = np.argsort(-lens, kind="stable")
        vec = np.zeros((len(rows), dim), np.float32)
        base = model.base_model.to(device).eval()
        pad = int(tok.pad_token_id or 0)
        budget = 8192  # padded tokens per batch
        bar = _bar(len(rows), "encoding (cached for the next run)", progress)
        # One intra-op thread, as for the head's loop: on the shared 2-core machine (load 6-7) two OpenMP threads
        # spin-waited for each other in every attention call (cold demo compare: 59 CPU s + 9 s sys, most of it in
        # scaled_dot_product_attention, for ~700 rows of 18 tokens; one thread encodes them in ~6 s).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _encode_rows(base, enc, lens, order, vec, pad, budget, device, bar)
        finally:
            torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
        out[todo] = vec[inv]
        if store is not None:
            store.add(ukeys, vec)
    return out


def _encode_rows(base, enc, lens, order, vec, pad, budget, device, bar) -> None:
    """The [CLS] states of the rows in ``order`` (longest first) into ``vec``, batches of <= ``budget`` tokens."""
    import torch

    i = 0
    with torch.inference_mode():
        while i < len(order):
            width = int(lens[order[i]])
            take = order[i : i + max(1, min(256, budget // max(1, width)))]
            i += len(take)
            ids = np.full((len(take), width), pad, np.int64)
            mask = np.zeros((len(take), width), np.int64)
            for r, j in enumerate(take):
                ids[r, : lens[j]] = enc[j]
                mask[r, : lens[j]] = 1
            h = base(
                input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device)
            ).last_hidden_state[:, 0]
            vec[take] = h.float().cpu().numpy()
            if bar is not None:
                bar.update(len(take))


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False, disable=None)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _resolved(config) -> dict:
    s = config.strategy
    return {
        "lr": config.lr if config.lr > 0 else DEFAULT_LR[s],
        "batch_size": config.batch_size if config.batch_size > 0 else DEFAULT_BATCH[s],
        "max_length": config.max_length if config.max_length > 0 else DEFAULT_MAX_LENGTH,
        "epochs": max(config.epochs, HEAD_MIN_EPOCHS) if s == "head" else config.epochs,
    }


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _train_head(
    model, feats: dict, ys: dict, config, hp: dict, weights, log_path: Path, device: str, progress: bool
) -> dict:
    """Plain loop over cached features (module docstring); keeps the best validation-loss epoch."""

    import torch

    parts = _head_parts(model)
    if parts is None:
        raise UserError(
            f"--strategy head: {type(model).__name__}'s classification head is not one winnow can train "
            "on cached features (BERT, DistilBERT, RoBERTa-style); use --strategy last-k or full"
        )
    mods, fwd_raw, first = parts
    model.to(device)
    # One thread: the head's matmuls are (32 x 384) x (384 x 384); with two busy cores, every multi-threaded op waited
    # for a descheduled worker thread (22 ms per 32 x 32 linear measured under load: a 72-row head took 40 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _head_loop(model, mods, fwd_raw, first, feats, ys, config, hp, weights, log_path, device, progress)
    finally:
        torch.set_num_threads(threads)


def _head_loop(model, mods, fwd_raw, first, feats, ys, config, hp, weights, log_path, device, progress) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    # The head trains on standardised features (per-dimension mean and std of the training rows: a random or
    # mean-pooling-trained encoder's [CLS] state varies little around a large mean, which Adam on raw features
    # learns slowly); afterwards the standardisation is folded into the head's first Linear, W' = W / std,
    # b' = b - W' mean, so the saved model takes the raw [CLS] state and predicts the same labels.
    mu = torch.from_numpy(feats["train"].mean(0)).to(device)
    sd = torch.from_numpy(feats["train"].std(0) + 1e-6).to(device)

    def fwd(h):
        return fwd_raw((h - mu) / sd)

    params = [p for m in mods for p in m.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.01)
    xtr = torch.from_numpy(feats["train"]).to(device)
    ytr = torch.from_numpy(ys["train"]).to(device)
    xva = torch.from_numpy(feats["val"]).to(device)
    yva = torch.from_numpy(ys["val"]).to(device)
    w = torch.tensor(weights, dtype=torch.float32, device=device) if weights is not None else None
    n = len(ytr)
    bs = hp["batch_size"]
    samp = (
        torch.from_numpy(_sample_weights(ys["train"], len(model.config.id2label)))
        if config.imbalance == "resample"
        else None
    )
    best = (math.inf, -1, None)
    bad = 0
    steps = 0
    bar = _bar(hp["epochs"], "head", progress)
    stopped = "epochs"
    for epoch in range(hp["epochs"]):
        t0 = time.perf_counter()
        model.train()
        if samp is not None:
            perm = torch.multinomial(samp, n, replacement=True, generator=gen)
        else:
            perm = torch.randperm(n, generator=gen)
        tot = 0.0
        for i in range(0, n, bs):
            idx = perm[i : i + bs].to(device)
            loss = F.cross_entropy(fwd(xtr[idx]), ytr[idx], weight=w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            steps += 1
            if 0 < config.max_steps <= steps:
                break
        model.eval()
        with torch.no_grad():
            val_loss = float(F.cross_entropy(fwd(xva), yva, weight=w))
        rec = {
            "epoch": epoch,
            "train_loss": tot / max(1, min(n, steps * bs)),
            "val_loss": val_loss,
            "steps": steps,
            "trainable": "head",
            "seconds": round(time.perf_counter() - t0, 4),
        }
        _log(log_path, rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['train_loss']:.4f}", val=f"{val_loss:.4f}")
            bar.update(1)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, copy.deepcopy([m.state_dict() for m in mods]))
            bad = 0
        else:
            bad += 1
        if 0 < config.max_steps <= steps:
            stopped = "max_steps"
            break
        if config.patience and bad >= config.patience:
            stopped = "early_stopping"
            break
    if bar is not None:
        bar.close()
    if best[2] is not None:
        for m, state in zip(mods, best[2]):
            m.load_state_dict(state)
    with torch.no_grad():
        w_new = first.weight / sd[None, :]
        first.bias -= w_new @ mu
        first.weight.copy_(w_new)
    model.eval()
    return {
        "best_epoch": best[1],
        "best_val_loss": best[0],
        "epochs_run": epoch + 1,
        "steps": steps,
        "stopped": stopped,
    }


def _set_trainable(model, strategy: str, k: int) -> list[int]:
    """requires_grad per strategy; returns the indices of the encoder layers that train (0 = bottom)."""
    layers = _encoder_layers(model)
    nl = len(layers)
    for p in model.parameters():
        p.requires_grad_(strategy == "full")
    if strategy == "full":
        return list(range(nl))
    k = min(k, nl)
    for layer in layers[nl - k :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    base = model.base_model
    for name, p in model.named_parameters():  # the head: everything outside the base model, plus its pooler
        if not name.startswith(model.base_model_prefix + ".") or ".pooler." in name:
            p.requires_grad_(True)
    if k >= nl and strategy == "gradual":
        for p in base.parameters():
            p.requires_grad_(True)
    return list(range(nl - k, nl))


class _Rows:
    """A torch dataset of tokenized rows (input_ids, attention_mask, labels)."""

    def __init__(self, enc, y):
        self.enc, self.y = enc, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        d = {k: self.enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in self.enc}
        d["labels"] = int(self.y[i])
        return d


def _train_encoder(
    model, tok, dfs: dict, ys: dict, config, hp: dict, weights, log_path: Path, device: str, progress: bool, work: Path
) -> dict:
    """transformers.Trainer over the tokenized rows (module docstring)."""
    import torch
    import torch.nn.functional as F
    from transformers import (
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    strategy = config.strategy
    nl = len(_encoder_layers(model))
    if strategy == "gradual":
        for p in model.parameters():  # every parameter enters the optimiser; frozen ones get no gradient
            p.requires_grad_(True)
    else:
        _set_trainable(model, strategy, config.last_k)
    w = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    samp = _sample_weights(ys["train"], len(model.config.id2label)) if config.imbalance == "resample" else None
    state = {"t0": time.perf_counter(), "layers": [], "train_loss": None}

    class WinnowTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            loss = F.cross_entropy(out.logits, labels, weight=None if w is None else w.to(out.logits.device))
            return (loss, out) if return_outputs else loss

        def _get_train_sampler(self, *args, **kwargs):
            if samp is None:
                return super()._get_train_sampler(*args, **kwargs)
            g = torch.Generator().manual_seed(config.seed)
            return torch.utils.data.WeightedRandomSampler(samp, len(samp), replacement=True, generator=g)

    class Progress(TrainerCallback):
        def on_epoch_begin(self, args, st, control, **kw):
            if strategy == "gradual":
                e = round(st.epoch or 0)
                state["layers"] = _set_trainable(model, "gradual", e + 1)
            else:
                state["layers"] = (
                    list(range(nl)) if strategy == "full" else list(range(nl - min(config.last_k, nl), nl))
                )
            state["t0"] = time.perf_counter()

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "loss" in logs:
                state["train_loss"] = float(logs["loss"])

        def on_evaluate(self, args, st, control, metrics=None, **kw):
            rec = {
                "epoch": round(st.epoch or 0) - 1,
                "train_loss": state["train_loss"],
                "val_loss": float((metrics or {}).get("eval_loss", float("nan"))),
                "steps": st.global_step,
                "trainable_layers": state["layers"],
                "encoder_layers": nl,
                "requires_grad": {
                    n: bool(p.requires_grad)
                    for n, p in model.named_parameters()
                    if n.endswith(".weight") and ".layer." in n and "attention.self.query" in n
                },
                "seconds": round(time.perf_counter() - state["t0"], 3),
            }
            _log(log_path, rec)

    enc = {s: _tokenize(tok, dfs[s], hp["max_length"]) for s in ("train", "val")}
    use_cpu = device == "cpu"
    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=hp["epochs"],
        per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=max(32, hp["batch_size"]),
        learning_rate=hp["lr"],
        weight_decay=0.01,
        seed=config.seed,
        data_seed=config.seed,
        max_steps=config.max_steps,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_strategy="steps",
        logging_steps=10,
        report_to=[],
        use_cpu=use_cpu,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    callbacks = [Progress()]
    if config.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.patience))
    trainer = WinnowTrainer(
        model=model,
        args=args,
        train_dataset=_Rows(enc["train"], ys["train"]),
        eval_dataset=_Rows(enc["val"], ys["val"]),
        data_collator=DataCollatorWithPadding(tok),
        callbacks=callbacks,
    )
    if not progress:
        # With the bar off, Trainer prints every log dict instead (PrinterCallback); train_log.jsonl has the epochs.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    out = trainer.train()
    model.eval()
    best = trainer.state.best_metric
    return {
        "best_val_loss": None if best is None else float(best),
        "epochs_run": math.ceil(trainer.state.epoch or 0),
        "steps": int(out.global_step),
        "stopped": "early_stopping"
        if trainer.state.epoch < hp["epochs"] and config.max_steps <= 0
        else ("max_steps" if config.max_steps > 0 else "epochs"),
    }


def predict(model, tok, df: pl.DataFrame, max_length: int, device: str, batch: int = 64) -> np.ndarray:
    """Label codes of the full model's forward pass over ``df`` (what the saved folder predicts)."""
    import torch

    enc = _tokenize(tok, df, max_length)
    model.to(device).eval()
    out = np.zeros(df.height, np.int64)
    lens = np.array([len(x) for x in enc["input_ids"]])
    order = np.argsort(-lens, kind="stable")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    with torch.inference_mode():
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            items = [{k: enc[k][j] for k in keys} for j in idx]
            b = tok.pad(items, return_tensors="pt")
            logits = model(**{k: v.to(device) for k, v in b.items()}).logits
            out[idx] = logits.argmax(-1).cpu().numpy()
    return out


def train_classifier(
    train: pl.DataFrame,
    val: pl.DataFrame,
    test: pl.DataFrame,
    config,
    out: Path,
    progress: bool = True,
    cache: bool = True,
    save: bool = True,
) -> dict:
    """Fine-tune, evaluate and save (module docstring). ``progress`` shows bars (tqdm, off when stderr is not a
    terminal); ``cache`` stores the head's features under the user cache dir."""
    import shutil
    import tempfile

    import torch

    from engine.models.device import resolve_device

    out = Path(out)
    t_start = time.perf_counter()
    try:
        device = resolve_device(config.device)
    except RuntimeError as e:
        raise UserError(str(e).replace("embed device", "--device").replace("--embed-device", "--device")) from None
    path = _model_path(config)
    labels = label_set(train, val, test)
    if len(labels) < 2:
        raise UserError(f"classification needs at least two labels; the rows have {labels or 'none'}")
    label2id = {lab: i for i, lab in enumerate(labels)}
    ys = {
        "train": _codes(train, label2id, "SEL"),
        "val": _codes(val, label2id, "--val"),
        "test": _codes(test, label2id, "--test"),
    }
    missing = sorted(set(range(len(labels))) - set(ys["train"].tolist()))
    hp = _resolved(config)
    tok, model = _load(path, labels, config.seed)
    weights = _class_weights(ys["train"], len(labels), config.imbalance)
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    torch.manual_seed(config.seed)
    if config.strategy == "head":
        t0 = time.perf_counter()
        feats = {
            s: cls_features(model, tok, df, hp["max_length"], device, path, cache, progress)
            for s, df in (("train", train), ("val", val), ("test", test))
        }
        encode_s = time.perf_counter() - t0
        info = _train_head(model, feats, ys, config, hp, weights, log_path, device, progress)
        info["features_s"] = round(encode_s, 2)
        _, fwd, _ = _head_parts(model)
        with torch.no_grad():
            preds = {s: fwd(torch.from_numpy(feats[s]).to(device)).argmax(-1).cpu().numpy() for s in ("val", "test")}
    else:
        work = Path(tempfile.mkdtemp(prefix=".trainer-", dir=out))
        try:
            info = _train_encoder(
                model, tok, {"train": train, "val": val}, ys, config, hp, weights, log_path, device, progress, work
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        preds = {s: predict(model, tok, df, hp["max_length"], device) for s, df in (("val", val), ("test", test))}
    for p in model.parameters():
        p.requires_grad_(True)
    if save:  # cli.py compare trains many arms x seeds and keeps only their metrics and predictions
        model.to("cpu").save_pretrained(out)
        tok.save_pretrained(out)
    result = {
        "strategy": config.strategy,
        "model": path,
        "device": device,
        "labels": labels,
        "labels_missing_in_train": [labels[i] for i in missing],
        "class_weights": None if weights is None else [round(float(x), 6) for x in weights],
        "hyperparameters": hp,
        "training": info,
    }
    for s, df in (("val", val), ("test", test)):
        result[s] = metrics_of(ys[s], preds[s], labels)
        pl.DataFrame(
            {"id": df["id"], "label": df["label"].cast(pl.String), "pred": [labels[i] for i in preds[s]]}
        ).write_parquet(out / f"{s}_predictions.parquet")
    result["train_seconds"] = round(time.perf_counter() - t_start, 2)
    return result
