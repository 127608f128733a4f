"""The global context: how a global stage reads the corpus, whatever runs it.

A global stage's ``run(ctx)`` sees only this interface, never a path, so the local runner, a Ray runner and the
tests can each give it their own storage:

- ``ctx.config``: the resolved config tree (``auto`` settings already concrete);
- ``ctx.iter_tables(columns, kept_only=False, where=None, keys=None)``: Arrow tables of ``_shard`` (int32), ``row``
  (int64), the current ``verdict`` (after earlier global stages) and the requested columns (null where a column is
  absent), one piece of the corpus at a time (bounded memory), in (shard, row) order. ``kept_only`` keeps rows whose
  verdict is still ``kept``; ``where`` is a polars expression filter (list-typed columns such as ``embedding`` reach
  it as null-or-1 stand-ins: test them with ``is_null`` / ``is_not_null`` only); ``keys`` a polars frame of
  (``_shard``, ``row``) restricting the rows;
- ``ctx.table(...)`` / ``ctx.frame(...)`` / ``ctx.iter_frames(...)``: the same, concatenated or as polars;
- ``ctx.previous(run_dir)``: a read-only context over an earlier finished run (MinHash dedup against it).

Columns come from the map phase: published ones (``scores/``) and the *work columns* a map stage declared for the
global phase only (MinHash signatures). The context holds the current verdict of every row as one small integer
per row (O(rows x 10 bytes) with the row numbers), so global stages never re-read it.

``PartsContext`` reads a local run folder's ``work/map`` parts; ``MemoryContext`` holds one Arrow table (tests, and
small corpora).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engine.io.writers import part_schema, read_part

KEPT = "kept"
KEY_COLUMNS = ("_shard", "row", "verdict")


class GlobalContext(abc.ABC):
    """The interface (see the module docstring); subclasses say where the data are (``_pieces``)."""

    config: Any

    def __init__(self, config: Any):
        self.config = config
        self._names: list[str] = [KEPT]  # verdict code -> name (code 0 = kept)
        self._code: dict[str, int] = {KEPT: 0}
        self._rows: dict[int, np.ndarray] = {}  # shard -> row numbers, ascending
        self._codes: dict[int, np.ndarray] = {}  # shard -> int16 verdict codes aligned with _rows

    # ------------------------------------------------------------------------------------------------ verdicts
    def _encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        enc = pc.dictionary_encode(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
        names = enc.dictionary.to_pylist()
        lut = np.array([self._code_of(n) for n in names], np.int16)
        idx = enc.indices.to_numpy(zero_copy_only=False)
        return lut[idx] if len(idx) else np.zeros(0, np.int16)

    def _code_of(self, name: str) -> int:
        if name not in self._code:
            self._code[name] = len(self._names)
            self._names.append(name)
        return self._code[name]

    def _set_shard_verdicts(self, shard: int, rows: np.ndarray, verdict: pa.Array | pa.ChunkedArray) -> None:
        self._rows[shard] = np.asarray(rows, np.int64)
        self._codes[shard] = self._encode(verdict)

    def verdict_array(self, shard: int, positions: np.ndarray | None = None) -> pa.Array:
        codes = self._codes[shard] if positions is None else self._codes[shard][positions]
        return pa.DictionaryArray.from_arrays(
            pa.array(codes, pa.int16()), pa.array(self._names, pa.large_string())
        ).cast(pa.large_string())

    def num_rows(self) -> int:
        return int(sum(len(r) for r in self._rows.values()))

    def kept_count(self) -> int:
        return int(sum((c == 0).sum() for c in self._codes.values()))

    def verdict_counts(self) -> dict[str, int]:
        counts = np.zeros(len(self._names), np.int64)
        for c in self._codes.values():
            counts += np.bincount(c, minlength=len(self._names))
        return {self._names[i]: int(n) for i, n in enumerate(counts) if n}

    def apply_verdicts(self, upd: pl.DataFrame) -> pl.DataFrame:
        """Apply new verdicts (``_shard``, ``row``, ``verdict``, ...) to rows still kept; return the rows that took
        them (first reason wins: a row another stage rejected keeps its verdict)."""
        upd = upd.filter(pl.col("verdict").is_not_null())
        if upd.height == 0:
            return upd
        keep = np.zeros(upd.height, bool)
        shard_col = upd["_shard"].to_numpy()
        row_col = upd["row"].to_numpy()
        verdicts = upd["verdict"].to_numpy()
        order = np.argsort(shard_col, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_col[order])) + 1
        for idx in np.split(order, bounds):
            if not len(idx):
                continue
            s = int(shard_col[idx[0]])
            rows = self._rows.get(s)
            if rows is None:
                continue
            pos = np.searchsorted(rows, row_col[idx])
            ok = (pos < len(rows)) & (rows[np.minimum(pos, len(rows) - 1)] == row_col[idx])
            pos, sel = pos[ok], idx[ok]
            still = self._codes[s][pos] == 0
            pos, sel = pos[still], sel[still]
            # the same row twice in one update: the first wins
            _u, first = np.unique(pos, return_index=True)
            pos, sel = pos[first], sel[first]
            self._codes[s][pos] = np.array([self._code_of(v) for v in verdicts[sel]], np.int16)
            keep[sel] = True
        return upd.filter(pl.Series(keep))

    # ------------------------------------------------------------------------------------------------ reading
    @abc.abstractmethod
    def _pieces(self, columns: list[str]) -> Iterator[tuple[int, np.ndarray, pa.Table]]:
        """(shard, positions of its rows in the verdict store, table of ``row`` + ``columns``) per piece."""

    def iter_tables(
        self,
        columns: list[str],
        kept_only: bool = False,
        where: pl.Expr | None = None,
        keys: pl.DataFrame | None = None,
    ) -> Iterator[pa.Table]:
        cols = list(dict.fromkeys(c for c in columns if c not in KEY_COLUMNS))
        wanted = {}
        if keys is not None:
            k = keys.select(pl.col("_shard").cast(pl.Int32), pl.col("row").cast(pl.Int64))
            wanted = {int(s[0]): g["row"].to_numpy() for s, g in k.group_by("_shard")}
        filter_cols = [] if where is None else [c for c in where.meta.root_names() if c not in KEY_COLUMNS]
        for shard, pos, t in self._pieces(cols + [c for c in filter_cols if c not in cols]):
            if keys is not None and shard not in wanted:
                continue
            mask = np.ones(t.num_rows, bool)
            if kept_only:
                mask &= self._codes[shard][pos] == 0
            if keys is not None:
                mask &= np.isin(t.column("row").to_numpy(), wanted[shard])
            if where is not None and mask.any():
                probe = pl.from_arrow(_probe_table(t, ["row", *filter_cols])).with_columns(
                    pl.lit(shard, pl.Int32).alias("_shard"),
                    pl.from_arrow(self.verdict_array(shard, pos)).alias("verdict"),
                )
                mask &= probe.select(where.fill_null(False)).to_series().to_numpy()
            if not mask.any():
                continue
            sel = None if mask.all() else pa.array(np.flatnonzero(mask))
            part = t if sel is None else t.take(sel)
            ppos = pos if sel is None else pos[mask]
            out = {
                "_shard": pa.array(np.full(part.num_rows, shard, np.int32)),
                "row": part.column("row").cast(pa.int64()),
                "verdict": self.verdict_array(shard, ppos),
            }
            for c in cols:
                out[c] = part.column(c)
            yield pa.table(out)

    def table(
        self,
        columns: list[str],
        kept_only: bool = False,
        where: pl.Expr | None = None,
        keys: pl.DataFrame | None = None,
    ) -> pa.Table:
        pieces = list(self.iter_tables(columns, kept_only, where, keys))
        if not pieces:
            cols = list(dict.fromkeys(c for c in columns if c not in KEY_COLUMNS))
            return pa.table(
                {
                    "_shard": pa.array([], pa.int32()),
                    "row": pa.array([], pa.int64()),
                    "verdict": pa.array([], pa.large_string()),
                    **{c: pa.nulls(0) for c in cols},
                }
            )
        return pa.concat_tables(pieces, promote_options="permissive")

    def iter_frames(
        self,
        columns: list[str],
        kept_only: bool = False,
        where: pl.Expr | None = None,
        keys: pl.DataFrame | None = None,
    ) -> Iterator[pl.DataFrame]:
        for t in self.iter_tables(columns, kept_only, where, keys):
            yield pl.from_arrow(t)

    def frame(
        self,
        columns: list[str],
        kept_only: bool = False,
        where: pl.Expr | None = None,
        keys: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        return pl.from_arrow(self.table(columns, kept_only, where, keys))

    def previous(self, run_dir: str | Path) -> GlobalContext:
        """A read-only context over an earlier finished run folder (its map parts and final verdicts)."""
        return open_run(run_dir, self.config)


def _probe_table(t: pa.Table, names: list[str]) -> pa.Table:
    """The columns a ``where`` filter reads; list-typed ones (embeddings) become int8 stand-ins, 1 or null where the
    value is null, so ``is_null`` / ``is_not_null`` keep their meaning and no vector is copied into polars (at 10M
    rows x 256 float16 that copy was 5 GB and 20 s for a label-noise pass on unlabelled data)."""
    cols = {}
    for c in names:
        col = t.column(c)
        typ = col.type
        if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
            valid = pc.is_valid(col)
            col = pc.if_else(valid, pa.scalar(1, pa.int8()), pa.scalar(None, pa.int8()))
        cols[c] = col
    return pa.table(cols)


def _column_or_nulls(t: pa.Table, names: list[str], n: int) -> dict[str, pa.ChunkedArray | pa.Array]:
    return {c: (t.column(c) if c in t.column_names else pa.nulls(n)) for c in names}


class PartsContext(GlobalContext):
    """A local run's map phase: ``parts[shard]`` = its Parquet parts in row order, ``work[shard]`` = its Arrow IPC
    file of work columns (rows aligned with the parts, concatenated), a list of such files, one per part (the Ray
    engine writes one per part), or None."""

    def __init__(
        self, config: Any, parts: dict[int, list[Path]], work: dict[int, Path | list[Path] | None] | None = None
    ):
        super().__init__(config)
        self.parts = {int(k): [Path(p) for p in v] for k, v in sorted(parts.items())}
        self.work = {
            int(k): ([Path(p) for p in v] if isinstance(v, list) else Path(v) if v else None)
            for k, v in (work or {}).items()
        }
        self._part_rows: dict[int, list[int]] = {}
        for s, files in self.parts.items():
            rows, verdicts, sizes = [], [], []
            for f in files:
                t = read_part(f, columns=["row", "verdict"])
                rows.append(t.column("row").to_numpy())
                verdicts.append(t.column("verdict"))
                sizes.append(t.num_rows)
            self._part_rows[s] = sizes
            self._set_shard_verdicts(
                s,
                np.concatenate(rows) if rows else np.zeros(0, np.int64),
                pa.chunked_array([c for v in verdicts for c in v.chunks], pa.large_string()),
            )

    def _work_table(self, shard: int, part: int | None = None) -> pa.Table | None:
        path = self.work.get(shard)
        if isinstance(path, list):
            path = path[part] if part is not None and part < len(path) else None
        if path is None or not path.exists():
            return None
        with pa.memory_map(str(path)) as src:  # zero copy: the pages are the file's
            return pa.ipc.open_file(src).read_all()

    def _pieces(self, columns):
        for s, files in self.parts.items():
            work = None
            work_cols: list[str] = []
            per_part = isinstance(self.work.get(s), list)
            if columns and not per_part:
                work = self._work_table(s)
                work_cols = [c for c in columns if work is not None and c in work.column_names]
            start = 0
            for k, (f, n) in enumerate(zip(files, self._part_rows[s])):
                if columns and per_part:
                    work = self._work_table(s, k)
                    work_cols = [c for c in columns if work is not None and c in work.column_names]
                avail = set(part_schema(f).names)
                main_cols = [c for c in columns if c in avail and c not in work_cols]
                t = read_part(f, columns=["row", *main_cols])
                cols = {"row": t.column("row"), **_column_or_nulls(t, main_cols, n)}
                if work_cols:
                    w = work if per_part else work.slice(start, n)
                    cols.update({c: w.column(c) for c in work_cols})
                for c in columns:
                    cols.setdefault(c, pa.nulls(n))
                yield s, np.arange(start, start + n), pa.table(cols)
                start += n


class MemoryContext(GlobalContext):
    """One in-memory table (``_shard`` optional, ``row``, ``verdict`` and any columns): for tests and small inputs."""

    def __init__(self, table: pa.Table | pl.DataFrame, config: Any = None):
        if config is None:
            from engine.config import Config

            config = Config()
        super().__init__(config)
        t = table.to_arrow() if isinstance(table, pl.DataFrame) else table
        if "_shard" not in t.column_names:
            t = t.append_column("_shard", pa.array(np.zeros(t.num_rows, np.int32)))
        if "verdict" not in t.column_names:
            t = t.append_column("verdict", pa.array([KEPT] * t.num_rows, pa.large_string()))
        order = np.lexsort((t.column("row").to_numpy(), t.column("_shard").to_numpy()))
        t = t.take(pa.array(order))
        shard = t.column("_shard").to_numpy()
        self._tables: dict[int, pa.Table] = {}
        for s in np.unique(shard):
            sub = t.filter(pc.equal(t.column("_shard"), int(s)))
            self._tables[int(s)] = sub
            self._set_shard_verdicts(int(s), sub.column("row").to_numpy(), sub.column("verdict"))

    def _pieces(self, columns):
        for s, t in self._tables.items():
            n = t.num_rows
            yield s, np.arange(n), pa.table({"row": t.column("row"), **_column_or_nulls(t, columns, n)})


def open_run(run_dir: str | Path, config: Any) -> PartsContext:
    """A context over a finished local run folder (``OUT`` or ``OUT/work``), with that run's final verdicts."""
    root = Path(run_dir)
    map_dir = root / "map" if (root / "map").is_dir() else root / "work" / "map"
    markers = sorted(map_dir.glob("done-*.json"))
    if not markers:
        raise FileNotFoundError(f"{run_dir}: no finished map shards (work/map/done-*.json): not a winnow run folder")
    parts, work = {}, {}
    scores = map_dir.parent.parent / "scores"
    for m in markers:
        st = json.loads(m.read_text())
        i = int(st["index"])
        if not st.get("parts"):
            continue
        # Final verdicts live in scores/ (the same names as Parquet); fall back to the map parts before finalize.
        final = [scores / (Path(p).stem + ".parquet") for p in st["parts"]]
        parts[i] = final if all(f.exists() for f in final) else [map_dir / p for p in st["parts"]]
        work[i] = (
            [map_dir / p for p in st["work_parts"]]
            if st.get("work_parts")
            else map_dir / st["work"]
            if st.get("work")
            else None
        )
    return PartsContext(config, parts, work)
