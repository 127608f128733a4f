"""The stage registry drives the config tree, the CLI flags, the resume key and which stages run."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine import registry
from engine.config import Config
from engine.run import local
from engine.run.shards import shard_key

ROOT = Path(__file__).resolve().parents[2]


def test_every_stage_has_its_section_and_options_map_to_fields():
    cfg = Config()
    names = [s.name for s in registry.specs()]
    assert len(names) == len(set(names))
    for s in registry.specs():
        sec = getattr(cfg, s.section)
        assert isinstance(sec, s.config), s.name
        fields = {f.name for f in dataclasses.fields(sec)}
        for o in s.options:
            assert o.section == s.section and o.field in fields, (s.name, o.flag)
        assert s.cls.name == s.name
    # data-path order: every map stage before every global stage it could feed
    kinds = [s.kind for s in registry.specs()]
    assert kinds == sorted(kinds, key=lambda k: k != "map")


def test_one_constructor_shape():
    cfg = Config()
    cfg.embed.embedder = "none"
    for s in registry.specs():
        if s.name in ("embed", "loss", "tokens", "contamination"):
            continue  # models / eval files to load: built in their own tests
        st = s.build(cfg)
        assert st.config is getattr(cfg, s.section) or getattr(st, "cfg", None) is getattr(cfg, s.section)


def test_requires_and_skip_stages():
    cfg = Config()
    names = lambda kind: [s.name for s in registry.active(cfg, kind)]
    assert "minhash" in names("map") and "near_dedup" in names("global")
    cfg.run.skip_stages = ["minhash"]
    assert "minhash" not in names("map") and "near_dedup" not in names("global")
    cfg = Config()
    cfg.embed.embedder = "none"
    assert "embed" not in names("map") and "label_noise" not in names("global")
    cfg.dedup.enabled = False  # --no-near-dedup turns off both MinHash stages
    assert "minhash" not in names("map") and "near_dedup" not in names("global")


def test_resume_key_follows_the_active_map_stages(tmp_path):
    from engine.io.readers import discover

    p = tmp_path / "a.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n')
    shard = discover([str(p)])[0][0]
    cfg = Config()
    key = shard_key(shard, cfg)
    cfg.semdedup.threshold = 0.5  # a global stage's option: finished shards stay valid
    assert shard_key(shard, cfg) == key
    cfg.dedup.num_perm = 64  # a map stage's option: shards are redone
    assert shard_key(shard, cfg) != key
    cfg = Config()
    cfg.exact.enabled = False  # content_hash declares changes_shard=False: the hash is computed either way
    assert shard_key(shard, cfg) == key
    assert "dedup" in registry.resume_sections(cfg) and "labels" not in registry.resume_sections(cfg)


def test_global_columns_are_typed_and_work_columns_never_published():
    cfg = Config()
    cols = registry.global_columns(cfg)
    assert "minhash_cluster" in cols and "label_quality" in cols
    assert set(registry.work_columns(cfg)) >= {"minhash_sig", "minhash_resp_len"}
    assert not set(registry.work_columns(cfg)) & {c for s in registry.specs() for c in s.columns}


def test_cli_flags_come_from_the_registry():
    r = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "score", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0
    for o in registry.options():
        assert o.flag in r.stdout, o.flag
    r = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "score", str(ROOT), "--out", "/tmp/x", "--loss", "--no-loss"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 2 and "contradict" in r.stderr and "Traceback" not in r.stderr


def test_runner_names_no_stage():
    text = (ROOT / "engine" / "run" / "local.py").read_text() + (ROOT / "engine" / "run" / "pipeline.py").read_text()
    for s in registry.specs():
        assert f'"{s.name}"' not in text, s.name
    assert "engine.stages" not in text


def test_build_uses_registry_order():
    cfg = Config()
    cfg.embed.embedder = "none"
    cfg.tokens.enabled = False
    assert [s.name for s in local.build_map_stages(cfg)] == ["normalize", "rules", "clean", "content_hash", "minhash"]
    assert [s.name for s in local.build_global_stages(cfg)][:2] == ["exact_dedup", "near_dedup"]


@pytest.mark.parametrize("section", ["run", "read", "select"])
def test_reserved_sections_stay_the_runners(section):
    assert section not in registry.sections()
