"""Unicode normalisation of ``prompt`` and ``response``: the text every later stage and the exact-dedup key see.

The rules live in ``kernels/normalize.py`` (NFC, control characters, line endings, odd spaces, trailing spaces,
runs of blank lines, trimming; indentation kept). The input's own columns are left untouched, so nothing is lost.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from engine.config import NormalizeConfig
from engine.stage import Stage, set_column
from kernels.normalize import normalize


class NormalizeStage(Stage):
    name = "normalize"

    def __init__(self, config: NormalizeConfig | None = None):
        super().__init__(config or NormalizeConfig())

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if not self.config.enabled:
            return batch
        for col in ("prompt", "response"):
            before = batch.column(col)
            after = normalize(before, self.config.form)
            self.count(f"{col}_changed", int(pc.sum(pc.not_equal(before, after).cast(pa.int8())).as_py() or 0))
            batch = set_column(batch, col, after)
        return batch
