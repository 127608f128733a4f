"""The Ray executor (``--engine ray``): winnow's own registered stage classes on Ray Data, writing the same run
folder and manifest as the local executor (``engine.run.local``).

**Map phase, on Ray Data.** The pending shards become a dataset of shard indices, then:

1. **read** (tasks, one per shard): winnow's own reader (``engine.run.pipeline.canonical_batches``), not
   ``ray.data.read_json`` / ``read_parquet``. Ray's readers would give other ids (they know no shard content hash),
   stop at the first malformed JSON line instead of keeping it as a ``malformed`` row with its line number, and
   take the user's columns as they are, where winnow escapes the ones that clash with its own (``orig_*``) and
   detects the format per shard. Reading through winnow's reader is what keeps ids, formats, malformed-row
   accounting and the user's columns identical to the local engine. The reader yields canonical batches of
   ``read.batch_rows`` rows, each carrying small control columns (``__ray_*``: shard, batch number, format, input
   columns, the shard's row total on its last batch, per-stage counters).
2. **one ``map_batches`` per registry map stage**, in the registry's order, on whole blocks: stateless stages as
   tasks (Ray fuses consecutive ones into one task; each worker process builds a stage once and keeps it), model
   stages (``MODEL_STAGES``: the embedder) as a stateful class on an actor pool of ``run.workers`` actors, with one
   GPU each when the cluster has GPUs. On a CPU-only cluster every map stage runs on that actor pool, in order:
   CPU tasks beside CPU actors deadlocked a cluster whose CPUs the actors held (``--workers 1``: the one actor took
   the one CPU and no stage task ever started), and Ray's optimiser fuses stateless tasks into the actors anyway
   where it can (seen as ``MapWorker(MapBatches(_run_stage)->...->MapBatches(StageActor))``). A stage sees exactly the batch the local runner would hand it (the control
   columns are set aside), so its output is the same.
3. **write** (tasks): each block becomes one map part ``work/map/part-SSSSS-CCCC.arrow`` (Arrow IPC, lz4, the same
   metadata and null global columns as the local runner) and one ``work-SSSSS-CCCC.arrow`` of work columns (the
   local runner writes one per shard; ``PartsContext`` reads either). Blocks are written under temporary names;
   the driver renames a shard's blocks in row order and writes its completion marker ``done-SSSSS.json`` (the
   local runner's format, with the same resume key) once the rows written add up to the shard's total. A killed
   job leaves no marker for an unfinished shard, so a rerun redoes exactly the unfinished shards
   (``engine.run.shards.reusable``: the same staleness rules as the local runner).

A shard of more than ``read.batch_rows`` rows therefore gives several parts (one per batch) where the local runner
gives one: ``scores/`` holds the same rows and columns in more files.

**Global phase and finalize.** The global stages run in the local order, on the driver, through the same
``PartsContext`` over ``work/map`` and ``engine.run.local.finish_run``, and ``finalize`` writes ``scores/`` exactly as
the local runner does; so verdicts, ``duplicate_of`` and scores are those of the local engine. Three of them hand
their heavy part to the cluster:

- **exact dedup** (``ExactDedupOnRay``): every map part's kept ``content_hash`` values are grouped with Ray Data's
  ``groupby`` (a distributed shuffle); the stage then runs on the driver over the rows of duplicate groups only.
- **near dedup** (``NearDedupOnRay``), MinHash LSH without the signatures on the driver:
  1. one task per map part memory-maps its work file and computes the band keys of the rows still kept
     (``engine.stages.dedup.band_records``: the local stage's ``band_keys``), as records (group, band, key, row);
  2. Ray Data ``groupby`` on ``key mod P`` (P = max(CPUs, records / 4M)) brings every record of a band bucket to one
     ``map_groups`` call, which lists the bucket's candidate pairs in the local stage's order
     (``bucket_pairs``: all pairs up to ``bucket_all_pairs`` rows, else star + chain, rows ascending) and counts
     their equal signature values from the work files of just those rows (``pair_equal_counts``);
  3. the driver sorts the pairs into the local order (group, band, key, position) and replays them through the local
     union-find (``replay_candidates``): the same skips, the same undecided pairs for the hybrid check, survivors by
     the same keep-the-best-copy rule, star split and counters. The hybrid check's exact shingle sets (undecided
     pairs' rows only) and the estimated Jaccard of each near duplicate with its survivor come from tasks too.
  Driver memory: the candidate pairs (about 40 bytes each, every pair the bands propose, rejected ones included:
  187,920 at 1M rows of bench_dedup's corpus) and about 60 bytes per row of small arrays (union-find parent,
  survivor, shard/row, response length, violations, kind, masks); no signature and no text (the shingle sets of
  the undecided pairs' rows only). ``verify="exact"`` and ``previous`` runs fall back to the driver. Measured at 1M
  rows, 1 CPU (bench/bench_ray.py): 36 s on the cluster (Ray's shuffle start is most of it) and 5.8 s on the
  driver, against 12 s for the local stage.
- **label noise**: the cross-validation folds of both views (embeddings; hashed character n-grams) fit as parallel
  Ray tasks, one CPU each (``FoldMap``, through ``engine.stages.labels.fold_runner``); what the folds share (the
  embeddings, the labels, the text view's sparse matrix) goes into the object store once. The same fits as the
  local engine's, so the same out-of-fold probabilities up to float rounding and the same ``label_issue`` flags.
  The text view's scoring pass and confident learning stay on the driver.

Not distributed: the union-find itself, semantic dedup, the loss pass and finalize. The manifest says
``engine: ray``, what ran where (``ray.distributed``, ``ray.on_driver``) and ``ray.label_folds_ran_on_ray``.

**Selection.** ``select --engine ray`` runs GreeDi's partitions (``engine/select/greedi.py``) as Ray tasks, one CPU
each, the candidates put in the object store once; the final greedy over the union runs on the driver. The same
seed and partitions give the same selected ids as the local engine.

**Where things must live.** Inputs and ``--out`` are paths every node can read and write (a shared filesystem);
the driver renames parts and runs the global phase, so it needs the same view. Without ``--ray-address`` a local
Ray instance with ``run.workers`` CPUs (0 = every core) is started and stopped around the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import registry
from engine.config import Config, validate
from engine.errors import UserError
from engine.io.readers import check_out, discover
from engine.io.writers import META_FORMAT, META_INPUT_COLUMNS, _IpcFile, disk_full, part_name, write_json_atomic
from engine.run.context import GlobalContext
from engine.run.lock import RunLock
from engine.run.shards import shard_key

INSTALL_HINT = "install it with `make install` or `pip install 'ray[data]'`"
# Stages that load a model: run on an actor pool (the model is loaded once per actor), with a GPU per actor when
# the cluster has GPUs. Every other map stage runs as stateless tasks.
MODEL_STAGES = ("embed",)
SIDE = "__ray_"  # control columns: never seen by a stage, never written
C_SHARD, C_CHUNK, C_FMT, C_COLS, C_TOTAL, C_STATS = (
    SIDE + n for n in ("shard", "chunk", "fmt", "cols", "total", "stats")
)


def require():
    """The ``ray`` module with Ray Data, or a UserError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError(f"--engine ray: Ray Data is not installed; {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def session(config: Config) -> Iterator[Any]:
    """Ray for the length of a command: joins ``run.ray_address`` when given, else starts a local instance with
    ``run.workers`` CPUs (0 = every core) and stops it afterwards. An instance already initialised (a test's) is
    used as it is and left running."""
    ray = require()
    if ray.is_initialized():
        yield ray
        return
    for name in ("ray", "ray.data", "ray._private"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kw: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    try:
        if config.run.ray_address:
            ray.init(address=config.run.ray_address, **kw)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance writes no token under $HOME
            _start_local(ray, config.run.workers or os.cpu_count() or 1, kw)
    except ConnectionError as e:
        raise UserError(
            f"--ray-address {config.run.ray_address}: cannot connect to a Ray cluster there ({e})"
        ) from None
    _quiet_data()
    for name in ("ray", "ray.data", "ray.data._internal.progress"):  # Ray configures its loggers in init
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield ray
    finally:
        ray.shutdown()


def _start_local(ray, cpus: int, kw: dict) -> None:
    """A local Ray instance. Ray gives its raylet 30 s to register; on a loaded machine a first start can miss that
    (seen here at a load of 15 on 2 cores), so one more try."""
    for attempt in range(2):
        try:
            ray.init(num_cpus=cpus, object_store_memory=min(2 << 30, _object_store_default()), **kw)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 1:
                raise


def _object_store_default() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.3)
    except (ValueError, OSError):
        return 2 << 30


def _quiet_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    for name in ("print_on_execution_start", "enable_operator_progress_bars"):
        if hasattr(ctx, name):
            setattr(ctx, name, False)
    import warnings

    # Ray Data warns on the user's terminal when a run has fewer shards than --workers (read/write concurrency)
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)


# ------------------------------------------------------------------------------------------------ worker side
_BUILT: dict[tuple[str, str], Any] = {}


def _config(config_dict: dict) -> Config:
    from engine.config import config_from_dict

    return config_from_dict(config_dict)


def _threads() -> None:
    """One thread per task (Ray gives each task one CPU): numba's count is per calling thread, so set it each call."""
    import numba

    numba.set_num_threads(1)
    pa.set_cpu_count(1)


def _build(name: str, config_dict: dict):
    key = (name, json.dumps(config_dict, sort_keys=True, default=str))
    st = _BUILT.get(key)
    if st is None:
        from engine.run.pipeline import limit_threads

        limit_threads(1)
        st = registry.spec(name).build(_config(config_dict))
        _BUILT[key] = st
    return st


def _const(n: int, value: str) -> pa.Array:
    """``value`` on every row, dictionary-encoded (one copy of the string per block)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.large_string()))


def _read_shards(batch: pa.Table, shards: list, config_dict: dict) -> Iterator[pa.Table]:
    """Ray Data task: canonical batches of each shard index in ``batch``, with the control columns. The last batch
    of a shard carries the shard's row total (one batch held back to know which is last)."""
    from engine.run.pipeline import canonical_batches

    _threads()
    rc = _config(config_dict).read
    for index in batch.column("index").to_pylist():
        shard = shards[index]
        fmt_box: dict[str, Any] = {}
        counts = {"rows": 0}
        held = None
        chunk = 0
        for b in canonical_batches(shard, rc, fmt_box, counts):
            if held is not None:
                yield _with_side(held, index, chunk, fmt_box, -1)
                chunk += 1
            held = b
        if held is not None:
            yield _with_side(held, index, chunk, fmt_box, counts["rows"])


def _with_side(b: pa.RecordBatch, index: int, chunk: int, fmt_box: dict, total: int) -> pa.Table:
    n = b.num_rows
    t = pa.Table.from_batches([b])
    side = {
        C_SHARD: pa.array(np.full(n, index, np.int32)),
        C_CHUNK: pa.array(np.full(n, chunk, np.int32)),
        C_FMT: _const(n, fmt_box.get("fmt", "")),
        C_COLS: _const(n, json.dumps(fmt_box.get("input_cols", []))),
        C_TOTAL: pa.array(np.full(n, total, np.int64)),
        C_STATS: _const(n, "{}"),
    }
    for k, v in side.items():
        t = t.append_column(k, v)
    return t


def _apply(stage, t: pa.Table) -> pa.Table:
    """Run one map stage on one block: the control columns are set aside, the stage gets one record batch (what the
    local runner hands it) and its counters and seconds go into the block's stats column."""
    _threads()
    side = [c for c in t.column_names if c.startswith(SIDE)]
    if t.num_rows == 0:
        return t
    body = t.drop_columns(side).combine_chunks()
    batches = body.to_batches()
    batch = batches[0] if len(batches) == 1 else pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
    stage.stats = {}
    t0 = time.perf_counter()
    out = list(stage(iter([batch])))
    seconds = time.perf_counter() - t0
    res = pa.Table.from_batches(out) if out else body.slice(0, 0)
    if res.num_rows != t.num_rows:
        raise RuntimeError(f"internal error: stage {stage.name} returned {res.num_rows} rows for {t.num_rows}")
    stats = json.loads(t.column(C_STATS)[0].as_py() or "{}")
    mine = dict(stage.stats)
    mine["seconds"] = mine.get("seconds", 0) + seconds
    stats[stage.name] = mine
    for c in side:
        col = _const(t.num_rows, json.dumps(stats)) if c == C_STATS else t.column(c)
        res = res.append_column(c, col)
    return res


def _run_stage(t: pa.Table, name: str, config_dict: dict) -> pa.Table:
    """Ray Data task for a stateless stage (built once per worker process, then reused)."""
    return _apply(_build(name, config_dict), t)


class StageActor:
    """Ray Data actor for a model stage (or a chain of stages ending in one): builds them (loads the model) once,
    then maps blocks through them in order."""

    def __init__(self, names: list[str], config_dict: dict):
        from engine.run.pipeline import limit_threads

        limit_threads(1)
        config = _config(config_dict)
        self.stages = [registry.spec(n).build(config) for n in names]

    def __call__(self, t: pa.Table) -> pa.Table:
        for st in self.stages:
            t = _apply(st, t)
        return t


def _write_blocks(t: pa.Table, map_dir: str, token: str, config_dict: dict) -> pa.Table:
    """Ray Data task: write each (shard, batch) of the block as a map part and a work file under temporary names;
    return one summary row per piece for the driver."""
    _threads()
    config = _config(config_dict)
    null_cols = registry.global_columns(config)
    work_names = registry.work_columns(config)
    from engine.run.pipeline import count_verdicts

    rows_out = []
    shard_col = t.column(C_SHARD).to_numpy()
    chunk_col = t.column(C_CHUNK).to_numpy()
    key = shard_col.astype(np.int64) << 32 | chunk_col.astype(np.int64)
    for k in np.unique(key):
        sel = np.flatnonzero(key == k)
        piece = t.take(pa.array(sel)) if len(sel) != t.num_rows else t
        index, chunk = int(k >> 32), int(k & 0xFFFFFFFF)
        fmt = piece.column(C_FMT)[0].as_py()
        cols = piece.column(C_COLS)[0].as_py()
        total = int(pc.max(piece.column(C_TOTAL)).as_py())
        stats = piece.column(C_STATS)[0].as_py()
        body = piece.drop_columns([c for c in piece.column_names if c.startswith(SIDE)]).combine_chunks()
        first = int(body.column("row")[0].as_py())
        stem = f"{index:05d}-{token}-{chunk:06d}-{first:012d}"
        have = [c for c in work_names if c in body.column_names]
        work_name = ""
        map_path = Path(map_dir)
        if have:
            side = pa.table({"row": body.column("row"), **{c: body.column(c) for c in have}})
            work_name = f"work-{stem}.arrow.tmp"
            # uncompressed, like the local runner's work file (MinHash values do not compress)
            with pa.OSFile(str(map_path / work_name), "wb") as f, pa.ipc.new_file(f, side.schema) as wr:
                wr.write_table(side)
            body = body.drop_columns(have)
        n = body.num_rows
        for name, typ in null_cols.items():
            if name not in body.column_names:
                body = body.append_column(pa.field(name, typ), pa.nulls(n, typ))
        meta = dict(body.schema.metadata or {})
        meta.update({META_INPUT_COLUMNS: cols.encode(), META_FORMAT: fmt.encode()})
        body = body.replace_schema_metadata(meta)
        part = f"part-{stem}.arrow.tmp"
        pw = _IpcFile(map_path / part, body.schema)
        for b in body.to_batches():
            pw.write_batch(b)
        pw.close()
        verdicts: dict[str, int] = {}
        for b in body.to_batches():
            count_verdicts(b, verdicts)
        rows_out.append(
            {
                "shard": index,
                "chunk": chunk,
                "first_row": first,
                "rows": n,
                "part": part,
                "work": work_name,
                "total": total,
                "fmt": fmt,
                "stats": stats,
                "verdicts": json.dumps(verdicts),
            }
        )
    return pa.Table.from_pylist(
        rows_out,
        schema=pa.schema(
            [
                ("shard", pa.int32()),
                ("chunk", pa.int32()),
                ("first_row", pa.int64()),
                ("rows", pa.int64()),
                ("part", pa.string()),
                ("work", pa.string()),
                ("total", pa.int64()),
                ("fmt", pa.string()),
                ("stats", pa.string()),
                ("verdicts", pa.string()),
            ]
        ),
    )


# ------------------------------------------------------------------------------------------------ driver side
def _user_error(e: BaseException) -> UserError | None:
    """The UserError a Ray task raised, unwrapped from Ray's exception wrappers."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e).splitlines()[-1] if "\n" in str(e) else str(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            return UserError(str(cause))
        e = cause if isinstance(cause, BaseException) else e.__cause__
    return None


class _Shard:
    """What the driver knows of one pending shard's written blocks."""

    def __init__(self):
        self.pieces: list[dict] = []
        self.total = -1
        self.rows = 0

    def add(self, r: dict) -> None:
        self.pieces.append(r)
        self.rows += r["rows"]
        if r["total"] >= 0:
            self.total = r["total"]

    @property
    def complete(self) -> bool:
        return self.total >= 0 and self.rows == self.total


def _commit(index: int, shard, st: _Shard, config: Config, map_dir: Path, seconds: float) -> dict:
    """Rename a finished shard's blocks in row order, write its completion marker; returns its stats (the local
    runner's marker fields, plus ``work_parts``)."""
    pieces = sorted(st.pieces, key=lambda r: (r["chunk"], r["first_row"]))
    parts, works = [], []
    verdicts: dict[str, int] = {}
    stages: dict[str, dict] = {}
    seen_chunks: set[int] = set()
    fmt = None
    for k, r in enumerate(pieces):
        name = part_name(index, k, "arrow")
        os.replace(map_dir / r["part"], map_dir / name)
        parts.append(name)
        if r["work"]:
            wname = f"work-{index:05d}-{k:04d}.arrow"
            os.replace(map_dir / r["work"], map_dir / wname)
            works.append(wname)
        for v, c in json.loads(r["verdicts"]).items():
            verdicts[v] = verdicts.get(v, 0) + c
        if r["chunk"] not in seen_chunks:  # a block Ray split in two carries its batch's counters twice
            seen_chunks.add(r["chunk"])
            for name_s, vals in json.loads(r["stats"]).items():
                agg = stages.setdefault(name_s, {})
                for key, v in vals.items():
                    agg[key] = agg.get(key, 0) + v
        fmt = r["fmt"] or fmt
    for vals in stages.values():
        if "seconds" in vals:
            vals["seconds"] = round(vals["seconds"], 3)
    if works and len(works) != len(parts):
        raise RuntimeError(f"internal error: shard {index} has {len(parts)} parts but {len(works)} work files")
    stats = _marker(index, shard, config, fmt, st.rows, verdicts, parts, works, stages, seconds)
    write_json_atomic(map_dir / f"done-{index:05d}.json", stats)
    return stats


def _marker(index, shard, config, fmt, rows, verdicts, parts, works, stages, seconds) -> dict:
    stats = {
        "index": index, "path": shard.path, "kind": shard.kind, "size": shard.size, "hash": shard.content_hash,
        "format": fmt, "rows": rows, "map_verdicts": verdicts, "parts": parts, "work": None, "work_parts": works,
        "stages": stages, "seconds": round(seconds, 3), "key": shard_key(shard, config),
    }  # fmt: skip
    if shard.size and rows == 0:
        stats["warning"] = "no rows"
    return stats


def _actor_stage(ds, rd, names: list[str], cfg: dict, workers: int, args: dict):
    """``map_batches`` of a model stage on an actor pool of 1..``workers`` actors. ``max_restarts=0``: a failed
    actor fails the run (a rerun resumes), and Ray's core worker then does not log an error-level line about
    constructor arguments in the object store (ray-project/ray#53727) on the user's terminal."""
    import warnings

    kw = dict(fn_constructor_kwargs={"names": names, "config_dict": cfg}, batch_size=None, batch_format="pyarrow",
              compute=rd.ActorPoolStrategy(min_size=1, max_size=max(1, workers)), **args)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_restarts goes through ray_remote_args, deprecated since 2.60
        try:
            return ds.map_batches(StageActor, max_restarts=0, **kw)
        except TypeError:  # a Ray that no longer takes it
            return ds.map_batches(StageActor, **kw)


def _on_actors(config: Config, gpus: float) -> list[str]:
    """The map stages that run on actor pools (the rest run as tasks): see ``map_phase``."""
    names = [s.name for s in registry.active(config, registry.MAP)]
    models = [n for n in names if n in MODEL_STAGES]
    return names if models and gpus < 1 else models


def map_phase(
    ray, shards, pending: list[int], config: Config, map_dir: Path, workers: int, progress: Any = None
) -> dict[int, dict]:
    """Run the map phase of the ``pending`` shards on Ray Data; returns {shard index: its marker stats}."""
    import ray.data as rd

    for i in pending:  # what an interrupted earlier attempt left of these shards
        for stale in (*map_dir.glob(f"part-{i:05d}-*"), *map_dir.glob(f"work-{i:05d}*")):
            stale.unlink()
    if not pending:
        return {}
    cfg = config.to_dict()
    token = secrets.token_hex(4)  # temp names of this attempt: a task of a killed attempt cannot clash with ours
    gpus = float(ray.cluster_resources().get("GPU", 0))
    ds = rd.from_items([{"index": i} for i in pending], override_num_blocks=len(pending))
    # Reads and writes ask for no CPU (at most `workers` of each at a time): mostly I/O, like the local runner's
    # reader and writer threads beside its stage thread. A CPU each would deadlock a cluster whose CPUs the
    # embedder's actors hold (1 CPU, 1 actor: no read or write task could ever start), and not fusing the reader
    # with the stage tasks spreads one big shard's blocks over every worker.
    ds = ds.map_batches(
        _read_shards,
        fn_kwargs={"shards": shards, "config_dict": cfg},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        compute=rd.TaskPoolStrategy(size=max(1, workers)),
    )
    names = [s.name for s in registry.active(config, registry.MAP)]
    if gpus < 1 and any(n in MODEL_STAGES for n in names):
        # CPU only: every map stage on the model stage's actor pool. Stateless CPU tasks beside CPU actors deadlock
        # a cluster whose CPUs the actors hold (1 CPU, 1 actor: no task ever starts), and Ray's optimiser fuses
        # the stateless tasks into the actors when it can anyway.
        ds = _actor_stage(ds, rd, names, cfg, workers, {})
    else:
        for name in names:
            if name in MODEL_STAGES:  # GPUs: the model's actors hold a GPU each, the CPU stages stay tasks
                ds = _actor_stage(ds, rd, [name], cfg, workers, {"num_gpus": 1})
            else:
                ds = ds.map_batches(
                    _run_stage, fn_kwargs={"name": name, "config_dict": cfg}, batch_size=None, batch_format="pyarrow"
                )
    ds = ds.map_batches(
        _write_blocks,
        fn_kwargs={"map_dir": str(map_dir), "token": token, "config_dict": cfg},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0,
        compute=rd.TaskPoolStrategy(size=max(1, workers)),
    )

    crash_after = int(os.environ.get("WINNOW_CRASH_AFTER_SHARDS", "-1"))  # tests: simulate a kill mid-run
    task = progress.add_task("map (ray)", total=sum(shards[i].size for i in pending) or 1) if progress else None
    state = {i: _Shard() for i in pending}
    results: dict[int, dict] = {}
    t0 = time.perf_counter()
    it = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    try:
        for batch in it:
            for r in batch.to_pylist():
                i = int(r["shard"])
                st = state[i]
                st.add(r)
                if st.complete and i not in results:
                    results[i] = _commit(i, shards[i], st, config, map_dir, time.perf_counter() - t0)
                    if progress:
                        progress.advance(task, shards[i].size)
                    if crash_after >= 0 and len(results) >= crash_after:
                        raise RuntimeError("WINNOW_CRASH_AFTER_SHARDS: simulated crash")
    except Exception as e:
        if (ue := _user_error(e)) is not None and not isinstance(e, UserError):
            raise ue from None
        raise
    finally:
        with contextlib.suppress(Exception):
            it.close() if hasattr(it, "close") else None
    for i in pending:
        if i in results:
            continue
        st = state[i]
        if st.pieces:  # every task ended without an error, yet the rows do not add up
            raise RuntimeError(f"internal error: shard {i} wrote {st.rows} rows of {st.total}")
        # the reader yielded nothing: an empty shard
        results[i] = _marker(i, shards[i], config, None, 0, {}, [], [], {}, 0.0)
        write_json_atomic(map_dir / f"done-{i:05d}.json", results[i])
    return results


def score(inputs: list[str], out: str | Path, config: Config, progress: Any = None, command: str = "score") -> dict:
    """``engine.run.local.score`` with the map phase on Ray: the same locking, temp-file cleanup, resume and
    run folder; the manifest says ``engine: ray``."""
    from engine.run.local import _remove_temps

    t_start = time.perf_counter()
    validate(config)
    shards, warnings = discover(inputs, exclude=str(out))
    check_out(out, shards)
    out = Path(out)
    with RunLock(out):
        _remove_temps(out)
        try:
            with session(config) as ray:
                return _score(ray, t_start, shards, warnings, out, config, progress, command)
        except BaseException as e:
            _remove_temps(out)
            if (full := disk_full(e, getattr(e, "filename", None) or out)) is None:
                raise
            raise full from None


def _score(
    ray, t_start: float, shards, warnings: list[str], out: Path, config: Config, progress: Any, command: str
) -> dict:
    from engine.run.local import finish_run, open_map

    shards, map_dir, resolved, results, pending = open_map(shards, out, config)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = config.run.workers or cpus
    t_map = time.perf_counter()
    results.update(map_phase(ray, shards, pending, config, map_dir, workers, progress))
    map_seconds = time.perf_counter() - t_map
    extra = {
        "engine": "ray",
        "ray": {
            "address": config.run.ray_address or "local",
            "cpus": cpus,
            "gpus": float(ray.cluster_resources().get("GPU", 0)),
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "version": ray.__version__,
            "stages_on_actors": _on_actors(config, float(ray.cluster_resources().get("GPU", 0))),
            "distributed": "map phase (read, map stages, part writes); exact-dedup hash grouping; MinHash band "
            "keys, band buckets and candidate pairs; label-noise folds",
            "on_driver": "exact dedup over its duplicate groups; near dedup's union-find over candidate pairs; "
            "the other global stages; finalize",
            "label_folds_ran_on_ray": 0,
        },
    }
    gstages = [
        ON_RAY[st.name](st, extra["ray"]) if st.name in ON_RAY else st
        for st in registry.build(config, registry.GLOBAL)
    ]
    from engine.stages.labels import fold_runner

    folds = FoldMap(extra["ray"])
    with fold_runner(folds):
        return finish_run(
            t_start,
            shards,
            warnings,
            out,
            config,
            command,
            results,
            pending,
            resolved,
            {"map_s": round(map_seconds, 3), "warm_up_s": {}},
            workers,
            global_stages=gstages,
            extra=extra,
        )


# ------------------------------------------------------------------------------------------------ exact dedup


def _part_hashes(batch: pa.Table) -> pa.Table:
    """Ray Data task: ``content_hash`` of the rows each map part in ``batch`` left kept."""
    from engine.io.writers import read_part

    _threads()
    out = []
    for path in batch.column("path").to_pylist():
        t = read_part(path, columns=["content_hash", "verdict"])
        out.append(t.filter(pc.equal(t.column("verdict"), "kept")).select(["content_hash"]))
    return pa.concat_tables(out) if out else pa.table({"content_hash": pa.array([], pa.uint64())})


class _Where:
    """A global context that shows a stage only the rows passing ``where`` (everything else delegates)."""

    def __init__(self, ctx, where):
        self._ctx, self._where = ctx, where

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def iter_tables(self, columns, kept_only=False, where=None, keys=None):
        w = self._where if where is None else (where & self._where)
        return self._ctx.iter_tables(columns, kept_only, w, keys)

    table = GlobalContext.table
    frame = GlobalContext.frame
    iter_frames = GlobalContext.iter_frames


class _StageOnRay:
    """A global stage with part of its work on Ray: it wraps the registry's stage (``inner``), whose name, stats and
    other attributes it shows as its own; ``info`` collects where each part ran, for the manifest."""

    def __init__(self, inner, info: dict | None = None):
        self.inner = inner
        self.name = inner.name
        self.info = info if info is not None else {}

    @property
    def stats(self):
        return self.inner.stats

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ExactDedupOnRay(_StageOnRay):
    """The exact-dedup stage with its grouping on Ray Data: the map parts' ``content_hash`` values are grouped with
    Ray Data's ``groupby`` (a distributed shuffle), and the stage itself then runs on the driver over the rows of
    the hash groups with two or more copies only, plus one single-copy row, so that its counters read as on a corpus
    without duplicates. A row alone in its group never changes verdict and the stage orders rows by (shard, row), so
    its updates are the local engine's; the driver holds the duplicate groups instead of every kept row's hash.
    (Map-time ``kept`` is a superset of the rows still kept when the stage runs; the stage recounts its groups.)"""

    def run(self, ctx):
        import polars as pl
        import ray.data as rd

        files = [str(f) for fs in ctx.parts.values() for f in fs]
        if not files:
            return self.inner.run(ctx)
        t0 = time.perf_counter()
        ds = rd.from_items([{"path": f} for f in files], override_num_blocks=len(files))
        import ray

        # a few large partitions, not Ray Data's default 200 (whose tasks cost more than the rows here)
        n_parts = max(1, int(ray.cluster_resources().get("CPU", 1)), -(-ctx.kept_count() // 4_000_000))
        counts = (
            ds.map_batches(_part_hashes, batch_size=1, batch_format="pyarrow")
            .groupby("content_hash", num_partitions=n_parts)
            .count()
        )
        multi, single = [], []
        for b in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
            n = b.column(b.column_names[-1]).to_numpy()
            h = b.column("content_hash").to_numpy()
            multi.append(h[n > 1])
            if not single and (n == 1).any():
                single.append(h[n == 1][:1])
        keep = np.concatenate([*multi, *single]) if multi or single else np.zeros(0, np.uint64)
        where = pl.col("content_hash").is_in(pl.Series(keep.astype(np.uint64), dtype=pl.UInt64))
        t1 = time.perf_counter()
        try:
            return self.inner.run(_Where(ctx, where))
        finally:
            self.info.setdefault("global_split_s", {})[self.name] = {
                "cluster": round(t1 - t0, 3),
                "driver": round(time.perf_counter() - t1, 3),
            }


# ------------------------------------------------------------------------------------------------ selection
def _select_partition(sel, cands, k: int, limits, idx: np.ndarray):
    _threads()
    return sel.select(cands.take(idx), min(k, len(idx)), limits.take(idx))


def partition_map(sel, cands, k: int, limits, parts: list[np.ndarray]) -> list:
    """GreeDi's partitions as Ray tasks (``engine.select.greedi.partition_runner``): the candidates and limits are
    put in the object store once; results come back in partition order."""
    ray = require()
    task = ray.remote(num_cpus=1)(_select_partition)
    c_ref, l_ref, s_ref = ray.put(cands), ray.put(limits), ray.put(sel)
    return ray.get([task.remote(s_ref, c_ref, k, l_ref, idx) for idx in parts])


partition_map.where = "ray"  # the selection manifest's method_info.partitions_ran_on


# ------------------------------------------------------------------------------------------------ near dedup
def _pieces_of(ctx) -> list[dict]:
    """The map parts of a PartsContext in its row order, each with its work file, where its rows start in that
    file, its row count and its first row's index in the context's (shard, row) order."""
    pieces, offset = [], 0
    for s in ctx.parts:
        work = ctx.work.get(s)
        start = 0
        for k, n in enumerate(ctx._part_rows[s]):
            path = work[k] if isinstance(work, list) else work
            pieces.append({"shard": s, "part": str(ctx.parts[s][k]), "work": str(path) if path else None,
                           "start": 0 if isinstance(work, list) else start, "n": int(n), "offset": offset})  # fmt: skip
            start += n
            offset += n
    return pieces


def _piece_signatures(piece: dict) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(signatures (n, P) or None, valid mask, kind) of one piece, memory-mapped from its work file (zero copy: only
    the pages touched are read)."""
    from engine.stages.dedup import KIND, SIG

    n = piece["n"]
    if not piece["work"] or not Path(piece["work"]).exists():
        return None, np.zeros(n, bool), np.zeros(n, np.uint8)
    with pa.memory_map(piece["work"]) as src:
        t = pa.ipc.open_file(src).read_all()
    if SIG not in t.column_names:
        return None, np.zeros(n, bool), np.zeros(n, np.uint8)
    t = t.slice(piece["start"], n)
    col = t.column(SIG).combine_chunks()
    p = col.type.list_size
    vals = col.values
    if col.offset or len(vals) != len(col) * p:  # a slice of a larger array: copy this piece's values
        vals = pc.list_flatten(pc.if_else(pc.is_valid(col), col, pa.scalar([0] * p, col.type)))
    sig = vals.to_numpy(zero_copy_only=False).reshape(len(col), p)
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    kind = (pc.fill_null(t.column(KIND), 0).to_numpy(zero_copy_only=False).astype(np.uint8) if KIND in t.column_names
            else np.zeros(n, np.uint8))  # fmt: skip
    return sig, valid, kind


def _gather_signatures(rows: np.ndarray, pieces: list[dict]) -> np.ndarray:
    """Signatures of the sorted unique context rows ``rows``, read piece by piece from the work files."""
    offsets = np.array([pc_["offset"] for pc_ in pieces], np.int64)
    which = np.searchsorted(offsets, rows, side="right") - 1
    out = None
    for w in np.unique(which):
        sel = np.flatnonzero(which == w)
        sig, _valid, _kind = _piece_signatures(pieces[w])
        if out is None:
            out = np.zeros((len(rows), sig.shape[1]), sig.dtype)
        out[sel] = sig[rows[sel] - pieces[w]["offset"]]
    return out if out is not None else np.zeros((0, 1), np.uint32)


def _equal_counts(a: np.ndarray, b: np.ndarray, pieces: list[dict]) -> np.ndarray:
    from engine.stages.dedup import pair_equal_counts

    if not len(a):
        return np.zeros(0, np.int64)
    rows = np.unique(np.concatenate([a, b]))
    sig = _gather_signatures(rows, pieces)
    return pair_equal_counts(sig, np.searchsorted(rows, a), np.searchsorted(rows, b))


def _band_task(piece: dict, kept: np.ndarray, rules, empty: int, n_parts: int):
    """Ray task, one per map part: which rows take part (kept, signed, not empty), and the part's band-key records
    (``engine.stages.dedup.band_records``) with ``p``, the groupby partition of their key."""
    from engine.stages.dedup import band_records

    _threads()
    sig, valid, kind = _piece_signatures(piece)
    part = np.asarray(kept, bool) & valid
    if sig is not None and len(sig):
        part &= ~np.all(sig == sig.dtype.type(empty), axis=1)
        rec = band_records(sig, part, kind, rules, piece["offset"])
    else:
        rec = band_records(np.zeros((0, 1), np.uint32), part[:0], kind[:0], [])
    p = (rec["key"] % np.uint64(n_parts)).astype(np.int32)
    table = pa.table({"p": p, **{k: v for k, v in rec.items()}})
    return np.packbits(part), np.packbits(valid), kind, table


def _bucket_edges(t: pa.Table, cap: int, pieces: list[dict]) -> pa.Table:
    """Ray Data ``map_groups`` task: every band bucket of one partition (all its records are here), its candidate
    pairs in the local order, and their equal signature values, read from the work files."""
    from engine.stages.dedup import bucket_pairs

    _threads()
    col = {c: t.column(c).to_numpy() for c in ("g", "j", "key", "row")}
    pairs = bucket_pairs(col["g"], col["j"], col["key"], col["row"], cap)
    pairs["eq"] = _equal_counts(pairs["a"], pairs["b"], pieces).astype(np.int16)
    return pa.table(pairs)


def _sets_task(part: str, local: np.ndarray, which: str, shingle_kw: dict) -> tuple[np.ndarray, np.ndarray]:
    """Ray task: the exact shingle sets (the map phase's rule) of rows ``local`` of one map part, from its text."""
    from engine.io.writers import read_part
    from engine.stages.dedup import dedup_text
    from kernels.minhash import shingle_sets

    _threads()
    t = read_part(part, columns=["prompt", "response"]).take(pa.array(local))
    for c in ("prompt", "response"):
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.large_string()))
    return shingle_sets(dedup_text(t, which), **shingle_kw)


def _eq_task(a: np.ndarray, b: np.ndarray, pieces: list[dict]) -> np.ndarray:
    _threads()
    return _equal_counts(a, b, pieces)


class NearDedupOnRay(_StageOnRay):
    """The near-dedup stage with its band passes on Ray (the module docstring, "near dedup"): band keys in one task
    per map part, buckets grouped with Ray Data's ``groupby``, candidate pairs and their signature agreement per
    group; the driver replays the pairs in the local order (``engine.stages.dedup.replay_candidates``) and runs the
    local stage's second pass, survivors and star split. Falls back to the local stage for ``verify="exact"``,
    ``previous`` runs and contexts that are not a run folder."""

    def run(self, ctx):
        t0 = time.perf_counter()
        split = {"cluster": 0.0}
        try:
            return self._run(ctx, split)
        finally:
            if split.get("ran"):
                split.pop("ran")
                split["driver"] = round(time.perf_counter() - t0 - split["cluster"], 3)
                split["cluster"] = round(split["cluster"], 3)
                self.info.setdefault("global_split_s", {})[self.name] = split

    def _run(self, ctx, split: dict):
        import ray
        import ray.data as rd

        from engine.run.context import PartsContext
        from engine.stages.dedup import RESP_LEN, empty_value, replay_candidates

        c = self.inner.cfg
        if not isinstance(ctx, PartsContext) or c.verify == "exact" or c.previous:
            return self.inner.run(ctx)
        pieces = _pieces_of(ctx)
        if not pieces:
            return self.inner.run(ctx)
        split["ran"] = True
        t_cluster = time.perf_counter()
        main, short = c.rules()
        rules = [main] + ([short] if short is not None else [])
        n = pieces[-1]["offset"] + pieces[-1]["n"]
        kept = np.concatenate([ctx._codes[s] == 0 for s in ctx.parts])
        cpus = int(ray.cluster_resources().get("CPU", 1))
        approx = int(kept.sum()) * max(r.num_bands for r in rules)  # band records, at most
        n_parts = max(1, cpus, -(-approx // 4_000_000))  # groups of up to ~4M records (~90 MB)
        task = ray.remote(num_cpus=1, num_returns=4)(_band_task)
        empty = empty_value(c.family, c.scheme)
        refs = [task.remote(pc_, kept[pc_["offset"] : pc_["offset"] + pc_["n"]], rules, empty, n_parts)
                for pc_ in pieces]  # fmt: skip
        part = np.zeros(n, bool)
        valid = np.zeros(n, bool)
        kind = np.zeros(n, np.uint8)
        for pc_, (bits, vbits, k, _t) in zip(pieces, refs):
            o, m = pc_["offset"], pc_["n"]
            part[o : o + m] = np.unpackbits(ray.get(bits), count=m).astype(bool)
            valid[o : o + m] = np.unpackbits(ray.get(vbits), count=m).astype(bool)
            kind[o : o + m] = ray.get(k)
        edges = rd.from_arrow_refs([r[3] for r in refs])
        grouped = edges.groupby("p", num_partitions=n_parts).map_groups(
            _bucket_edges, fn_kwargs={"cap": int(c.bucket_all_pairs), "pieces": pieces}, batch_format="pyarrow"
        )
        got = [b for b in grouped.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
        del refs
        cols = ("g", "j", "key", "t", "a", "b", "eq")
        types = {"g": np.uint8, "j": np.uint8, "key": np.uint64, "t": np.int64, "a": np.int64, "b": np.int64,
                 "eq": np.int16}  # fmt: skip
        pairs = {k: (np.concatenate([b.column(k).to_numpy() for b in got]) if got else np.zeros(0, types[k]))
                 for k in cols}  # fmt: skip
        del got
        split["cluster"] += time.perf_counter() - t_cluster  # band tasks, groupby, pairs (the driver waits)
        # per-row arrays the survivor choice reads (no signature, no text)
        shard = np.concatenate([np.full(len(ctx._rows[s]), s, np.int32) for s in ctx.parts])
        row = np.concatenate([ctx._rows[s] for s in ctx.parts])
        resp_len = np.zeros(n, np.int64)
        viol = np.zeros(n, np.int64)
        want = [RESP_LEN] + ([c.violations_column] if c.violations_column else [])
        pos = 0
        for t in ctx.iter_tables(want):
            m = t.num_rows
            resp_len[pos : pos + m] = pc.fill_null(t.column(RESP_LEN), 0).to_numpy(zero_copy_only=False)
            if c.violations_column and c.violations_column in t.column_names:
                viol[pos : pos + m] = pc.fill_null(t.column(c.violations_column), 0).to_numpy(zero_copy_only=False)
            pos += m
        hybrid = c.verify == "hybrid"
        eq_task = ray.remote(num_cpus=1)(_eq_task)

        def est_fn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            out = np.ones(len(a), np.float32)  # a row with itself: every value equal
            d = np.flatnonzero(a != b)
            if d.size:
                t_est = time.perf_counter()
                chunks = np.array_split(d, max(1, min(cpus, d.size // 50_000)))
                counts = ray.get([eq_task.remote(a[ch], b[ch], pieces) for ch in chunks])
                split["cluster"] += time.perf_counter() - t_est
                out[d] = (np.concatenate(counts) / c.num_perm).astype(np.float32)
            return out

        sets_task = ray.remote(num_cpus=1)(_sets_task)
        offsets = np.array([pc_["offset"] for pc_ in pieces], np.int64)

        def exact_sets(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # the hybrid check's sets of the undecided pairs' rows, from their text, in one task per map part: the
            # driver never reads the corpus text (the local stage re-reads it through the context)
            t_sets = time.perf_counter()
            which = np.searchsorted(offsets, rows, side="right") - 1
            todo = [(w, rows[which == w] - offsets[w]) for w in np.unique(which)]
            got = ray.get([sets_task.remote(pieces[w]["part"], loc, c.text, c.shingle_kwargs()) for w, loc in todo])
            vals = np.concatenate([v for v, _o in got]) if got else np.zeros(0, np.uint32)
            off = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(np.concatenate([np.diff(o) for _v, o in got]) if got else [], out=off[1:])
            st = self.inner.stats
            st["rows_reread"] = st.get("rows_reread", 0) + int(rows.size)
            split["cluster"] += time.perf_counter() - t_sets
            return vals, off

        res = replay_candidates(n, pairs, part, kind, rules, c.num_perm, hybrid, np.zeros(n, np.int64), viol,
                                resp_len, exact_sets, est_fn)  # fmt: skip
        split["pairs"] = len(pairs["a"])
        del pairs
        st = self.inner.stats
        for k, v in res.stats.items():
            st[k] = st.get(k, 0) + v
        st["num_bands"], st["rows_per_band"] = main.num_bands, main.rows_per_band
        if short is not None:
            st["short_num_bands"], st["short_rows_per_band"] = short.num_bands, short.rows_per_band

        def take_ids(idx: np.ndarray) -> pa.Array:
            import polars as pl

            u, inv = np.unique(idx, return_inverse=True)
            keys = pl.DataFrame({"_shard": shard[u], "row": row[u]})
            t = ctx.table(["id"], keys=keys)
            found = pl.from_arrow(t.select(["_shard", "row", "id"]))
            ids = keys.join(found, on=["_shard", "row"], how="left", maintain_order="left")["id"].to_arrow()
            return ids.cast(pa.large_string()).take(pa.array(inv))

        upd = self.inner.updates(res, n, shard, row, take_ids)
        if upd is not None and not valid.all():
            import polars as pl

            # the local stage numbers signed rows only: minhash_cluster is the survivor's rank among them
            rank = np.cumsum(valid) - 1
            upd = upd.with_columns(pl.Series("minhash_cluster", rank[upd["minhash_cluster"].to_numpy()]))
        return upd


ON_RAY = {"exact_dedup": ExactDedupOnRay, "near_dedup": NearDedupOnRay}  # global stages with their grouping on Ray


# ------------------------------------------------------------------------------------------------ label noise
def _fit_fold(fit, shared: dict, kw: dict):
    from engine.run.pipeline import limit_threads

    limit_threads(1)
    return fit(**shared, **kw)


class FoldMap:
    """The label-noise folds as parallel Ray tasks, one CPU each (``engine.stages.labels.fold_runner``): the data
    every fold shares (embeddings, labels, the text view's matrix) go into the object store once. The manifest's
    ``ray.label_folds_ran_on_ray`` counts the folds."""

    def __init__(self, info: dict):
        self.info = info

    def __call__(self, fit, shared: dict, per_fold: list[dict]) -> list:
        ray = require()
        task = ray.remote(num_cpus=1)(_fit_fold)
        ref = ray.put(shared)
        t0 = time.perf_counter()
        out = ray.get([task.remote(fit, ref, kw) for kw in per_fold])
        self.info["label_folds_ran_on_ray"] = self.info.get("label_folds_ran_on_ray", 0) + len(per_fold)
        sp = self.info.setdefault("global_split_s", {}).setdefault("label_noise", {"cluster": 0.0})
        sp["cluster"] = round(sp["cluster"] + time.perf_counter() - t0, 3)
        return out
