"""Known damage for ``cli.py compare --corrupt labels=0.2,dups=0.1,junk=0.05``: what a user's pool looks like after
a careless merge, planted so that the pipeline's catch can be counted.

``corrupt(pool, spec, seed)`` takes the training pool's rows (``id``, ``response`` = the text, ``label``) and returns
the damaged pool as classification rows: ``text``, ``label``, and three columns that survive scoring as the user's
own columns (so ``scores/`` and every selection say which rows were planted):
- ``injected``: null for an untouched row, else ``label_flip`` | ``near_dup`` | ``junk``;
- ``clean_label``: the label before damage (null for junk, which has no true label);
- ``pool_id``: the pool row a row comes from (a near-duplicate names its original; junk gets ``junk-<i>``).

Each kind is a fraction of the pool's rows ``n`` (before damage):
- ``labels=F``: round(F n) distinct original rows get a label drawn uniformly from the other classes;
- ``dups=F``: round(F n) new rows, each a copy of a uniformly drawn original row (with its label as it stands after
  the flips) with 1 or 2 words replaced by words drawn from the pool's vocabulary: near duplicates, the kind MinHash
  dedup exists for;
- ``junk=F``: round(F n) new rows of five kinds in turn (random letters, one word repeated, placeholder text,
  symbols and links, and word salad drawn from the pool's vocabulary: the last is what no rule can see), each with a
  uniformly drawn label.
The result is shuffled (seeded), so copies are not always after their originals. The same pool, spec and seed give
the same rows.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from engine.errors import UserError

KINDS = {"labels": "label_flip", "dups": "near_dup", "junk": "junk"}
PLACEHOLDERS = [
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "TODO: add the text here",
    "[insert description]",
    "N/A",
    "test test test",
    "Text goes here. Text goes here.",
]


def parse_spec(text: str) -> dict[str, float]:
    """``labels=0.2,dups=0.1,junk=0.05`` -> {"labels": 0.2, "dups": 0.1, "junk": 0.05}; a UserError names --corrupt."""
    out: dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in KINDS:
            raise UserError(
                f"--corrupt {text}: expected KIND=FRACTION pairs with KIND in labels, dups, junk, e.g. "
                "labels=0.2,dups=0.1,junk=0.05"
            )
        if key in out:
            raise UserError(f"--corrupt {text}: {key} is given twice")
        try:
            f = float(val)
        except ValueError:
            raise UserError(f"--corrupt {text}: {key}={val} is not a number") from None
        if not 0 <= f <= 1:
            raise UserError(f"--corrupt {text}: {key}={val} must be a fraction of the pool in [0, 1]")
        out[key] = f
    return out


def _junk(kind: int, rng: np.random.Generator, vocab: np.ndarray) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    if kind == 0:  # random letters
        return " ".join("".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(rng.integers(5, 14)))
    if kind == 1:  # one word repeated
        return " ".join([str(rng.choice(vocab))] * int(rng.integers(8, 20)))
    if kind == 2:  # placeholder text
        return str(rng.choice(PLACEHOLDERS))
    if kind == 3:  # symbols and links
        tag = "".join(rng.choice(letters, 8))
        return f"http://t.co/{tag} #### $$$ >>> http://bit.ly/{tag[::-1]} !!!"
    return " ".join(rng.choice(vocab, int(rng.integers(8, 20))))  # word salad


def _near_dup(text: str, rng: np.random.Generator, vocab: np.ndarray) -> str:
    words = text.split()
    if not words:
        return str(rng.choice(vocab))
    for pos in rng.choice(len(words), min(len(words), int(rng.integers(1, 3))), replace=False):
        new = str(rng.choice(vocab))
        while new == words[pos] and len(vocab) > 1:
            new = str(rng.choice(vocab))
        words[pos] = new
    return " ".join(words)


def corrupt(pool: pl.DataFrame, spec: dict[str, float], seed: int = 0) -> tuple[pl.DataFrame, dict[str, int]]:
    """(damaged pool rows, {kind: rows planted}) (module docstring)."""
    rng = np.random.default_rng(seed)
    n = pool.height
    text = pool["response"].fill_null("").to_list()
    label = [None if v is None else str(v) for v in pool["label"].to_list()]
    clean = list(label)
    ids = [str(x) for x in pool["id"].to_list()]
    injected: list[str | None] = [None] * n
    classes = sorted({x for x in label if x is not None})
    counts = {KINDS[k]: 0 for k in KINDS}
    k_flip = round(spec.get("labels", 0) * n)
    if k_flip:
        if len(classes) < 2:
            raise UserError("--corrupt labels=...: the pool has fewer than two labels, nothing to flip to")
        can = np.flatnonzero(np.array([x is not None for x in label]))
        for i in rng.choice(can, min(k_flip, len(can)), replace=False):
            others = [c for c in classes if c != label[i]]
            label[i] = others[int(rng.integers(len(others)))]
            injected[i] = "label_flip"
            counts["label_flip"] += 1
    words = np.array(sorted({w for t in text for w in t.split()}) or ["word"])
    new_text, new_label, new_clean, new_ids, new_kind = [], [], [], [], []
    for j in range(round(spec.get("dups", 0) * n) if n else 0):
        src = int(rng.integers(n))
        new_text.append(_near_dup(text[src], rng, words))
        new_label.append(label[src])
        new_clean.append(clean[src])
        new_ids.append(ids[src])
        new_kind.append("near_dup")
    for j in range(round(spec.get("junk", 0) * n)):
        new_text.append(_junk(j % 5, rng, words))
        new_label.append(classes[int(rng.integers(len(classes)))] if classes else None)
        new_clean.append(None)
        new_ids.append(f"junk-{j}")
        new_kind.append("junk")
    counts["near_dup"] = new_kind.count("near_dup")
    counts["junk"] = new_kind.count("junk")
    df = pl.DataFrame(
        {
            "text": text + new_text,
            "label": label + new_label,
            "injected": injected + new_kind,
            "clean_label": clean + new_clean,
            "pool_id": ids + new_ids,
        },
        schema={
            "text": pl.String,
            "label": pl.String,
            "injected": pl.String,
            "clean_label": pl.String,
            "pool_id": pl.String,
        },
    )
    order = rng.permutation(df.height)
    return df[order], counts
