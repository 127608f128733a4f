"""The selector interface: candidates and a budget in, ordered picks with marginal gains out.

Every selector (``--method``) is a class in its own file of this package, registered by name with ``@selector``.
``Selector.select(cands, k, limits)`` returns a ``Picked``: positions into the candidates in pick order, each
pick's marginal gain, and the objective value. ``limits`` (engine/select/budget.py) carries the constraints every
selector obeys: per-label and per-source places and a token budget (kernels/quota.py's arrays).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from engine.errors import UserError


@dataclass
class Candidates:
    """The kept rows a selection chooses from (never text): ``ids`` (n,) str, ``emb`` (n, d) float16 L2-normalised
    (None for methods that need none), ``quality`` (n,) float32 in [0, 1], ``labels`` / ``sources`` (n,) str or
    None, ``tokens`` (n,) float64 (prompt + response tokens, or an estimate)."""

    ids: np.ndarray
    quality: np.ndarray
    tokens: np.ndarray
    emb: np.ndarray | None = None
    labels: np.ndarray | None = None
    sources: np.ndarray | None = None
    score: np.ndarray | None = None  # topk's ranking column (float64, NaN = null)
    weight: np.ndarray | None = None  # facility: how many points each candidate stands for (GreeDi's union)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: np.ndarray) -> Candidates:
        """The candidates at positions ``idx`` (a partition, a label's rows)."""

        def sub(a):
            return None if a is None else a[idx]

        return Candidates(
            self.ids[idx],
            self.quality[idx],
            self.tokens[idx],
            sub(self.emb),
            sub(self.labels),
            sub(self.sources),
            sub(self.score),
            sub(self.weight),
        )


@dataclass
class Picked:
    order: np.ndarray  # int64 positions into the candidates, in pick order
    gains: np.ndarray  # float64 marginal gain of each pick
    objective: float | None = None  # the selector's objective on the picks (None: it has none)
    info: dict = field(default_factory=dict)  # method specifics for the manifest (graph size, evaluations, ...)
    cover: np.ndarray | None = None  # facility: the candidate covering each point (-1: none), for GreeDi's weights


class Selector(ABC):
    """A selection method (abstract: each file of this package subclasses it). ``params`` are the ``select`` config's fields the method reads (for the manifest)."""

    name: ClassVar[str] = ""
    needs_embeddings: ClassVar[bool] = False
    params: ClassVar[tuple[str, ...]] = ()
    partitioned: ClassVar[bool] = True  # past --partitions' size the selection runs as GreeDi rounds

    def __init__(self, config, seed: int = 0):
        self.config = config
        self.seed = seed

    @abstractmethod
    def select(self, cands: Candidates, k: int, limits) -> Picked:
        """Up to ``k`` picks among ``cands`` within ``limits`` (never mutated: selectors spend a copy)."""

    def parameters(self) -> dict:
        return {p: getattr(self.config, p) for p in self.params}


SELECTORS: dict[str, type[Selector]] = {}


def selector(cls: type[Selector]) -> type[Selector]:
    if cls.name in SELECTORS:
        raise ValueError(f"selector {cls.name!r} registered twice")
    SELECTORS[cls.name] = cls
    return cls


def get(name: str) -> type[Selector]:
    load_all()
    if name not in SELECTORS:
        raise UserError(f"--method {name}: expected one of auto, {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name]


def load_all() -> None:
    """Import every selector file (each registers itself)."""
    from engine.select import deita, facility, kcenter, random_pick, stratified, topk  # noqa: F401
