"""Unicode normalisation of ``prompt`` and ``response``: the text every later stage and the exact-dedup key see.

The rules live in ``kernels/normalize.py`` (NFC, control characters, line endings, odd spaces, trailing spaces,
runs of blank lines, trimming; indentation kept). The input's own columns are left untouched, so nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from engine.registry import Option, register
from engine.stage import Stage, set_column
from kernels.normalize import normalize


@dataclass
class NormalizeConfig:
    enabled: bool = True  # NFC, control characters, line endings, trailing spaces, runs of blank lines
    form: str = "NFC"  # Unicode normal form: NFC | NFKC | NFD | NFKD (checked by the --normalize-form option)


@register(
    name="normalize", kind="map", section="normalize", config=NormalizeConfig, order=10,
    enabled=lambda sec, cfg: sec.enabled,
    options=[
        Option("--normalize-form", "form", "Unicode normal form NFC | NFKC | NFD | NFKD (default: NFC)",
               allowed=("NFC", "NFKC", "NFD", "NFKD")),
        Option("--no-normalize", "enabled", "skip Unicode normalisation", type=None, value=False),
    ],
)  # fmt: skip
class NormalizeStage(Stage):
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
