"""Row identity under ``--map id=COL``: the user's id column becomes ``id`` only if it is unique across the run.

By default ids are generated (``<shard prefix>-<row>``, engine/io/schema.py) and unique by construction, so this
stage does not run. When the user names an id column, a repeated value is a user error naming both rows (file and
line): winnow never publishes two rows under one id, and silently renaming one would break the user's joins. A row
whose id column is empty is already ``malformed`` (schema) and keeps a generated id.
Memory: O(rows x id length) for the id column (polars group-by), never the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from engine.errors import UserError
from engine.io.schema import row_location
from engine.registry import register
from engine.stage import GlobalStage


@dataclass
class IdentityConfig:
    """No options: the stage runs exactly when ``--map`` names an ``id`` column."""


@register(
    name="identity",
    kind="global",
    section="identity",
    config=IdentityConfig,
    order=100,
    enabled=lambda sec, cfg: bool(cfg.read.map.get("id")),
    changes_shard=False,
)
class IdentityCheck(GlobalStage):
    def run(self, ctx) -> None:
        col = ctx.config.read.map.get("id")
        df = ctx.frame(["id", "source"])
        rep = df.filter(pl.col("id").is_duplicated()).sort(["_shard", "row"])
        self.stats["ids"] = df.height
        if rep.height:
            first = rep.row(0, named=True)
            second = rep.filter(pl.col("id") == first["id"]).row(1, named=True)
            n = rep["id"].n_unique()
            raise UserError(
                f"--map id={col}: id {first['id']!r} repeats ({row_location(first['source'], first['row'])} and "
                f"{row_location(second['source'], second['row'])}; {n} id(s) repeat in all): ids must be unique, drop "
                "id= from --map to let winnow generate them (the column is kept either way)"
            )
