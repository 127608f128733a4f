"""``quality`` in [0, 1]: one number per row from the signals the run has, a polars expression (``--quality``, a
config entry, recorded in the selection manifest).

The default is the mean of the components present (a missing column or a null is skipped, so a run without LM
losses or labels still gets a score from the rest):
- length: log(1 + response tokens (else response characters / 4)) / log(1 + 256), capped at 1 (a response of 256 tokens or more scores 1);
- repetition margins, against the Gopher thresholds the rules use: 1 - dup_5gram_frac / 0.15 and
  1 - frac_dup_line / 0.30, clipped to [0, 1] (a row the rules barely kept scores near 0);
- ``label_quality`` (the labels stage's self-confidence of the given label) where labels were scored;
- IFD where LM losses were scored (Li et al. 2024, "Cherry"): ``ifd`` itself up to 1, and 0 above 1 (the prompt
  does not help predict the response).
A row with no component at all scores 0.5.
"""

from __future__ import annotations

import polars as pl

from engine.errors import UserError

DEFAULT = (
    "pl.mean_horizontal("
    "(pl.coalesce(pl.col('response_tokens').cast(pl.Float64), pl.col('response_chars') / 4).log1p() / 5.5491)"
    ".clip(0, 1), "
    "1 - (pl.col('dup_5gram_frac') / 0.15).clip(0, 1), "
    "1 - (pl.col('frac_dup_line') / 0.30).clip(0, 1), "
    "pl.col('label_quality').cast(pl.Float64), "
    "pl.col('ifd').clip(0, 1) * (pl.col('ifd') <= 1).cast(pl.Float64))"
)
DEFAULT_COLUMNS = ("response_tokens", "response_chars", "dup_5gram_frac", "frac_dup_line", "label_quality", "ifd")


def parse(text: str) -> pl.Expr:
    """The expression ``text`` (``pl`` is polars; nothing else is in scope), or a UserError naming --quality."""
    src = text or DEFAULT
    try:
        expr = eval(src, {"pl": pl, "__builtins__": {}}, {})
    except Exception as e:  # noqa: BLE001 - any syntax or name error is the user's formula
        raise UserError(f"--quality {text}: not a polars expression ({type(e).__name__}: {e})") from None
    if not isinstance(expr, pl.Expr):
        raise UserError(f"--quality {text}: not a polars expression (got {type(expr).__name__})")
    return expr


def columns(text: str) -> list[str]:
    """The columns the formula reads."""
    return list(dict.fromkeys(parse(text).meta.root_names()))


def compute(df: pl.DataFrame, text: str) -> pl.Series:
    """Quality per row of ``df`` (float32 in [0, 1]). The default formula skips the columns ``df`` lacks; a user's
    formula naming a missing column is a UserError."""
    expr = parse(text)
    missing = [c for c in columns(text) if c not in df.columns]
    if missing and text:
        raise UserError(f"--quality {text}: no such column {missing[0]!r} in the scores")
    df = df.with_columns([pl.lit(None, dtype=pl.Float64).alias(c) for c in missing])
    try:
        q = df.select(expr.cast(pl.Float64).alias("quality"))["quality"]
    except Exception as e:  # noqa: BLE001 - a type error in the user's formula
        raise UserError(f"--quality {text or 'default'}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return q.fill_nan(None).fill_null(0.5).clip(0.0, 1.0).cast(pl.Float32)
