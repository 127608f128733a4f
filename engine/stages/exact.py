"""Exact deduplication on the normalised ``prompt`` + ``response``, across every shard.

Map side: ``ContentHashStage`` adds ``content_hash`` (uint64, kernels/strings.py). Global side: ``ExactDedup``
reads back (shard, row, id, content_hash, verdict) only, keeps the first kept occurrence of each hash in input
order (shard order, then row) and marks the others ``exact_duplicate`` with ``duplicate_of`` = the kept row's id.
Memory: O(rows x ~40 bytes) (polars group-by over the hash column), never the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from engine.registry import Option, register
from engine.stage import GlobalStage, Stage, set_column
from kernels.strings import combine_hashes, hash_strings


def content_hash(prompt: pa.Array, response: pa.Array) -> np.ndarray:
    return combine_hashes(hash_strings(prompt, seed=1), hash_strings(response, seed=2))


@dataclass
class ExactDedupConfig:
    enabled: bool = True  # exact dedup on normalised prompt + response, first occurrence kept


# The hash is cheap (one pass over the bytes) and always computed, so turning exact dedup on or off reuses shards.
@register(name="content_hash", kind="map", section="exact", config=ExactDedupConfig, order=40,
          columns=("content_hash",), changes_shard=False)
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

    def run(self, ctx) -> pl.DataFrame | None:
        df = ctx.frame(["id", "content_hash"], kept_only=True)
        if df.height == 0:
            return None
        df = df.sort(["_shard", "row"])
        first = df.group_by("content_hash", maintain_order=True).agg(
            pl.col("id").first().alias("first_id"),
            pl.col("_shard").first().alias("first_shard"),
            pl.col("row").first().alias("first_row"),
        )
        dups = df.join(first, on="content_hash").filter(
            (pl.col("_shard") != pl.col("first_shard")) | (pl.col("row") != pl.col("first_row"))
        )
        self.stats["exact_duplicate"] = dups.height
        self.stats["clusters_with_duplicates"] = dups.select(pl.col("content_hash").n_unique()).item() if dups.height else 0
        return dups.select(
            "_shard",
            "row",
            pl.lit("exact_duplicate").alias("verdict"),
            pl.concat_str(pl.lit("same normalised prompt and response as "), pl.col("first_id")).alias("detail"),
            pl.col("first_id").alias("duplicate_of"),
        )
