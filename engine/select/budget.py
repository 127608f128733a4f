"""Budgets and constraints: how much to select, per-label quotas (``--balance``) and per-source caps
(``--source-cap``), as the arrays every selector obeys (kernels/quota.py).

- Budget: a count (``5000``), a fraction of the kept rows (``0.2`` / ``20%``) or tokens (``tokens:2e6``, counted
  from ``prompt_tokens + response_tokens``, or estimated; the manifest says which). A count is rows in the output,
  repeats included.
- ``--balance equal``: the same number of rows per label; ``proportional``: each label's share of the kept rows
  (largest remainder); ``min:N``: at least N rows per label, the rest of the budget chosen freely. A label with fewer
  rows than its quota gives all its rows and is oversampled by repetition up to the quota (``selection_repeats``;
  the manifest lists the labels oversampled). Quotas need a count or fraction budget.
- ``--source-cap N`` (rows) or ``F`` in (0, 1) (a fraction of the budget): at most that many rows from any one value
  of ``--cap-by`` (default ``source``, the input file; any column of the scores, e.g. a user's own ``orig_source``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.errors import UserError

UNLIMITED = np.iinfo(np.int64).max // 4


@dataclass
class Budget:
    kind: str  # count | fraction | tokens
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``5000`` -> count; ``0.2`` / ``20%`` / ``1.0`` -> fraction of the kept rows in (0, 1]; ``tokens:2e6`` ->
        tokens. Anything else (zero, negative, infinite, a non-integer count, a percentage over 100) is a UserError."""
        t = str(text).strip().lower()
        bad = UserError(
            f"--budget {text}: expected a count (5000), a fraction of the kept rows in (0, 1] (0.2 or "
            "20%) or tokens (tokens:2e6)"
        )
        try:
            if t.startswith("tokens:"):
                v = float(t.split(":", 1)[1])
                kind = "tokens"
            elif t.endswith("%"):
                v = float(t[:-1]) / 100
                kind = "fraction"
            else:
                v = float(t)
                kind = "fraction" if v < 1 or (v == 1 and "." in t) else "count"
        except ValueError:
            raise bad from None
        if not (math.isfinite(v) and v > 0) or (kind == "fraction" and v > 1) or (kind == "count" and v != int(v)):
            raise bad
        return cls(kind, v)

    def rows(self, n: int) -> int:
        """The count of rows this budget allows out of ``n`` candidates (tokens: n; the token limit applies)."""
        if self.kind == "count":
            return min(int(self.value), n)
        if self.kind == "fraction":
            return min(n, math.floor(self.value * n + 1e-9))
        return n

    @property
    def tokens(self) -> float:
        return self.value if self.kind == "tokens" else math.inf


@dataclass
class Balance:
    kind: str  # none | equal | proportional | min
    minimum: int = 0

    @classmethod
    def parse(cls, text: str) -> Balance:
        t = str(text or "none").strip().lower()
        if t in ("none", "equal", "proportional"):
            return cls(t)
        if t.startswith("min:"):
            try:
                n = int(t[4:])
            except ValueError:
                n = 0
            if n > 0:
                return cls("min", n)
        raise UserError(f"--balance {text}: expected none, equal, proportional or min:N (N a positive count)")


def parse_cap(text: str) -> float:
    """``--source-cap``: 0 = none, a count >= 1, or a fraction of the budget in (0, 1)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = -1.0
    if not math.isfinite(v) or v < 0 or (v >= 1 and v != int(v)):
        raise UserError(
            f"--source-cap {text}: expected 0 (no cap), a count of rows (500) or a fraction of the budget "
            "in (0, 1) (0.3)"
        )
    return v


def label_quotas(counts: dict[str, int], k: int, balance: Balance) -> dict[str, int]:
    """Rows per label (quotas may exceed a label's count: those are oversampled)."""
    labels = sorted(counts)
    if not labels:
        return {}
    if balance.kind == "equal":
        base, extra = divmod(k, len(labels))
        return {lab: base + (1 if i < extra else 0) for i, lab in enumerate(labels)}
    if balance.kind == "proportional":
        total = sum(counts.values())
        raw = {lab: k * counts[lab] / total for lab in labels}
        q = {lab: math.floor(raw[lab]) for lab in labels}
        rest = k - sum(q.values())
        for lab in sorted(labels, key=lambda lab: (-(raw[lab] - q[lab]), lab))[:rest]:
            q[lab] += 1
        return q
    if balance.kind == "min":
        return {lab: balance.minimum for lab in labels}
    raise ValueError(balance.kind)


@dataclass
class Limits:
    """kernels/quota.py's state for one selection run (``copy()`` before each run: the selectors spend it)."""

    group: np.ndarray  # (n, 2) int32: label group, cap group (-1: none)
    label_left: np.ndarray  # int64 per label group
    source_left: np.ndarray  # int64 per cap group
    cost: np.ndarray  # float64 (n,) tokens
    cost_left: np.ndarray  # float64 (1,)

    def copy(self) -> Limits:
        return Limits(self.group, self.label_left.copy(), self.source_left.copy(), self.cost, self.cost_left.copy())

    def take(self, idx: np.ndarray) -> Limits:
        """The limits restricted to candidate positions ``idx`` (same counters, copied)."""
        return Limits(
            self.group[idx], self.label_left.copy(), self.source_left.copy(), self.cost[idx], self.cost_left.copy()
        )

    def args(self) -> tuple:
        return self.group, self.label_left, self.source_left, self.cost, self.cost_left

    @classmethod
    def none(cls, n: int) -> Limits:
        return cls(
            np.full((n, 2), -1, np.int32),
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            np.zeros(n),
            np.array([math.inf]),
        )


def codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(int32 code per row, names in code order); a null is its own group named ''."""
    names, inv = np.unique(np.array(["" if v is None else str(v) for v in values], dtype=object), return_inverse=True)
    return inv.astype(np.int32), [str(n) for n in names]


def build_limits(
    n: int,
    tokens: np.ndarray,
    budget: Budget,
    label_codes: np.ndarray | None,
    label_caps: np.ndarray | None,
    cap_codes: np.ndarray | None,
    cap: int,
) -> Limits:
    """Limits over ``n`` candidates: label groups with ``label_caps`` places each, cap groups with ``cap`` places
    each (0 = none) and the token budget."""
    lim = Limits.none(n)
    group = lim.group.copy()
    if label_codes is not None and label_caps is not None:
        group[:, 0] = label_codes
        lim.label_left = np.asarray(label_caps, np.int64).copy()
    if cap_codes is not None and cap > 0:
        group[:, 1] = cap_codes
        lim.source_left = np.full(int(cap_codes.max()) + 1 if n else 1, cap, np.int64)
    lim.group = group
    lim.cost = np.asarray(tokens, np.float64)
    lim.cost_left = np.array([budget.tokens])
    return lim
