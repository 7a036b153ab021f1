"""Metrics in function space: Lyapunov ``V``, duality gap, field norm, payoff.

``V(θ, φ) = ½ E‖F_θ − F*‖² + ½ E‖G_φ − G*‖²`` is the quantity the
natural-gradient flow drives to 0 in a strictly convex-concave hidden game; the
duality gap ``max_G L(F, G) − min_F L(F, G)`` is ≥ 0 and 0 exactly at equilibrium;
``‖v‖`` is the Euclidean norm of the parameter-space vector field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .curvature.pytree import sq_norm
from .games.base import Batch, Game, Params
from .solvers.oracle import vector_field

#: metrics that are "smaller is better" and span decades: plotted on a log scale
LOG_METRICS = ("lyapunov", "exploitability", "field_norm", "openspiel_exploitability")


def lyapunov(game: Game, params: Params, batch: Batch) -> float | None:
    """``V`` at ``params``, or ``None`` for games without a known equilibrium."""
    with torch.no_grad():
        F, G = game.strategies(params, batch)
        V = game.lyapunov(F, G, batch)
    return None if V is None else float(V)


def progress_value(game: Game, params: Params, batch: Batch) -> float | None:
    """The metric named by :attr:`Game.progress_metric <hcc.games.base.Game.progress_metric>` at
    ``params`` (``V`` or the duality gap), or ``None`` if the game cannot compute it."""
    if game.progress_metric == "lyapunov":
        return lyapunov(game, params, batch)
    with torch.no_grad():
        gap = game.duality_gap(*game.strategies(params, batch), batch)
    return None if gap is None else float(gap)


def evaluate(game: Game, params: Params, batch: Batch, *, field: bool = True) -> dict[str, float]:
    """Every metric the game supports at ``params`` (one forward, one backward)."""
    out: dict[str, float] = {}
    with torch.no_grad():
        F, G = game.strategies(params, batch)
        out["payoff"] = float(game.payoff(F, G, batch))
        V = game.lyapunov(F, G, batch)
        if V is not None:
            out["lyapunov"] = float(V)
        gap = game.duality_gap(F, G, batch)
        if gap is not None:
            out["exploitability"] = float(gap)
    if field:
        out["field_norm"] = math.sqrt(float(sq_norm(vector_field(game, params, batch))))
    out.update(game.extra_metrics(params, batch))
    return out


def to_float(x: Tensor | float) -> float:
    return float(x)
