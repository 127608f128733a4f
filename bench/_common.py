"""Shared helpers for bench/bench_*.py: result rows in bench/results.csv, peak RSS, machine tag."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_CSV = ROOT / "bench" / "results.csv"
SHARED_DATA = ROOT.parent / "shared" / "data"
FIELDS = ["op", "provider", "n", "metric", "value", "machine", "git_sha", "date"]


def machine() -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or "uncommitted"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_result(op: str, provider: str, n: int, metric: str, value: float) -> None:
    """Append one measurement to bench/results.csv (header written once)."""
    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(
            {
                "op": op,
                "provider": provider,
                "n": n,
                "metric": metric,
                "value": f"{value:.6g}" if isinstance(value, float) else value,
                "machine": machine(),
                "git_sha": git_sha(),
                "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def print_json(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True))
