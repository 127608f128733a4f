"""The warm-up runs every active stage once (map fold and global stages) and splits the map stages into groups."""

from engine import registry
from engine.config import Config
from engine.run import warmup


def test_groups_cover_every_active_map_stage_once():
    cfg = Config()
    cfg.embed.embedder = "none"
    groups = warmup._groups(cfg, 2)
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(s.name for s in registry.active(cfg, registry.MAP))
    assert len(groups) == 2 and "clean" in groups[0]


def test_warm_runs_map_and_global_stages(monkeypatch):
    cfg = Config()
    cfg.embed.embedder = "none"
    cfg.tokens.enabled = False
    ran = []
    real = registry.StageSpec.build

    def spy(self, config):
        ran.append(self.name)
        return real(self, config)

    monkeypatch.setattr(registry.StageSpec, "build", spy)
    got = warmup.warm(cfg, processes=1)
    assert {"map", "global", "total"} <= set(got)
    assert ran == [s.name for s in registry.active(cfg, registry.MAP)] + [
        s.name for s in registry.active(cfg, registry.GLOBAL)
    ]
