"""Sweeps over step sizes × seeds on the batched path, and the summaries of batched runs.

:func:`sweep` solves every ``(lr, seed)`` instance with :func:`hcc.batch.run_batch`
(one vectorized program per chunk, on a local or a Ray backend). The rest turns a
list of per-instance :class:`~hcc.run.Result` records into what ``hcc solve --seeds``
and ``hcc sweep`` write:

- :func:`instance_rows` — one row per instance (lr, seed, status, converged,
  steps to tol, final V, V relative to the start);
- :func:`summary_rows` — per step size: converged fraction, diverged fraction,
  median and quartiles of the steps to tol (over the converged instances), median
  final V and final/initial V;
- :func:`batch_figure` — V of every instance against the step, and the median;
- :func:`sweep_figure` — converged fraction against the step size, box plots of the
  steps to tol, and box plots of final/initial V (below 1: contracting; above:
  unstable), with an optional vertical line at a theoretical stability boundary.

Figures use the object-oriented Matplotlib API (no ``pyplot``), like :mod:`hcc.plots`.

>>> from hcc.sweep import sweep, summary_rows
>>> recs = sweep("rps", "gda+exact", lrs=[0.02, 0.1], seeds=range(8), steps=300)
>>> summary_rows(recs)[0]["converged_fraction"]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .batch import Backend, run_batch
from .checkpoint import Checkpoint
from .curvature.pytree import tree_map
from .records import atomic_write, save_figure, write_history_csv, write_json
from .registry import OptionError
from .run import GuardOptions, Result

__all__ = [
    "batch_figure", "batch_metric", "format_table", "instance_rows", "late_ratio", "save_batch", "save_sweep",
    "summary_rows", "sweep", "sweep_figure", "write_rows",
]


def sweep(
    game: str,
    solver: str,
    *,
    lrs: Sequence[float],
    seeds: Iterable[int],
    game_options: dict[str, Any] | None = None,
    solver_options: dict[str, Any] | None = None,
    steps: int | None = None,
    tol: float = 1e-6,
    device: str = "cpu",
    dtype: str = "float64",
    log_every: int | None = None,
    chunk: int | None = None,
    backend: Backend = "local",
    threads: int | None = None,
    guard: GuardOptions | dict[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
) -> list[Result]:
    """Solve ``game`` with ``solver`` for every ``(lr, seed)`` pair, batched; records lr-major.

    Instance ``(h, s)`` is the run ``hcc.run(game, solver, lr=h, seed=s, ...)``; see
    :func:`hcc.batch.run_batch` for ``chunk``, ``backend``, ``threads``, ``guard`` and
    ``checkpoint``.
    """
    lrs = [float(h) for h in lrs]
    seeds = [int(s) for s in seeds]
    if not lrs or not seeds:
        raise OptionError(f"sweep: expected at least one lr and one seed, got {len(lrs)} and {len(seeds)}")
    return run_batch(
        game, solver, seeds=[s for _ in lrs for s in seeds], lrs=[h for h in lrs for _ in seeds],
        game_options=game_options, solver_options=solver_options, steps=steps, tol=tol, device=device,
        dtype=dtype, log_every=log_every, chunk=chunk, backend=backend, threads=threads, guard=guard,
        checkpoint=checkpoint,
    )


# -- tables ------------------------------------------------------------------------------------


def _V(row: dict[str, Any], key: str = "lyapunov") -> float:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def instance_rows(records: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per instance: lr, seed, status, converged, steps_to_tol, steps_run, diverged_at,
    stalled_at, then ``V0`` and ``final_V``; for games without V, each recorded metric at the
    start (``mmd0``, …) and at the end (``final_mmd``, …)."""
    rows = []
    for r in records:
        first = r.history[0] if r.history else {}
        row = {
            "lr": r.solver_options.get("lr"), "seed": r.seed, "status": r.status, "converged": r.converged,
            "steps_to_tol": r.steps_to_tol, "steps_run": r.steps_run, "diverged_at": r.diverged_at,
            "stalled_at": r.stalled_at,
        }
        if "lyapunov" in first or not first:
            row.update({"V0": _V(first), "final_V": _V(r.final)})
        else:
            row.update({f"{k}0": v for k, v in first.items() if k != "step"})
            row.update({f"final_{k}": v for k, v in r.final.items() if k != "step"})
        rows.append(row)
    return rows


def late_ratio(r: Result) -> float:
    """``V(T) / V(⌊T/2⌋)`` over the run's last half (``T`` its final step): below 1 the iterates
    still contract at the end of the run, above 1 they move away (an unstable step size shows
    here even when a transient first lowers ``V``); NaN for a diverged run or without V."""
    if r.status == "diverged" or not r.history or not math.isfinite(_V(r.final)):
        return math.nan
    T = int(r.final.get("step", 0))
    mids = [h for h in r.history if int(h.get("step", 0)) <= T // 2]
    V_mid = _V(mids[-1]) if mids else math.nan
    return _V(r.final) / V_mid if V_mid > 0 else math.nan


def _quantile(xs: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(xs, dtype=float), q)) if xs else math.nan


def summary_rows(records: Sequence[Result]) -> list[dict[str, Any]]:
    """Per step size (ascending): instance count, converged, diverged and stalled fractions,
    quartiles of the steps to tol (converged instances only), median final V and median
    final/initial V (a diverged instance counts as ∞); with MMD recorded (GAN), its final median."""
    by: dict[float, list[Result]] = {}
    for r in records:
        by.setdefault(float(r.solver_options["lr"]), []).append(r)
    out = []
    for lr in sorted(by):
        rs = by[lr]
        st = [float(r.steps_to_tol) for r in rs if r.steps_to_tol is not None]
        ratio = [math.inf if r.status == "diverged" else _V(r.final) / _V(r.history[0]) for r in rs
                 if r.history and _V(r.history[0]) > 0]
        finals = [math.inf if r.status == "diverged" else _V(r.final) for r in rs]
        out.append({
            "lr": lr, "instances": len(rs),
            "converged_fraction": sum(bool(r.converged) for r in rs) / len(rs),
            "diverged_fraction": sum(r.status == "diverged" for r in rs) / len(rs),
            "stalled_fraction": sum(r.status == "stalled" for r in rs) / len(rs),
            "steps_to_tol_median": statistics.median(st) if st else math.nan,
            "steps_to_tol_q25": _quantile(st, 0.25), "steps_to_tol_q75": _quantile(st, 0.75),
            "steps_to_tol_max": max(st) if st else math.nan,
            "final_V_median": statistics.median(finals) if finals else math.nan,
            "V_ratio_median": statistics.median(ratio) if ratio else math.nan,
            "V_late_ratio_median": _nanmedian([late_ratio(r) for r in rs]),
        })
        if any("mmd" in r.final for r in rs):  # games without V: their own quality metric
            out[-1]["final_mmd_median"] = _nanmedian([math.inf if r.status == "diverged" else _V(r.final, "mmd")
                                                      for r in rs])
    return out


def _nanmedian(xs: Sequence[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    return statistics.median(ok) if ok else math.nan


def _six_digits(v: Any) -> Any:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Rows of dicts as CSV (floats with 6 significant digits; ``None`` as empty)."""
    return write_history_csv(rows, path, cell=_six_digits)


def format_table(rows: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> str:
    """A plain-text table (Markdown pipe syntax) of ``rows``."""
    if not rows:
        return "(no rows)"
    keys = list(keys or rows[0])

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# -- figures -------------------------------------------------------------------------------------


def _curve(r: Result, steps: int, metric: str = "lyapunov") -> np.ndarray:
    """``metric`` at steps 0..steps; held at its last value after the instance stopped; ∞ once diverged."""
    ys = np.full(steps + 1, np.nan)
    pts = [(int(h["step"]), _V(h, metric)) for h in r.history if "step" in h]
    if r.diverged_at is not None:
        pts = [(t, v) for t, v in pts if t < r.diverged_at]
    for t, v in pts:
        if t <= steps:
            ys[t] = v
    last = np.nan
    for t in range(steps + 1):  # forward fill between logged rows and after the stop
        if np.isnan(ys[t]):
            ys[t] = last
        last = ys[t]
    if r.diverged_at is not None and r.diverged_at <= steps:
        ys[r.diverged_at:] = np.inf
    return ys


def batch_metric(records: Sequence[Result]) -> str:
    """What :func:`batch_figure` draws: ``lyapunov`` if recorded, else the ``payoff``."""
    return "lyapunov" if records and records[0].history and "lyapunov" in records[0].history[0] else "payoff"


def batch_figure(records: Sequence[Result], title: str = "") -> Figure:
    """V (games without V: the payoff) of every instance against the step (thin lines) and the
    median over instances (thick)."""
    metric = batch_metric(records)
    log = metric == "lyapunov"
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.subplots()
    steps = max((r.steps_run for r in records), default=0)
    curves = np.stack([_curve(r, steps, metric) for r in records]) if records else np.zeros((0, 1))
    x = np.arange(steps + 1)
    alpha = max(0.05, min(0.6, 8.0 / max(len(records), 1)))

    def shown(y: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(y) & ((y > 0) if log else True), y, np.nan)

    for c in curves:
        ax.plot(x, shown(c), color="C0", lw=0.7, alpha=alpha)
    if len(records):
        med = np.median(np.where(np.isnan(curves), np.inf, curves), axis=0)
        ax.plot(x, shown(med), color="C3", lw=2.2, label=f"median over {len(records)} instances")
    tol = records[0].tol if records else None
    if tol and log:
        ax.axhline(tol, ls="--", lw=1, color="0.4", label=f"tol = {tol:g}")
    n_conv = sum(bool(r.converged) for r in records)
    n_div = sum(r.status == "diverged" for r in records)
    n_stall = sum(r.status == "stalled" for r in records)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("V (function-space Lyapunov)" if log else "payoff (evaluation batch)")
    ax.grid(True, alpha=0.3)
    head = (f"{n_conv}/{len(records)} converged, " if log else "") + f"{n_div} diverged" + (
        f", {n_stall} stalled" if n_stall else "")
    ax.legend(fontsize=8, title=head, title_fontsize=8)
    ax.set_title(title or (f"{records[0].game} · {records[0].solver}" if records else ""), fontsize=10)
    return fig


def sweep_figure(records: Sequence[Result], title: str = "", boundary: float | None = None) -> Figure:
    """Converged fraction vs lr; box plots of steps to tol per lr; box plots of ``V(T)/V(T/2)`` per lr.

    ``boundary``: a step size drawn as a dashed vertical line (e.g. the Euler stability
    limit ``2a/(a² + b²)``).
    """
    summ = summary_rows(records)
    lrs = [s["lr"] for s in summ]
    by: dict[float, list[Result]] = {}
    for r in records:
        by.setdefault(float(r.solver_options["lr"]), []).append(r)
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    a1, a2, a3 = fig.subplots(1, 3)
    a1.plot(lrs, [s["converged_fraction"] for s in summ], "o-", color="C0", label="converged (V ≤ tol)")
    a1.plot(lrs, [s["diverged_fraction"] for s in summ], "s--", color="C3", label="diverged")
    a1.set_ylim(-0.03, 1.03)
    a1.set_ylabel("fraction of seeds")
    a1.set_title("converged fraction", fontsize=10)
    width = 0.6 * (min(np.diff(lrs)) if len(lrs) > 1 else max(lrs[0], 1e-12) * 0.5)
    st = [[r.steps_to_tol for r in by[h] if r.steps_to_tol is not None] for h in lrs]
    if any(st):
        pos = [h for h, s in zip(lrs, st, strict=True) if s]
        a2.boxplot([s for s in st if s], positions=pos, widths=width, manage_ticks=False)
    else:
        a2.text(0.5, 0.5, "no instance reached tol", transform=a2.transAxes, ha="center", va="center", color="0.5")
    a2.set_ylabel("steps to V ≤ tol")
    a2.set_title("steps to tol (converged instances)", fontsize=10)
    ratios = []
    for h in lrs:
        vals = [late_ratio(r) for r in by[h]]
        ratios.append([v for v in vals if math.isfinite(v) and v > 0])
    if any(ratios):
        pos = [h for h, v in zip(lrs, ratios, strict=True) if v]
        a3.boxplot([v for v in ratios if v], positions=pos, widths=width, manage_ticks=False)
        a3.set_yscale("log")
    a3.axhline(1.0, ls=":", lw=1, color="0.3")
    n_div = [sum(r.status == "diverged" for r in by[h]) for h in lrs]
    for h, n in zip(lrs, n_div, strict=True):
        if n:
            a3.annotate(f"{n} div.", (h, 1.0), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=7, color="C3")
    a3.set_ylabel("V(T) / V(T/2)")
    a3.set_title("late contraction over the last half (< 1: stable)", fontsize=10)
    for ax in (a1, a2, a3):
        ax.set_xlabel("step size h")
        ax.set_xlim(lrs[0] - width, lrs[-1] + width)
        ax.grid(True, alpha=0.3)
        if boundary is not None:
            ax.axvline(boundary, ls="--", color="C2", lw=1.2, label=f"stability limit h = {boundary:g}")
    a1.legend(fontsize=8)
    r0 = records[0] if records else None
    n_seeds = len({r.seed for r in records})
    default = f"{r0.game} · {r0.solver}: {n_seeds} seeds × {len(lrs)} step sizes, {r0.steps_run} steps" if r0 else ""
    fig.suptitle(title or default, fontsize=11)
    return fig


# -- output folders --------------------------------------------------------------------------------


def save_batch(records: Sequence[Result], out: str | Path, *, plot: bool = True, title: str = "") -> Path:
    """``hcc solve --seeds``: ``seeds.csv`` (one row per seed), ``result.json`` (converged
    fraction, summary and every instance's record), ``params.pt`` (every instance's final
    iterate, in seed order) and ``lyapunov.png`` (:func:`batch_figure`; ``payoff.png`` for games
    without V); every file atomically, ``result.json`` last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(instance_rows(records), out / "seeds.csv")
    params = [r.params for r in records]
    if all(p is not None for p in params):
        params = [tree_map(lambda x: x.detach().cpu(), p) for p in params]
        atomic_write(out / "params.pt", lambda tmp: torch.save(params, tmp))
    if plot and records:
        name = "lyapunov.png" if batch_metric(records) == "lyapunov" else "payoff.png"
        save_figure(batch_figure(records, title), out / name, dpi=130)
    doc = {
        "instances": len(records),
        "converged_fraction": sum(bool(r.converged) for r in records) / max(len(records), 1),
        "diverged_fraction": sum(r.status == "diverged" for r in records) / max(len(records), 1),
        "stalled_fraction": sum(r.status == "stalled" for r in records) / max(len(records), 1),
        "summary": summary_rows(records),
        "records": [r.to_dict() for r in records],
    }
    write_json(out / "result.json", "seeds", doc)
    return out


def save_sweep(records: Sequence[Result], out: str | Path, *, plot: bool = True, title: str = "",
               boundary: float | None = None, extra: dict[str, Any] | None = None) -> Path:
    """``hcc sweep``: ``sweep.csv`` (lr, seed, status, converged, steps_to_tol, final V per instance),
    ``summary.csv`` (:func:`summary_rows`), ``result.json`` (the summary, ``extra`` and every
    instance's record without its history) and ``sweep.png`` (:func:`sweep_figure`); every file
    atomically, ``result.json`` last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(instance_rows(records), out / "sweep.csv")
    summ = summary_rows(records)
    write_rows(summ, out / "summary.csv")
    if plot and records:
        save_figure(sweep_figure(records, title, boundary), out / "sweep.png", dpi=130)
    doc = {**(extra or {}), "summary": summ,
           "records": [{k: v for k, v in r.to_dict().items() if k != "history"} for r in records]}
    write_json(out / "result.json", "sweep", doc)
    return out
