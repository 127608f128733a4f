"""Exact deduplication on the normalised ``prompt`` + ``response``, across every shard, with label conflicts.

Map side: ``ContentHashStage`` adds ``content_hash`` (uint64, kernels/strings.py) of the normalised prompt and
response. For classification rows that is the text alone (``engine.io.schema``: prompt "", response = text, the
label only in ``label``), so two rows with the same text and different labels share a hash.

Global side: ``ExactDedup`` reads back (shard, row, id, content_hash, label, verdict) of kept rows only and groups
them by hash, in input order (shard order, then row):

- **Same label** (or no label: null labels never conflict): the first row is kept, the others are
  ``exact_duplicate`` with ``duplicate_of`` = the kept row's id (as before labels existed).
- **Different labels** among the group's labelled rows: a label held by a *strict majority* of the labelled copies
  (more than half) wins: the first row with it is kept, the other rows with it and the unlabelled copies are
  ``exact_duplicate`` of it, and every row with another label is ``label_conflict`` with ``duplicate_of`` = the kept
  row's id. With no strict majority (a tie, or three labels none of which has half) no copy is trusted: every row
  of the group is ``label_conflict`` and none is kept (``duplicate_of`` null). Why strict majority and not a
  plurality: with 3 x A, 2 x B, 2 x C the text is labelled A by fewer than half of its annotations, as often wrong
  as right; keeping it would train on a coin flip.
- ``detail`` of a ``label_conflict`` row names its own label and up to ``conflict_detail_rows`` other copies as
  ``id=label`` (then "+N more").

Memory: O(rows x ~40 bytes) (polars group-by over the hash column), never the text; the conflict bookkeeping
touches only rows of hash groups with two or more copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from engine.registry import Option, Range, check_fields, register
from engine.stage import GlobalStage, Stage, set_column
from kernels.strings import combine_hashes, hash_strings

LABEL_CONFLICT = "label_conflict"
EXACT_DUPLICATE = "exact_duplicate"


def content_hash(prompt: pa.Array, response: pa.Array) -> np.ndarray:
    return combine_hashes(hash_strings(prompt, seed=1), hash_strings(response, seed=2))


@dataclass
class ExactDedupConfig:
    enabled: bool = True  # exact dedup on normalised prompt + response (the label is not part of the key)
    conflict_detail_rows: int = 5  # other copies named (id=label) in a label_conflict row's detail

    def validate(self) -> None:
        check_fields(self, "exact", conflict_detail_rows=Range(0))


# The hash is cheap (one pass over the bytes) and always computed, so turning exact dedup on or off reuses shards.
@register(
    name="content_hash",
    kind="map",
    section="exact",
    config=ExactDedupConfig,
    order=40,
    columns=("content_hash",),
    changes_shard=False,
)
class ContentHashStage(Stage):
    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        h = content_hash(batch.column("prompt"), batch.column("response"))
        return set_column(batch, "content_hash", pa.array(h, pa.uint64()))


@register(
    name="exact_dedup", kind="global", section="exact", config=ExactDedupConfig, order=110,
    enabled=lambda sec, cfg: sec.enabled, requires=("content_hash",),
    options=[Option("--no-exact-dedup", "enabled", "skip exact deduplication", type=None, value=False)],
)  # fmt: skip
class ExactDedup(GlobalStage):
    def __init__(self, config=None):
        super().__init__(config)
        sec = getattr(config, "exact", config)
        self.cfg = sec if isinstance(sec, ExactDedupConfig) else ExactDedupConfig()

    def run(self, ctx) -> pl.DataFrame | None:
        df = ctx.frame(["id", "content_hash", "label"], kept_only=True)
        if df.height == 0:
            return None
        df = (
            df.sort(["_shard", "row"])
            .with_row_index("_ord")
            .with_columns(pl.col("id").cast(pl.String), pl.col("label").cast(pl.String))
        )
        # Only hash groups with two or more copies can change a verdict.
        multi = df.filter(pl.len().over("content_hash") > 1)
        self.stats[EXACT_DUPLICATE] = 0
        self.stats[LABEL_CONFLICT] = 0
        self.stats["label_conflict_groups"] = 0
        self.stats["clusters_with_duplicates"] = 0
        if multi.height == 0:
            return None
        multi = multi.with_columns(pl.col("label").drop_nulls().n_unique().over("content_hash").alias("_n_labels"))
        plain = self._plain(multi.filter(pl.col("_n_labels") <= 1))
        conflict = self._conflicts(multi.filter(pl.col("_n_labels") > 1))
        self.stats["clusters_with_duplicates"] = multi.select(pl.col("content_hash").n_unique()).item()
        out = pl.concat([plain, conflict])
        return out if out.height else None

    def _plain(self, g: pl.DataFrame) -> pl.DataFrame:
        """Groups without a label conflict: first copy kept, the rest exact duplicates of it."""
        first = g.group_by("content_hash").agg(pl.col("_ord").min().alias("_kept_ord"))
        g = g.join(first, on="content_hash")
        g = g.join(
            g.filter(pl.col("_ord") == pl.col("_kept_ord")).select("content_hash", pl.col("id").alias("_kept_id")),
            on="content_hash",
        )
        dups = g.filter(pl.col("_ord") != pl.col("_kept_ord"))
        self.stats[EXACT_DUPLICATE] += dups.height
        return dups.select(
            "_shard",
            "row",
            pl.lit(EXACT_DUPLICATE).alias("verdict"),
            pl.concat_str(pl.lit("same normalised prompt and response as "), pl.col("_kept_id")).alias("detail"),
            pl.col("_kept_id").alias("duplicate_of"),
        )

    def _conflicts(self, g: pl.DataFrame) -> pl.DataFrame:
        """Groups whose labelled copies carry two or more labels (the rule in the module docstring)."""
        empty = pl.DataFrame(
            schema={
                "_shard": pl.Int32,
                "row": pl.Int64,
                "verdict": pl.String,
                "detail": pl.String,
                "duplicate_of": pl.String,
            }
        )
        if g.height == 0:
            return empty
        votes = (
            g.filter(pl.col("label").is_not_null())
            .group_by("content_hash", "label")
            .agg(pl.len().alias("_votes"), pl.col("_ord").min().alias("_first"))
            .with_columns(pl.col("_votes").sum().over("content_hash").alias("_labelled"))
        )
        winner = votes.filter(pl.col("_votes") * 2 > pl.col("_labelled")).select(
            "content_hash", pl.col("label").alias("_win"), pl.col("_first").alias("_kept_ord")
        )
        g = g.join(winner, on="content_hash", how="left")
        g = g.join(
            g.filter(pl.col("_ord") == pl.col("_kept_ord")).select("content_hash", pl.col("id").alias("_kept_id")),
            on="content_hash",
            how="left",
        )
        # detail: up to k other copies as id=label, in input order (ids are unique in a run, so a row's own tag is
        # the one to leave out)
        k = max(0, int(self.cfg.conflict_detail_rows))
        g = g.with_columns(pl.format("{}={}", pl.col("id"), pl.col("label").fill_null("(none)")).alias("_tag"))
        tags = (
            g.sort("_ord")
            .group_by("content_hash", maintain_order=True)
            .agg(pl.col("_tag").head(k + 1).alias("_tags"), pl.len().alias("_copies"))
        )
        g = g.with_columns(
            pl.when(pl.col("_win").is_null())
            .then(pl.lit(LABEL_CONFLICT))
            .when(pl.col("_ord") == pl.col("_kept_ord"))
            .then(pl.lit(None, pl.String))
            .when(pl.col("label").is_null() | (pl.col("label") == pl.col("_win")))
            .then(pl.lit(EXACT_DUPLICATE))
            .otherwise(pl.lit(LABEL_CONFLICT))
            .alias("verdict")
        ).filter(pl.col("verdict").is_not_null())
        conf = g.filter(pl.col("verdict") == LABEL_CONFLICT).join(tags, on="content_hash")
        shown = (
            conf.select("_ord", "_tag", "_tags")
            .explode("_tags")
            .filter(pl.col("_tags") != pl.col("_tag"))
            .group_by("_ord")
            .agg(pl.col("_tags").head(k).alias("_shown"))
        )
        conf = conf.join(shown, on="_ord", how="left").with_columns(
            pl.col("_shown").fill_null(pl.lit([], pl.List(pl.String)))
        )
        more = pl.col("_copies").cast(pl.Int64) - 1 - pl.col("_shown").list.len().cast(pl.Int64)
        listed = pl.col("_shown").list.join(", ") + pl.when(more > 0).then(pl.format(" (+{} more)", more)).otherwise(
            pl.lit("")
        )
        conf = conf.with_columns(
            pl.when(pl.col("_win").is_null())
            .then(
                pl.format(
                    "label {}: no label held by more than half of the {} copies; others: {}",
                    pl.col("label").fill_null("(none)"),
                    pl.col("_copies"),
                    listed,
                )
            )
            .otherwise(
                pl.format(
                    "label {} against the majority label {} (kept: {}); others: {}",
                    pl.col("label").fill_null("(none)"),
                    pl.col("_win"),
                    pl.col("_kept_id"),
                    listed,
                )
            )
            .alias("detail")
        )
        dups = g.filter(pl.col("verdict") == EXACT_DUPLICATE)
        self.stats[EXACT_DUPLICATE] += dups.height
        self.stats[LABEL_CONFLICT] += conf.height
        self.stats["label_conflict_groups"] += conf.select(pl.col("content_hash").n_unique()).item()
        return pl.concat([
            dups.select("_shard", "row", "verdict",
                        pl.concat_str(pl.lit("same normalised prompt and response as "), pl.col("_kept_id")).alias(
                            "detail"),
                        pl.col("_kept_id").alias("duplicate_of")),
            conf.select("_shard", "row", "verdict", "detail", pl.col("_kept_id").alias("duplicate_of")),
        ]).cast({"_shard": pl.Int32, "row": pl.Int64})  # fmt: skip
