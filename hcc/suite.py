r"""Benchmark suite: families of hidden matrix games with certified equilibria, and its runner.

A **family** (:data:`FAMILIES`) is a recipe for instances of one kind of game: random
payoffs (Gaussian or uniform entries, square or rectangular, with dominated strategies,
with a pure saddle point, cyclic tournaments), ``rps`` with many contexts or wider /
deeper strategy maps, and ``matching-pennies``. An :class:`Instance` is a game name, its
options (a matrix game's payoff inline, every float written with ``repr`` so that it
round-trips to the same float64), the seed of its networks and the certificate of its
equilibrium; the same instance runs in float64 and in float32.

Equilibria are exact and certified independently of the solvers measured
(:func:`~hcc.games.equilibrium.certified_equilibrium`: Lemke's method and a KKT solve for
``λ > 0``, linear programs refined on the support for ``λ = 0``, cross-checked with
nashpy's support enumeration where that is affordable). ``V`` needs a unique equilibrium:
``λ > 0`` games have one; a ``λ = 0`` payoff is redrawn (from the same stream, so the
instance stays reproducible) until its equilibrium is certified unique with a strict
complementarity margin ``≥`` :data:`MIN_MARGIN`.

The **runner** (:func:`run_suite`) solves every instance with every solver: ``hcc``
solvers by name (anything :func:`hcc.make_solver` accepts) at their defaults, and
*baselines* (plain ``eg``, ``consensus``, and ACGD from the CGDs package on the same
initial networks) at a step size chosen per family on separate tuning instances from a
small grid (:func:`hcc.compare.pick_lr`: fewest median steps to ``V ≤ tol``, then the
smallest median final ``V``). Per run it records whether ``V ≤ tol`` was reached within
the step budget, the iterations (``V`` checked after every step) and the wall-clock spent
in the steps up to then; :func:`summarize` turns the runs into medians per family ×
dtype × solver (a run that did not converge counts as ∞, so a median shows ``>budget``
when more than half failed).

>>> from hcc.suite import run_suite
>>> res = run_suite(["gauss-l0.1"], ["exact-natgrad"], baselines=[], instances=1, dtypes=["float64"])
>>> print(res.markdown())
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .compare import GridPoint, parse_grid, pick_lr
from .games import Game, make_game
from .games.equilibrium import CertificationError, certified_equilibrium
from .metrics import lyapunov
from .registry import OptionError, Registry, check_positive
from .run import Result, _jsonable, resolve_dtype, solve, write_history_csv
from .solvers import check_solver_name, make_solver

SCHEMA_VERSION = 1
#: a run converged when V ≤ TOL ...
TOL = 1e-6
#: ... within this many steps
BUDGET = 1000
#: λ = 0 payoffs are redrawn until the strict complementarity margin of their equilibrium is at least this
MIN_MARGIN = 1e-6
#: a family's full run has at least this many instances
MIN_INSTANCES = 3
#: steps of a tuning run (a baseline's step size: fewest median steps to V ≤ tol within these, else the
#: smallest median V after them)
TUNE_BUDGET = 300
#: tuning instances are numbered from here (their payoffs and networks are not the measured ones)
TUNE_OFFSET = 1000
#: the name of the CGDs peer in solver lists
ACGD = "acgd"
#: default step-size grids of the baselines: factors of the solver's default (``x``) or absolute steps
BASELINE_GRIDS: dict[str, str] = {"eg": "x0.5,x1,x2,x4", "consensus": "x0.5,x1,x2,x4", ACGD: "0.01,0.03,0.1,0.3"}
#: the hcc solvers a suite run measures at their defaults unless told otherwise
DEFAULT_SOLVERS = ("exact-natgrad", "cg-natgrad", "kfac-natgrad")
#: nashpy cross-checks λ = 0 equilibria of games with at most this many actions in all (vertex
#: enumeration: 0.6 s at 7x7, 20 s at 9x9)
NASHPY_MAX_ACTIONS = 14


# -- payoffs ----------------------------------------------------------------------------------------


def payoff_text(M: np.ndarray) -> str:
    """``M`` as the matrix game's inline ``payoff`` option, ``repr`` of every float (exact float64)."""
    return ";".join(",".join(repr(float(x)) for x in row) for row in np.asarray(M, dtype=np.float64))


def gaussian(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return rng.standard_normal((m, k))


def uniform(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, (m, k))


def with_dominated(rng: np.random.Generator, m: int, k: int, extra: int = 2) -> np.ndarray:
    """An ``m × k`` Gaussian core plus ``extra`` strictly dominated rows and columns, shuffled.

    A dominated row is a core row plus ``U(0.2, 1)`` entrywise (worse for the minimizing row
    player); a dominated column is a core column minus ``U(0.2, 1)`` (worse for the maximizer).
    """
    M = rng.standard_normal((m, k))
    rows = M[rng.integers(0, m, extra)] + rng.uniform(0.2, 1.0, (extra, k))
    M = np.r_[M, rows]
    cols = M[:, rng.integers(0, k, extra)] - rng.uniform(0.2, 1.0, (m + extra, extra))
    M = np.c_[M, cols]
    return M[rng.permutation(m + extra)][:, rng.permutation(k + extra)]


def with_pure_saddle(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """A Gaussian matrix rewritten to have a strict pure saddle point at a random ``(i, j)``:
    ``M_ij`` is the strict maximum of its row and the strict minimum of its column."""
    M = rng.standard_normal((m, k))
    i, j = rng.integers(0, m), rng.integers(0, k)
    v = M[i, j]
    M[i, :] = v - rng.uniform(0.2, 1.5, k)
    M[:, j] = v + rng.uniform(0.2, 1.5, m)
    M[i, j] = v
    return M


def cyclic(rng: np.random.Generator, n: int) -> np.ndarray:
    """A weighted cyclic tournament (generalized rock-paper-scissors), ``n`` odd: strategy ``i``
    beats the next ``(n − 1)/2`` strategies cyclically; weights ``U(0.5, 2)``, skew-symmetric."""
    W = rng.uniform(0.5, 2.0, (n, n))
    W = np.triu(W, 1) + np.triu(W, 1).T
    d = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    sign = np.where((d >= 1) & (d <= (n - 1) // 2), -1.0, 1.0)  # the row player (minimizer) wins: negative
    return np.where(d == 0, 0.0, sign * W)


# -- families -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One game of a family: ``make_game(game, options, seed=seed)``, in any dtype."""

    family: str
    index: int
    game: str
    options: dict[str, Any]
    seed: int
    #: what is known about its equilibrium (a matrix game: :class:`~hcc.games.equilibrium.Certificate` fields)
    certificate: dict[str, Any]
    #: payoffs rejected (λ = 0, equilibrium not certified unique) before this one
    redraws: int = 0

    def build(self, dtype: str = "float64") -> Game:
        return make_game(self.game, self.options, seed=self.seed).to(resolve_dtype(dtype))

    @property
    def label(self) -> str:
        """What varies inside the family: the payoff's shape and λ, or the map's options."""
        o = self.options
        parts = [f"{self.certificate['shape'][0]}x{self.certificate['shape'][1]}"] if "shape" in self.certificate \
            else []
        parts += [f"{k}={v}" for k, v in o.items() if k != "payoff"]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = {k: v for k, v in self.options.items() if k != "payoff"}  # the payoff goes to its own file
        return d


@dataclass(frozen=True)
class Family:
    """Instances of one kind: variant ``i mod len(variants)`` of instance ``i``, drawn by ``draw``.

    ``draw(rng, variant)`` returns the game options (and, for matrix games, the payoff as an
    array under ``"M"``); the stream of instance ``i`` is seeded by the family's name and ``i``.
    """

    name: str
    summary: str
    game: str
    variants: tuple[dict[str, Any], ...]
    draw: Callable[[np.random.Generator, dict[str, Any]], dict[str, Any]]

    def instance(self, index: int, variant: int | None = None) -> Instance:
        """Instance ``index`` (its payoff stream and network seed); variant ``index mod len(variants)``
        unless given."""
        v = self.variants[index % len(self.variants) if variant is None else variant]
        rng = np.random.default_rng([zlib.crc32(self.name.encode()), index])
        for redraw in range(100):
            opts = self.draw(rng, v)
            cert = _certify(self.game, opts)
            if cert is not None:
                M = opts.pop("M", None)
                if M is not None:
                    opts = {"payoff": payoff_text(M), **opts}
                return Instance(self.name, index, self.game, opts, index, cert, redraw)
        raise RuntimeError(f"family {self.name!r}: no payoff with a certified unique equilibrium in 100 draws")

    @property
    def default_instances(self) -> int:
        """Instances of a full run: every variant once, and at least :data:`MIN_INSTANCES`."""
        return max(len(self.variants), MIN_INSTANCES)

    def instances(self, n: int | None = None) -> list[Instance]:
        """The measured instances ``0..n−1`` (``n`` default: :attr:`default_instances`)."""
        return [self.instance(i) for i in range(self.default_instances if n is None else n)]

    def tuning_instances(self, n: int) -> list[Instance]:
        """``n`` instances for choosing step sizes, numbered from :data:`TUNE_OFFSET` (never measured);
        instance ``j`` takes the variant in the middle of the ``j``-th of ``n`` slices of the variants."""
        nv = len(self.variants)
        return [self.instance(TUNE_OFFSET + j, ((2 * j + 1) * nv // (2 * n)) % nv) for j in range(n)]


def _certify(game: str, opts: dict[str, Any]) -> dict[str, Any] | None:
    """The equilibrium's certificate, or ``None`` to redraw (λ = 0 and not certified unique)."""
    if "M" not in opts:
        how = {"rps": "closed form: uniform (Mu = 0)", "matching-pennies": "closed form: f* = g* = 1/2"}[game]
        return {"method": how, "unique": True}
    M, lam = opts["M"], float(opts.get("lam", 0.0))
    try:
        eq = certified_equilibrium(M, lam)
    except CertificationError:
        return None
    c = eq.certificate
    if not c.unique or (lam == 0 and c.margin < MIN_MARGIN):
        return None
    return {**c.to_dict(), "crosscheck": nashpy_crosscheck(M, eq.F, eq.G) if lam == 0 else "λ > 0: KKT certificate"}


def nashpy_crosscheck(M: np.ndarray, F: np.ndarray, G: np.ndarray, atol: float = 1e-9) -> str:
    """Compare a λ = 0 equilibrium with nashpy's vertex enumeration (when affordable and installed).

    (nashpy's support enumeration tests best responses with exact float equality and misses
    equilibria to round-off; vertex enumeration does not.) Raises :class:`CertificationError`
    unless nashpy finds exactly this equilibrium; returns what was checked.
    """
    m, k = M.shape
    if m + k > NASHPY_MAX_ACTIONS:
        return f"nashpy skipped ({m}x{k}: more than {NASHPY_MAX_ACTIONS} actions)"
    try:
        import nashpy
    except ImportError:
        return "nashpy skipped (not installed)"
    # nashpy's row player maximizes: our min player's payoff is −M
    eqs = list(nashpy.Game(-M).vertex_enumeration())
    errs = [max(np.abs(x - F).max(), np.abs(y - G).max()) for x, y in eqs]
    if len(eqs) != 1 or errs[0] > atol:
        raise CertificationError(f"nashpy's vertex enumeration found {len(eqs)} equilibria at distances "
                                 f"{[f'{e:.2g}' for e in errs]} (expected 1 within {atol:g})")
    return f"nashpy vertex enumeration: 1 equilibrium, max |diff| {errs[0]:.1e}"


FAMILIES: Registry[Family] = Registry("family")


def _shapes(*mk: tuple[int, int]) -> tuple[dict[str, int], ...]:
    return tuple({"m": m, "k": k} for m, k in mk)


def _register_matrix(name: str, summary: str, variants: tuple[dict[str, Any], ...], lam: float,
                     sample: Callable[..., np.ndarray]) -> None:
    def draw(rng: np.random.Generator, v: dict[str, Any]) -> dict[str, Any]:
        return {"M": sample(rng, **v), "lam": lam}

    FAMILIES.register(name, Family(name, f"{summary}, λ = {lam:g}", "matrix", variants, draw))


def _register_fixed(name: str, summary: str, game: str, variants: tuple[dict[str, Any], ...],
                    options: dict[str, Any]) -> None:
    def draw(rng: np.random.Generator, v: dict[str, Any]) -> dict[str, Any]:
        return {**options, **v}

    FAMILIES.register(name, Family(name, summary, game, variants, draw))


_register_matrix("gauss-l0", "Gaussian N(0, 1) entries, 3x3, 10x10, 50x50", _shapes((3, 3), (10, 10), (50, 50)), 0.0,
                 gaussian)
_register_matrix("gauss-l0.01", "Gaussian N(0, 1) entries, 5x5, 20x20, 50x50", _shapes((5, 5), (20, 20), (50, 50)),
                 0.01, gaussian)
_register_matrix("gauss-l0.1", "Gaussian N(0, 1) entries, 3x3, 10x10, 50x50", _shapes((3, 3), (10, 10), (50, 50)),
                 0.1, gaussian)
_register_matrix("uniform-l0.1", "uniform U(-1, 1) entries, 5x5, 20x20, 50x50", _shapes((5, 5), (20, 20), (50, 50)),
                 0.1, uniform)
_register_matrix("rect-l0", "Gaussian, rectangular 4x6, 10x20, 30x5", _shapes((4, 6), (10, 20), (30, 5)), 0.0,
                 gaussian)
_register_matrix("rect-l0.1", "Gaussian, rectangular 6x4, 20x10, 5x30", _shapes((6, 4), (20, 10), (5, 30)), 0.1,
                 gaussian)
_register_matrix("dominated-l0", "Gaussian core 3x3, 4x4, 5x5 plus 2 strictly dominated rows and columns",
                 _shapes((3, 3), (4, 4), (5, 5)), 0.0, with_dominated)
_register_matrix("pure-l0", "a strict pure saddle point, 3x3, 5x5, 8x6", _shapes((3, 3), (5, 5), (8, 6)), 0.0,
                 with_pure_saddle)
_register_matrix("cyclic-l0", "weighted cyclic tournaments (generalized RPS) of 3, 5, 7 strategies",
                 tuple({"n": n} for n in (3, 5, 7)), 0.0, cyclic)
_register_matrix("cyclic-l0.1", "weighted cyclic tournaments (generalized RPS) of 5, 7, 9 strategies",
                 tuple({"n": n} for n in (5, 7, 9)), 0.1, cyclic)
_register_fixed("rps", "rps, λ = 0.1, n_support 1, 4, 16, 64 (contexts)", "rps",
                tuple({"n_support": n} for n in (1, 4, 16, 64)), {"lam": 0.1})
_register_fixed("rps-wide", "rps, λ = 0.1, wider / deeper maps: width 64 depth 3, width 128 depth 2", "rps",
                ({"width": 64, "depth": 3}, {"width": 128, "depth": 2}), {"lam": 0.1})
_register_fixed("matching-pennies", "matching pennies, λ = 0.1", "matching-pennies", ({},), {"lam": 0.1})
#: ``--quick``: a smoke run in about a minute (one instance of a few families, two-point grids)
QUICK: dict[str, Any] = {"families": ("gauss-l0.1", "rps", "matching-pennies"), "instances": 1, "tune_instances": 1,
                         "grids": {"eg": "x1,x2", "consensus": "x1,x2", "acgd": "0.03,0.1"}}
#: seeds of the rps check (iterations to V ≤ 1e-8 of the best hcc solver)
RPS_CHECK_SEEDS = range(5)


# -- runs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A column of the tables: an hcc solver at its defaults (``grid`` None) or a baseline whose step
    size is chosen per family from ``grid`` (:func:`hcc.compare.parse_grid` syntax: ``x`` factors of
    the solver's default for each instance, or absolute steps)."""

    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    grid: str | None = None

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.solver + (f"[{opts}]" if opts else "") + (" (tuned)" if self.grid is not None else "")

    def step_size(self, game: Game, value: float | None) -> float | None:
        """The step for ``game`` given the family's pick ``value`` (``None``: the solver's default)."""
        if value is None or self.grid is None:
            return None
        factors = self.grid.strip().lower().startswith("x")
        return value * make_solver(self.solver, game, options=self.options).lr if factors else value


@dataclass
class Run:
    """One instance × dtype × entry: did ``V ≤ tol`` happen within the budget, after how many steps,
    and how much wall-clock inside the steps up to then (or up to the end)."""

    family: str
    index: int
    variant: str
    dtype: str
    solver: str
    lr: float
    status: str  # converged | max_steps | diverged
    iterations: int | None
    wall_s: float
    V0: float
    final_V: float
    steps_run: int


def run_entry(inst: Instance, dtype: str, entry: Entry, value: float | None, *, budget: int = BUDGET,
              tol: float = TOL) -> Run:
    """Solve ``inst`` in ``dtype`` with ``entry`` (at the family's pick ``value`` when tuned)."""
    game = inst.build(dtype)
    lr = entry.step_size(game, value)
    if entry.solver == ACGD:
        if lr is None:
            raise OptionError(f"acgd: expected absolute step sizes in its grid, got {entry.grid!r}")
        return _run_acgd(inst, dtype, entry.label, game, lr, budget, tol)
    solver = make_solver(entry.solver, game, lr=lr, options=entry.options)
    res = solve(game, solver, steps=budget, tol=tol, seed=inst.seed, log_every=budget + 1)
    return _record(inst, dtype, entry.label, solver.lr, res)


def _record(inst: Instance, dtype: str, label: str, lr: float, res: Result) -> Run:
    V0 = float(res.history[0].get("lyapunov", math.nan))
    final = math.inf if res.status == "diverged" else float(res.final.get("lyapunov", math.nan))
    return Run(inst.family, inst.index, inst.label, dtype, label, lr, res.status, res.steps_to_tol,
               float(res.history[-1]["time_s"]), V0, final, res.steps_run)


def _run_acgd(inst: Instance, dtype: str, label: str, game: Game, lr: float, budget: int, tol: float) -> Run:
    """CGDs' ACGD (Schäfer & Anandkumar 2019, adaptive CGD) on the game's own networks (the same
    initial parameters as the hcc runs of this instance); ``V`` after every step, the clock around
    the steps only (like :func:`hcc.solve`)."""
    from CGDs import ACGD as _ACGD

    batch = game.sample_batch()
    params = (dict(game.min_map.named_parameters()), dict(game.max_map.named_parameters()))
    opt = _ACGD(max_params=list(game.max_map.parameters()), min_params=list(game.min_map.parameters()),
                lr_max=lr, lr_min=lr)
    V = V0 = float(lyapunov(game, params, batch))
    status, iters, wall, t = "max_steps", None, 0.0, 0
    for t in range(1, budget + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        opt.step(game.payoff_of(params, batch))
        wall += time.perf_counter() - t0
        V = float(lyapunov(game, params, batch))
        if not (math.isfinite(V) and V <= 1e12):
            status, V = "diverged", math.inf
            break
        if V <= tol:
            status, iters = "converged", t
            break
    return Run(inst.family, inst.index, inst.label, dtype, label, lr, status, iters, wall, V0, V, t)


def cgds_available() -> bool:
    try:
        import CGDs  # noqa: F401
    except ImportError:
        return False
    return True


def tune(family: Family, entry: Entry, n: int, *, budget: int = TUNE_BUDGET, tol: float = TOL,
         progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The family's step size for ``entry``: every grid value on ``n`` tuning instances (float64),
    scored and picked by :func:`hcc.compare.pick_lr`. Returns the grid, the scores and the pick."""
    grid, factors = parse_grid(entry.grid or "")
    values = grid if grid is not None else factors
    scores = []
    for value in values:  # type: ignore[union-attr]
        runs = [run_entry(inst, "float64", entry, value, budget=budget, tol=tol) for inst in
                family.tuning_instances(n)]
        it = [r.iterations if r.iterations is not None else math.inf for r in runs]
        fin = [r.final_V for r in runs]
        scores.append(GridPoint(value, _finite(statistics.median(it)), _finite(statistics.median(fin)),
                                sum(r.status == "converged" for r in runs) / len(runs)))
        if progress:
            progress(f"  tune {family.name} {entry.label} {entry.grid}: {value:g} -> median iterations "
                     f"{_cell_iter(statistics.median(it), budget)}")
    return {"grid": entry.grid, "scores": [asdict(s) for s in scores], "pick": pick_lr(scores)}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# -- the suite --------------------------------------------------------------------------------------------


@dataclass
class SuiteResult:
    """Everything one suite run measured, with its settings."""

    settings: dict[str, Any]
    instances: list[Instance]
    tuning: dict[str, dict[str, dict[str, Any]]]
    runs: list[Run]
    rps_check: dict[str, Any] | None = None
    wall_time_s: float = 0.0

    @property
    def entries(self) -> list[str]:
        return list(dict.fromkeys(r.solver for r in self.runs))

    @property
    def default_entries(self) -> list[str]:
        """The hcc solvers run at their defaults (the candidates for "best hcc solver")."""
        return [e for e in self.entries if not e.endswith("(tuned)")]

    def summary(self) -> list[dict[str, Any]]:
        """Per family × dtype × solver, then per solver over all instances (family ``all``)."""
        groups: dict[tuple[str, str, str], list[Run]] = {}
        for r in self.runs:
            groups.setdefault((r.family, r.dtype, r.solver), []).append(r)
            groups.setdefault(("all", "", r.solver), []).append(r)
        return [_summary_row(f, d, s, rs) for (f, d, s), rs in groups.items()]

    def _against_acgd(self, solver: str) -> dict[str, Any]:
        """``solver``'s standing: converged fraction over all runs, and per target column the family ×
        dtype rows where its median is not ≤ ACGD's (``keys``: the rows both ran)."""
        rows = self.summary()
        allrow = next(r for r in rows if r["family"] == "all" and r["solver"] == solver)
        peer = Entry(ACGD, grid="").label
        per = {(r["family"], r["dtype"], r["solver"]): r for r in rows if r["family"] != "all"}
        keys = sorted({(f, d) for f, d, s in per if s == peer and (f, d, solver) in per})
        misses: dict[str, list[str]] = {}
        budget = self.settings["budget"]
        for col in ("median_iterations", "median_wall_s"):
            misses[col] = []
            for f, d in keys:
                a, b = per[(f, d, solver)][col], per[(f, d, peer)][col]
                if not (math.isfinite(a) and a <= b):
                    misses[col].append(f"{f} {d}: {_fmt(a, col, budget)} vs {_fmt(b, col, budget)}"
                                       + (f" ({a / b:.2f}x)" if math.isfinite(a) and math.isfinite(b) else ""))
        return {"fraction": allrow["converged_fraction"], "runs": allrow["runs"], "keys": keys, "misses": misses,
                "median_wall_s": allrow["median_wall_s"]}

    def best(self) -> str | None:
        """The hcc solver at its defaults that meets the most targets: converged on >= 95% of the runs first,
        then the fewest family x dtype rows where its median iterations or wall-clock exceed ACGD's, then the
        highest converged fraction, then the least median wall-clock over all runs."""
        cands = [e for e in self.default_entries if any(r.solver == e for r in self.runs)]
        if not cands:
            return None

        def key(e: str) -> tuple:
            a = self._against_acgd(e)
            return (a["fraction"] < 0.95, sum(len(m) for m in a["misses"].values()), -a["fraction"],
                    a["median_wall_s"])

        return min(cands, key=key)

    def targets(self) -> list[str]:
        """The targets, each ``[met]`` or ``[not met]`` with the numbers, for the best hcc solver; then one
        line per other hcc solver at its defaults."""
        best = self.best()
        if best is None:
            return ["[not met] no hcc solver at its defaults in this run"]
        budget = self.settings["budget"]
        a = self._against_acgd(best)
        frac = a["fraction"]
        out = [f"best hcc solver at its defaults: {best} (the one meeting the most targets)",
               f"{_met(frac >= 0.95)} {best} converges on {100 * frac:.1f}% of {a['runs']} runs (instances x "
               f"dtypes) within {budget} steps (target >= 95%"
               + ("" if frac >= 0.95 else f", short by {100 * (0.95 - frac):.1f} points") + ")"]
        keys = a["keys"]
        for what, col in (("median iterations", "median_iterations"), ("median wall-clock", "median_wall_s")):
            if not keys:
                out.append(f"[not met] {what} <= ACGD's on every family: ACGD was not run")
                continue
            misses = a["misses"][col]
            out.append(f"{_met(not misses)} {what} <= ACGD's on {len(keys) - len(misses)}/{len(keys)} family x dtype "
                       "rows" + (f"; missed: {'; '.join(misses)}" if misses else ""))
        if self.rps_check is not None:
            c = self.rps_check
            ok = c["median_iterations"] <= 10
            out.append(f"{_met(ok)} rps (λ = 0.1): {c['solver']} reaches V <= {c['tol']:g} in a median of "
                       f"{_fmt(c['median_iterations'], 'median_iterations', c['budget'])} iterations (max "
                       f"{_fmt(c['max_iterations'], 'median_iterations', c['budget'])}; {len(c['iterations'])} seeds; "
                       f"target <= 10" + ("" if ok else f", over by {_fmt(c['median_iterations'] - 10, 'x', 0)}")
                       + ")")
        for e in self.default_entries:
            if e == best or not any(r.solver == e for r in self.runs):
                continue
            o = self._against_acgd(e)
            n = len(o["keys"])
            out.append(f"[info] {e}: converges on {100 * o['fraction']:.1f}%"
                       + (f"; median iterations <= ACGD's on {n - len(o['misses']['median_iterations'])}/{n} rows, "
                          f"wall-clock on {n - len(o['misses']['median_wall_s'])}/{n}" if n else ""))
        return out

    def markdown(self) -> str:
        s = self.settings
        rows = self.summary()
        by = {(r["family"], r["dtype"], r["solver"]): r for r in rows}
        fams = list(dict.fromkeys((r["family"], r["dtype"]) for r in rows if r["family"] != "all")) + [("all", "")]
        cols = self.entries
        budget = s["budget"]
        head = f"| family | dtype | runs | {' | '.join(cols)} |\n|---|---|---|{'---|' * len(cols)}"

        def table(key: str) -> str:
            lines = [head]
            for f, d in fams:
                n = next((by[(f, d, c)]["runs"] for c in cols if (f, d, c) in by), 0)
                cells = [_fmt(by[(f, d, c)][key], key, budget) if (f, d, c) in by else "" for c in cols]
                lines.append(f"| {f} | {d} | {n} | {' | '.join(cells)} |")
            return "\n".join(lines)

        parts = [
            f"hcc {s['versions']['hcc']}, torch {s['versions']['torch']}, {s['threads']} thread(s), CPU; "
            f"V <= {s['tol']:g} within {budget} steps; {sum(s['instances'].values())} instances (numbered from 0), "
            f"dtypes {', '.join(s['dtypes'])}; step sizes of the baselines picked on {s['tune_instances']} "
            f"other instances per family (numbered from {TUNE_OFFSET}, float64, {s['tune_budget']} steps); "
            f"wall-clock: time inside the steps (noisy on a shared machine). Suite time {self.wall_time_s:.0f} s"
            + (f" (in {len(s['families'])} runs merged; each family's solvers side by side in one run)."
               if s.get("merged") else "."),
            f"\n### converged fraction within {budget} steps\n", table("converged_fraction"),
            f"\n### median iterations to V <= {s['tol']:g} (>{budget}: more than half did not converge)\n",
            table("median_iterations"),
            f"\n### median wall-clock (s) to V <= {s['tol']:g}\n", table("median_wall_s"),
            "\n### median final V\n", table("median_final_V"),
        ]
        if self.tuning:
            parts.append("\n### baselines' step sizes (picked per family on the tuning instances; x: factor of the "
                         "solver's default for each instance)\n")
            labels = list(dict.fromkeys(lab for t in self.tuning.values() for lab in t))
            parts.append(f"| family | {' | '.join(labels)} |\n|---|{'---|' * len(labels)}")
            for fam, t in self.tuning.items():
                cells = [_pick(t[lab]) if lab in t else "" for lab in labels]
                parts.append(f"| {fam} | {' | '.join(cells)} |")
        parts += ["\n### targets\n", *[f"- {t}" for t in self.targets()]]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"schema_version": SCHEMA_VERSION, "settings": self.settings,
                          "wall_time_s": self.wall_time_s, "instances": [i.to_dict() for i in self.instances],
                          "tuning": self.tuning, "summary": self.summary(), "targets": self.targets(),
                          "rps_check": self.rps_check, "runs": [asdict(r) for r in self.runs]})

    def save(self, out: str | Path) -> Path:
        """``suite.json`` (everything), ``runs.csv`` (one row per run), ``summary.csv``, ``table.md``
        and ``payoffs.json`` (every matrix instance's payoff, inline text)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "suite.json").write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        write_history_csv([asdict(r) for r in self.runs], out / "runs.csv")
        write_history_csv(self.summary(), out / "summary.csv")
        (out / "table.md").write_text(self.markdown() + "\n")
        payoffs = {f"{i.family}/{i.index}": i.options["payoff"] for i in self.instances if "payoff" in i.options}
        (out / "payoffs.json").write_text(json.dumps(payoffs, indent=0))
        return out


    @classmethod
    def load(cls, path: str | Path) -> SuiteResult:
        """A saved suite run (its folder or its ``suite.json``)."""
        p = Path(path)
        f = p / "suite.json" if p.is_dir() else p
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise OptionError(f"{f}: expected a suite.json written by `hcc suite`, got {e}") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise OptionError(f"{f}: expected schema_version {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
        pf = f.parent / "payoffs.json"
        payoffs = json.loads(pf.read_text()) if pf.is_file() else {}
        insts = []
        for d in data["instances"]:
            key = f"{d['family']}/{d['index']}"
            opts = {"payoff": payoffs[key], **d["options"]} if key in payoffs else d["options"]
            insts.append(Instance(**{**d, "options": opts}))
        runs = [Run(**{**r, "V0": _nan_if_none(r["V0"]), "final_V": _inf_if_none(r["final_V"])})
                for r in data["runs"]]
        check = data.get("rps_check")
        if check is not None:
            check = {**check, "iterations": [_inf_if_none(x) for x in check["iterations"]],
                     "median_iterations": _inf_if_none(check["median_iterations"]),
                     "max_iterations": _inf_if_none(check["max_iterations"])}
        return cls(data["settings"], insts, data["tuning"], runs, check, data["wall_time_s"])


def merge(results: Sequence[SuiteResult]) -> SuiteResult:
    """One result from suite runs of different families (e.g. one run per family); they must share the
    step budget and the tolerance. Each family's solvers ran side by side in its own run."""
    if not results:
        raise OptionError("merge: expected at least one suite result, got none")
    first = results[0].settings
    settings = {**first, "families": [], "instances": {}, "solvers": [], "merged": len(results) > 1}
    out = SuiteResult(settings, [], {}, [])
    for r in results:
        for key in ("budget", "tol"):
            if r.settings[key] != first[key]:
                raise OptionError(f"merge: expected the same {key} in every run, got {first[key]} and "
                                  f"{r.settings[key]}")
        dup = set(r.settings["families"]) & set(settings["families"])
        if dup:
            raise OptionError(f"merge: expected each family in one run, got {sorted(dup)} twice")
        settings["families"] += r.settings["families"]
        settings["dtypes"] = list(dict.fromkeys(settings["dtypes"] + r.settings["dtypes"]))
        settings["instances"].update(r.settings["instances"])
        settings["solvers"] += [s for s in r.settings["solvers"] if s not in settings["solvers"]]
        out.instances += r.instances
        out.runs += r.runs
        out.tuning.update(r.tuning)
        out.rps_check = r.rps_check or out.rps_check
        out.wall_time_s += r.wall_time_s
    return out


def _inf_if_none(x: float | None) -> float:
    return math.inf if x is None else float(x)


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _summary_row(family: str, dtype: str, solver: str, runs: list[Run]) -> dict[str, Any]:
    it = [r.iterations if r.iterations is not None else math.inf for r in runs]
    wall = [r.wall_s if r.status == "converged" else math.inf for r in runs]
    return {"family": family, "dtype": dtype, "solver": solver, "runs": len(runs),
            "converged_fraction": sum(r.status == "converged" for r in runs) / len(runs),
            "diverged": sum(r.status == "diverged" for r in runs),
            "median_iterations": statistics.median(it), "median_wall_s": statistics.median(wall),
            "median_final_V": statistics.median(r.final_V for r in runs)}


def _met(ok: bool) -> str:
    return "[met]" if ok else "[not met]"


def _cell_iter(x: float, budget: int) -> str:
    return f">{budget}" if not math.isfinite(x) else f"{x:g}"


def _fmt(x: float, key: str, budget: int) -> str:
    if key == "converged_fraction":
        return f"{100 * x:.0f}%"
    if key == "median_iterations":
        return _cell_iter(x, budget)
    if key == "median_wall_s":
        return "-" if not math.isfinite(x) else f"{x:.3f}"
    if key == "median_final_V":
        return "inf" if not math.isfinite(x) else f"{x:.1e}"
    return f"{x:g}"


def _pick(t: dict[str, Any]) -> str:
    factor = (t["grid"] or "").strip().lower().startswith("x")
    return f"{'x' if factor else ''}{t['pick']:g} of {{{t['grid']}}}"


def parse_entries(solvers: Sequence[str], baselines: Sequence[str], grids: dict[str, str] | None = None,
                  options: dict[str, dict[str, Any]] | None = None) -> list[Entry]:
    """Entries for ``solvers`` (at defaults) and ``baselines`` (tuned from ``grids``, default
    :data:`BASELINE_GRIDS`); ``options[name]`` are the solver's options. Names are checked."""
    grids = {**BASELINE_GRIDS, **(grids or {})}
    options = options or {}
    out = []
    for name in [*solvers, *baselines]:
        if name != ACGD:
            check_solver_name(name)
        elif options.get(name):
            raise OptionError(f"acgd: expected no solver options, got {options[name]}")
    for name in solvers:
        if name == ACGD:
            raise OptionError("acgd: expected it among the baselines (it has no default step size), got it in solvers")
        out.append(Entry(name, dict(options.get(name, {}))))
    for name in baselines:
        if name not in grids:
            raise OptionError(f"baseline {name!r}: expected a step-size grid for it (e.g. {name}=x0.5,x1,x2), got none")
        try:
            _, factors = parse_grid(grids[name])
        except OptionError as e:
            raise OptionError(f"grid of {name!r}: {str(e).removeprefix('--lr-grid: ')}") from None
        if name == ACGD and factors is not None:
            raise OptionError(f"grid of 'acgd': expected absolute step sizes (it has no default), got {grids[name]!r}")
        out.append(Entry(name, dict(options.get(name, {})), grids[name]))
    return out


def rps_check(solver: str, seeds: Sequence[int], *, tol: float = 1e-8, budget: int = BUDGET,
              options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Iterations of ``solver`` (at its defaults) to ``V ≤ tol`` on ``rps`` (λ = 0.1, its default maps), float64."""
    its = []
    for s in seeds:
        g = make_game("rps", {"lam": 0.1}, seed=s).to(torch.float64)
        res = solve(g, make_solver(solver, g, options=options), steps=budget, tol=tol, seed=s, log_every=budget + 1)
        its.append(res.steps_to_tol if res.steps_to_tol is not None else math.inf)
    return {"solver": solver, "tol": tol, "budget": budget, "seeds": list(seeds), "iterations": its,
            "median_iterations": statistics.median(its), "max_iterations": max(its)}


def run_family(
    family: str,
    entries: Sequence[Entry],
    *,
    instances: int | None,
    tune_instances: int,
    dtypes: Sequence[str],
    budget: int,
    tune_budget: int,
    tol: float,
    progress: Callable[[str], None] | None = None,
    stream: str | Path | None = None,
) -> tuple[list[Instance], dict[str, dict[str, Any]], list[Run]]:
    """One family: pick the baselines' step sizes on its tuning instances, then run every entry on every
    instance in every dtype. Returns the instances, the tuning records and the runs."""
    torch.set_num_threads(1)
    fam = FAMILIES[family]
    say = progress or (lambda _: None)
    insts = fam.instances(instances)
    tuning, picks = {}, {}
    for e in entries:
        if e.grid is not None:
            tuning[e.label] = tune(fam, e, tune_instances, budget=tune_budget, tol=tol, progress=progress)
            picks[e.label] = tuning[e.label]["pick"]
    runs = []
    with open(stream, "a") if stream is not None else contextlib.nullcontext() as sink:
        for dtype in dtypes:
            for e in entries:  # first calls pay one-off costs (imports, kernels): a short untimed run
                run_entry(insts[0], dtype, e, picks.get(e.label), budget=3, tol=1e-300)
            for inst in insts:
                for e in entries:
                    r = run_entry(inst, dtype, e, picks.get(e.label), budget=budget, tol=tol)
                    runs.append(r)
                    if sink is not None:
                        sink.write(json.dumps(_jsonable(asdict(r))) + "\n")
                        sink.flush()
                    say(f"{fam.name} #{inst.index} {dtype} {e.label}: {r.status}, iterations "
                        f"{_cell_iter(r.iterations or math.inf, budget)}, {r.wall_s:.2f} s, V {r.final_V:.1e}")
    return insts, tuning, runs


def run_suite(
    families: Sequence[str],
    solvers: Sequence[str],
    baselines: Sequence[str] = ("eg", "consensus", ACGD),
    *,
    instances: int | None = None,
    tune_instances: int = 2,
    dtypes: Sequence[str] = ("float64", "float32"),
    budget: int = BUDGET,
    tune_budget: int = TUNE_BUDGET,
    tol: float = TOL,
    grids: dict[str, str] | None = None,
    solver_options: dict[str, dict[str, Any]] | None = None,
    check_rps: bool = True,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
    stream: str | Path | None = None,
) -> SuiteResult:
    """Run ``solvers`` (at defaults) and ``baselines`` (tuned per family) on ``instances`` instances of
    each family (default: :attr:`Family.default_instances`), in each dtype (:func:`run_family`).

    ``baselines`` may include ``"acgd"`` (CGDs); without CGDs installed it is left out (and said so
    through ``progress``). With ``check_rps`` and ``rps`` among the families, the best hcc solver's
    iterations to ``V ≤ 1e-8`` on ``rps`` are measured too. ``jobs > 1`` runs families in that many
    processes (each single-threaded; their timings then share the machine). ``stream``: a file that
    gets each run as one JSON line as soon as it is done.
    """
    t_start = time.perf_counter()
    for name, val in (("instances", instances), ("tune_instances", tune_instances), ("budget", budget),
                      ("tune_budget", tune_budget), ("tol", tol), ("jobs", jobs)):
        check_positive(name, val)
    fams = [FAMILIES[f] for f in families]
    for d in dtypes:
        resolve_dtype(d)
    say = progress or (lambda _: None)
    if ACGD in baselines and not cgds_available():
        say("acgd: CGDs is not installed (pip install 'hcc[peers]'); left out")
        baselines = [b for b in baselines if b != ACGD]
    entries = parse_entries(solvers, baselines, grids, solver_options)
    res = SuiteResult(settings={
        "families": list(families), "solvers": [e.label for e in entries],
        "instances": {f.name: instances or f.default_instances for f in fams}, "tune_instances": tune_instances,
        "dtypes": list(dtypes), "budget": budget, "tune_budget": tune_budget, "tol": tol, "jobs": jobs,
        "grids": {e.label: e.grid for e in entries if e.grid is not None}, "threads": 1,
        "versions": {"hcc": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "numpy": np.__version__},
    }, instances=[], tuning={}, runs=[])
    kwargs = {"instances": instances, "tune_instances": tune_instances, "dtypes": dtypes, "budget": budget,
              "tune_budget": tune_budget, "tol": tol, "stream": stream}
    if jobs == 1:
        outs = [run_family(f.name, entries, progress=progress, **kwargs) for f in fams]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            futs = [pool.submit(run_family, f.name, entries, progress=_stderr if progress else None, **kwargs)
                    for f in fams]
            outs = [f.result() for f in futs]
    for fam, (insts, tuning, runs) in zip(fams, outs):
        res.instances += insts
        res.runs += runs
        if tuning:
            res.tuning[fam.name] = tuning
    best = res.best()
    if check_rps and best is not None and "rps" in families:
        entry = next(e for e in entries if e.label == best)
        res.rps_check = rps_check(entry.solver, RPS_CHECK_SEEDS, budget=budget, options=entry.options)
    res.wall_time_s = time.perf_counter() - t_start
    return res


def _stderr(line: str) -> None:
    """Progress from a worker process (a picklable callback)."""
    print(line, file=sys.stderr, flush=True)


__all__ = [
    "ACGD", "BASELINE_GRIDS", "BUDGET", "DEFAULT_SOLVERS", "FAMILIES", "QUICK", "TOL", "TUNE_BUDGET", "Entry", "Family",
    "Instance", "Run", "SuiteResult", "cgds_available", "merge", "nashpy_crosscheck", "parse_entries", "payoff_text",
    "rps_check", "run_entry", "run_family", "run_suite", "tune",
]
