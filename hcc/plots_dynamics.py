"""Plots of local dynamics: spectra at an equilibrium and 2-D phase portraits.

Companion of :mod:`hcc.plots` (same conventions: object-oriented matplotlib, no
``pyplot``, no global backend, every figure closed by being dropped). The figures
read records, not games: a :class:`~hcc.spectrum.Spectrum` (or its ``spectrum.json``)
and a :class:`~hcc.field.FieldPortrait`.

- :func:`spectrum_figure` — The Numerics of GANs, Fig. 1 style: eigenvalues of
  ``∇v`` in the complex plane (with the disc ``|1 + hλ| < 1`` where simultaneous
  GDA at step ``h`` is stable), and eigenvalues of the solver's update operator
  against the unit circle.
- :func:`field_figure` — the function-space vector field as a stream plot with
  the solvers' trajectories on top (Gidel et al. 2019, Fig. 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle

if TYPE_CHECKING:
    from .field import FieldPortrait
    from .spectrum import Spectrum

#: trajectory colours per solver (others cycle through the default palette)
SOLVER_COLORS = {"gda": "tab:red", "alt-gda": "tab:orange", "negmom": "tab:green", "eg": "tab:blue",
                 "ogda": "tab:purple", "consensus": "tab:brown", "hamiltonian": "tab:pink"}
SOLVER_LABELS = {"gda": "simultaneous GDA", "alt-gda": "alternating GDA", "negmom": "alt. GDA, negative momentum",
                 "eg": "extragradient", "ogda": "optimistic GDA", "consensus": "consensus optimization",
                 "hamiltonian": "Hamiltonian descent"}


def _scatter_with_multiplicity(ax: Axes, z: np.ndarray, **kw: object) -> None:
    """Scatter eigenvalues; a point repeated many times (neutral directions) is labelled ×k."""
    ax.scatter(z.real, z.imag, zorder=3, **kw)  # type: ignore[arg-type]
    keys, counts = np.unique(np.round(z, 6), return_counts=True)
    for k, c in zip(keys, counts):
        if c > 1:
            ax.annotate(f"×{c}", (k.real, k.imag), xytext=(5, 5), textcoords="offset points", fontsize=8)


def _square_limits(ax: Axes, z: np.ndarray, include: list[complex], pad: float = 0.15) -> None:
    pts = np.concatenate([z, np.asarray(include, dtype=complex)])
    lo_x, hi_x, lo_y, hi_y = pts.real.min(), pts.real.max(), pts.imag.min(), pts.imag.max()
    cx, cy = (lo_x + hi_x) / 2, (lo_y + hi_y) / 2
    r = max(hi_x - lo_x, hi_y - lo_y, 1e-3) / 2 * (1 + pad) + 0.05
    ax.set_xlim(cx - r, cx + r)
    ax.set_ylim(cy - r, cy + r)
    ax.set_aspect("equal")


def _zoom(ax: Axes, mu: np.ndarray, color: str) -> None:
    """Inset around the largest non-neutral eigenvalue when it sits close to the unit circle."""
    off = mu[np.abs(mu - 1) > 1e-6]
    if off.size == 0:
        return
    top = off[np.argmax(np.abs(off) + 1e-12 * (off.imag >= 0))]  # of a conjugate pair, the upper one
    gap = abs(abs(top) - 1)
    if not 1e-9 < gap < 0.05:
        return
    w = max(4 * gap, 0.02)
    ins = ax.inset_axes((0.05, 0.05, 0.36, 0.36))
    t = np.linspace(0, 2 * np.pi, 2000)
    ins.plot(np.cos(t), np.sin(t), "k", lw=1.0)
    ins.scatter(off.real, off.imag, marker="o", s=30, fc="none", ec=color, lw=1.5, zorder=3)
    ins.set_xlim(top.real - w, top.real + w)
    ins.set_ylim(top.imag - w, top.imag + w)
    ins.set_aspect("equal")
    ins.tick_params(labelsize=6)
    ins.xaxis.set_major_locator(ticker.MaxNLocator(3))
    ins.yaxis.set_major_locator(ticker.MaxNLocator(3))
    ins.set_title(f"zoom: |μ| = {abs(top):.4f}", fontsize=7)
    ax.indicate_inset_zoom(ins, edgecolor="0.5")


def spectrum_figure(spec: Spectrum) -> Figure:
    """Two panels: eigenvalues of ``∇v``, and of the update operator with the unit circle."""
    fig = Figure(figsize=(11, 6.2), layout="constrained")
    ax_v, ax_t = fig.subplots(1, 2)
    lam, mu, h = spec.field_eigs, spec.update_eigs, spec.lr

    # left: ∇v, the imaginary axis and the GDA stability disc |1 + hλ| < 1 (centre −1/h, radius 1/h)
    ax_v.axhline(0, color="0.8", lw=0.8)
    ax_v.axvline(0, color="0.5", lw=1.0, ls="--", label="imaginary axis (no GDA step is stable)")
    ax_v.add_patch(Circle((-1 / h, 0), 1 / h, fc="tab:green", alpha=0.12, ec="tab:green", lw=1,
                          label=f"|1 + hλ| < 1: where simultaneous GDA at h = {h:g} is stable"))
    _scatter_with_multiplicity(ax_v, lam, marker="x", s=60, color="tab:red", label="eigenvalues λ of ∇v")
    _square_limits(ax_v, lam, [0j, -0.5 + 0j])
    bound = spec.lemma4_step_bound
    if bound == 0:
        verdict4 = "no step of simultaneous GDA is stable (h* = 0)"
    else:
        verdict4 = "simultaneous GDA stable iff h < " + ("∞" if math.isinf(bound) else f"{bound:.4g}")
    eq = spec.equilibrium.split(":")[0]
    ax_v.set_title(f"{spec.game}, at the equilibrium ({eq})\neigenvalues λ of ∇v, v = (−∇θΨ, ∇φΨ)\n"
                   f"Lemma 4: {verdict4}", fontsize=10)
    ax_v.set_xlabel("Re λ")
    ax_v.set_ylabel("Im λ")
    fig.legend(*ax_v.get_legend_handles_labels(), loc="outside lower left", fontsize=8, frameon=False)

    # right: the update operator and the unit circle
    ax_t.axhline(0, color="0.8", lw=0.8)
    ax_t.axvline(0, color="0.8", lw=0.8)
    ax_t.add_patch(Circle((0, 0), 1, fill=False, ec="k", lw=1.2, label="unit circle"))
    rho = spec.spectral_radius
    color = "tab:blue" if rho < 1 else "tab:red"
    _scatter_with_multiplicity(ax_t, mu, marker="o", s=40, fc="none", ec=color, lw=1.5,
                               label=f"eigenvalues of the update operator ({spec.state_dim})")
    _square_limits(ax_t, mu, [1 + 0j, -1 + 0j, 1j, -1j])
    verdict = "locally convergent" if rho < 1 else ("marginal" if rho < 1 + 1e-9 else "locally divergent")
    extra = ""
    if spec.neutral_dims and spec.spectral_radius_transverse != spec.spectral_radius:
        rho_t = spec.spectral_radius_transverse
        extra = f"\n{spec.neutral_dims} neutral directions (μ = 1, the equilibrium manifold); ρ off them = {rho_t:.4f}"
        verdict = "locally convergent to the manifold" if rho_t < 1 else "locally divergent"
    ax_t.set_title(f"eigenvalues μ of the update operator of {spec.solver} (h = {h:g})\n"
                   f"spectral radius ρ = {rho:.4f}: {verdict}{extra}", fontsize=10)
    ax_t.set_xlabel("Re μ")
    ax_t.set_ylabel("Im μ")
    _zoom(ax_t, mu, color)
    fig.legend(*ax_t.get_legend_handles_labels(), loc="outside lower right", fontsize=8, frameon=False)
    return fig


def plot_spectrum(spec: Spectrum, path: str | Path, dpi: int = 150) -> Path:
    """Save :func:`spectrum_figure` to ``path`` (PNG) and return it."""
    path = Path(path)
    from .records import save_figure

    return save_figure(spectrum_figure(spec), path, dpi=dpi, bbox_inches="tight")


def field_figure(portrait: FieldPortrait) -> Figure:
    """Stream plot of the function-space field with the solvers' trajectories on top."""
    fig = Figure(figsize=(6.8, 6.2), layout="constrained")
    ax = fig.subplots()
    speed = np.hypot(portrait.U, portrait.V)
    ax.streamplot(portrait.X, portrait.Y, portrait.U, portrait.V, color=speed, cmap="Greys", density=1.1,
                  linewidth=0.8, arrowsize=0.9, zorder=1)
    default = iter(["tab:cyan", "tab:olive", "tab:gray", "k"])
    for name, path in portrait.trajectories.items():
        c = SOLVER_COLORS.get(name) or next(default, "k")
        lab = f"{SOLVER_LABELS.get(name, name)} (h = {portrait.lrs[name]:g})"
        ax.plot(path[:, 0], path[:, 1], "-", color=c, lw=1.4, alpha=0.9, label=lab, zorder=3)
        ax.plot(path[-1, 0], path[-1, 1], "o", color=c, ms=5, zorder=4)
    first = next(iter(portrait.trajectories.values()), None)
    if first is not None:
        ax.plot(*first[0], "s", color="k", ms=7, label="start", zorder=5)
    if portrait.equilibrium is not None:
        ax.plot(*portrait.equilibrium, "*", color="gold", mec="k", ms=15, label="equilibrium", zorder=5)
    ax.set_xlim(portrait.X.min(), portrait.X.max())
    ax.set_ylim(portrait.Y.min(), portrait.Y.max())
    ax.set_aspect("equal")
    ax.set_xlabel(portrait.labels[0])
    ax.set_ylabel(portrait.labels[1])
    steps = portrait.extra.get("steps")
    ax.set_title(f"{portrait.game}: function-space field and {steps} steps per solver\n"
                 "(solvers run in parameter space; drawn: their (F, G) image)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.1), ncol=2, fontsize=8, frameon=False)
    return fig


def plot_field(portrait: FieldPortrait, path: str | Path, dpi: int = 150) -> Path:
    """Save :func:`field_figure` to ``path`` (PNG) and return it."""
    path = Path(path)
    from .records import save_figure

    return save_figure(field_figure(portrait), path, dpi=dpi, bbox_inches="tight")


__all__ = ["field_figure", "plot_field", "plot_spectrum", "spectrum_figure"]
