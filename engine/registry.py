"""The stage registry: every stage declares itself once, in its own file, and the rest of winnow derives from it.

A stage module under ``engine/stages/`` decorates its class with ``@register(...)``, naming:

- ``name``: the stage's name (manifest ``stages.<name>``, timings, ``run.skip_stages``);
- ``kind``: ``"map"`` (a batch at a time, in bounded memory) or ``"global"`` (the whole corpus, through the
  global context);
- ``section`` and ``config``: the config section it reads and that section's dataclass; ``engine.config.Config``
  is built from these sections, so a new stage's options exist as soon as its file does;
- ``order``: its place along the data path (map and global stages run in ascending order);
- ``columns``: the columns it adds to ``scores/``; ``work_columns``: columns it hands to global stages only (kept
  in ``work/``, never published: MinHash signatures);
- ``changes_shard``: whether its section changes what a finished map shard holds (the resume key);
- ``enabled``: ``f(section, config) -> bool``, whether it runs with these options;
- ``requires``: stages it needs (a global stage whose map stage is skipped is skipped too);
- ``options``: its CLI flags (``Option``), each mapped onto one field of its section, with the values it allows
  (``allowed``: a ``Range`` or a tuple of choices; ``engine.config.validate`` checks them before any work, from a
  flag or a ``--config`` file alike; a section's ``validate()`` declares the limits of fields without a flag with
  ``check_fields``);
- ``resolve``: ``f(config, facts) -> dict``, run once by the driver before any stage is built, to turn ``auto``
  settings into concrete ones (written back into the config, so the resume key, every worker and the manifest see
  the same resolved value) and to say why.

Every stage has one constructor shape, ``Cls(section_config)``. Global stages get everything else at run time
from ``run(ctx)`` (``engine.run.context.GlobalContext``). Stage modules are found by listing ``engine/stages/``:
adding a stage is one file there plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAP, GLOBAL = "map", "global"


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: ``lo <= v <= hi`` (strict on an ``open`` side), or one of the sentinels ``also``
    (``-1`` = no limit). ``Range(1)``: >= 1; ``Range(0, 1, lo_open=True, hi_open=True)``: in (0, 1)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()  # sentinel values outside the range, e.g. (-1,)

    def ok(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if v in self.also:
            return True
        # written as "inside" tests, so NaN fails them all
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return bool(above and below)

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        num = lambda x: f"{x:g}" if isinstance(x, float) else str(x)
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"{kind} in {left}{num(self.lo)}, {num(self.hi)}{right}"
        elif self.lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {num(self.lo)}"
        elif self.hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {num(self.hi)}"
        else:
            text = kind
        return " or ".join([*(num(a) for a in self.also), text])


Allowed = Range | tuple  # a Range of numbers, or a tuple of the allowed strings


def expected(allowed: Allowed, value: Any) -> str | None:
    """What ``allowed`` expects, when ``value`` (one value; lists are checked item by item) is outside it; else None."""
    if isinstance(allowed, Range):
        return None if allowed.ok(value) else allowed.describe(isinstance(value, int) and not isinstance(value, bool))
    return None if value in allowed else "one of " + ", ".join(map(str, allowed))


@dataclass(frozen=True)
class Option:
    """One CLI flag mapped onto one field of a config section.

    ``type`` None makes a switch that stores ``value`` when given (``--no-near-dedup`` stores False in
    ``dedup.enabled``); ``nargs`` "+" makes a list. Two flags on one field (``--loss`` / ``--no-loss``) may not be
    given together. ``allowed`` (a ``Range`` or a tuple of strings) is what the field may hold, checked by
    ``engine.config.validate`` before any work, whether the value came from the flag or a ``--config`` file."""

    flag: str  # "--dedup-threshold"
    field: str  # field of the section: "threshold"
    help: str  # units and sentinels: "(default: 0.8)", "(-1 = no limit)"
    type: Callable | None = str  # argparse type; None = a switch storing `value`
    value: Any = None  # what a switch stores
    nargs: str | None = None  # "+" for a list of values
    metavar: str | None = None
    section: str = ""  # set by register() from the stage's section unless given
    allowed: Allowed | None = None  # Range(1) / ("fast", "datasketch"); None = any value of `type`
    column: bool = False  # the value names a numeric column of the run ("" = none): checked against the columns
    # the inputs and the active stages will give (engine.config.check_inputs)

    def check(self, value: Any) -> None:
        """ValueError naming the flag when ``value`` (the field's value) is not ``allowed``."""
        if self.allowed is None or self.type is None:
            return
        for v in value if isinstance(value, list) else [value]:
            want = expected(self.allowed, v)
            if want is not None:
                raise ValueError(f"{self.flag} {v} ({self.section}.{self.field}): expected {want}")


def check_fields(obj: Any, section: str, **rules: Allowed) -> None:
    """A config section's own limits for the fields no flag declares (its ``validate()`` calls this): ValueError
    naming the first field whose value is outside its rule, as ``section.field`` or its flag when it has one."""
    flags = {(o.section, o.field): o.flag for o in options() if o.type is not None} if _LOADED else {}
    for name, allowed in rules.items():
        value = getattr(obj, name)
        for v in value if isinstance(value, list) else [value]:
            want = expected(allowed, v)
            if want is not None:
                flag = flags.get((section, name))
                where = f"{flag} {v} ({section}.{name})" if flag else f"{section}.{name} = {v!r}"
                raise ValueError(f"{where}: expected {want}")


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    section: str
    config: type
    cls: type
    order: int
    columns: tuple[str, ...] = ()
    column_types: dict | None = None  # global stages: column -> Arrow type (the map phase writes them as nulls)
    work_columns: tuple[str, ...] = ()
    changes_shard: bool = True
    enabled: Callable[[Any, Any], bool] | None = None
    requires: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    resolve: Callable[[Any, dict], dict] | None = None
    module: str = ""

    def is_enabled(self, config: Any) -> bool:
        sec = getattr(config, self.section)
        return True if self.enabled is None else bool(self.enabled(sec, config))

    def build(self, config: Any):
        """The stage object for the whole ``config`` tree (one shape for all: ``Cls(section)``)."""
        return self.cls(getattr(config, self.section))


_SPECS: dict[str, StageSpec] = {}
_LOADED = False


def register(
    *,
    name: str,
    kind: str,
    section: str,
    config: type,
    order: int,
    columns: tuple[str, ...] | list[str] | dict = (),
    work_columns: tuple[str, ...] | list[str] = (),
    changes_shard: bool = True,
    enabled: Callable[[Any, Any], bool] | None = None,
    requires: tuple[str, ...] | list[str] = (),
    options: tuple[Option, ...] | list[Option] = (),
    resolve: Callable[[Any, dict], dict] | None = None,
):
    """Class decorator: declare a stage (see the module docstring)."""
    if kind not in (MAP, GLOBAL):
        raise ValueError(f"stage {name}: kind must be 'map' or 'global', got {kind!r}")

    def deco(cls):
        opts = tuple(o if o.section else Option(**{**o.__dict__, "section": section}) for o in options)
        spec = StageSpec(
            name=name, kind=kind, section=section, config=config, cls=cls, order=order, columns=tuple(columns),
            column_types=dict(columns) if isinstance(columns, dict) else None,
            work_columns=tuple(work_columns), changes_shard=changes_shard, enabled=enabled,
            requires=tuple(requires), options=opts, resolve=resolve, module=cls.__module__,
        )  # fmt: skip
        old = _SPECS.get(name)
        if old is not None and old.module != spec.module:
            raise ValueError(f"stage name {name!r} registered twice: {old.module} and {spec.module}")
        _SPECS[name] = spec
        cls.name = name
        cls.spec = spec
        return cls

    return deco


def load() -> None:
    """Import every module of ``engine/stages/`` once (each registers its stages)."""
    global _LOADED
    if _LOADED:
        return
    import engine.stages as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{m.name}")
    _LOADED = True


def specs(kind: str | None = None) -> list[StageSpec]:
    """Registered stages in data-path order (optionally of one kind)."""
    load()
    out = sorted(_SPECS.values(), key=lambda s: (s.order, s.name))
    return [s for s in out if kind is None or s.kind == kind]


def spec(name: str) -> StageSpec:
    load()
    if name not in _SPECS:
        raise KeyError(f"no stage named {name!r}; stages: {', '.join(s.name for s in specs())}")
    return _SPECS[name]


def sections() -> dict[str, type]:
    """Config section name -> dataclass, for every registered stage, in data-path order."""
    out: dict[str, type] = {}
    for s in specs():
        have = out.get(s.section)
        if have is not None and have is not s.config:
            raise ValueError(f"config section {s.section!r} declared with {have.__name__} and {s.config.__name__}")
        out[s.section] = s.config
    return out


def options() -> list[Option]:
    """Every stage's CLI flags, in data-path order (a flag shared by two stages of one section counts once)."""
    seen: dict[str, Option] = {}
    for s in specs():
        for o in s.options:
            seen.setdefault(o.flag, o)
    return list(seen.values())


def active(config: Any, kind: str) -> list[StageSpec]:
    """The stages of ``kind`` that run under ``config``: enabled, not in ``run.skip_stages``, requirements met."""
    skip = set(config.run.skip_stages)
    on: dict[str, bool] = {}
    for s in specs():
        on[s.name] = s.name not in skip and s.is_enabled(config) and all(on.get(r, False) for r in s.requires)
    return [s for s in specs(kind) if on[s.name]]


def build(config: Any, kind: str) -> list:
    """The stage objects of ``kind`` that run under ``config``, in order."""
    return [s.build(config) for s in active(config, kind)]


def global_columns(config: Any) -> dict:
    """Columns the active global stages add, with their Arrow types: the map phase writes them as nulls, so a part
    the global phase leaves alone needs no rewrite and every part of ``scores/`` has every column."""
    out: dict = {}
    for s in active(config, GLOBAL):
        out.update(s.column_types or {})
    return out


def work_columns(config: Any) -> list[str]:
    """Columns the active map stages hand to global stages only (kept in ``work/``, never in ``scores/``)."""
    return [c for s in active(config, MAP) for c in s.work_columns]


def resume_sections(config: Any) -> list[str]:
    """Config sections that decide whether a finished map shard can be reused: the read options and the sections of
    the active map stages that change what a shard holds."""
    out = ["read"]
    for s in active(config, MAP):
        if s.changes_shard and s.section not in out:
            out.append(s.section)
    return out


def resolve(config: Any, facts: dict) -> dict[str, dict]:
    """Run every stage's ``resolve`` hook once (the driver does this before building stages); returns
    {stage: what it decided and why} for the manifest. Hooks write concrete values into ``config``."""
    out: dict[str, dict] = {}
    for s in specs():
        if s.resolve is not None and s.name not in config.run.skip_stages:
            got = s.resolve(config, facts)
            if got:
                out[s.name] = got
    return out
