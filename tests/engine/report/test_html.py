"""The HTML report over a real (small) run folder: every section is there with its numbers, user text is escaped,
nothing is fetched from the network, fine-tune and compare results render when present and are explained when
absent, an unexpected shape of either never breaks the page, and the CLI's errors are one line, exit 2."""

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import polars as pl
import pytest

from engine.config import Config, SelectConfig
from engine.errors import UserError
from engine.report.html import command_line, render, write_report
from engine.run.local import score
from engine.select.selection import select

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = "<script>alert('pwned')</script>"
EVIL_LABEL = "neg<img src=x onerror=alert(1)>"
SECTIONS = ("verdicts", "scores", "samples", "duplicates", "selection", "map", "finetune", "compare")
WORDS = [
    "river",
    "forest",
    "engine",
    "garden",
    "harbor",
    "island",
    "valley",
    "planet",
    "orbit",
    "vessel",
    "thread",
    "fabric",
    "mirror",
    "lantern",
    "compass",
    "ladder",
    "anchor",
    "candle",
    "basket",
    "canvas",
    "marble",
]


def _png() -> bytes:
    """A valid 1 x 1 PNG, built here (no image library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    rows = []
    for i in range(60):
        words = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 9))
        rows.append({"instruction": f"Describe item {i} in a few words.", "output": f"Item {i}: {words} number {i}."})
    rows.append(dict(rows[3]))  # exact duplicate of row 3
    rows.append(dict(rows[3]))  # a second copy: a cluster of 3
    rows.append({"instruction": f"{SCRIPT} what is this?", "output": ""})  # empty_response, the only one
    rows.append({"instruction": "Say nothing useful.", "output": "N/A"})  # placeholder
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lab = [
        {
            "text": f"the {WORDS[i % 21]} and the {WORDS[(i * 5) % 21]} were {'great' if i % 3 else 'awful'} "
            f"today {i}",
            "label": "pos" if i % 3 else EVIL_LABEL,
        }
        for i in range(45)
    ]
    (tmp / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lab))
    cfg = Config()
    cfg.run.workers = 1
    cfg.embed.embedder = "static"
    cfg.loss.enabled = "off"
    out = tmp / "run"
    score([str(tmp / "alpaca.jsonl"), str(tmp / "reviews.jsonl")], out, cfg, command="run")
    select(out, out / "selected", SelectConfig(budget="0.3"), seed=0)
    return out


def _sections(page: str) -> dict[str, str]:
    """Section id -> its HTML."""
    return dict(re.findall(r"<section id='([a-z]+)'>(.*?)</section>", page, flags=re.DOTALL))


def test_every_section_with_its_numbers(run):
    page = render(run)
    m = json.loads((run / "manifest.json").read_text())
    sel = json.loads((run / "selected" / "manifest.json").read_text())
    s = _sections(page)
    assert tuple(s) == SECTIONS
    # verdict counts, and the invariant shown
    assert f"Verdicts sum to {m['rows_in']:,} = rows_in {m['rows_in']:,}" in s["verdicts"]
    for v, c in m["verdicts"].items():
        assert re.search(rf"<td>{v}</td><td><span class='r'>{c:,}</span>", s["verdicts"]), v
    assert m["verdicts"]["exact_duplicate"] == 2 and m["verdicts"]["empty_response"] == 1
    # score distributions: a chart per signal, with the rules' thresholds of this run
    for col in ("response_chars", "n_words", "frac_dup_line", "label_quality", "quality"):
        assert f"<code>{col}</code>" in s["scores"], col
    assert s["scores"].count("<svg ") >= 5
    assert f"gopher_repetition &gt; {m['config']['clean']['max_dup_line_frac']:g}" in s["scores"]
    # samples: every verdict has a block
    for v in m["verdicts"]:
        assert f"<h3>{v} <span" in s["samples"], v
    # duplicates: the planted cluster of 3 (row 3 and its two copies)
    assert "Exact duplicates" in s["duplicates"]
    assert "<td>largest cluster</td><td>3 rows</td>" in s["duplicates"]
    # selection: before/after per label and per source, the counts of the selection manifest
    for lab, n in sel["labels_after"].items():
        assert f"{n:,}" in s["selection"] and "pos" in s["selection"], lab
    assert "alpaca.jsonl" in s["selection"] and "reviews.jsonl" in s["selection"]
    # the map: one dot per kept row (fewer than MAP_POINTS), selected ones in their own group
    assert s["map"].count("<circle ") - 2 == m["verdicts"]["kept"]  # minus the two legend dots
    assert f"selected among them</td><td>{sel['selected']:,}" in s["map"]
    # absent fine-tune and compare: explained, with the command that would fill them
    assert "cli.py finetune" in s["finetune"] and "class='empty'" in s["finetune"]
    assert "cli.py compare" in s["compare"] and "class='empty'" in s["compare"]


def test_user_text_is_escaped(run):
    page = render(run)
    assert SCRIPT not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page  # the prompt, shown as text
    assert "<img src=x" not in page and "neg&lt;img src=x onerror=alert(1)&gt;" in page  # a label


def test_no_external_urls(run):
    page = render(run)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", page, flags=re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?(?:https?:|//)", page, flags=re.IGNORECASE)
    assert "<link" not in page and "@import" not in page and "<iframe" not in page


def test_finetune_and_compare_render_when_present(run, tmp_path):
    (run / "model").mkdir(exist_ok=True)
    (run / "compare").mkdir(exist_ok=True)
    try:
        (run / "model" / "metrics.json").write_text(
            json.dumps(
                {
                    "task": "classification",
                    "rows": {"train": 40, "val": 10, "test": 10, "leak_dropped": 0},
                    "test": {
                        "accuracy": 0.8125,
                        "macro_f1": 0.7731,
                        "labels": ["pos", EVIL_LABEL],
                        "per_class": {"pos": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 7}},
                        "confusion": [[6, 1], [2, 1]],
                    },
                    "val": {"accuracy": 0.7},
                }
            )
        )
        (run / "compare" / "compare.png").write_bytes(_png())
        (run / "compare" / "compare.json").write_text(
            json.dumps(
                {
                    "metric": "macro_f1",
                    "budget": "30%",
                    "plot": "compare.png",
                    "arms": [
                        {
                            "name": "winnow",
                            "runs": [{"seed": 0, "n": 30, "macro_f1": 0.71, "injected": {"junk": 2}}],
                            "mean": {"macro_f1": 0.7123, "accuracy": 0.75, "val_macro_f1": 0.60},
                            "std": {"macro_f1": 0.0123},
                        },
                        {
                            "name": "random",
                            "runs": [{"seed": 0, "n": 30}],
                            "mean": {"macro_f1": 0.6543, "val_macro_f1": 0.65},
                        },
                    ],
                    "gains": [
                        {"arm": "winnow", "vs": "random", "metric": "macro_f1", "mean": 0.058, "ci95": [0.012, 0.101]}
                    ],
                    "oracle_gap_recovered": 0.7847,
                    "oracle_gap_recovered_ci95": [0.5044, 1.1185],
                }
            )
        )
        s = _sections(render(run))
        assert "0.8125" in s["finetune"] and "0.7731" in s["finetune"] and "confusion matrix" in s["finetune"]
        assert "neg&lt;img src=x" in s["finetune"] and "<img src=x" not in s["finetune"]
        assert "0.7123 ± 0.0123" in s["compare"] and "0.6543" in s["compare"]
        assert "[0.0120, 0.1010]" in s["compare"] and "<td>yes</td>" in s["compare"]  # the interval excludes 0
        assert "junk 2.0" in s["compare"]
        assert "0.7847" in s["compare"] and "[0.504, 1.119]" in s["compare"]  # the share and its interval
        assert "src='data:image/png;base64," in s["compare"]
        # better on test, worse on validation: the page says the two sets may differ
        assert "-5.0 macro-F1 points on the validation rows but +5.8 on the test rows" in s["compare"]
        # an unexpected shape shows what is there, never an error
        (run / "model" / "metrics.json").write_text(
            json.dumps(
                {
                    "task": "sft",
                    "before": {"loss": 2.5, "ppl": 12.2},
                    "after": {"loss": 2.1},
                    "test": [1, 2],
                    "val": {"per_class": "x", "confusion": [1]},
                }
            )
        )
        (run / "compare" / "compare.json").write_text(
            json.dumps(
                {"arms": [{"name": "x", "runs": "?", "mean": 3}], "gains": [{"ci95": None}], "plot": "missing.png"}
            )
        )
        s = _sections(render(run))
        assert "2.5" in s["finetune"] and "2.1" in s["finetune"] and "12.2" in s["finetune"]
        assert "missing.png not found" in s["compare"]
        (run / "model" / "metrics.json").write_text("[1, 2")
        assert "could not be read" in _sections(render(run))["finetune"]
    finally:
        for p in ("model/metrics.json", "compare/compare.json", "compare/compare.png"):
            (run / p).unlink(missing_ok=True)


def test_command_is_rebuilt_from_the_manifest(run):
    m = json.loads((run / "manifest.json").read_text())
    cmd, rebuilt = command_line(m, run)
    assert rebuilt and cmd.startswith("python cli.py run ") and f"--out {run}" in cmd
    assert "--embedder static" in cmd and "--workers 1" in cmd and "alpaca.jsonl" in cmd
    assert command_line({**m, "argv": ["run", "x y"]}, run) == ("python cli.py run 'x y'", False)


def test_score_only_run_explains_missing_selection(run, tmp_path):
    # a copy without selected/: the selection section says how to make one, the map still draws the kept rows
    import shutil

    d = tmp_path / "scored"
    shutil.copytree(run, d, ignore=shutil.ignore_patterns("selected", "work"))
    s = _sections(render(d))
    assert "No selection in this run folder" in s["selection"]
    kept = sum(
        pl.read_parquet(f, columns=["verdict"]).filter(pl.col("verdict") == "kept").height
        for f in (d / "scores").glob("part-*.parquet")
    )
    assert s["map"].count("<circle ") - 1 == kept


def _cli(*args):
    return subprocess.run(
        [sys.executable, "cli.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_report_writes_the_page_and_errors_are_one_line(run, tmp_path):
    r = _cli("report", run, "--out", tmp_path / "r.html")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"report: {tmp_path / 'r.html'}"
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    for args, want in (
        ((tmp_path / "nope",), "no such folder"),
        ((tmp_path,), "no manifest.json"),
        ((run, "--out", tmp_path), "is a folder"),
        ((run, "--out", tmp_path / "no" / "r.html"), "does not exist"),
    ):
        r = _cli("report", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("winnow: error: "), r.stderr
        assert want in lines[0]
    with pytest.raises(UserError, match="no scores/part"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "manifest.json").write_text("{}")
        write_report(tmp_path / "empty")


def test_run_writes_the_report_at_its_end(tmp_path, capsys):
    import cli

    rows = [
        {"instruction": f"Name fact {i} about {WORDS[i]}.", "output": f"Fact {i}: the {WORDS[i]} is {WORDS[-i]}."}
        for i in range(12)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["run", str(tmp_path / "in.jsonl"), "--out", str(out), "--embedder", "static", "--workers", "1"]
    assert cli.main([*argv, "--no-loss"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.html'}"
    assert tuple(_sections((out / "report.html").read_text())) == SECTIONS
