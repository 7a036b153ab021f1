r"""Phase portraits of games with a 2-D function-space state: the field and solver trajectories.

The seeds' "proof by picture" (Gidel et al., *Negative Momentum for Improved Game
Dynamics*, AISTATS 2019, Fig. 1; Mescheder et al., *The Numerics of GANs*, 2017):
on a game whose strategies are two scalars ``(F, G)`` the function-space vector field

.. math::

    v(F, G) = \big(-∂_F ℓ_{\min},\; -∂_G ℓ_{\max}\big) = \big(-∂_F L,\; ∂_G L\big)\ \text{(zero-sum)}

is drawn as a stream plot, with the iterates of several solvers on top. The
solvers run in *parameter space*; what is drawn is the ``(F, G)`` image of their
iterates (for the bilinear game with ``dim = 1`` the parameters are ``(F, G)``;
for hidden matching pennies ``(f(θ), g(φ))``). The field drawn is the one the
natural-gradient flow follows in function space; plain gradients
in parameter space move ``(F, G)`` along the field scaled by each player's
``‖J‖²``, and off it once the step is finite.

>>> from hcc import make_game
>>> from hcc.field import field_portrait
>>> portrait = field_portrait(make_game("bilinear"), ["gda", "eg"], steps=50)
>>> portrait.trajectories["eg"].shape
(51, 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .curvature.pytree import all_finite
from .games.base import Batch, Game
from .registry import OptionError
from .solvers import make_solver

#: default solvers of a portrait: simultaneous vs alternating vs negative momentum vs extragradient
DEFAULT_SOLVERS = ("gda", "alt-gda", "negmom", "eg")
#: steps drawn per solver when none are given, per game name ("*": fallback)
DEFAULT_STEPS = {"*": 200, "bilinear": 150, "matching-pennies": 300}
#: the drawn box of games whose strategies live in a bounded set
STATE_BOXES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "matching-pennies": ((0.0, 1.0), (0.0, 1.0)),
}
#: axis names of the state, per game
STATE_LABELS: dict[str, tuple[str, str]] = {
    "bilinear": ("θ (min player)", "φ (max player)"),
    "matching-pennies": ("f(θ) (min player)", "g(φ) (max player)"),
}


@dataclass
class FieldPortrait:
    """A grid of the function-space field and the ``(F, G)`` trajectories of solvers."""

    game: str
    game_options: dict[str, Any]
    #: grid coordinates and field components, each ``(ny, nx)``
    X: np.ndarray
    Y: np.ndarray
    U: np.ndarray
    V: np.ndarray
    #: solver name → ``(steps + 1, 2)`` array of ``(F, G)`` (rows after a divergence are dropped)
    trajectories: dict[str, np.ndarray]
    #: solver name → step size used
    lrs: dict[str, float]
    equilibrium: tuple[float, float] | None
    labels: tuple[str, str] = ("F (min player)", "G (max player)")
    extra: dict[str, Any] = field(default_factory=dict)


def state_2d(game: Game, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(F, G)`` at the game's initial parameters if both are scalars, else :class:`OptionError`."""
    F, G = game.strategies(game.init_params(), batch)
    if F.numel() != 1 or G.numel() != 1:
        raise OptionError(f"game {game.name!r}: expected a game with a 2-D state (scalar strategies F, G, e.g. "
                          f"bilinear with dim=1 or matching-pennies), got F with {F.numel()} and G with "
                          f"{G.numel()} values")
    return F, G


def function_field(game: Game, batch: Batch, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The function-space field ``(−∂_F ℓ_min, −∂_G ℓ_max)`` at scalar strategies ``f, g`` (0-d tensors)."""
    F0, G0 = game.strategies(game.init_params(), batch)
    F = f.detach().reshape(F0.shape).requires_grad_(True)
    G = g.detach().reshape(G0.shape).requires_grad_(True)
    l_min, l_max = game.losses(F, G, batch)
    (dF,) = torch.autograd.grad(l_min, F, retain_graph=True)
    (dG,) = torch.autograd.grad(l_max, G)
    return -dF.reshape(()), -dG.reshape(())


def field_portrait(
    game: Game,
    solvers: Sequence[str] = DEFAULT_SOLVERS,
    *,
    steps: int | None = None,
    lrs: dict[str, float] | None = None,
    grid: int = 25,
) -> FieldPortrait:
    """Field on a ``grid × grid`` box and each solver's ``(F, G)`` trajectory from the game's init.

    Each solver runs ``steps`` steps (default :data:`DEFAULT_STEPS`) at its default
    step size for the game (or ``lrs[name]``). Trajectories stop early if the
    iterates become non-finite. The box is :data:`STATE_BOXES` for bounded games,
    else centred on the equilibrium with half-width 1.6× the start's distance.
    """
    batch = game.sample_batch()
    F0, G0 = state_2d(game, batch)
    steps = DEFAULT_STEPS.get(game.name, DEFAULT_STEPS["*"]) if steps is None else steps
    if steps < 1:
        raise OptionError(f"steps: expected a positive integer, got {steps}")
    trajectories: dict[str, np.ndarray] = {}
    used: dict[str, float] = {}
    for name in solvers:
        solver = make_solver(name, game, lr=(lrs or {}).get(name))
        used[name] = solver.lr
        params = game.init_params()
        state = solver.init(game, params)
        path = [_point(game, params, batch)]
        for _ in range(steps):
            params, state, _ = solver.step(game, params, state, batch)
            if not all_finite(params):
                break
            path.append(_point(game, params, batch))
        trajectories[name] = np.array(path)

    eq = game.equilibrium(batch)
    star = (float(eq[0].reshape(-1)[0]), float(eq[1].reshape(-1)[0])) if eq is not None else None
    if game.name in STATE_BOXES:
        (x0, x1), (y0, y1) = STATE_BOXES[game.name]
    else:
        c = star or (0.0, 0.0)
        r = 1.6 * max(abs(float(F0) - c[0]), abs(float(G0) - c[1]), 1e-3)
        (x0, x1), (y0, y1) = (c[0] - r, c[0] + r), (c[1] - r, c[1] + r)
    xs, ys = np.linspace(x0, x1, grid), np.linspace(y0, y1, grid)
    X, Y = np.meshgrid(xs, ys)
    U, V = np.zeros_like(X), np.zeros_like(Y)
    dt = F0.dtype
    for i in range(grid):
        for j in range(grid):
            u, v = function_field(game, batch, torch.tensor(X[i, j], dtype=dt), torch.tensor(Y[i, j], dtype=dt))
            U[i, j], V[i, j] = float(u), float(v)
    return FieldPortrait(
        game=game.name, game_options=asdict(game.options), X=X, Y=Y, U=U, V=V, trajectories=trajectories,
        lrs=used, equilibrium=star, labels=STATE_LABELS.get(game.name, ("F (min player)", "G (max player)")),
        extra={"steps": steps},
    )


def _point(game: Game, params: Any, batch: Batch) -> tuple[float, float]:
    with torch.no_grad():
        F, G = game.strategies(params, batch)
    f, g = float(F.reshape(-1)[0]), float(G.reshape(-1)[0])
    return (f, g) if math.isfinite(f) and math.isfinite(g) else (math.nan, math.nan)


__all__ = ["DEFAULT_SOLVERS", "DEFAULT_STEPS", "FieldPortrait", "field_portrait", "function_field", "state_2d"]
