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

from engine.stages.clean import CleanConfig
from engine.stages.contamination import ContaminationConfig
from engine.stages.dedup import DedupConfig
from engine.stages.embed import EmbedConfig
from engine.errors import UserError
from engine.stages.labels import LabelNoiseConfig
from engine.stages.loss import LossConfig
from engine.stages.semdedup import SemDedupConfig


@dataclass
class ReadConfig:
    format: str = "auto"  # auto | alpaca | chat | sharegpt | classification | text | mapped (auto: by columns)
    map: dict[str, str] = field(default_factory=dict)  # canonical name -> input column, e.g. {"prompt": "question"}
    batch_rows: int = 8192  # rows per Arrow batch handed to stages (memory per batch ~ rows x mean row bytes)
    jsonl_block_bytes: int = 8 << 20  # bytes of JSONL parsed per block (8 MiB); bounds reader memory


@dataclass
class NormalizeConfig:
    enabled: bool = True  # NFC, control characters, line endings, trailing spaces, runs of blank lines
    form: str = "NFC"  # Unicode normal form: NFC | NFKC | NFD | NFKD


@dataclass
class RulesConfig:
    min_response_chars: int = 1  # shorter responses get verdict too_short (characters, after normalisation)
    max_response_chars: int = 32768  # longer responses get verdict too_long (characters); -1 = no limit
    max_prompt_chars: int = 32768  # longer prompts get verdict prompt_too_long (characters); -1 = no limit
    reject_response_equals_prompt: bool = True  # verdict response_equals_prompt


@dataclass
class ExactDedupConfig:
    enabled: bool = True  # exact dedup on normalised prompt + response, first occurrence kept


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


@dataclass
class Config:
    read: ReadConfig = field(default_factory=ReadConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)  # Gopher/C4 + SFT quality rules (engine/stages/clean.py)
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)  # MinHash near duplicates (engine/stages/dedup.py)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)  # engine/stages/contamination.py
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # embeddings: MiniLM or the static tier (engine/stages/embed.py)
    semdedup: SemDedupConfig = field(default_factory=SemDedupConfig)  # semantic near duplicates, off by default
    labels: LabelNoiseConfig = field(default_factory=LabelNoiseConfig)  # label-noise scores (engine/stages/labels.py)
    loss: LossConfig = field(default_factory=LossConfig)  # per-sample LM losses and IFD (engine/stages/loss.py)
    run: RunConfig = field(default_factory=RunConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable hash of the named sections (what decides whether a finished shard can be reused)."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


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
