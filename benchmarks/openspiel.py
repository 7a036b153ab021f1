r"""hcc's solvers against OpenSpiel's tabular ones on OpenSpiel's poker games.

For each game (default: Kuhn and Leduc poker) it runs

- **CFR+** (Tammelin 2014), OpenSpiel's C++ ``pyspiel.CFRPlusSolver`` and, with
  ``--python-cfr``, its Python ``cfr.CFRPlusSolver``: the exploitability of the *average*
  policy after each iteration, until the target or the time budget;
- the **sequence-form LP**: our scipy/HiGHS LP on OpenSpiel's sequence-form matrices
  (:func:`hcc.games.sequence_form.solve_lp`) and, where cvxpy has its ECOS solver, OpenSpiel's
  own ``sequence_form_lp`` (value and seconds);
- **hcc solvers** on the ``openspiel`` game (neural policies, one network per player):
  the last iterate's exploitability, recorded at every logged step.

Every exploitability is OpenSpiel's own (``exploitability.exploitability`` = NashConv / 2),
computed outside the clocks. Wall-clock is the solver's time only: CFR+'s
``evaluate_and_update_policy`` calls, and hcc's ``Solver.step`` calls (``time_s`` of the
run's history). Writes ``<out>/exploitability.png`` (per game: exploitability against
iterations and against seconds) and ``<out>/table.md``, and prints the table.

Timings on a shared machine are noisy; the rows of one table come from one run.

Usage::

    python benchmarks/openspiel.py                      # Kuhn and Leduc, default solvers
    python benchmarks/openspiel.py --games kuhn_poker --hcc kfac-natgrad@0.1 eg:strategy=realization
    python benchmarks/openspiel.py --quick              # smoke run: short budgets
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

import hcc
from hcc.games.openspiel import sequence_form
from hcc.plots import plot_metric
from hcc.registry import parse_key_values
from hcc.run import Result

#: exploitability targets (OpenSpiel's definition) of the issue, per game
TARGETS = {"kuhn_poker": 1e-4, "leduc_poker": 1e-2}
#: hcc solvers run by default, ``NAME[@LR][:game options]`` (no LR: the registry's step × the game's lr_scale)
DEFAULT_HCC = {
    "kuhn_poker": ["exact-natgrad", "cg-natgrad", "kfac-natgrad", "eg+kfac", "adam@0.01"],
    "leduc_poker": ["kfac-natgrad", "kfac-natgrad:strategy=realization", "adam@0.001"],
}
METRIC = "openspiel_exploitability"


@dataclass
class Trace:
    """One method's record: exploitability against iterations and solver seconds."""

    label: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    expl: list[float] = field(default_factory=list)
    note: str = ""

    def add(self, step: int, seconds: float, expl: float) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.expl.append(expl)

    def first_below(self, target: float) -> tuple[int, float] | None:
        """``(iterations, seconds)`` of the first record with exploitability ≤ ``target``."""
        return next(((s, t) for s, t, e in zip(self.steps, self.seconds, self.expl) if e <= target), None)

    def as_result(self) -> Result:
        """The trace as an hcc :class:`~hcc.run.Result`, so :func:`hcc.plots.plot_metric` draws it."""
        hist = [{"step": s, "time_s": t, METRIC: e} for s, t, e in zip(self.steps, self.seconds, self.expl)]
        return Result(game="openspiel", game_options={}, solver=self.label, solver_options={}, seed=0,
                      history=hist)


def log_steps(n: int, per_decade: int = 12) -> set[int]:
    """About ``per_decade`` logarithmically spaced iteration counts in ``1 … n``."""
    k = max(1, int(per_decade * math.log10(max(n, 10))))
    return {max(1, round(10 ** (i * math.log10(n) / k))) for i in range(k + 1)} | {n}


def run_cfr(name: str, target: float, max_iters: int, budget_s: float, python: bool) -> Trace:
    """CFR+ until the average policy's exploitability is ≤ ``target``/10, ``max_iters`` or ``budget_s``."""
    import pyspiel
    from open_spiel.python.algorithms import cfr, exploitability

    game = sequence_form(name).game
    if python:
        solver, label = cfr.CFRPlusSolver(game), "CFR+ (OpenSpiel, Python)"

        def expl() -> float:
            return exploitability.exploitability(game, solver.average_policy())
    else:
        solver, label = pyspiel.CFRPlusSolver(game), "CFR+ (OpenSpiel, C++)"

        def expl() -> float:
            return pyspiel.exploitability(game, solver.average_policy())

    trace, clock, marks = Trace(label), 0.0, log_steps(max_iters)
    for it in range(1, max_iters + 1):
        t0 = time.perf_counter()
        solver.evaluate_and_update_policy()
        clock += time.perf_counter() - t0
        if it in marks or clock > budget_s:
            trace.add(it, clock, float(expl()))
            if trace.expl[-1] <= target / 10 or clock > budget_s:
                break
    return trace


def run_lp(name: str) -> list[tuple[str, float | None, float | None, str]]:
    """``(method, value for player 0, seconds, note)`` of the sequence-form LPs."""
    game = hcc.make_game("openspiel", {"name": name}).double()
    t0 = time.perf_counter()
    v, *_ = game.lp()
    rows = [("sequence-form LP (scipy HiGHS, hcc)", -v, time.perf_counter() - t0, "")]
    try:
        import cvxpy as cp
        from open_spiel.python.algorithms import sequence_form_lp
    except ImportError:
        return rows + [("sequence-form LP (OpenSpiel, cvxpy)", None, None, "cvxpy not installed")]
    if "ECOS" not in cp.installed_solvers():
        return rows + [("sequence-form LP (OpenSpiel, cvxpy)", None, None, "needs cvxpy's ECOS (pip install ecos)")]
    t0 = time.perf_counter()
    v0, *_ = sequence_form_lp.solve_zero_sum_game(sequence_form(name).game)
    return rows + [("sequence-form LP (OpenSpiel, cvxpy/ECOS)", float(v0), time.perf_counter() - t0, "")]


def run_hcc(name: str, spec: str, steps: int, log_every: int, target: float, game_opts: dict[str, Any],
            solver_opts: dict[str, Any], budget_s: float) -> Trace:
    """One hcc solver (``NAME[@LR][:KEY=VALUE,…]``, the pairs are game options) on the game,
    OpenSpiel's exploitability at every logged step."""
    head, _, extra = spec.partition(":")
    solver, _, lr = head.partition("@")
    own = parse_key_values([kv for kv in extra.split(",") if kv])
    game = hcc.make_game("openspiel", {"name": name, **game_opts, **own}).double()
    s = hcc.make_solver(solver, game, lr=float(lr) if lr else None, options=solver_opts)
    extras = [str(v) for v in own.values()] + [f"{k}={v}" for k, v in (solver_opts or {}).items()]
    trace = Trace(f"{solver} (lr = {s.lr:.3g}{''.join(f', {e}' for e in extras)})")

    def record(step: int, row: dict[str, float]) -> None:  # every logged step after the first
        if METRIC in row:
            trace.add(step, row["time_s"], row[METRIC])
        if row["time_s"] > budget_s:
            raise _Budget

    try:
        hcc.solve(game, s, steps=steps, tol=2 * target / 10, log_every=log_every, progress=record)
    except _Budget:
        trace.note = f"stopped at the {budget_s:g} s budget"
    return trace


class _Budget(Exception):
    """Raised from the progress callback when a run is past its time budget."""


def table(name: str, target: float, traces: Sequence[Trace], lps: Sequence[tuple[str, Any, Any, str]]) -> str:
    lines = [f"### {name}: exploitability (OpenSpiel's, NashConv/2) — target ≤ {target:g}", "",
             "| method | iterations | solver seconds | final exploitability | iterations to target | "
             "seconds to target | ms / iteration |", "|---|---:|---:|---:|---:|---:|---:|"]
    for tr in traces:
        hit = tr.first_below(target)
        it, sec = (str(hit[0]), f"{hit[1]:.2f}") if hit else ("—", "—")
        per = 1e3 * tr.seconds[-1] / max(tr.steps[-1], 1)
        lines.append(f"| {tr.label}{' — ' + tr.note if tr.note else ''} | {tr.steps[-1]} | {tr.seconds[-1]:.2f} | "
                     f"{tr.expl[-1]:.2e} | {it} | {sec} | {per:.2f} |")
    lines += ["", "| LP | value (player 0) | seconds | note |", "|---|---:|---:|---|"]
    for method, v, sec, note in lps:
        lines.append(f"| {method} | {'—' if v is None else f'{v:.6f}'} | {'—' if sec is None else f'{sec:.2f}'} "
                     f"| {note} |")
    return "\n".join(lines)


def figure(results: dict[str, tuple[float, list[Trace]]]) -> Figure:
    fig = Figure(figsize=(10, 3.8 * len(results)), layout="constrained")
    axes = fig.subplots(len(results), 2, squeeze=False)
    for row, (name, (target, traces)) in zip(axes, results.items()):
        runs = [t.as_result() for t in traces]
        for ax, x in zip(row, ("step", "time_s")):
            plot_metric(ax, runs, METRIC, x=x, labels=[t.label for t in traces], log=True, tol=target)
            ax.set_xscale("log")
            ax.set_ylabel("exploitability (OpenSpiel)")
            ax.set_title(f"{name}: against {'iterations' if x == 'step' else 'solver seconds'}", fontsize=10)
        row[0].legend(fontsize=7, loc="lower left")
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--games", nargs="+", default=list(TARGETS), help="OpenSpiel game names  [kuhn_poker leduc_poker]")
    ap.add_argument("--hcc", nargs="*", default=None,
                    help="hcc solvers as NAME[@LR][:KEY=VALUE,…] (game options)  [per game: DEFAULT_HCC]")
    ap.add_argument("-g", "--game-opt", action="append", default=[], help="openspiel game option KEY=VALUE")
    ap.add_argument("-S", "--solver-opt", action="append", default=[], help="solver option KEY=VALUE")
    ap.add_argument("--steps", type=int, default=None, help="max hcc steps  [kuhn 5000, others 2000]")
    ap.add_argument("--log-every", type=int, default=None, help="hcc log interval  [kuhn 10, others 25]")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds per method and game  [600]")
    ap.add_argument("--cfr-iters", type=int, default=100_000, help="max CFR+ iterations  [100000]")
    ap.add_argument("--python-cfr", action="store_true", help="also run OpenSpiel's Python CFR+")
    ap.add_argument("--out", type=Path, default=Path("docs/openspiel"), help="output folder  [docs/openspiel]")
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 hcc steps, 20 s budgets")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.budget, a.cfr_iters = 100, 20.0, 2000
    torch.set_num_threads(1)
    game_opts, solver_opts = parse_key_values(a.game_opt), parse_key_values(a.solver_opt)
    results: dict[str, tuple[float, list[Trace]]] = {}
    texts = []
    for name in a.games:
        target = TARGETS.get(name, 1e-3)
        log_every = a.log_every or (10 if name == "kuhn_poker" else 25)
        steps = a.steps or (5000 if name == "kuhn_poker" else 2000)
        traces = [run_cfr(name, target, a.cfr_iters, a.budget, python=False)]
        if a.python_cfr:
            traces.append(run_cfr(name, target, a.cfr_iters, a.budget, python=True))
        for spec in a.hcc if a.hcc is not None else DEFAULT_HCC.get(name, ["eg"]):
            traces.append(run_hcc(name, spec, steps, log_every, target, game_opts, solver_opts, a.budget))
            print(f"  {name}: {traces[-1].label} done ({traces[-1].seconds[-1]:.0f} s)", flush=True)
        texts.append(table(name, target, traces, run_lp(name)))
        print("\n" + texts[-1] + "\n", flush=True)
        results[name] = (target, traces)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "table.md").write_text("\n\n".join(texts) + "\n")
    figure(results).savefig(a.out / "exploitability.png", dpi=130)
    print(f"wrote {a.out / 'table.md'} and {a.out / 'exploitability.png'}")


if __name__ == "__main__":
    main()
