"""Exact deduplication on the normalised ``prompt`` + ``response``, across every shard.

Map side: ``ContentHashStage`` adds ``content_hash`` (uint64, kernels/strings.py). Global side: ``ExactDedup``
reads back (shard, row, id, content_hash, verdict) only, keeps the first kept occurrence of each hash in input
order (shard order, then row) and marks the others ``exact_duplicate`` with ``duplicate_of`` = the kept row's id.
Memory: O(rows x ~40 bytes) (polars group-by over the hash column), never the text.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from engine.stage import GlobalStage, Stage, set_column
from kernels.strings import combine_hashes, hash_strings


def content_hash(prompt: pa.Array, response: pa.Array) -> np.ndarray:
    return combine_hashes(hash_strings(prompt, seed=1), hash_strings(response, seed=2))


class ContentHashStage(Stage):
    name = "content_hash"

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        h = content_hash(batch.column("prompt"), batch.column("response"))
        return set_column(batch, "content_hash", pa.array(h, pa.uint64()))


class ExactDedup(GlobalStage):
    name = "exact_dedup"

    def run(self, ctx) -> pl.DataFrame | None:
        df = ctx.frame(["id", "content_hash"]).filter(pl.col("verdict") == "kept")
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
