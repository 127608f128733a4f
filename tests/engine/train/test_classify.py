"""Classification fine-tuning on a tiny random BERT (built from a config, WordPiece vocab written here; nothing is
downloaded) over planted separable data: every strategy learns it, the saved folder reloads and predicts what the
metrics measured, the metrics match a hand-checked confusion, gradual unfreezing adds one layer per epoch."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import cli
from engine.train.classify import metrics_of
from engine.train.finetune import FinetuneConfig, finetune

WORDS = {
    "neg": ["loss", "fell", "weak", "drop", "cut", "bad", "decline", "miss"],
    "neu": ["said", "meeting", "office", "report", "today", "plan", "located", "held"],
    "pos": ["gain", "rose", "strong", "profit", "beat", "growth", "record", "up"],
}
FILLER = ["the", "a", "company", "its", "of", "in", "and", "for"]


def make_tiny_bert(d: Path, layers: int = 3) -> str:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in WORDS.values() for w in ws)]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(d / "vocab.txt"), do_lower_case=True)  # a WordPiece vocab file
    tok.save_pretrained(d)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(d)
    return str(d)


def planted(n: int, seed: int, prefix: str) -> pl.DataFrame:
    """n rows, labels in turn; each text = 3 words of its class + 2 fillers, shuffled."""
    rng = np.random.default_rng(seed)
    labs = list(WORDS)
    rows = []
    for i in range(n):
        lab = labs[i % 3]
        words = list(rng.choice(WORDS[lab], 3)) + list(rng.choice(FILLER, 2))
        rng.shuffle(words)
        rows.append({"id": f"{prefix}{i}", "prompt": "", "response": " ".join(words), "label": lab, "verdict": "kept"})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows")
    paths = {}
    for name, n, seed in (("train", 120, 0), ("val", 30, 1), ("test", 30, 2)):
        paths[name] = d / f"{name}.parquet"
        planted(n, seed, name).write_parquet(paths[name])
    return paths


def _reload_predict(folder: Path, test: pl.DataFrame) -> list[str]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        enc = tok(test["response"].to_list(), padding=True, truncation=True, max_length=128, return_tensors="pt")
        codes = model(**enc).logits.argmax(-1).tolist()
    return [model.config.id2label[c] for c in codes]


RECIPES = {
    "head": {"strategy": "head", "patience": 5},
    "last-k": {"strategy": "last-k", "last_k": 1, "epochs": 6, "lr": 3e-3, "batch_size": 8, "patience": 0},
    "full": {"strategy": "full", "epochs": 6, "lr": 2e-3, "batch_size": 8, "patience": 0},
    "gradual": {"strategy": "gradual", "epochs": 8, "lr": 3e-3, "batch_size": 8, "patience": 0},
}


@pytest.mark.parametrize("strategy", list(RECIPES))
def test_strategy_learns_and_reloads(strategy, tiny, data, tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "model"
    cfg = FinetuneConfig(task="classification", model=tiny, seed=0, **RECIPES[strategy])
    m = finetune(data["train"], out, cfg, val=str(data["val"]), test=str(data["test"]))
    assert m["test"]["labels"] == ["neg", "neu", "pos"]
    assert m["test"]["accuracy"] >= (0.9 if strategy in ("head", "full") else 0.7), m["test"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["macro_f1"] == pytest.approx(m["test"]["macro_f1"])
    cfgjson = json.loads((out / "config.json").read_text())
    assert cfgjson["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    test = pl.read_parquet(data["test"])
    preds = pl.read_parquet(out / "test_predictions.parquet")
    assert preds["id"].to_list() == test["id"].to_list()
    assert _reload_predict(out, test) == preds["pred"].to_list()  # the saved folder predicts what was measured
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all("val_loss" in r for r in log)


def test_gradual_unfreezes_one_layer_per_epoch(tiny, data, tmp_path):
    out = tmp_path / "model"
    cfg = FinetuneConfig(
        task="classification", model=tiny, strategy="gradual", epochs=3, lr=1e-3, batch_size=16, patience=0
    )
    finetune(data["train"], out, cfg, val=str(data["val"]), test=str(data["test"]))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for r in log:
        e = r["epoch"]
        assert r["trainable_layers"] == list(range(3 - (e + 1), 3))
        grad = {int(k.split(".layer.")[1].split(".")[0]): v for k, v in r["requires_grad"].items()}
        assert grad == {i: i >= 3 - (e + 1) for i in range(3)}


def test_head_features_are_cached(tiny, data, tmp_path, monkeypatch):
    import engine.train.classify as C

    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    cfg = FinetuneConfig(task="classification", model=tiny, strategy="head")
    finetune(data["train"], tmp_path / "a", cfg, val=str(data["val"]), test=str(data["test"]))
    calls = []
    real = C._tokenize
    monkeypatch.setattr(C, "_tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = finetune(data["train"], tmp_path / "b", cfg, val=str(data["val"]), test=str(data["test"]))
    assert not calls  # second run: every feature came from the cache
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["test"]["confusion"] == first["test"]["confusion"]  # same seed, same features: same model


def test_imbalance_weight_and_resample(tiny, data, tmp_path):
    train = pl.read_parquet(data["train"])
    skew = pl.concat([train.filter(pl.col("label") == "neu"), train.filter(pl.col("label") != "neu").head(16)])
    p = tmp_path / "skew.parquet"
    skew.write_parquet(p)
    for mode in ("weight", "resample", "none"):
        cfg = FinetuneConfig(task="classification", model=tiny, strategy="head", imbalance=mode)
        m = finetune(p, tmp_path / mode, cfg, val=str(data["val"]), test=str(data["test"]))
        if mode == "weight":
            counts = np.array([skew.filter(pl.col("label") == lab).height for lab in ("neg", "neu", "pos")])
            assert m["class_weights"] == pytest.approx(list(len(skew) / (3 * counts)), rel=1e-5)
        else:
            assert m["class_weights"] is None
        assert m["test"]["macro_f1"] > 0.5


def test_metrics_on_a_hand_checked_confusion():
    labels = ["a", "b", "c"]
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    m = metrics_of(y, p, labels)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert m["accuracy"] == pytest.approx(6 / 9)
    # a: P 2/3 R 2/3; b: P 1/2 R 1/2; c: P 3/4 R 3/4 -> F1 = P
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["support"] == 4
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    never = metrics_of(np.array([0, 1]), np.array([0, 0]), ["a", "b"])
    assert never["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def _finetune_args(train, data, out, *extra) -> list[str]:
    """``cli.py finetune TRAIN --out OUT --val VAL --test TEST -q EXTRA...`` on the module's split."""
    return ["finetune", str(train), "--out", str(out), "--val", str(data["val"]), "--test", str(data["test"]), "-q",
            *extra]  # fmt: skip


def test_cli_finetune_end_to_end(tiny, data, tmp_path, capsys):
    out = tmp_path / "m"
    code = cli.main(_finetune_args(data["train"], data, out, "--model", tiny, "--strategy", "head"))
    assert code == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == "" and "%|" not in printed.err and "Loading weights" not in printed.err, printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "classification" and m["rows"]["train"] == 120
    assert m["test"]["accuracy"] >= 0.9


def test_cli_finetune_quiet_encoder_strategy_prints_nothing(tiny, data, tmp_path, capsys):
    # Trainer prints its log dicts when its bar is off; -q must silence those too.
    args = _finetune_args(data["train"], data, tmp_path / "m", "--model", tiny, "--strategy", "last-k", "--epochs", "1",
                          "--max-steps", "12")  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == "" and "'loss'" not in printed.err and "%|" not in printed.err, printed


@pytest.mark.parametrize(
    "args, want",
    [
        (["--model", "{nope}"], "--model"),
        (["--strategy", "bogus"], "--strategy"),
        (["--imbalance", "bogus"], "--imbalance"),
        (["--last-k", "0"], "--last-k 0"),
        (["--patience", "-1"], "--patience -1"),
    ],
)
def test_bad_flags_are_one_line(args, want, data, tmp_path, capsys):
    out = tmp_path / "m"
    args = [a.replace("{nope}", str(tmp_path / "nope")) for a in args]
    try:
        code = cli.main(_finetune_args(data["train"], data, out, *args))
    except SystemExit as e:
        code = e.code
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(err) == 1 and want in err[0], err


def test_unlabelled_rows_are_a_user_error(tiny, data, tmp_path, capsys):
    train = pl.read_parquet(data["train"]).with_columns(pl.lit(None, pl.String).alias("label"))
    p = tmp_path / "nolabel.parquet"
    train.write_parquet(p)
    code = cli.main(_finetune_args(p, data, tmp_path / "m", "--model", tiny))
    err = capsys.readouterr().err
    assert code == 2 and "no row has a label" in err
