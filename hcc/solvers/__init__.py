"""Solvers: an update rule × a preconditioner × a step size, built from a registry.

A named solver (``eg``, ``negmom``, later ``exact-natgrad`` …) is one registry
line: which rule, which preconditioner, the rule's defaults, and a default step
size per game. ``make_solver`` turns a name plus user options into a
:class:`Solver`, whose :meth:`Solver.step` is a pure function of
``(params, state, batch)`` returning one record of what it measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..games.base import Batch, Game, Params
from ..registry import OptionError, Registry, build_options, check_positive
from .natural import CG, Exact
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


# The registry: one line per named solver. Step sizes: the best median steps to
# V ≤ 1e-6 over seeds 0-2 on a grid {0.01, 0.03, 0.1, 0.3, 1, 3} (float64, game
# defaults, matching pennies at λ = 0.1). Where no step converges (simultaneous GDA,
# normalized SGDA and Adam on rps) the default is a stable one. GAN: the lowest
# median MMD² after 2000 steps (`hcc compare gan --tune`), seeds 0-1 on
# {0.003, 0.01, 0.03, 0.05, 0.1} (gda 0.05: 0.124, eg 0.03: 0.156, nsgda 0.03: 0.065);
# Adam, best at the grid's low end there, re-tuned on seeds 0-2 over {0.0003, 0.001,
# 0.003}: 0.001 gives 0.051 against 0.124 at either neighbour.
MP = "matching-pennies"
_PLAIN = {
    "gda": SolverSpec("gda", summary="simultaneous gradient descent-ascent",
                      lr={"*": 0.05, "bilinear": 0.1, "rps": 0.05, MP: 0.05, "gan": 0.05}),
    "alt-gda": SolverSpec("gda", rule_defaults={"alternating": True}, summary="alternating GDA (Gauss-Seidel)",
                          lr={"*": 0.05, "bilinear": 0.1, "rps": 0.1, MP: 0.1, "gan": 0.05}),
    "eg": SolverSpec("eg", summary="extragradient (Korpelevich)",
                     lr={"*": 0.1, "bilinear": 0.5, "rps": 0.1, MP: 0.1, "gan": 0.03}),
    "ogda": SolverSpec("ogda", summary="optimistic GDA (Popov / Daskalakis et al.)",
                       lr={"*": 0.1, "bilinear": 0.3, "rps": 0.1, MP: 0.1, "gan": 0.03}),
    "negmom": SolverSpec("gda", rule_defaults={"beta": -0.5, "alternating": True},
                         summary="alternating GDA with negative momentum (Gidel et al. 2019)",
                         lr={"*": 0.1, "bilinear": 0.5, "rps": 0.1, MP: 0.3, "gan": 0.05}),
    "consensus": SolverSpec("consensus", summary="consensus optimization (Mescheder et al. 2017)",
                            lr={"*": 0.03, "bilinear": 0.5, "rps": 0.03, MP: 0.03, "gan": 0.05}),
    "hamiltonian": SolverSpec("hamiltonian", summary="Hamiltonian descent on ½‖v‖²",
                              lr={"*": 0.03, "bilinear": 0.5, "rps": 0.03, MP: 0.03, "gan": 0.01}),
    "nsgda": SolverSpec("nsgda", summary="normalized SGDA (per player or per layer)",
                        lr={"*": 0.01, "bilinear": 0.01, "rps": 0.01, MP: 0.01, "gan": 0.03}),
    "adam": SolverSpec("adam", summary="Adam-GDA, the practitioners' baseline",
                       lr={"*": 0.001, "bilinear": 0.01, "rps": 0.01, MP: 0.01, "gan": 0.001}),
}
for _name, _spec in _PLAIN.items():
    register_solver(_name, _spec)

# -- generalized natural gradients (design.md §2) ----------------------------------------------
PRECONDITIONERS.register(Exact.name, Exact)
PRECONDITIONERS.register(CG.name, CG)

# Natural extragradient, the field-based natural solvers (stability, step sizes: docs/curvature.md).
_NATURAL_EG = {
    "eg+exact": SolverSpec(
        "eg", precond="exact", summary="extragradient on the exact generalized natural gradient (field-based)",
        lr={"*": 0.1, "bilinear": 0.6, "rps": 0.4, "matrix": 0.4, MP: 0.2, "gan": 0.05}),
    "eg+cg": SolverSpec(
        "eg", precond="cg", summary="extragradient on the natural gradient by conjugate gradients (field-based)",
        lr={"*": 0.1, "bilinear": 0.6, "rps": 0.4, "matrix": 0.4, MP: 0.2, "gan": 0.05}),
}
for _name, _spec in _NATURAL_EG.items():
    register_solver(_name, _spec)

from . import hidden, prox  # noqa: E402,F401  (register the prox rule, the surrogate and phgd preconditioners)

#: the pull-back geometry of the named proximal solvers: Gauss-Newton on the centred logits
PROX_PULLBACK = {"geometry": "logit"}
# The natural proximal-point solvers (hcc.solvers.prox): one default for every game with a fixed
# function-space support, lr = 1 (the full Gauss-Newton step; nothing to tune per game).
_NATURAL = {
    "exact-natgrad": SolverSpec(
        "prox", precond="exact", precond_defaults=PROX_PULLBACK, lr={"*": 1.0},
        summary="natural proximal point: implicit function-space step, exact Gauss-Newton pull-back"),
    "cg-natgrad": SolverSpec(
        "prox", precond="cg", precond_defaults=PROX_PULLBACK, lr={"*": 1.0},
        summary="natural proximal point, pull-back by conjugate gradients"),
}
for _name, _spec in _NATURAL.items():
    register_solver(_name, _spec)

# The published methods for hidden games (hcc.solvers.hidden), one default step each: the surrogate-loss
# method with extragradient outside (target step τ = the step size) and preconditioned hidden gradient
# descent, simultaneous as published.
_HIDDEN = {
    "eg+surrogate": SolverSpec(
        "eg", precond="surrogate", precond_defaults={"geometry": "fisher"}, lr={"*": 1.0},
        summary="surrogate losses (D'Orazio et al. 2025): function-space EG target (Fisher), 5 inner GD steps"),
    "gda+phgd": SolverSpec(
        "gda", precond="phgd", lr={"*": 0.05},
        summary="preconditioned hidden gradient descent (Sakos et al. 2023), simultaneous, (JᵀJ)⁺"),
}
for _name, _spec in _HIDDEN.items():
    register_solver(_name, _spec)

__all__ = [
    "BOTH", "Oracle", "PRECONDITIONERS", "Preconditioner", "RULES", "Rule", "SOLVERS", "Solver",
    "SolverSpec", "check_solver_name", "compose_solver", "hamiltonian_grad", "make_solver", "register_solver",
    "vector_field",
]
from . import kfac  # noqa: E402,F401  (registers kfac, diag, kfac-natgrad, diag-natgrad)
