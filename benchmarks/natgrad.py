r"""Natural-gradient benchmark: iterations to ``V ≤ tol`` and time per step for every named solver.

For ``rps`` and ``matching-pennies`` (λ = 0.1, float64, CPU, one thread) every named
solver, ``eg`` on the functional parametrization (``param=functional``: projected
extragradient in function space) and undamped exact natural extragradient
(``eg+exact``, ``damping=0``) get their step size tuned on a small grid around their
default: the best step minimizes the median over seeds of the iterations to
``V ≤ tol`` (ties and never-converging solvers: the median final ``V``). Reported:
the best step, the median iterations (``>max`` if the median run never got there),
the converged runs, the time per step and both ratios to simultaneous GDA's best.

Time per step is ``Result.history[-1]["time_s"] / steps_run`` from :func:`hcc.solve`:
the cumulative time spent inside ``Solver.step`` only (the runner evaluates ``V``
outside it; ``log_every`` is larger than the run, so the full metrics are computed
twice per run, outside the clock too). With other processes on the machine it is
the best (minimum) over the seeds' runs at the best step.

Per game, a K-FAC table reruns ``kfac-natgrad`` at its tuned step without the per-step
cosine diagnostic and with factor inverses refreshed every 5 and 10 steps: what a K-FAC
step costs, and against the plain solver of the same rule (``eg``), what the options buy.

A second table times one exact natural direction (both players,
``Exact.direction``) with the per-sample Jacobian backends: ``func``
(``vmap(jacrev)``; with ``method=auto`` MLPs take the structured kernel and never
form ``J``), ``func`` with ``method=kernel`` (``J`` formed, the like-for-like
comparison) and ``backpack`` (``BatchGrad``, ``J`` formed, kernel solve).

Usage::

    python benchmarks/natgrad.py            # full run: ~18 minutes on 2 shared CPU cores
    python benchmarks/natgrad.py --quick    # smoke run: 1 seed, 3-point grids, 600 steps
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import hcc
from hcc.registry import build_options
from hcc.solvers import BOTH, SOLVERS
from hcc.solvers.natural import Exact, ExactOptions

PLAIN = ("gda", "alt-gda", "eg", "ogda", "negmom", "consensus", "hamiltonian", "nsgda", "adam")
NATURAL = ("exact-natgrad", "cg-natgrad", "kfac-natgrad", "diag-natgrad")
GAMES = ("rps", "matching-pennies")
FUNCTIONAL = "eg [functional]"
UNDAMPED = "eg+exact [λ=0]"
#: simultaneous natural GDA: one natural direction per step, like GDA's one gradient (the per-step cost)
NAT_GDA = "gda+exact"


@dataclass
class Entry:
    """One table row: a solver (by name), its options and the step sizes tried."""

    label: str
    solver: str
    grid: list[float]
    max_steps: int
    game_options: dict[str, Any] = field(default_factory=dict)
    solver_options: dict[str, Any] = field(default_factory=dict)
    natural: bool = False


@dataclass
class Outcome:
    """The runs of one entry at one step size (one per seed)."""

    lr: float
    iters: list[float]  # math.inf where V ≤ tol was not reached
    final_V: list[float]
    ms_per_step: list[float]
    max_steps: int

    @property
    def median_iters(self) -> float:
        return statistics.median(self.iters)

    @property
    def median_V(self) -> float:
        return statistics.median(self.final_V)

    @property
    def converged(self) -> int:
        return sum(math.isfinite(i) for i in self.iters)

    @property
    def ms(self) -> float:
        return min(self.ms_per_step)

    def key(self) -> tuple[float, float]:
        return self.median_iters, self.median_V


def run_once(game: str, entry: Entry, lr: float, seed: int, tol: float) -> tuple[float, float, float]:
    """``(iterations to V ≤ tol or inf, final V, ms per step)`` of one run."""
    g = hcc.make_game(game, {"lam": 0.1, **entry.game_options}, seed=seed).to(torch.float64)
    solver = hcc.make_solver(entry.solver, g, lr=lr, options=entry.solver_options)
    res = hcc.solve(g, solver, steps=entry.max_steps, tol=tol, seed=seed, log_every=entry.max_steps + 1)
    iters = float(res.steps_to_tol) if res.converged else math.inf
    V = res.final.get("lyapunov", math.inf) if res.status != "diverged" else math.inf
    ms = 1e3 * res.history[-1]["time_s"] / max(res.steps_run, 1)
    return iters, (V if V is not None and math.isfinite(V) else math.inf), ms


def evaluate_lr(game: str, entry: Entry, lr: float, seeds: Sequence[int], tol: float) -> Outcome:
    """Runs over ``seeds``; stops early once more than half failed (the median is then ``>max``)."""
    out = Outcome(lr, [], [], [], entry.max_steps)
    for seed in seeds:
        it, V, ms = run_once(game, entry, lr, seed, tol)
        out.iters.append(it)
        out.final_V.append(V)
        out.ms_per_step.append(ms)
        failed = len(out.iters) - out.converged
        if failed > len(seeds) // 2 and len(out.iters) < len(seeds):
            out.iters += [math.inf] * (len(seeds) - len(out.iters))  # the median is decided
            out.final_V += [math.inf] * (len(seeds) - len(out.final_V))
            break
    return out


def tune(game: str, entry: Entry, seeds: Sequence[int], tol: float) -> Outcome:
    return min((evaluate_lr(game, entry, lr, seeds, tol) for lr in entry.grid), key=Outcome.key)


def entries(game: str, grid: Sequence[float], nat_grid: Sequence[float], plain_steps: int,
            nat_steps: int, gda_steps: int) -> list[Entry]:
    """The rows: plain solvers on ``default × grid``, natural ones (and their function-space
    counterpart, EG on the functional parametrization) on ``default × nat_grid``. The
    reference, simultaneous GDA, gets ``gda_steps`` (it converges slowly, if at all)."""
    rows = []
    for name in PLAIN:
        lr0 = SOLVERS[name].default_lr(game)
        rows.append(Entry(name, name, [lr0 * m for m in grid], gda_steps if name == "gda" else plain_steps))
    nat0 = SOLVERS["exact-natgrad"].default_lr(game)
    rows.append(Entry(FUNCTIONAL, "eg", [nat0 * m for m in nat_grid], plain_steps, {"param": "functional"}))
    for name in NATURAL:
        lr0 = SOLVERS[name].default_lr(game)
        rows.append(Entry(name, name, [lr0 * m for m in nat_grid], nat_steps, natural=True))
    rows.append(Entry(UNDAMPED, "eg+exact", [nat0 * m for m in nat_grid], nat_steps, solver_options={"damping": 0.0},
                      natural=True))
    # Euler on the natural flow is stable only for h < 2a/(a² + b²): a small-step grid
    rows.append(Entry(NAT_GDA, NAT_GDA, [0.05 * m for m in nat_grid], nat_steps, natural=True))
    return rows


def plain_twin(name: str) -> str:
    """The plain named solver with ``name``'s update rule (``kfac-natgrad`` → ``eg``)."""
    spec = SOLVERS[name]
    return next(n for n in PLAIN if SOLVERS[n].rule == spec.rule and SOLVERS[n].rule_defaults == spec.rule_defaults)


#: K-FAC step-cost breakdown: the named solver's defaults, then without the per-step cosine
#: diagnostic (an exact solve per player) and with factor inverses refreshed every T steps
KFAC_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("defaults", {}),
    ("log_cosine=false", {"log_cosine": False}),
    ("log_cosine=false, refresh=5", {"log_cosine": False, "refresh": 5}),
    ("log_cosine=false, refresh=10", {"log_cosine": False, "refresh": 10}),
)


def kfac_cost_table(game: str, rows: list[tuple[Entry, Outcome]], seeds: Sequence[int], tol: float) -> None:
    """What a K-FAC step costs and what the options buy, at kfac-natgrad's tuned step."""
    by = {e.label: (e, o) for e, o in rows}
    entry, best = by["kfac-natgrad"]
    ref = by[plain_twin("kfac-natgrad")][1]
    print(f"\n{game}: kfac-natgrad at its tuned step {best.lr:.4g}, step cost against "
          f"{plain_twin('kfac-natgrad')} ({ref.ms:.2f} ms/step)\n")
    print("| kfac options | iterations | converged | ms/step | time / plain step | ms to tol |")
    print("|---|---|---|---|---|---|")
    for label, opts in KFAC_VARIANTS:
        e = Entry(label, "kfac-natgrad", [best.lr], entry.max_steps, entry.game_options,
                  {**entry.solver_options, **opts}, natural=True)
        o = evaluate_lr(game, e, best.lr, seeds, tol)
        total = f"{o.median_iters * o.ms:.0f}" if math.isfinite(o.median_iters) else "—"
        print(f"| {label} | {_fmt_iters(o)} | {o.converged}/{len(seeds)} | {o.ms:.2f} | {o.ms / ref.ms:.2f} "
              f"| {total} |")


def _fmt_iters(o: Outcome) -> str:
    return f"{o.median_iters:.0f}" if math.isfinite(o.median_iters) else f">{o.max_steps}"


def _iter_ratio(o: Outcome, ref: Outcome) -> str:
    a, b = o.median_iters, ref.median_iters
    if math.isfinite(a) and math.isfinite(b):
        return f"{a / b:.3g}"
    if math.isfinite(a):  # the reference never converged: an upper bound
        return f"<{a / ref.max_steps:.3g}"
    return "—"


def print_table(game: str, rows: list[tuple[Entry, Outcome]], n_seeds: int) -> None:
    ref = next(o for e, o in rows if e.label == "gda")
    print(f"\n### {game} (λ = 0.1): iterations to V ≤ tol, median over {n_seeds} seed(s), step tuned per row\n")
    print("| solver | best lr | iterations | converged | final V (median) | ms/step | iters / GDA | time / GDA |")
    print("|---|---|---|---|---|---|---|---|")
    for e, o in rows:
        print(f"| {e.label} | {o.lr:.4g} | {_fmt_iters(o)} | {o.converged}/{n_seeds} | {o.median_V:.1e} "
              f"| {o.ms:.2f} | {_iter_ratio(o, ref)} | {o.ms / ref.ms:.2f} |")


# -- targets ------------------------------------------------------------------------------------------


def targets(game: str, rows: list[tuple[Entry, Outcome]], same_step: dict[str, Outcome]) -> list[str]:
    by = {e.label: o for e, o in rows}
    gda = by["gda"]
    nat = [(e.label, o) for e, o in rows if e.natural and e.label not in (UNDAMPED, NAT_GDA)]
    best_label, best = min(nat, key=lambda t: t[1].key())
    lines = []

    def line(ok: bool | None | str, text: str) -> None:
        tag = ok if isinstance(ok, str) else "met" if ok else ("not met" if ok is False else "undecided")
        lines.append(f"[{tag:>9}] {game}: {text}")

    it = best.median_iters
    line(it <= 60, f"best natural solver ≤ 60 iterations: {best_label} {_fmt_iters(best)}")
    if math.isfinite(gda.median_iters):
        r = gda.median_iters / it
        line(r >= 100, f"≥ 100× fewer iterations than best-tuned GDA: {gda.median_iters:.0f} / {it:.0f} = {r:.3g}×")
    else:
        r = gda.max_steps / it
        line(True if r >= 100 else None,
             f"≥ 100× fewer iterations than best-tuned GDA: GDA >{gda.max_steps} (never reached V ≤ tol; best "
             f"final V {gda.median_V:.1e}), so the ratio is > {r:.3g}×")
    # the target is the exact metric (λ = 0); the named solver's Levenberg-Marquardt damping shortens
    # its function-space step (K(K + λ)⁻¹ g), so it is shown for information only
    for label in (UNDAMPED, "exact-natgrad"):
        o, f = by[label], same_step[label]
        ok = (lambda r: "info") if label == "exact-natgrad" else (lambda r: abs(r) <= 0.10)
        if math.isfinite(o.median_iters) and math.isfinite(f.median_iters):
            rel = o.median_iters / f.median_iters - 1
            line(ok(rel), f"{label} within 10% of EG on the functional parametrization at the same step "
                          f"{o.lr:.3g}: {o.median_iters:.0f} vs {f.median_iters:.0f} ({100 * rel:+.0f}%)")
        else:
            line(ok(1.0), f"{label} vs functional EG at step {o.lr:.3g}: {_fmt_iters(o)} vs {_fmt_iters(f)}")
    k, x = by["kfac-natgrad"], by["exact-natgrad"]
    if math.isfinite(k.median_iters) and math.isfinite(x.median_iters):
        r = k.median_iters / x.median_iters
        line(r <= 3, f"kfac-natgrad within 3× of exact-natgrad: {k.median_iters:.0f} / {x.median_iters:.0f} = {r:.2f}×")
    else:
        line(False, f"kfac-natgrad within 3× of exact-natgrad: {_fmt_iters(k)} vs {_fmt_iters(x)}")
    # the same update rule with and without the natural preconditioner: what a natural step costs
    for label, plain in ((NAT_GDA, "gda"), ("exact-natgrad", "eg"), (best_label, plain_twin(best_label))):
        o, p = by[label], by[plain]
        r = o.ms / p.ms
        line(r <= 5, f"a natural step within 5× a plain step: {label} {o.ms:.2f} ms / {plain} {p.ms:.2f} ms = {r:.2f}×")
    return lines


# -- Jacobian backends ----------------------------------------------------------------------------------


def time_direction(game_name: str, backend: str, method: str, repeats: int) -> tuple[float, str]:
    """Median ms of one exact natural direction (both players) and the method ``auto`` picked."""
    opts = {"lam": 0.1} if game_name != "gan" else {}
    game = hcc.make_game(game_name, opts, seed=0).to(torch.float64)
    params = game.init_params()
    batch = game.sample_batch(torch.Generator().manual_seed(0))
    pre = Exact(build_options(ExactOptions, {"backend": backend, "method": method}))
    state = pre.init(game, params)
    pre.direction(game, params, batch, state, BOTH)  # warm-up (BackPACK twin, allocations)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pre.direction(game, params, batch, state, BOTH)
        times.append(1e3 * (time.perf_counter() - t))
    from hcc.curvature.jacobians import output_dim
    from hcc.curvature.operators import choose_method

    xs = game.supports(params, batch)
    picked = []
    for m, p, x in zip(game.maps(), params, xs, strict=True):
        k = output_dim(m, p, x)
        picked.append(method if method != "auto" else
                      choose_method(m, x.shape[0], k, sum(t.numel() for t in p.values()), backend))  # type: ignore[arg-type]
    return statistics.median(times), "/".join(picked)


def backend_table(repeats: int) -> None:
    print(f"\n### Exact natural direction (both players), per-sample Jacobian backend: median ms of {repeats}\n")
    print("| game | n·k (min / max player) | func, method=auto | func, method=kernel | backpack (kernel) "
          "| faster default |")
    print("|---|---|---|---|---|---|")
    for g in ("rps", "matching-pennies", "gan"):
        game = hcc.make_game(g, {"lam": 0.1} if g != "gan" else {}, seed=0)
        params = game.init_params()
        batch = game.sample_batch(torch.Generator().manual_seed(0))
        F, G = game.strategies(params, batch)
        nk = f"{F[0].numel() * F.shape[0]} / {G[0].numel() * G.shape[0]}"
        cells, best = [], ("", math.inf)
        for backend, method in (("func", "auto"), ("func", "kernel"), ("backpack", "auto")):
            try:
                ms, picked = time_direction(g, backend, method, repeats)
            except Exception as e:  # noqa: BLE001  (report, don't crash the benchmark)
                cells.append(f"unsupported ({type(e).__name__})")
                continue
            cells.append(f"{ms:.2f} ({picked})")
            if method == "auto" and ms < best[1]:
                best = (backend, ms)
        print(f"| {g} | {nk} | {' | '.join(cells)} | {best[0]} |")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 3-point grids, 600 plain / 200 natural steps")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (median over them)  [3]")
    ap.add_argument("--plain-steps", type=int, default=3000, help="max steps of plain solvers  [3000]")
    ap.add_argument("--gda-steps", type=int, default=10000, help="max steps of the reference, GDA  [10000]")
    ap.add_argument("--nat-steps", type=int, default=300, help="max steps of natural solvers  [300]")
    ap.add_argument("--tol", type=float, default=1e-8, help="V tolerance  [1e-8]")
    ap.add_argument("--games", nargs="+", default=list(GAMES), choices=GAMES)
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per backend cell  [30]")
    ap.add_argument("--no-backends", action="store_true", help="skip the Jacobian-backend table")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    grid, nat_grid = (0.25, 0.5, 1.0, 2.0, 4.0), (0.5, 0.75, 1.0, 1.25, 1.5)
    if a.quick:
        a.seeds, a.plain_steps, a.gda_steps, a.nat_steps, a.repeats = 1, 600, 600, 200, 5
        grid, nat_grid = (0.5, 1.0, 2.0), (0.75, 1.0, 1.25)
    seeds = list(range(a.seeds))
    t0 = time.perf_counter()
    print(f"hcc {hcc.__version__}, torch {torch.__version__}, float64, 1 thread; tol {a.tol:g}; seeds {seeds}; "
          f"plain grid default×{grid} (max {a.plain_steps} steps, GDA {a.gda_steps}), natural grid default×{nat_grid} "
          f"(max {a.nat_steps} steps; eg [functional] uses exact-natgrad's default and grid)")
    all_targets: list[str] = []
    for game in a.games:
        rows = [(e, tune(game, e, seeds, a.tol))
                for e in entries(game, grid, nat_grid, a.plain_steps, a.nat_steps, a.gda_steps)]
        print_table(game, rows, len(seeds))
        fun = next(e for e, _ in rows if e.label == FUNCTIONAL)
        same = {label: evaluate_lr(game, fun, o.lr, seeds, a.tol)
                for e, o in rows for label in (e.label,) if label in ("exact-natgrad", UNDAMPED)}
        for label, o in same.items():
            print(f"\n{FUNCTIONAL} at {label}'s step {o.lr:.4g}: {_fmt_iters(o)} iterations "
                  f"({o.converged}/{len(seeds)} converged)", end="")
        print()
        kfac_cost_table(game, rows, seeds, a.tol)
        all_targets += targets(game, rows, same)
    if not a.no_backends:
        backend_table(a.repeats)
    print("\n### Targets\n")
    print("\n".join(all_targets))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
