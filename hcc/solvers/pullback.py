"""The generic pull-back of a function-space target through any preconditioner (see
:meth:`hcc.solvers.precond.Preconditioner.pullback`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp

from ..games.base import Batch, Game, Params
from .heads import target_residual
from .natural import head_coords, metric_map


def generic_pullback(precond: Any, game: Game, params: Params, batch: Batch, targets: tuple[Tensor, Tensor],
                     state: Any, damping: tuple[float, float]) -> tuple[Params, Any, dict[str, Any]]:
    """``apply`` on ``v = Ĵᵀr̂/n`` for both players, then the exact step-length fit per player."""
    maps, xs = game.maps(), game.supports(params, batch)
    geometry = precond.geometry
    vecs, outs = [], []
    for pl in (0, 1):
        p, x = {k: t.detach() for k, t in params[pl].items()}, xs[pl]
        z, head = head_coords(maps[pl], p, x)
        r = target_residual(z, targets[pl].reshape(z.shape), head, geometry)
        mm = metric_map(maps[pl], p, x, geometry)
        _, pull = vjp(lambda q, mm=mm, x=x: mm.outputs(q, x), p)
        vecs.append({k: t / x.shape[0] for k, t in pull(r)[0].items()})
        outs.append(mm)
    d, state, info = precond.apply(game, params, batch, (vecs[0], vecs[1]), state, (0, 1))
    fitted = []
    for pl in (0, 1):
        p, x, n = {k: t.detach() for k, t in params[pl].items()}, xs[pl], xs[pl].shape[0]
        mm = outs[pl]
        tangent = {k: d[pl][k].detach() for k in p}
        _, Jd = jvp(lambda q, mm=mm, x=x: mm.outputs(q, x), (p,), (tangent,))
        sq = sum(t.pow(2).sum() for t in tangent.values())
        dv = sum((tangent[k] * vecs[pl][k]).sum() for k in p)
        den = Jd.pow(2).sum() / n + damping[pl] * sq / n
        tiny = torch.finfo(den.dtype).tiny
        alpha = torch.where(den > tiny, dv / den.clamp_min(tiny), torch.zeros_like(den))
        fitted.append({k: alpha * t for k, t in d[pl].items()})
        info[f"pullback_alpha_{('theta', 'phi')[pl]}"] = float(alpha)
    return (fitted[0], fitted[1]), state, info
