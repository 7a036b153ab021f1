"""Plots of saved runs: Lyapunov decay, duality gap, field norm, GAN sample quality.

Plots read :class:`~hcc.run.Result` records only (never live
objects). Figures are built with the object-oriented API (:class:`~matplotlib.figure.Figure`,
no ``pyplot``), so nothing touches the global backend or needs a display, and no
figure is left open.

The building block is :func:`plot_metric`: one metric's curve for a list of runs on
one ``Axes``. :func:`plot_run` arranges it into the per-run panels that ``hcc solve``
saves; a comparison of several runs is ``plot_metric(ax, results, "lyapunov")``.

>>> from hcc import run
>>> from hcc.plots import plot_run
>>> path = plot_run(run("rps", "eg", steps=50), "rps-eg.png")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .metrics import LOG_METRICS

if TYPE_CHECKING:
    from .run import Result

#: axis labels (with what the quantity is) for the metrics runs record
LABELS: dict[str, str] = {
    "lyapunov": "V (function-space Lyapunov)",
    "exploitability": "exploitability (duality gap)",
    "openspiel_exploitability": "exploitability (OpenSpiel: NashConv / 2)",
    "field_norm": "‖v‖ (vector-field norm)",
    "payoff": "payoff Ψ",
    "mmd": "MMD to the data",
    "modes_covered": "modes covered",
    "high_quality": "high-quality share",
    "d_distance": "|D − ½| (discriminator)",
    "time_s": "solver time (s)",
    "step": "iteration",
}
#: panel titles
TITLES: dict[str, str] = {
    "lyapunov": "Lyapunov function", "exploitability": "duality gap", "field_norm": "vector-field norm",
    "mmd": "MMD", "modes_covered": "mode coverage", "high_quality": "sample quality",
}
#: panels of a run with a Lyapunov function, and of one without (GANs), in order
V_PANELS = ("lyapunov", "exploitability", "field_norm")
GAN_PANELS = ("mmd", "modes_covered", "high_quality")
#: counts, drawn with integer ticks
INTEGER_METRICS = frozenset({"modes_covered"})
#: GAN metrics that span decades
_LOG = frozenset(LOG_METRICS) | {"mmd"}


def series(result: Result, metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` arrays of ``metric`` over the run's history; missing/None values are NaN."""
    xs = [_num(r.get(x)) for r in result.history]
    ys = [_num(r.get(metric)) for r in result.history]
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def run_label(result: Result) -> str:
    """A short legend entry: ``solver (lr = h)``."""
    lr = result.solver_options.get("lr")
    return f"{result.solver} (lr = {lr:g})" if isinstance(lr, (int, float)) else result.solver


def plot_metric(
    ax: Axes,
    results: Sequence[Result],
    metric: str,
    *,
    x: str = "step",
    labels: Sequence[str] | None = None,
    log: bool | None = None,
    tol: float | None = None,
) -> Axes:
    """Draw ``metric`` against ``x`` for each run in ``results`` onto ``ax``.

    ``log`` defaults to a log y axis for decaying metrics (:data:`hcc.metrics.LOG_METRICS`,
    MMD); non-positive and non-finite values are masked there rather than breaking
    the scale. A run that diverged gets an ``x`` marker at its divergence step; ``tol``
    draws a dashed horizontal line.
    """
    log = metric in _LOG if log is None else log
    labels = list(labels) if labels is not None else [run_label(r) for r in results]
    drawn = False
    for res, label in zip(results, labels):
        xs, ys = series(res, metric, x)
        ok = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if log else True)
        if not ok.any():
            continue
        # markers on short runs, so points isolated by masked neighbours still show
        marker = "." if ok.sum() <= 60 else None
        (line,) = ax.plot(xs, np.where(ok, ys, np.nan), lw=1.5, marker=marker, ms=4, label=label)
        drawn = True
        if res.diverged_at is not None and x == "step":
            ax.axvline(res.diverged_at, ls=":", lw=1.2, color=line.get_color(),
                       label=f"diverged at step {res.diverged_at}")
            hit = ok & (xs == res.diverged_at)
            if hit.any():
                ax.plot(xs[hit], ys[hit], "x", ms=9, mew=2, color=line.get_color())
    if tol is not None and tol > 0:
        ax.axhline(tol, ls="--", lw=1, color="0.4", label=f"tol = {tol:g}")
    if log and (drawn or tol):
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        if hi < 10 * lo:  # under a decade minor ticks get labels: "0.25" reads better than "2.5×10⁻¹"
            plain = ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    if metric in INTEGER_METRICS:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if not drawn:
        ax.text(0.5, 0.5, "no data" + (" > 0" if log else ""), transform=ax.transAxes, ha="center",
                va="center", color="0.5")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.grid(True, which="major", alpha=0.3)
    return ax


def stop_metric(result: Result) -> str:
    """The metric the run's tolerance applied to: ``lyapunov`` (``V``) if it was recorded, else the
    duality gap ``exploitability`` (games without a unique equilibrium: ``openspiel``)."""
    keys = {k for r in result.history for k in r}
    return "exploitability" if "lyapunov" not in keys and "exploitability" in keys else "lyapunov"


def run_figure(result: Result) -> Figure:
    """The per-run figure: V, duality gap and field norm, or the GAN panels without V."""
    keys = {k for r in result.history for k in r}
    stop = stop_metric(result)
    panels = [m for m in (V_PANELS if stop in keys else GAN_PANELS) if m in keys]
    panels = panels or [m for m in ("field_norm", "payoff") if m in keys][:1] or ["payoff"]
    fig = Figure(figsize=(4.6 * len(panels), 3.9), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        plot_metric(ax, [result], metric, tol=result.tol if metric == stop else None)
        ax.set_title(TITLES.get(metric, metric), fontsize=10)
        if ax.get_legend_handles_labels()[0] and (metric == panels[0] or result.diverged_at is not None):
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(_title(result), fontsize=11)
    return fig


def plot_run(result: Result, path: str | Path, dpi: int = 150) -> Path:
    """Save :func:`run_figure` of ``result`` as a PNG at ``path``; returns the path."""
    from .records import save_figure

    return save_figure(run_figure(result), path, dpi=dpi)


def gan_samples_figure(
    real: Any, snapshots: Sequence[tuple[int, Any]], title: str = "generator samples over training"
) -> Figure:
    """A row of scatter panels: the data (grey) and the generator's samples (colour) at each step.

    ``snapshots`` is ``[(step, samples (n, 2)), …]``, e.g. collected with
    :func:`hcc.run.solve`'s ``callback`` and :meth:`hcc.games.gan.GAN.samples`.
    All panels share the data's limits, so mode collapse and drift read at a glance.
    Samples of dimension ``s²`` > 2 (8×8 digits: 64) are images: each panel then tiles the first
    16 as a 4 × 4 grid, the data's panel first.
    """
    real = np.asarray(real, dtype=float)
    if real.shape[1] > 2:
        return _image_grids(real, snapshots, title)
    lo, hi = real.min(axis=0), real.max(axis=0)
    pad = 0.25 * (hi - lo).max() + 0.1
    n = max(len(snapshots), 1)
    fig = Figure(figsize=(2.6 * n, 2.9), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (step, fake) in zip(axes, snapshots):
        fake = np.asarray(fake, dtype=float)
        ax.scatter(real[:, 0], real[:, 1], s=3, c="0.7", label="data")
        ax.scatter(fake[:, 0], fake[:, 1], s=3, c="C3", alpha=0.6, label="generator")
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
        ax.set_aspect("equal")
        ax.set_title(f"step {step}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="upper left", markerscale=3)
    fig.suptitle(title, fontsize=10)
    return fig


def _tiles(images: np.ndarray, rows: int = 4) -> np.ndarray:
    """The first ``rows²`` images (``n × s²``) tiled into one ``(rows·s) × (rows·s)`` array."""
    s = int(round(math.sqrt(images.shape[1])))
    if s * s != images.shape[1]:
        raise ValueError(f"image samples: expected a square number of pixels, got {images.shape[1]}")
    k = rows * rows
    x = np.full((k, s, s), np.nan)
    x[: min(k, len(images))] = images[:k].reshape(-1, s, s)
    return x.reshape(rows, rows, s, s).transpose(0, 2, 1, 3).reshape(rows * s, rows * s)


def _image_grids(real: np.ndarray, snapshots: Sequence[tuple[int, Any]], title: str) -> Figure:
    n = len(snapshots) + 1
    fig = Figure(figsize=(2.0 * n, 2.3), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    panels = [("data", real)] + [(f"step {t}", np.asarray(f, dtype=float)) for t, f in snapshots]
    for ax, (name, imgs) in zip(axes, panels, strict=True):
        ax.imshow(_tiles(imgs), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return fig


def snapshot_steps(steps: int, n: int = 6) -> list[int]:
    """``n`` evenly spaced steps from 0 to ``steps`` (the panels of a sample grid)."""
    return sorted({round(i * steps / (n - 1)) for i in range(n)})


def _title(result: Result) -> str:
    lr = result.solver_options.get("lr")
    head = f"{result.game} · {result.solver}" + (f" · step size {lr:g}" if isinstance(lr, (int, float)) else "")
    V = "V" if stop_metric(result) == "lyapunov" else "gap"
    if result.status == "converged":
        tail = f"{V} ≤ {result.tol:g} after {result.steps_to_tol} steps"
    elif result.status == "diverged":
        tail = f"diverged at step {result.diverged_at}"
    elif result.converged is False:
        tail = f"{V} > {result.tol:g} after {result.steps_run} steps"
    else:
        tail = f"{result.steps_run} steps"
    return f"{head} — {tail}"


def _num(v: Any) -> float:
    """A history value as a float; ``None`` (NaN/inf in result.json) and non-numbers → NaN."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


__all__ = [
    "GAN_PANELS", "LABELS", "TITLES", "V_PANELS", "gan_samples_figure", "plot_metric", "plot_run", "run_figure",
    "run_label", "series", "snapshot_steps",
]


# -- comparisons over seeds (hcc compare, hcc plot) -------------------------------------------------

#: x-axis labels of the comparison panels
COMPARE_X = {"step": "iteration", "time_s": "wall-clock time in solver steps (s)"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_BIG = 1e300  # stands in for ∞ (diverged runs) inside np.quantile, which turns ∞ − ∞ into NaN


def median_band(
    results: Sequence[Result], metric: str, x: str = "step", band: tuple[float, float] = (0.25, 0.75)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, median, low, high)`` of ``metric`` over the runs (seeds) at every logged step.

    Runs are aligned by step. A run that stopped early (at the tolerance, or at its step
    cap) keeps its last value afterwards, so the median stays defined; a diverged run
    counts as ∞ from its divergence step on (∞ comes back as NaN, a gap on the plot).
    With ``x="time_s"`` the x value of a step is the median over runs of the cumulative
    solver time at that step, a stopped run's time extended at its mean time per step
    (so the x values increase with the step).
    """
    curves = []
    for res in results:
        steps, ys = series(res, metric)
        _, ts = series(res, "time_s")
        ok = np.isfinite(steps) & np.isfinite(ys)
        if res.diverged_at is not None:
            ok &= steps < res.diverged_at
        if ok.any():
            curves.append((steps[ok], ys[ok], ts[ok], res.diverged_at))
    if not curves:
        empty = np.array([], dtype=float)
        return empty, empty, empty, empty
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    Y = np.empty((len(curves), len(grid)))
    T = np.empty((len(curves), len(grid)))
    for i, (steps, ys, ts, div) in enumerate(curves):
        idx = np.clip(np.searchsorted(steps, grid, side="right") - 1, 0, None)
        Y[i] = ys[idx]
        if div is not None:
            Y[i, grid >= div] = _BIG
        t_ok = np.isfinite(ts)
        per_step = ts[t_ok][-1] / steps[t_ok][-1] if t_ok.any() and steps[t_ok][-1] > 0 else np.nan
        T[i] = np.interp(grid, steps[t_ok], ts[t_ok]) if t_ok.any() else np.nan
        beyond = grid > steps[-1]
        T[i, beyond] = ts[t_ok][-1] + (grid[beyond] - steps[-1]) * per_step if t_ok.any() else np.nan
    q = np.quantile(np.minimum(Y, _BIG), [0.5, *band], axis=0)
    q[q > _BIG * 1e-10] = np.nan
    if x == "step":
        xs = grid
    elif x == "time_s":
        with warnings.catch_warnings():  # runs without timings (batched records): an empty panel, no warning
            warnings.simplefilter("ignore", RuntimeWarning)
            xs = np.nanmedian(T, axis=0)
    else:
        raise ValueError(f"x: expected 'step' or 'time_s', got {x!r}")
    return xs, q[0], q[1], q[2]


def plot_groups(
    ax: Axes,
    groups: Sequence[tuple[str, Sequence[Result]]],
    metric: str,
    *,
    x: str = "step",
    band: tuple[float, float] = (0.25, 0.75),
    tol: float | None = None,
    log: bool | None = None,
) -> Axes:
    """Median of ``metric`` over each group's runs with a ``band`` quantile band, one colour per group.

    ``groups`` is ``[(label, runs), …]`` (e.g. :meth:`hcc.compare.Comparison.groups`); a
    group of one run is its curve. Diverged runs are counted in the legend.
    """
    log = metric in _LOG if log is None else log
    drawn = False
    for i, (label, runs) in enumerate(groups):
        xs, med, lo, hi = median_band(runs, metric, x, band)
        ok = np.isfinite(xs) & np.isfinite(med) & ((med > 0) if log else True)
        if not ok.any():
            continue
        color = f"C{i % 10}"
        n_div = sum(r.status == "diverged" for r in runs)
        if n_div:
            label += f" — {n_div}/{len(runs)} diverged"
        # one marker shape per group on short curves, so identical curves (exact vs CG) both show
        marker = _MARKERS[i % len(_MARKERS)] if ok.sum() <= 60 else None
        ax.plot(xs, np.where(ok, med, np.nan), color=color, lw=1.6, marker=marker, ms=3.5, mfc="none",
                label=label)
        if len(runs) > 1:
            good = np.isfinite(xs) & np.isfinite(lo) & np.isfinite(hi) & ((lo > 0) if log else True)
            ax.fill_between(xs, np.where(good, lo, np.nan), np.where(good, hi, np.nan), color=color, alpha=0.18,
                            lw=0)
        drawn = True
    if tol is not None and tol > 0:
        ax.axhline(tol, ls="--", lw=1, color="0.4", label=f"tol = {tol:g}")
    if log and drawn:
        ax.set_yscale("log")
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xlabel(COMPARE_X.get(x, LABELS.get(x, x)))
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.grid(True, which="major", alpha=0.3)
    return ax


def compare_figure(
    groups: Sequence[tuple[str, Sequence[Result]]],
    metric: str,
    *,
    title: str = "",
    tol: float | None = None,
    band: tuple[float, float] = (0.25, 0.75),
) -> Figure:
    """Two panels: ``metric`` against iterations and against solver wall-clock time (:func:`plot_groups`)."""
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x in zip(axes, ("step", "time_s")):
        plot_groups(ax, groups, metric, x=x, band=band, tol=tol)
        ax.set_title(f"{TITLES.get(metric, metric)} against {COMPARE_X[x].split(' (')[0]}", fontsize=10)
    axes[1].set_ylabel("")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


__all__ += ["COMPARE_X", "compare_figure", "median_band", "plot_groups"]
