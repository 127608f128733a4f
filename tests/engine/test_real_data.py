"""The manifest invariant on the real sets in ../shared/data (skipped where they are absent, as on a user's
machine)."""

import pytest

from engine.config import Config
from engine.run.local import score
from tests.conftest import SHARED_DATA

SETS = ["alpaca_52k", "alpaca_chinese", "t0_train_50k", "financial_phrasebank", "code_alpaca_2k"]


@pytest.mark.parametrize("name", SETS)
def test_invariant_on_real_sets(name, tmp_path):
    folder = SHARED_DATA / name
    if not folder.exists():
        pytest.skip(f"{folder} not present")
    cfg = Config()
    cfg.run.workers = 1
    m = score([str(folder)], tmp_path / "out", cfg)
    assert m["rows_in"] > 0 and sum(m["verdicts"].values()) == m["rows_in"]
    # t0_train_50k keeps ~48% (measured 26,684 of 55,185): P3 applies several templates to the same passage
    # and answer, often only reordering them ("Title: X\n<article>" vs "<article>\n===\nGenerate a title:\nX"),
    # which the word-set MinHash path for short texts links; before it, 5-gram MinHash alone kept ~53%.
    assert m["verdicts"]["kept"] / m["rows_in"] > (0.45 if name == "t0_train_50k" else 0.9)
    assert "malformed" not in m["verdicts"]
