"""Sweep specs: a YAML grid of toy-world (or any) configurations, parsed, checked and expanded into planned runs.

A spec (see docs/experiments.md) has a ``base`` mapping of flat ``RunConfig``/``MethodConfig``
fields, a ``grid`` (Cartesian product of lists), optional ``cases`` (a list of overrides, each
crossed with the grid), optional ``blocks`` (several such sub-sweeps sharing ``base``) and an
optional ``tuning`` block (:mod:`sdpo_sim.tuning`). A run's id is a hash of its full validated config, so a
restarted sweep skips what is finished and a changed spec is accepted only if every finished run is still
part of it (:func:`check_compatible`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import yaml

from .core.io import read_yaml_file

SPEC_KEYS = ("name", "description", "base", "grid", "cases", "blocks", "tuning")
BLOCK_KEYS = ("name", "base", "grid", "cases")
PACKAGED_SPECS = ("claims", "main", "quick")  # names `sdpo-sim sweep` resolves to sdpo_sim/specs/*.yaml

ConfigFn = Callable[[dict], dict]  # flat mapping -> full validated flat config (raises ValueError)


# ----------------------------------------------------------------------------- spec
@dataclass
class Block:
    """One sub-sweep: ``base`` overrides, a grid and optional cases."""

    name: str
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    cases: list = field(default_factory=lambda: [{}])

    def points(self, shared_base: Mapping[str, Any]) -> list[dict]:
        """Every flat (unvalidated) config of this block: base ∪ case ∪ grid point, later winning."""
        keys = list(self.grid)
        out = []
        for case in self.cases:
            for values in itertools.product(*(self.grid[k] for k in keys)):
                out.append({**shared_base, **self.base, **case, **dict(zip(keys, values))})
        return out


@dataclass
class Spec:
    """A parsed, structurally checked sweep spec (field names are checked by :func:`plan`)."""

    name: str
    base: dict
    blocks: list
    tuning: Optional[dict] = None
    description: str = ""
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "spec") -> "Spec":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a sweep spec must be a mapping with keys {', '.join(SPEC_KEYS)}; got {type(data).__name__}")
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SPEC_KEYS)}")
        base = _mapping(data.get("base", {}), f"{source}: base")
        if "blocks" in data:
            if "grid" in data or "cases" in data:
                raise ValueError(f"{source}: give either top-level grid/cases or blocks, not both")
            raw_blocks = data["blocks"]
            if not isinstance(raw_blocks, list) or not raw_blocks:
                raise ValueError(f"{source}: blocks must be a non-empty list of mappings with keys {', '.join(BLOCK_KEYS)}")
        else:
            raw_blocks = [{"name": "main", "grid": data.get("grid", {}), "cases": data.get("cases", [{}])}]
        blocks, names = [], set()
        for i, rb in enumerate(raw_blocks):
            where = f"{source}: blocks[{i}]"
            rb = _mapping(rb, where)
            bad = sorted(set(rb) - set(BLOCK_KEYS))
            if bad:
                raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; allowed: {', '.join(BLOCK_KEYS)}")
            name = str(rb.get("name", f"block{i}"))
            if name in names:
                raise ValueError(f"{where}: duplicate block name {name!r}")
            names.add(name)
            grid = _grid(rb.get("grid", {}), f"{where}.grid" if "blocks" in data else f"{source}: grid")
            cases = _cases(rb.get("cases", [{}]), f"{where}.cases" if "blocks" in data else f"{source}: cases")
            for j, case in enumerate(cases):
                both = sorted(set(case) & set(grid))
                if both:
                    raise ValueError(f"{where}: field(s) {', '.join(map(repr, both))} set by both grid and cases[{j}]; set each field in one place")
            blocks.append(Block(name, _mapping(rb.get("base", {}), f"{where}.base"), grid, cases))
        tuning = data.get("tuning")
        if tuning is not None:
            tuning = _mapping(tuning, f"{source}: tuning")
        return cls(name=str(data.get("name", "sweep")), base=base, blocks=blocks, tuning=tuning, description=str(data.get("description", "")), raw=dict(data))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Spec":
        """Read a YAML spec with a safe loader."""
        path = Path(path)
        expected = f"a sweep spec file (YAML) or a packaged spec name ({' | '.join(PACKAGED_SPECS)}) is expected"
        data = read_yaml_file(path, "spec file", expected)
        return cls.from_dict(data, source=str(path))


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of field names to values, got {type(value).__name__}")
    return dict(value)


def _grid(value: Any, where: str) -> dict:
    grid = _mapping(value, where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
    return grid


def _cases(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of mappings")
    return [_mapping(c, f"{where}[{i}]") for i, c in enumerate(value)]


# ----------------------------------------------------------------------------- plan
def run_id(config: Mapping[str, Any]) -> str:
    """Stable 12-hex id of a full config: ``sha1(json(config, sorted keys))[:12]``."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Planned:
    """A validated run: its id, full config and the blocks it belongs to."""

    run_id: str
    config: dict
    blocks: list


def validate_points(points: Sequence[tuple[str, dict]], config_fn: ConfigFn) -> list[Planned]:
    """Validate every (block, flat config); deduplicate by run id. Raises ``ValueError`` naming the point."""
    planned: dict[str, Planned] = {}
    for block, point in points:
        try:
            full = config_fn(point)
        except ValueError as err:
            shown = {k: v for k, v in point.items()}
            raise ValueError(f"block {block!r}, run {shown}: {err}") from None
        rid = run_id(full)
        if rid in planned:
            if block not in planned[rid].blocks:
                planned[rid].blocks.append(block)
        else:
            planned[rid] = Planned(rid, full, [block])
    return list(planned.values())


def check_fields(spec: Spec, known: Sequence[str]) -> None:
    """Refuse any field name (in base, blocks, grids, cases) that is not a config field, naming where it is."""
    known_set = set(known)

    def check(keys: Sequence[str], where: str) -> None:
        bad = sorted(set(keys) - known_set)
        if bad:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, bad))}; known fields: {', '.join(sorted(known_set))}")

    check(list(spec.base), "base")
    for b in spec.blocks:
        check(list(b.base), f"block {b.name!r} base")
        check(list(b.grid), f"block {b.name!r} grid")
        for i, case in enumerate(b.cases):
            check(list(case), f"block {b.name!r} cases[{i}]")


def expand(spec: Spec) -> list[tuple[str, dict]]:
    """All (block name, flat config) points of the spec, in order."""
    return [(b.name, p) for b in spec.blocks for p in b.points(spec.base)]



def known_fields(config_fn: ConfigFn) -> list[str]:
    return list(config_fn({}))


def check_compatible(out: Path, spec: Spec, wanted: set, *, ignore: Sequence[str] = ()) -> None:
    """Refuse a directory holding finished runs that the new spec would not contain.

    A stored run is part of the spec if its id is in ``wanted`` — ids computed from configs with the
    fields in ``ignore`` removed (``lr``, and ``beta`` where tuning chooses them), see :func:`loose_id`.
    """
    runs_dir = out / "runs"
    if not runs_dir.is_dir():
        return
    orphan = []
    for meta in sorted(runs_dir.glob("*.json")):
        config = json.loads(meta.read_text()).get("config", {})
        if meta.stem not in wanted and loose_id(config, ignore) not in wanted:
            orphan.append(meta.stem)
    if orphan:
        old = out / "spec.yaml"
        hint = ""
        if old.is_file():
            try:
                before = yaml.safe_load(old.read_text()) or {}
                changed = sorted(k for k in set(before) | set(spec.raw) if before.get(k) != spec.raw.get(k))
                hint = f" (changed top-level key(s): {', '.join(changed)})" if changed else ""
            except yaml.YAMLError:
                pass
        raise ValueError(
            f"{out} holds {len(orphan)} finished run(s) that this spec does not contain{hint}, e.g. {orphan[0]}: "
            "the spec changed in a way that conflicts with the existing results. Use a new --out directory "
            "(or delete the old one); adding grid values or seeds to a spec is fine and resumes.")


def loose_id(config: Mapping[str, Any], ignore: Sequence[str] = ()) -> str:
    """:func:`run_id` of a config without the fields in ``ignore``."""
    return run_id({k: v for k, v in config.items() if k not in ignore}) if ignore else run_id(config)


