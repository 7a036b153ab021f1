r"""Natural solvers against nSGDA and Adam on the continuous GANs (2-D ring and grid, 8×8 digits).

For the 2-D mixtures (``gan``, ``-g dataset=ring|grid``, ``--seeds`` seeds each, float32):

- the reference is **nSGDA** after ``--ref-steps`` steps (3000) at its registry step: its final
  MMD² to the data is each seed's *target*;
- every other solver runs ``--steps`` steps (default: 3000; ``kfac-gda``-type solvers on the ring
  1000) and the table gives, per solver, the seeds that reach their seed's target, the median
  solver seconds to it against nSGDA's seconds for all its steps, and the modes covered.

For the digits (``digits-gan``, ``--digit-seeds`` seeds): **Adam** (the practitioners' baseline)
and the natural solvers run until ``--budget`` seconds of solver time; the table gives the
Fréchet distance (``fid``) and the classes covered at that equal wall-clock (the last logged step
within the budget), and the best ``fid`` reached within it.

Wall-clock is the solvers' own time (``time_s`` of the run's history: the ``Solver.step`` calls,
not the metric evaluations); the rows of one table come from one process, run one after another.
Writes ``<out>/table.md``, ``<out>/summary.json`` and one figure per data set,
``<out>/<data>.png`` (median and quartiles over seeds, against iterations and against seconds).

Usage::

    python benchmarks/gan.py                          # ring, grid (5 seeds), digits (3 seeds): ~17 min
    python benchmarks/gan.py --datasets ring --seeds 2 --solvers kfac-gda adam
    python benchmarks/gan.py --quick                  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import hcc
from hcc.plots import compare_figure
from hcc.run import Result

#: solvers run on the 2-D mixtures besides the nSGDA reference, ``NAME[@LR][:KEY=VALUE,…]`` (solver options)
DEFAULT_2D = ["kfac-gda", "kfac-gda@0.1:alternating=true", "adam", "gda"]
#: solvers run on the digits
DEFAULT_DIGITS = ["adam", "kfac-gda"]
REFERENCE = "nsgda"


def parse_spec(spec: str) -> tuple[str, float | None, dict[str, Any]]:
    """``NAME[@LR][:KEY=VALUE,…]`` → ``(name, lr, solver options)``."""
    head, _, opts = spec.partition(":")
    name, _, lr = head.partition("@")
    options = dict(kv.split("=", 1) for kv in opts.split(",")) if opts else {}
    return name, float(lr) if lr else None, options


def run(game: str, spec: str, seed: int, steps: int, game_options: dict[str, Any], log_every: int) -> Result:
    """One float32 run of ``spec`` (``NAME[@LR][:KEY=VALUE,…]``)."""
    name, lr, options = parse_spec(spec)
    res = hcc.run(game, name, lr=lr, steps=steps, seed=seed, dtype="float32", game_options=game_options,
                  solver_options=options or None, log_every=log_every)
    res.solver = spec
    return res


def steps_for(game: str, spec: str, budget_s: float, log_every: int) -> int:
    """Steps that take a little over ``budget_s`` solver seconds (timed on a 3·log_every-step run)."""
    probe = run(game, spec, 0, 3 * log_every, {}, log_every)
    per_step = probe.final["time_s"] / probe.final["step"]
    return int(math.ceil(1.15 * budget_s / per_step / log_every) + 1) * log_every


def first_below(res: Result, metric: str, target: float) -> tuple[int, float] | None:
    """``(step, seconds)`` of the first logged record with ``metric ≤ target``."""
    for h in res.history:
        v = h.get(metric)
        if v is not None and math.isfinite(v) and v <= target:
            return int(h["step"]), float(h["time_s"])
    return None


def at_time(res: Result, t: float) -> dict[str, float]:
    """The last logged record with solver time ≤ ``t`` (the first record if none)."""
    rec = res.history[0]
    for h in res.history:
        if h["time_s"] <= t + 1e-9:
            rec = h
    return rec


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def bench_mixture(dataset: str, solvers: list[str], seeds: range, ref_steps: int, steps: dict[str, int],
                  log_every: int) -> tuple[list[dict[str, Any]], list[tuple[str, list[Result]]]]:
    opts, k = {"dataset": dataset}, len(seeds)
    ref = [run("gan", REFERENCE, s, ref_steps, opts, log_every) for s in seeds]
    n_modes = 8 if dataset == "ring" else 25
    rows = [{
        "data": dataset, "solver": f"{REFERENCE} (reference)", "steps": ref_steps,
        "final_mmd": median([r.final["mmd"] for r in ref]),
        "reached": f"{k}/{k}", "seconds": median([r.final["time_s"] for r in ref]),
        "ref_seconds": median([r.final["time_s"] for r in ref]), "speedup": 1.0,
        "modes_end": median([r.final["modes_covered"] for r in ref]),
        "all_modes": sum(r.final["modes_covered"] >= n_modes for r in ref), "seeds": k,
        "ms_per_step": 1e3 * median([r.final["time_s"] / r.final["step"] for r in ref]),
    }]
    groups = [(REFERENCE, ref)]
    for spec in solvers:
        n = steps.get(spec, ref_steps)
        runs = [run("gan", spec, s, n, opts, log_every) for s in seeds]
        hits = [first_below(r, "mmd", rr.final["mmd"]) for r, rr in zip(runs, ref)]
        secs = [h[1] for h in hits if h is not None]
        ratios = [rr.final["time_s"] / h[1] for h, rr in zip(hits, ref) if h is not None and h[1] > 0]
        rows.append({
            "data": dataset, "solver": spec, "steps": n, "final_mmd": median([r.final["mmd"] for r in runs]),
            "reached": f"{len(secs)}/{k}", "seconds": median(secs),
            "ref_seconds": rows[0]["ref_seconds"], "speedup": median(ratios),
            "modes_end": median([r.final["modes_covered"] for r in runs]),
            "all_modes": sum(r.final["modes_covered"] >= n_modes for r in runs), "seeds": k,
            "ms_per_step": 1e3 * median([r.final["time_s"] / r.final["step"] for r in runs]),
        })
        groups.append((spec, runs))
        print(_row_2d(rows[-1]), flush=True)
    print(_row_2d(rows[0]), flush=True)
    return rows, groups


def bench_digits(solvers: list[str], seeds: range, budget: float, log_every: int
                 ) -> tuple[list[dict[str, Any]], list[tuple[str, list[Result]]]]:
    rows, groups = [], []
    for spec in solvers:
        n = steps_for("digits-gan", spec, budget, log_every)
        runs = [run("digits-gan", spec, s, n, {}, log_every) for s in seeds]
        at = [at_time(r, budget) for r in runs]
        best = [min((h for h in r.history if h["time_s"] <= budget + 1e-9), key=lambda h: h["fid"]) for r in runs]
        rows.append({
            "data": "digits", "solver": spec, "budget_s": budget, "steps_in_budget": median([a["step"] for a in at]),
            "fid": median([a["fid"] for a in at]), "fid_per_seed": [round(a["fid"], 2) for a in at],
            "classes": median([a["classes_covered"] for a in at]),
            "classes_per_seed": [int(a["classes_covered"]) for a in at],
            "best_fid": median([b["fid"] for b in best]), "seeds": len(seeds),
            "ms_per_step": 1e3 * median([r.final["time_s"] / max(r.final["step"], 1) for r in runs]),
        })
        groups.append((spec, runs))
        print(_row_digits(rows[-1]), flush=True)
    return rows, groups


HEAD_2D = ("| data | solver | steps | ms/step | median final MMD² | reached nSGDA's final MMD² | median s to it "
           "(nSGDA: all its steps) | speed-up vs nSGDA | median modes at end | all modes at end |\n"
           "|---|---|---|---|---|---|---|---|---|---|")
HEAD_DIGITS = ("| data | solver | budget (s) | steps in budget | ms/step | FID at budget (median; per seed) | "
               "classes at budget (per seed) | best FID within budget |\n|---|---|---|---|---|---|---|---|")


def _num(x: float, fmt: str, suffix: str = "") -> str:
    return "—" if not math.isfinite(x) else f"{x:{fmt}}{suffix}"


def _row_2d(r: dict[str, Any]) -> str:
    return (f"| {r['data']} | `{r['solver']}` | {r['steps']} | {r['ms_per_step']:.1f} | {r['final_mmd']:.4f} | "
            f"{r['reached']} | {_num(r['seconds'], '.2f')} ({r['ref_seconds']:.2f}) | "
            f"{_num(r['speedup'], '.1f', '×')} | "
            f"{r['modes_end']:g} | {r['all_modes']}/{r['seeds']} |")


def _row_digits(r: dict[str, Any]) -> str:
    return (f"| {r['data']} | `{r['solver']}` | {r['budget_s']:g} | {r['steps_in_budget']:g} | "
            f"{r['ms_per_step']:.1f} | {r['fid']:.1f}; {', '.join(f'{x:.1f}' for x in r['fid_per_seed'])} | "
            f"{r['classes']:g}; {', '.join(map(str, r['classes_per_seed']))} | {r['best_fid']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["ring", "grid", "digits"], choices=["ring", "grid", "digits"])
    ap.add_argument("--solvers", nargs="+", default=None, help="2-D solvers besides nSGDA, NAME[@LR][:K=V,…]")
    ap.add_argument("--digit-solvers", nargs="+", default=DEFAULT_DIGITS)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--digit-seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed … first-seed + seeds − 1")
    ap.add_argument("--ref-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=None, help="steps of the other 2-D solvers (default: the reference's;"
                    " kfac-gda-type on the ring: a third of it)")
    ap.add_argument("--budget", type=float, default=10.0, help="digits: solver seconds per run")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--out", default="docs/gan-bench")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, short runs")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.quick:
        a.seeds, a.digit_seeds, a.ref_steps, a.budget, a.log_every = 1, 1, 200, 2.0, 20
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    solvers = a.solvers if a.solvers is not None else DEFAULT_2D
    t0 = time.perf_counter()
    rows_2d, rows_digits = [], []
    print(HEAD_2D)
    for ds in [d for d in a.datasets if d != "digits"]:
        steps = {}
        for spec in solvers:
            n = a.steps if a.steps is not None else a.ref_steps
            if a.steps is None and ds == "ring" and "kfac-gda" in spec:
                n = a.ref_steps // 3
            steps[spec] = n
        rows, groups = bench_mixture(ds, solvers, range(a.first_seed, a.first_seed + a.seeds), a.ref_steps, steps,
                                     a.log_every)
        rows_2d += rows
        fig = compare_figure(groups, "mmd", title=f"GAN, {ds}: MMD² to the data (median, quartiles; {a.seeds} seeds)")
        fig.savefig(out / f"{ds}.png", dpi=120)
    if "digits" in a.datasets:
        print(HEAD_DIGITS)
        rows_digits, groups = bench_digits(a.digit_solvers, range(a.first_seed, a.first_seed + a.digit_seeds),
                                           a.budget, a.log_every)
        fig = compare_figure(groups, "fid", title=f"digits GAN: Fréchet distance (median, quartiles; "
                                                  f"{a.digit_seeds} seeds)")
        fig.savefig(out / "digits.png", dpi=120)
    elapsed = time.perf_counter() - t0
    args = sys.argv[1:] if argv is None else list(argv)
    lines = [f"`python benchmarks/gan.py {' '.join(args)}`".replace(" `", "`"),
             f"({elapsed:.0f} s in all, float32, one thread)", ""]
    if rows_2d:
        lines += [HEAD_2D, *map(_row_2d, rows_2d), ""]
    if rows_digits:
        lines += [HEAD_DIGITS, *map(_row_digits, rows_digits), ""]
    (out / "table.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"mixtures": rows_2d, "digits": rows_digits}, indent=1))
    print(f"wrote {out}/table.md, summary.json and the figures ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
