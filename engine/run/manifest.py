"""The run folder's ``manifest.json``: what went in, what came out, with which settings, how long each step took."""

from __future__ import annotations

import platform
from typing import Any

from engine import __version__, registry


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "winnow": __version__}
    for pkg in ("pyarrow", "polars", "numpy", "numba", "torch", "transformers", "triton", "datasketch", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def stage_stats(results: dict[int, dict], global_stats: dict[str, dict]) -> dict[str, dict]:
    """Per-stage counters: map stages summed over shards, then the global stages' own."""
    out: dict[str, dict] = {}
    for st in results.values():
        for name, stats in st.get("stages", {}).items():
            agg = out.setdefault(name, {})
            for k, v in stats.items():
                agg[k] = agg.get(k, 0) + v
    out.update(global_stats)
    return out


def summaries(stats: dict[str, dict]) -> dict[str, Any]:
    """Top-level manifest entries a stage class asks for (``manifest_key`` + ``summarize(stats)``), e.g. the
    contamination counts per evaluation set and the label issues per class."""
    out: dict[str, Any] = {}
    for s in registry.specs():
        key = getattr(s.cls, "manifest_key", None)
        if key:
            out[key] = s.cls.summarize(stats.get(s.name, {}))
    return out
