r"""Preconditioned Gauss-Newton steps on a least-squares distance to a function-space target.

Both the pull-back of a proximal target (:meth:`Preconditioner.pullback`) and the surrogate-loss
preconditioner (:class:`~hcc.solvers.hidden.Surrogate`) minimize, per player,

.. math::

    ½‖r̂(θ)‖² + ½μ‖θ − θ₀‖², \qquad r̂(θ) = r̂₀ − \big(c(θ) − c(θ₀)\big),

where ``c(θ)`` are the metric outputs (:meth:`hcc.curvature.jacobians.MetricMap.outputs`, ``Ĵ = ∂c/∂θ``
at ``θ₀``) and ``r̂₀`` the initial residual (the target minus the current point in the
geometry's coordinates). :func:`least_squares_steps` takes ``steps`` preconditioned steps, each with
the exact minimizer of the linearized objective along the preconditioned direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp

from ..curvature.heads import target_residual
from ..curvature.jacobians import MetricMap, head_coords, metric_map
from ..games.base import Batch, Game, Params

#: ``(params, vecs, state) ↦ (directions, state, info)``: a preconditioner's ``apply`` on both players
ApplyFn = Callable[[Params, tuple[dict[str, Tensor], dict[str, Tensor]], Any], tuple[Params, Any, dict[str, Any]]]


def least_squares_steps(apply: ApplyFn, params: Params, r0: tuple[Tensor, Tensor],
                        mms: tuple[MetricMap, MetricMap], state: Any, damping: tuple[float, float],
                        steps: int, inner_lr: float | None = None) -> tuple[Params, Any, dict[str, Any]]:
    r"""``steps`` preconditioned steps on the objective of the module docstring for both players.

    Each step applies the preconditioner to the gradient ``v = Ĵ(θ)ᵀr̂(θ)/n − μ(θ − θ₀)/n`` at the
    current inner point and moves by ``α d``: with ``inner_lr = None`` the exact minimizer of the
    linearized objective along ``d``, ``α = ⟨d, v⟩ / (‖Ĵd‖²/n + μ‖d‖²/n)`` (one Jacobian-vector product),
    else ``α = inner_lr`` (plain preconditioned gradient descent on the surrogate). With an exact
    preconditioner one step is the Levenberg-Marquardt step; approximate ones (K-FAC, diagonal, the
    identity) approach the minimizer with more steps. Returns ``θ − θ₀`` per player.
    """
    xs = (mms[0].x, mms[1].x)
    start = tuple({k: t.detach() for k, t in p.items()} for p in params)
    c0 = tuple(mm.outputs(p, x) for mm, p, x in zip(mms, start, xs, strict=True))
    cur = [dict(p) for p in start]
    info: dict[str, Any] = {}
    for _ in range(steps):
        vecs = []
        for pl in (0, 1):
            p, x, n, mm = cur[pl], xs[pl], xs[pl].shape[0], mms[pl]
            c, pull = vjp(lambda q, mm=mm, x=x: mm.outputs(q, x), p)
            g = pull(r0[pl] - (c - c0[pl]))[0]
            vecs.append({k: (g[k] - damping[pl] * (p[k] - start[pl][k])) / n for k in p})
        d, state, info = apply((cur[0], cur[1]), (vecs[0], vecs[1]), state)
        for pl in (0, 1):
            p, x, n, mm = cur[pl], xs[pl], xs[pl].shape[0], mms[pl]
            tangent = {k: d[pl][k].detach() for k in p}
            if inner_lr is None:
                _, Jd = jvp(lambda q, mm=mm, x=x: mm.outputs(q, x), (p,), (tangent,))
                sq = sum(t.pow(2).sum() for t in tangent.values())
                dv = sum((tangent[k] * vecs[pl][k]).sum() for k in p)
                den = Jd.pow(2).sum() / n + damping[pl] * sq / n
                tiny = torch.finfo(den.dtype).tiny
                alpha = torch.where(den > tiny, dv / den.clamp_min(tiny), torch.zeros_like(den))
            else:
                alpha = torch.as_tensor(inner_lr, dtype=next(iter(p.values())).dtype)
            cur[pl] = {k: p[k] + alpha * tangent[k] for k in p}
            info[f"inner_alpha_{('theta', 'phi')[pl]}"] = float(alpha)
    out = tuple({k: cur[pl][k] - start[pl][k] for k in start[pl]} for pl in (0, 1))
    return out, state, info  # type: ignore[return-value]


def metric_maps(game: Game, params: Params, batch: Batch, geometry: str) -> tuple[MetricMap, MetricMap]:
    """Both players' :class:`MetricMap` at ``params`` on their supports."""
    maps, xs = game.maps(), game.supports(params, batch)
    return tuple(metric_map(m, {k: t.detach() for k, t in p.items()}, x, geometry)  # type: ignore[return-value]
                 for m, p, x in zip(maps, params, xs, strict=True))


def target_residuals(game: Game, params: Params, batch: Batch, targets: tuple[Tensor, Tensor],
                     geometry: str) -> tuple[Tensor, Tensor]:
    """``r̂₀`` of pre-head ``targets`` for both players (:func:`~hcc.curvature.heads.target_residual`)."""
    maps, xs = game.maps(), game.supports(params, batch)
    out = []
    for m, p, x, t in zip(maps, params, xs, targets, strict=True):
        z, head = head_coords(m, p, x)
        out.append(target_residual(z, t.reshape(z.shape), head, geometry))
    return out[0], out[1]


def generic_pullback(precond: Any, game: Game, params: Params, batch: Batch, targets: tuple[Tensor, Tensor],
                     state: Any, damping: tuple[float, float], steps: int = 1) -> tuple[Params, Any, dict[str, Any]]:
    """:meth:`Preconditioner.pullback` by :func:`least_squares_steps` with the preconditioner's ``apply``."""
    geometry = precond.geometry
    mms = metric_maps(game, params, batch, geometry)
    r0 = target_residuals(game, params, batch, targets, geometry)

    def apply(p: Params, vecs: tuple, st: Any) -> tuple[Params, Any, dict[str, Any]]:
        return precond.apply(game, p, batch, vecs, st, (0, 1))

    return least_squares_steps(apply, params, r0, mms, state, damping, steps)
