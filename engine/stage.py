"""The stage protocol.

A stage is a class set up once (``__init__(config)`` loads models, compiles kernels) and then called on an
iterator of Arrow record batches, yielding batches: ``__call__(batches) -> Iterator[pa.RecordBatch]``. The same
class runs under the local runner and as a Ray Data actor (``map_batches`` with a class).

Rules every stage keeps:
- one output row per input row, same order: filters never drop rows, they set ``verdict``;
- scorers add columns and never rewrite another stage's columns;
- a row whose verdict is already not ``kept`` keeps its first reason (``reject`` only touches kept rows).

Global stages (dedup clustering, label noise, losses) need the whole corpus: they implement ``GlobalStage.run(ctx)``
over the columns they need, read through the global context (``engine.run.context``), never from a path.

Every stage is declared once with ``engine.registry.register`` (its name, config section, kind, columns) and is
built as ``Cls(section_config)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEPT = "kept"


class Stage:
    """Base class of map stages: ``name`` (set by ``register``) labels stats and timings in the manifest."""

    name: str = "stage"

    def __init__(self, config: Any = None):
        self.config = config
        # Per-stage counters merged into the manifest's ``stages`` section (the runner sums them over shards).
        self.stats: dict[str, float] = {}

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield self.process(batch)

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Map one batch to one batch of the same length; override this or ``__call__``."""
        raise TypeError(f"{type(self).__name__} must override process() or __call__()")

    def count(self, key: str, value: float = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + value


def set_column(batch: pa.RecordBatch, name: str, values: pa.Array | np.ndarray) -> pa.RecordBatch:
    """Add ``name`` to ``batch``, or replace it if present."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(values)
    idx = batch.schema.get_field_index(name)
    if idx >= 0:
        return batch.set_column(idx, name, values)
    return batch.append_column(name, values)


def kept_mask(batch: pa.RecordBatch) -> np.ndarray:
    """Boolean numpy mask of rows whose verdict is still ``kept``."""
    return pc.equal(batch.column("verdict"), KEPT).to_numpy(zero_copy_only=False)


def reject(
    batch: pa.RecordBatch,
    mask: np.ndarray,
    reason: str,
    detail: pa.Array | np.ndarray | str | None = None,
) -> tuple[pa.RecordBatch, int]:
    """Set ``verdict = reason`` (and ``detail``) on rows where ``mask`` is true and the verdict is still kept.

    Returns the new batch and how many rows it rejected. ``detail`` is one string for all, or one per row.
    """
    hit = np.asarray(mask, dtype=bool) & kept_mask(batch)
    n = int(hit.sum())
    if n == 0:
        return batch, 0
    hit_arr = pa.array(hit)
    verdict = pc.if_else(hit_arr, pa.scalar(reason, batch.schema.field("verdict").type), batch.column("verdict"))
    batch = set_column(batch, "verdict", verdict)
    if detail is not None:
        dtype = batch.schema.field("detail").type
        if isinstance(detail, str):
            new = pa.scalar(detail, dtype)
        else:
            new = pa.array(detail).cast(dtype) if not isinstance(detail, pa.Array) else detail.cast(dtype)
        batch = set_column(batch, "detail", pc.if_else(hit_arr, new, batch.column("detail")))
    return batch, n


class GlobalStage:
    """A stage that needs the whole corpus. ``run(ctx)`` returns an update table (see ``engine.run.local``)."""

    name: str = "global"

    def __init__(self, config: Any = None):
        self.config = config
        self.stats: dict[str, float] = {}

    def run(self, ctx: Any):  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must override run(ctx)")
