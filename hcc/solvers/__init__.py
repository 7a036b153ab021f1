"""Solvers: an update rule × a preconditioner × a step size, built from a registry.

A named solver (``eg``, ``negmom``, ``exact-natgrad`` …) is one entry of the data
file ``hcc/solvers/presets.toml`` (:func:`load_presets`): which rule, which
preconditioner, their defaults, and a default step size per game. ``make_solver``
turns a name plus user options into a :class:`Solver`, whose :meth:`Solver.step` is a
pure function of ``(params, state, batch)`` returning one record of what it measured.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..games.base import Batch, Game, Params
from ..registry import OptionError, Registry, build_options, check_positive
from .oracle import BOTH, Oracle, hamiltonian_grad, vector_field
from .precond import PRECONDITIONERS, Preconditioner
from .rules import RULES, Rule


@dataclass(frozen=True)
class SolverSpec:
    """A registry entry: rule × preconditioner with defaults."""

    rule: str
    precond: str = "identity"
    rule_defaults: dict[str, Any] = field(default_factory=dict)
    precond_defaults: dict[str, Any] = field(default_factory=dict)
    #: default step size per game name; ``"*"`` is the fallback
    lr: dict[str, float] = field(default_factory=dict)
    summary: str = ""

    def default_lr(self, game: str) -> float:
        return self.lr.get(game, self.lr["*"])


class Solver:
    """``rule × preconditioner`` at step size ``lr``; functional in params and state."""

    def __init__(self, name: str, rule: Rule, precond: Preconditioner, lr: float) -> None:
        check_positive("lr (step size)", lr)
        self.name, self.rule, self.precond, self.lr = name, rule, precond, float(lr)
        precond.step_size = self.lr

    def init(self, game: Game, params: Params) -> dict[str, Any]:
        self.rule.check_game(game)
        return {"rule": self.rule.init(params), "precond": self.precond.init(game, params)}

    def step(self, game: Game, params: Params, state: dict[str, Any], batch: Batch) -> tuple[Params, dict, dict]:
        """One update; returns ``(params, state, info)`` where ``info`` merges what the
        rule and the preconditioner measured (field evaluations, CG iterations, …).

        The new parameters are projected onto their domain (:meth:`Game.project`; the
        oracle projects its query points too), so on constrained maps every rule runs
        as its projected variant."""
        cell = [state["precond"]]

        def precondition(p: Params, vec: Params, players: tuple[int, ...]) -> tuple[Params, dict]:
            d, cell[0], info = self.precond.apply(game, p, batch, vec, cell[0], players)
            return d, info

        direction = None
        if self.precond.fused_direction:

            def direction(p: Params, players: tuple[int, ...]) -> tuple[Params, dict]:
                d, cell[0], info = self.precond.direction(game, p, batch, cell[0], players)
                return d, info

        def pullback(p: Params, targets: tuple, damping: tuple[float, float]) -> tuple[Params, dict]:
            d, cell[0], info = self.precond.pullback(game, p, batch, targets, cell[0], damping)
            return d, info

        oracle = Oracle(game, batch, precondition, direction_fn=direction, pullback_fn=pullback,
                        pullback_geometry=self.precond.geometry)
        new, rstate, info = self.rule.step(oracle, params, state["rule"], self.lr)
        new = game.project(new)
        info = {**_merge_infos(oracle.infos), **info, "field_evals": oracle.calls}
        return new, {"rule": rstate, "precond": cell[0]}, info

    def options(self) -> dict[str, Any]:
        return {
            "rule": self.rule.name,
            "precond": self.precond.name,
            "lr": self.lr,
            **dataclasses.asdict(self.rule.options),
            **dataclasses.asdict(self.precond.options),
        }


def _merge_infos(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers summed over the step's preconditioner calls (e.g. CG iterations), others last."""
    out: dict[str, Any] = {}
    for info in infos:
        for k, v in info.items():
            out[k] = out.get(k, 0) + v if k.endswith("_total") else v
    return out


SOLVERS: Registry[SolverSpec] = Registry("solver")


def register_solver(name: str, spec: SolverSpec) -> SolverSpec:
    RULES[spec.rule], PRECONDITIONERS[spec.precond]  # fail early on unknown parts
    if "*" not in spec.lr:
        raise ValueError(f"solver {name!r}: lr needs a '*' fallback")
    return SOLVERS.register(name, spec)


#: the named solvers' definitions, registered in the file's order at import (:func:`load_presets`)
PRESETS_FILE = Path(__file__).with_name("presets.toml")


class PresetError(ValueError):
    """A malformed presets file: the message names the file, the entry and the key."""


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, SolverSpec]:
    """The ``[solver."NAME"]`` tables of a presets file (TOML) as :class:`SolverSpec` s, in file order.

    Each entry's ``rule`` and ``precond`` must be registered, its ``rule_defaults`` /
    ``precond_defaults`` options of them, and its ``lr`` table must have the ``"*"`` fallback;
    anything else raises a :class:`PresetError` naming the file, the entry and the key.
    (The file shipped with hcc, :data:`PRESETS_FILE`, is registered as :data:`SOLVERS`.)
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PresetError(f"{path}: not valid TOML: {e}") from None
    extra = sorted(set(data) - {"solver"})
    if extra:
        raise PresetError(f"{path}: unknown top-level key {extra[0]!r}; expected [solver.\"NAME\"] tables")
    entries = data.get("solver", {})
    if not isinstance(entries, dict):
        raise PresetError(f"{path}: key 'solver': expected tables [solver.\"NAME\"], got {entries!r}")
    return {name: _preset(path, name, entry) for name, entry in entries.items()}


def _preset(path: Path, name: str, entry: Any) -> SolverSpec:
    """One entry of a presets file, checked (see :func:`load_presets`)."""
    where = f"{path}: solver {name!r}"
    if not isinstance(entry, dict):
        raise PresetError(f"{where}: expected a table, got {entry!r}")
    keys = [f.name for f in dataclasses.fields(SolverSpec)]
    for key in entry:
        if key not in keys:
            raise PresetError(f"{where}: unknown key {key!r}; expected one of: {', '.join(keys)}")
    for key in ("rule", "lr"):
        if key not in entry:
            raise PresetError(f"{where}: missing key {key!r}")
    for key in ("rule", "precond", "summary"):
        if key in entry and not isinstance(entry[key], str):
            raise PresetError(f"{where}: key {key!r}: expected a string, got {entry[key]!r}")
    rule, precond = entry["rule"], entry.get("precond", "identity")
    for key, value, registry in (("rule", rule, RULES), ("precond", precond, PRECONDITIONERS)):
        if value not in registry:
            raise PresetError(f"{where}: key {key!r}: unknown {registry.kind} {value!r}; "
                              f"expected one of: {', '.join(registry)}")
    for key, cls in (("rule_defaults", RULES[rule]), ("precond_defaults", PRECONDITIONERS[precond])):
        table = entry.get(key, {})
        if not isinstance(table, dict):
            raise PresetError(f"{where}: key {key!r}: expected a table of options, got {table!r}")
        fields = [f.name for f in dataclasses.fields(cls.Options)]
        for opt_name in table:
            if opt_name not in fields:
                raise PresetError(f"{where}: key {key!r}: unknown option {opt_name!r} of {cls.name!r}; "
                                  f"expected one of: {', '.join(fields) or '(none)'}")
    lr = entry["lr"]
    if not isinstance(lr, dict):
        raise PresetError(f"{where}: key 'lr': expected a table of step sizes per game, got {lr!r}")
    if "*" not in lr:
        raise PresetError(f"{where}: key 'lr': needs a '*' fallback (the step size for every other game)")
    for game, h in lr.items():
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not (h > 0 and math.isfinite(h)):
            raise PresetError(f"{where}: key 'lr': expected a positive step size for {game!r}, got {h!r}")
    return SolverSpec(rule, precond, rule_defaults=dict(entry.get("rule_defaults", {})),
                      precond_defaults=dict(entry.get("precond_defaults", {})),
                      lr={game: float(h) for game, h in lr.items()}, summary=entry.get("summary", ""))


def _build(
    name: str,
    rule_name: str,
    precond_name: str,
    rule_defaults: dict[str, Any],
    precond_defaults: dict[str, Any],
    lr: float,
    options: dict[str, Any] | None,
) -> Solver:
    """Split ``options`` between the rule's and the preconditioner's options dataclasses."""
    rule_cls, pre_cls = RULES[rule_name], PRECONDITIONERS[precond_name]
    rule_fields = {f.name for f in dataclasses.fields(rule_cls.Options)}
    pre_fields = {f.name for f in dataclasses.fields(pre_cls.Options)}
    options = dict(options or {})
    unknown = sorted(set(options) - rule_fields - pre_fields)
    if unknown:
        valid = ", ".join(sorted(rule_fields | pre_fields)) or "(none)"
        raise OptionError(f"unknown option {unknown[0]!r} for solver {name!r}; expected one of: {valid}")
    r_opts = {**rule_defaults, **{k: v for k, v in options.items() if k in rule_fields}}
    p_opts = {**precond_defaults, **{k: v for k, v in options.items() if k in pre_fields}}
    rule = rule_cls(build_options(rule_cls.Options, r_opts, owner=f"solver {name!r}"))
    precond = pre_cls(build_options(pre_cls.Options, p_opts, owner=f"solver {name!r}"))
    return Solver(name, rule, precond, lr)


def _lr_scale(game: Game | str, rule: str) -> float:
    """:attr:`Game.lr_scale` of an instance (a name: 1), if the rule's steps scale with the game."""
    if isinstance(game, str) or not RULES[rule].lr_scales_with_game:
        return 1.0
    return float(game.lr_scale)


def check_solver_name(name: str) -> str:
    """``name`` if it is a registered solver or a composite ``RULE+PRECOND`` of registered parts.

    Otherwise an :class:`~hcc.registry.OptionError` listing the valid choices.
    """
    if not isinstance(name, str):
        raise OptionError(f"solver: expected a name (str), got {type(name).__name__} {name!r}")
    if name not in SOLVERS and "+" in name:
        rule, _, precond = name.partition("+")
        RULES[rule], PRECONDITIONERS[precond]
    else:
        SOLVERS[name]
    return name


def make_solver(
    name: str,
    game: Game | str,
    lr: float | None = None,
    options: dict[str, Any] | None = None,
) -> Solver:
    """Build the named solver for ``game`` (a :class:`Game` or a game name).

    The default step size is the registry's for the game, times :attr:`Game.lr_scale` when
    ``game`` is an instance (a matrix game rescales by its payoff's norm).
    ``name`` is a registered solver or a composite ``RULE+PRECOND`` (e.g.
    ``ogda+cg``, see :func:`compose_solver`). ``options`` may set any option of the
    solver's rule or preconditioner (strings are parsed); unknown keys raise an
    error that lists the valid ones.
    """
    if check_solver_name(name) not in SOLVERS:
        rule, _, precond = name.partition("+")
        return compose_solver(rule, precond, game, lr=lr, options=options)
    spec = SOLVERS[name]
    game_name = game if isinstance(game, str) else game.name
    lr = spec.default_lr(game_name) * _lr_scale(game, spec.rule) if lr is None else lr
    return _build(name, spec.rule, spec.precond, spec.rule_defaults, spec.precond_defaults, lr, options)


def compose_solver(
    rule: str,
    precond: str,
    game: Game | str,
    lr: float | None = None,
    options: dict[str, Any] | None = None,
) -> Solver:
    """Any ``rule × precond`` from the registries (the CLI's ``--rule`` / ``--precond``).

    ``options`` go to the rule's or the preconditioner's options dataclass (the
    defaults are the dataclasses', not a named solver's). With ``lr=None`` the step
    size is borrowed from a registered solver with the same rule and preconditioner
    (one without rule defaults first), else from one with the same rule and the
    identity preconditioner (or any preconditioner, for a rule whose step does not scale
    with the game, like ``prox``); if none exists an error asks for ``lr``.

    >>> from hcc.solvers import compose_solver
    >>> solver = compose_solver("ogda", "exact", "rps")
    """
    RULES[rule], PRECONDITIONERS[precond]  # unknown names: errors listing the choices
    game_name = game if isinstance(game, str) else game.name
    if lr is None:
        specs = [s for s in SOLVERS.values() if s.rule == rule and s.precond == precond]
        specs.sort(key=lambda s: bool(s.rule_defaults))
        if not specs:
            specs = [s for s in SOLVERS.values() if s.rule == rule and s.precond == "identity" and not s.rule_defaults]
        if not specs and not RULES[rule].lr_scales_with_game:  # a step that does not depend on the geometry
            specs = [s for s in SOLVERS.values() if s.rule == rule and not s.rule_defaults]
        if not specs:
            raise OptionError(f"no default step size for rule {rule!r} with precond {precond!r}; pass lr")
        lr = specs[0].default_lr(game_name) * _lr_scale(game, rule)
    return _build(f"{rule}+{precond}", rule, precond, {}, {}, lr, options)


# -- the preconditioners and rules of the other modules ------------------------------------------
# registered by @RULES.entry / @PRECONDITIONERS.entry at import: the exact and cg preconditioners, the
# surrogate and phgd ones, kfac and diag, the prox rule
from . import hidden, kfac, natural, prox  # noqa: E402,F401

# -- the named solvers: hcc/solvers/presets.toml -------------------------------------------------
for _name, _spec in load_presets().items():
    register_solver(_name, _spec)

__all__ = [
    "BOTH", "Oracle", "PRECONDITIONERS", "PRESETS_FILE", "PresetError", "Preconditioner", "RULES", "Rule",
    "SOLVERS", "Solver", "SolverSpec", "check_solver_name", "compose_solver", "hamiltonian_grad", "load_presets",
    "make_solver", "register_solver", "vector_field",
]
