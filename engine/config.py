"""One dataclass tree for every option. CLI flags map onto fields one to one; ``--config FILE.toml`` can set any
of them (sections named like the fields below); the resolved tree goes into the manifest so a run can be
repeated exactly."""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import hashlib
import io
import json
import tomllib
import types
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine import registry
from engine.errors import UserError
from engine.io import schema
from engine.registry import Option, Range

# Canonical columns --map can fill (engine.io.schema, format "mapped"); prompt and response are required.
MAP_KEYS = ("prompt", "response", "label", "id")
FORMATS = ("auto", *schema.FORMATS)
SEED = Range(0)  # numpy's default_rng rejects negative seeds


@dataclass
class ReadConfig:
    format: str = "auto"  # auto | alpaca | chat | sharegpt | classification | text | mapped (auto: by columns)
    map: dict[str, str] = field(default_factory=dict)  # canonical name -> input column, e.g. {"prompt": "question"}
    batch_rows: int = 8192  # rows per Arrow batch handed to stages (memory per batch ~ rows x mean row bytes)
    jsonl_block_bytes: int = 8 << 20  # bytes of JSONL parsed per block (8 MiB); bounds reader memory

    def validate(self) -> None:
        if self.format == "mapped" and not self.map:
            raise ValueError("--format mapped needs --map prompt=COL,response=COL")
        if self.map and self.format not in ("auto", "mapped"):
            raise ValueError(
                f"--format {self.format} and --map contradict each other (--map sets the columns: drop --format)"
            )
        for key, col in self.map.items():
            if key not in MAP_KEYS:
                raise ValueError(f"--map {key}={col}: '{key}' is not a canonical column; map {', '.join(MAP_KEYS)}")
            if not col.strip():
                raise ValueError(f"--map {key}=: expected a column name after '='")
        missing = [k for k in ("prompt", "response") if k not in self.map]
        if self.map and missing:
            given = ",".join(f"{k}={v}" for k, v in self.map.items())
            raise ValueError(
                f"--map {given}: also map {' and '.join(f'{k}=COLUMN' for k in missing)} (a mapped input needs both)"
            )


@dataclass
class RunConfig:
    workers: int = 0  # processes for the map phase (0 = one per core, at most one per pending shard)
    seed: int = 0  # seed for every random choice (selection, splits, folds)
    compression: str = "zstd"  # Parquet codec of scores/ parts
    compression_level: int = 1  # zstd level: 1 writes ~2x faster than the default 3 for ~5% larger files
    skip_stages: list[str] = field(default_factory=list)  # stage names to leave out, e.g. ["clean", "minhash"]
    engine: str = "local"  # local | ray: the executor (engine/run/local.py, engine/run/ray.py)
    ray_address: str = ""  # --engine ray: the cluster to join ("" = start a local Ray instance for the command)

    def validate(self) -> None:
        registry.check_fields(
            self,
            "run",
            compression=("zstd", "lz4", "snappy", "gzip", "brotli", "none"),
            compression_level=Range(1, 22),
        )  # zstd's levels
        if self.ray_address and self.engine != "ray":
            raise ValueError(f"--ray-address {self.ray_address}: needs --engine ray")
        if self.engine == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise ValueError(
                    "--engine ray: Ray Data is not installed; install it with `make install` or "
                    "`pip install 'ray[data]'`"
                )
        names = [s.name for s in registry.specs()]
        for name in self.skip_stages:
            if name not in names:
                near = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {near[0]}? " if near else ""
                raise ValueError(f"--skip-stages {name}: no stage of that name; {hint}stages: {', '.join(names)}")


@dataclass
class SelectConfig:
    method: str = "auto"  # auto | facility | stratified | kcenter | deita | topk | random (engine/select/)
    score: str = ""  # topk's ranking column (higher is better unless ascending); "" = quality
    ascending: bool = False  # topk: take the lowest scores instead (e.g. a loss)
    budget: str = "0.2"  # a count ("5000"), a fraction ("0.2" or "20%"), or tokens ("tokens:2e6")
    quality: str = ""  # polars expression for the quality column; "" = engine/select/quality.py's DEFAULT
    quality_weight: float = 1.0  # facility: lambda on quality; kcenter: weight of quality in [0, 1]
    neighbours: int = 16  # k of the kNN similarity graph (facility, deita, kcenter's graph path)
    epsilon: float = 0.0  # facility: 0 = lazy greedy; > 0 = stochastic greedy with this epsilon
    strata_rows: int = 10  # stratified: about this many picks per k-means stratum
    tau: float = 0.9  # deita: cosine at or above which a row counts as too close to an accepted one
    kcenter: str = "auto"  # auto | exact | graph (engine/select/kcenter.py)
    balance: str = "none"  # none | equal | proportional | min:N (per-label quotas)
    source_cap: str = "0"  # at most this many rows (>= 1) or this fraction of the budget (< 1) per --cap-by value
    cap_by: str = "source"  # the column --source-cap counts by
    partitions: int = 0  # GreeDi partitions; 0 = auto (one per 4M candidates), 1 = none
    target: list[str] = field(default_factory=list)  # files of a target task (--target)
    relevance: str = "both"  # knn | dsir | both: how relevance to --target is measured
    target_mode: str = "weight"  # weight (quality x relevance) | restrict (keep the most relevant candidates)
    target_keep: float = 0.5  # restrict: the fraction of candidates kept, by relevance
    # auto | keep | drop: rows the labels stage flagged label_issue leave the candidates (drop); auto = what
    # engine/select/selection.py's label_issue_policy resolves from the evidence (bench/bench_compare.py)
    label_issues: str = "auto"

    def validate(self) -> None:
        from engine.select.selection import check_options

        check_options(self)  # method, budget, balance, caps, quality formula; columns once they are known


class _ConfigBase:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable hash of the named sections (what decides whether a finished shard can be reused)."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _build_config_class() -> type:
    """``Config``: ``read``, then one section per registered stage (in data-path order), then ``run`` and
    ``select``. A stage's section exists as soon as its file under engine/stages/ registers it."""
    fields: list[tuple[str, type, Any]] = [("read", ReadConfig, field(default_factory=ReadConfig))]
    for name, cls in registry.sections().items():
        if name in ("read", "run", "select"):
            raise ValueError(f"a stage may not use the reserved config section {name!r}")
        fields.append((name, cls, field(default_factory=cls)))
    fields += [
        ("run", RunConfig, field(default_factory=RunConfig)),
        ("select", SelectConfig, field(default_factory=SelectConfig)),
    ]
    cls = dataclasses.make_dataclass("Config", fields, bases=(_ConfigBase,))
    cls.__module__ = __name__
    cls.__doc__ = "The one config tree: " + ", ".join(n for n, _t, _f in fields) + "."
    return cls


Config = _build_config_class()

# Flags of the sections the runner owns (stage flags are declared by each stage, engine/registry.py).
CORE_OPTIONS = [
    Option(
        "--format",
        "format",
        "input format: auto | alpaca | chat | sharegpt | classification | text (default: auto, from the column names)",
        section="read",
        allowed=FORMATS,
    ),
    Option(
        "--batch-rows", "batch_rows", "rows per Arrow batch (default: 8192)", int, section="read", allowed=Range(1)
    ),
    # 1 GiB: pyarrow's JSON block_size is an int32, and a block is held about three times over while it is parsed
    Option(
        "--jsonl-block-bytes",
        "jsonl_block_bytes",
        "bytes of JSONL parsed per block (default: 8 MiB)",
        int,
        section="read",
        allowed=Range(1, 1 << 30),
    ),
    Option(
        "--workers",
        "workers",
        "processes for the map phase (default: 0 = one per core)",
        int,
        section="run",
        allowed=Range(0),
    ),
    Option("--seed", "seed", "seed for every random choice (default: 0)", int, section="run", allowed=SEED),
    Option(
        "--engine",
        "engine",
        "executor: local (processes on this machine) | ray (Ray Data; a local Ray "
        "instance unless --ray-address) (default: local)",
        section="run",
        allowed=("local", "ray"),
    ),
    Option(
        "--ray-address",
        "ray_address",
        "--engine ray: address of a running Ray cluster, e.g. auto or "
        "ray://head:10001 (default: start a local Ray instance)",
        section="run",
        metavar="ADDR",
    ),
    Option(
        "--skip-stages",
        "skip_stages",
        "stage names to leave out, e.g. clean minhash (the manifest's stages_run names them)",
        nargs="+",
        metavar="STAGE",
        section="run",
    ),
]

# Flags of selection (`select` and `run`); engine.select.selection.check_options checks what needs the columns.
SELECT_OPTIONS = [
    Option(
        "--method",
        "method",
        "auto | facility | stratified | kcenter | deita | topk | random (default: auto = "
        "topk if --score is given; on labelled rows scored for label noise, stratified after dropping label "
        "issues, with proportional label quotas; else facility)",
        section="select",
        allowed=("auto", "facility", "stratified", "kcenter", "deita", "topk", "random"),
    ),
    Option(
        "--score",
        "score",
        "topk's ranking column, higher is better (see --ascending); default: quality",
        section="select",
    ),
    Option(
        "--budget",
        "budget",
        "how much to select: a count (5000), a fraction of kept rows (0.2 or 20%), or tokens "
        "(tokens:2e6); default: 0.2",
        section="select",
    ),
    Option(
        "--ascending",
        "ascending",
        "topk takes the lowest scores (e.g. a loss)",
        type=None,
        value=True,
        section="select",
    ),
    Option(
        "--quality",
        "quality",
        "polars expression for the quality score in [0, 1] (default: length, repetition "
        "margins, label quality and IFD where present; see engine/select/quality.py)",
        section="select",
        metavar="EXPR",
    ),
    Option(
        "--quality-weight",
        "quality_weight",
        "facility: lambda, the weight of quality beside coverage (0 = pure "
        "facility location); kcenter: quality's weight in [0, 1] (default: 1)",
        float,
        section="select",
        allowed=Range(0),
    ),
    Option(
        "--neighbours",
        "neighbours",
        "k of the kNN similarity graph (default: 16)",
        int,
        section="select",
        allowed=Range(2, 1024),
    ),
    Option(
        "--epsilon",
        "epsilon",
        "facility: 0 = lazy greedy (exact greedy); in (0, 1) = stochastic greedy (default: 0)",
        float,
        section="select",
        allowed=Range(0, 1, hi_open=True),
    ),
    Option(
        "--strata-rows",
        "strata_rows",
        "stratified: about this many picks per k-means stratum of the embeddings (default: 10)",
        int,
        section="select",
        allowed=Range(1),
    ),
    Option(
        "--tau",
        "tau",
        "deita: cosine at or above which a row is too close to an accepted one (default: 0.9)",
        float,
        section="select",
        allowed=Range(-1, 1, lo_open=True),
    ),
    Option(
        "--kcenter",
        "kcenter",
        "kcenter path: auto | exact | graph (default: auto, by n x k)",
        section="select",
        allowed=("auto", "exact", "graph"),
    ),
    Option(
        "--balance",
        "balance",
        "per-label quotas: none | equal | proportional | min:N (default: none)",
        section="select",
    ),
    Option(
        "--source-cap",
        "source_cap",
        "at most N rows (>= 1) or a fraction F (< 1) of the budget per --cap-by value (default: 0 = no cap)",
        section="select",
    ),
    Option(
        "--cap-by",
        "cap_by",
        "column --source-cap counts by (default: source, the input file)",
        section="select",
        metavar="COLUMN",
    ),
    Option(
        "--partitions",
        "partitions",
        "GreeDi partitions for corpora past memory (default: 0 = one per 4M candidates; 1 = none)",
        int,
        section="select",
        allowed=Range(0),
    ),
    Option(
        "--target",
        "target",
        "files of a target task: candidates are weighted or restricted by relevance to them",
        nargs="+",
        metavar="FILE",
        section="select",
    ),
    Option(
        "--relevance",
        "relevance",
        "relevance to --target: knn (embedding similarity) | dsir (hashed n-gram importance weights) | both (default)",
        section="select",
        allowed=("knn", "dsir", "both"),
    ),
    Option(
        "--target-mode",
        "target_mode",
        "weight (quality x relevance, default) | restrict (keep the --target-keep most relevant candidates)",
        section="select",
        allowed=("weight", "restrict"),
    ),
    Option(
        "--target-keep",
        "target_keep",
        "restrict: fraction of candidates kept by relevance (default: 0.5)",
        float,
        section="select",
        allowed=Range(0, 1, lo_open=True),
    ),
    Option(
        "--label-issues",
        "label_issues",
        "auto | keep | drop: drop rows flagged label_issue from the candidates "
        "(default: auto, see the README's selection paragraph)",
        section="select",
        allowed=("auto", "keep", "drop"),
    ),
]


def all_options() -> list[Option]:
    """Every flag that sets a config field: the runner's, every stage's and selection's."""
    return CORE_OPTIONS + registry.options() + SELECT_OPTIONS


def parse_map(text: str) -> dict[str, str]:
    """``--map prompt=question,response=answer`` -> {"prompt": "question", "response": "answer"} (syntax only; which
    keys are allowed is ReadConfig.validate's, so a --config file's [read.map] gets the same checks)."""
    mapping: dict[str, str] = {}
    for item in text.split(","):
        key, eq, col = item.partition("=")
        key, col = key.strip(), col.strip()
        if not eq or not key or not col:
            raise UserError(
                f"--map {text}: expected CANON=COLUMN pairs separated by commas, e.g. prompt=question,response=answer"
            )
        if key in mapping:
            raise UserError(f"--map {text}: '{key}' is mapped twice")
        mapping[key] = col
    return mapping


# ------------------------------------------------------------------------------------------------ --config files
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return f"a table of {_type_name(args[1]).split(' ', 1)[1]}s"
    return {
        bool: "a boolean (true/false)",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "nothing",
    }.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _toml_kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _update(obj: Any, values: dict[str, Any], where: str, prefix: str = "") -> None:
    """Set ``values`` on the dataclass ``obj``: an unknown key or a value of the wrong type is a UserError naming
    the key (``dedup.num_perm``), what it must be, and the nearest known key for a typo."""
    known = {f.name: f for f in dataclasses.fields(obj)}
    hints = _hints(type(obj))
    for key, value in values.items():
        name = prefix + key
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean '{prefix}{near[0]}'? " if near else ""
            scope = f"[{prefix[:-1]}] keys" if prefix else "sections and keys"
            raise UserError(f"{where}: unknown key '{name}'; {hint}{scope}: {', '.join(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where}: '{name}' must be a table ([{name}]), got {_toml_kind(value)}")
            _update(current, value, where, name + ".")
            continue
        hint = hints[key]
        if not _type_ok(value, hint):
            raise UserError(f"{where}: '{name}' must be {_type_name(hint)}, got {_toml_kind(value)} {value!r}")
        if hint is float and isinstance(value, int):
            value = float(value)
        setattr(obj, key, value)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file, then ``overrides`` ({"section": {"field": value}})."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.exists():
            raise UserError(f"--config {p}: config file does not exist")
        if not p.is_file():
            raise UserError(f"--config {p}: not a file (expected a TOML file)")
        try:
            data = tomllib.loads(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"--config {p}: not a text file (expected TOML, UTF-8)") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"--config {p}: invalid TOML: {e}") from None
        except OSError as e:
            raise UserError(f"--config {p}: cannot read: {e.strerror}") from None
        _update(cfg, data, str(p))
    if overrides:
        _update(cfg, overrides, "option")
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """A Config from ``Config.to_dict()`` output (what worker processes and run folders carry)."""
    cfg = Config()
    _update(cfg, d, "config")
    return cfg


# ------------------------------------------------------------------------------------------------ checks
def validate(config: Config) -> None:
    """Every option, before any work (option errors are user errors: one line naming the flag, exit 2): each flag's
    declared ``allowed`` values (engine/registry.py ``Option``), each section's own ``validate()`` (limits of the
    fields no flag declares, paths, cross-field rules), and stages switched on whose required stage is off."""
    for o in all_options():
        sec = getattr(config, o.section, None)
        if sec is not None:
            try:
                o.check(getattr(sec, o.field))
            except ValueError as e:
                raise UserError(str(e)) from None
    for f in dataclasses.fields(config):
        sec = getattr(config, f.name)
        check = getattr(sec, "validate", None)
        if callable(check):
            try:
                check()
            except (ValueError, FileNotFoundError) as e:
                raise UserError(str(e)) from None
    _check_requirements(config)


def _check_requirements(config: Config) -> None:
    """A stage that is off by default but switched on (``--semdedup``) while a stage it needs is off would silently
    not run: say so. (Stages on by default, like label noise, just follow their requirement.)"""
    default = Config()
    skip = set(config.run.skip_stages)
    active = {s.name for kind in (registry.MAP, registry.GLOBAL) for s in registry.active(config, kind)}
    for s in registry.specs():
        if s.name in skip or not s.is_enabled(config) or s.is_enabled(default):
            continue
        for r in s.requires:
            if r not in active:
                flag = next((o.flag for o in s.options if o.type is None and o.value), s.name)
                flags = ", ".join(o.flag for o in registry.spec(r).options)
                why = f"--skip-stages {r}" if r in skip else f"turned off by its options: {flags or 'see --config'}"
                raise UserError(f"{flag}: needs the {r} stage, which is off ({why})")


def _numeric(t: pa.DataType | None) -> bool:
    return t is None or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def run_columns(config: Config, inputs: dict[str, pa.DataType | None] | None = None) -> dict[str, Any]:
    """The columns ``scores/`` will hold under ``config``, name -> Arrow type (None = not declared): the canonical
    ones, those of the active stages (the registry's declared columns) and the inputs' (under their stored names)."""
    from engine.io.columns import escape
    from engine.io.schema import CANONICAL_TYPES

    cols: dict[str, Any] = dict(CANONICAL_TYPES)
    for kind in (registry.MAP, registry.GLOBAL):
        for s in registry.active(config, kind):
            for c in s.columns:
                cols[c] = (s.column_types or {}).get(c)
    for name, t in (inputs or {}).items():
        cols.setdefault(escape(name), t)
    return cols


def check_column(flag: str, name: str, columns: dict[str, Any], complete: bool = True) -> None:
    """``name`` must be a numeric column of ``columns`` (a type of None is taken as numeric); ``complete`` False
    means some input's columns are unknown, so an absent name is not an error."""
    if name not in columns:
        if not complete:
            return
        numeric = sorted(c for c, t in columns.items() if t is not None and _numeric(t) and c != "row")
        near = difflib.get_close_matches(name, list(columns), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise UserError(f"{flag} {name}: no such column; {hint}numeric columns: {', '.join(numeric)}")
    if not _numeric(columns[name]):
        raise UserError(f"{flag} {name}: not a numeric column ({columns[name]}); give a score column")


def input_columns(shard: Any) -> dict[str, pa.DataType | None] | None:
    """The input columns of a shard, cheaply (name -> type, None where unknown): Parquet and Arrow from the schema
    in their metadata, JSON lines from the first lines (at most 1 MiB, or the first whole line). None when the file
    cannot be peeked at (the reader then says what is wrong with it)."""
    import pyarrow.parquet as pq
    from pyarrow import ipc

    try:
        if shard.kind == "parquet":
            schema = pq.read_schema(shard.path)
        elif shard.kind == "arrow":
            with open(shard.path, "rb") as f:
                is_file = f.read(6) == b"ARROW1"
            src = pa.memory_map(shard.path, "r")
            schema = (ipc.open_file(src) if is_file else ipc.open_stream(src)).schema
        else:
            return _json_columns(shard.path, shard.kind)
    except (OSError, pa.ArrowException, EOFError, zlib.error, ValueError):
        return None
    return {f.name: f.type for f in schema}


def _json_columns(path: str, kind: str) -> dict[str, pa.DataType | None] | None:
    import pyarrow.json as pj

    opener = gzip.open if kind == "jsonl.gz" else open
    with opener(path, "rb") as f:
        head = f.read(1 << 20)
        while b"\n" not in head and len(head) < (64 << 20):  # the first line is longer than 1 MiB
            more = f.read(1 << 20)
            if not more:
                break
            head += more
        at_end = not f.read(1)
    from engine.io.readers import BOM, MAX_JSON_DEPTH, scan_depth

    body = head.removeprefix(BOM).lstrip()
    if body.startswith(b"["):  # a JSON array: the objects that fit into the head
        objs, dec, text, i = [], json.JSONDecoder(), body[1:].decode("utf-8", "ignore"), 0
        _n, deep = scan_depth(body, MAX_JSON_DEPTH + 1, reset_at_newline=False)
        while not len(deep):  # an array nested too deep is the reader's error to report, not a peek's crash
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            try:
                obj, i = dec.raw_decode(text, i)
            except (json.JSONDecodeError, RecursionError):
                break
            objs.append(obj)
    else:
        lines = head if at_end else head[: head.rfind(b"\n") + 1]
        lines = lines.removeprefix(BOM)
        _n, deep = scan_depth(lines)
        if len(deep):  # pyarrow's parser crashes on deep nesting (engine/io/readers.py): drop those lines first
            bad = set(deep.tolist())
            lines = b"".join(x for j, x in enumerate(lines.splitlines(keepends=True)) if j not in bad)
        try:
            t = pj.read_json(io.BytesIO(lines), read_options=pj.ReadOptions(block_size=len(lines) + 1))
            return {f.name: f.type for f in t.schema} if t.num_rows else None
        except pa.ArrowInvalid:  # a malformed line or a type change: the keys, without types
            objs = []
            for line in lines.splitlines():
                try:
                    objs.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    continue
    objs = [o for o in objs if isinstance(o, dict)]
    return {k: None for o in objs for k in o} if objs else None


def check_inputs(config: Config, shards: list, with_select: bool = False) -> dict[str, Any]:
    """The options that name input or score columns, against the shards' schemas (``input_columns``) before the map
    phase: every ``--map`` column in every shard; ``--loss-priority`` (and, with ``with_select``, ``--score``)
    among the columns the run will produce. Returns those columns (``run_columns``; the inputs' only when an option
    needed them: a Parquet schema costs a metadata read per shard)."""
    named = [(o, getattr(getattr(config, o.section), o.field)) for o in registry.options() if o.column]
    named = [(o, v) for o, v in named if v]
    peek = bool(config.read.map or named or (with_select and config.select.score))
    seen: dict[str, Any] = {}
    complete = True
    for sh in shards if peek else []:
        cols = input_columns(sh)
        if cols is None:
            complete = False
            continue
        for key, col in config.read.map.items():
            if col not in cols:
                shown = ", ".join(list(cols)[:12]) + (", ..." if len(cols) > 12 else "")
                raise UserError(f"--map {key}={col}: {sh.path} has no column '{col}' (its columns: {shown})")
        for name, t in cols.items():
            if name in seen and seen[name] != t:
                t = None
            seen[name] = t
    columns = run_columns(config, seen)
    for o, name in named:
        check_column(o.flag, name, columns, complete)
    if with_select:
        from engine.select.selection import check_options

        check_options(config.select, columns, complete)
    return columns
