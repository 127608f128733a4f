"""One dataclass tree for every option. CLI flags map onto fields one to one; ``--config FILE.toml`` can set any
of them (sections named like the fields below); the resolved tree goes into the manifest so a run can be
repeated exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from engine import registry
from engine.errors import UserError
from engine.registry import Option


@dataclass
class ReadConfig:
    format: str = "auto"  # auto | alpaca | chat | sharegpt | classification | text | mapped (auto: by columns)
    map: dict[str, str] = field(default_factory=dict)  # canonical name -> input column, e.g. {"prompt": "question"}
    batch_rows: int = 8192  # rows per Arrow batch handed to stages (memory per batch ~ rows x mean row bytes)
    jsonl_block_bytes: int = 8 << 20  # bytes of JSONL parsed per block (8 MiB); bounds reader memory


@dataclass
class RunConfig:
    workers: int = 0  # processes for the map phase (0 = one per core, at most one per pending shard)
    seed: int = 0  # seed for every random choice (selection, splits, folds)
    compression: str = "zstd"  # Parquet codec of scores/ parts
    compression_level: int = 1  # zstd level: 1 writes ~2x faster than the default 3 for ~5% larger files
    skip_stages: list[str] = field(default_factory=list)  # stage names to leave out, e.g. ["clean", "minhash"]


@dataclass
class SelectConfig:
    method: str = "auto"  # topk | random | auto (topk when a score column is given, else random)
    score: str = ""  # score column for topk (higher is better unless ascending)
    ascending: bool = False  # topk: take the lowest scores instead (e.g. a loss)
    budget: str = "0.2"  # a count ("5000"), a fraction ("0.2" or "20%"), or tokens ("tokens:2e6")


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
    fields += [("run", RunConfig, field(default_factory=RunConfig)),
               ("select", SelectConfig, field(default_factory=SelectConfig))]
    cls = dataclasses.make_dataclass("Config", fields, bases=(_ConfigBase,))
    cls.__module__ = __name__
    cls.__doc__ = "The one config tree: " + ", ".join(n for n, _t, _f in fields) + "."
    return cls


Config = _build_config_class()

# Flags of the sections the runner owns (stage flags are declared by each stage, engine/registry.py).
CORE_OPTIONS = [
    Option("--format", "format", "input format: auto | alpaca | chat | sharegpt | classification | text "
           "(default: auto, from the column names)", section="read"),
    Option("--batch-rows", "batch_rows", "rows per Arrow batch (default: 8192)", int, section="read"),
    Option("--jsonl-block-bytes", "jsonl_block_bytes", "bytes of JSONL parsed per block (default: 8 MiB)", int,
           section="read"),
    Option("--workers", "workers", "processes for the map phase (default: 0 = one per core)", int, section="run"),
    Option("--seed", "seed", "seed for every random choice (default: 0)", int, section="run"),
    Option("--skip-stages", "skip_stages",
           "stage names to leave out, e.g. clean minhash (the manifest's stages_run names them)",
           nargs="+", metavar="STAGE", section="run"),
]


def _update(obj: Any, values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        if not hasattr(obj, key):
            raise UserError(f"{where}: unknown option '{key}'")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where}: '{key}' must be a table")
            _update(current, value, f"{where}.{key}")
        else:
            if current is not None and not isinstance(value, type(current)) and not (
                isinstance(current, float) and isinstance(value, int)
            ):
                raise UserError(f"{where}: '{key}' must be {type(current).__name__}, got {type(value).__name__}")
            setattr(obj, key, value)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file, then ``overrides`` ({"section": {"field": value}})."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: config file does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{p}: invalid TOML: {e}") from None
        _update(cfg, data, str(p))
    if overrides:
        _update(cfg, overrides, "option")
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """A Config from ``Config.to_dict()`` output (what worker processes and run folders carry)."""
    cfg = Config()
    _update(cfg, d, "config")
    return cfg


def validate(config: Config) -> None:
    """Every section's own ``validate()`` (option errors are user errors: one line, exit 2)."""
    for f in dataclasses.fields(config):
        sec = getattr(config, f.name)
        check = getattr(sec, "validate", None)
        if callable(check):
            try:
                check()
            except (ValueError, FileNotFoundError) as e:
                raise UserError(str(e)) from None
