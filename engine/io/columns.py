"""Column names: how the user's own columns and winnow's share one table without ever colliding.

One mechanism, a recorded rename by escaping: an input column whose name winnow uses or may use (a canonical column,
a column any registered stage adds, a reader-internal ``__`` name, any name starting with ``_``) or whose name
starts with the escape prefix ``orig_`` itself is stored as ``orig_<name>``. The mapping is a bijection, so every
stored name maps back to exactly one input name:

- ``id`` -> ``orig_id``; ``n_words`` -> ``orig_n_words``; ``__row`` -> ``orig___row``;
- ``orig_source`` -> ``orig_orig_source`` (so an input holding both ``source`` and ``orig_source`` keeps both);
- every other name is stored as it is.

``unescape`` inverts it. Each shard's part records its input columns under their stored names (part metadata
``winnow.input_columns``), so ``selected.jsonl`` / ``selected.parquet`` and ``cli.py inspect`` give the user's
columns back under their own names and values, and winnow's score columns can never overwrite them.
"""

from __future__ import annotations

from functools import lru_cache

ESCAPE = "orig_"

# Names later steps of the path add (selection, training, compare, Ray): reserved now, so that a user column never
# changes its stored name when a step is added.
_FUTURE = ("selected", "selection_rank", "selection_gain", "quality", "relevance", "split", "cluster", "weight")


@lru_cache(maxsize=1)
def reserved() -> frozenset[str]:
    """Every column name winnow writes: canonical, reader-internal, and every registered stage's columns."""
    from engine import registry
    from engine.io.schema import CANONICAL

    names = set(CANONICAL) | set(_FUTURE)
    for spec in registry.specs():
        names.update(spec.columns)
        names.update(spec.work_columns)
    return frozenset(names)


def needs_escape(name: str) -> bool:
    return name.startswith((ESCAPE, "_")) or name in reserved()


def escape(name: str) -> str:
    """The stored name of input column ``name``."""
    return ESCAPE + name if needs_escape(name) else name


def unescape(stored: str) -> str:
    """The input name of a stored input column (inverse of ``escape``)."""
    return stored.removeprefix(ESCAPE)


def escape_all(names: list[str]) -> list[str]:
    return [escape(n) for n in names]
