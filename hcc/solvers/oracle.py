"""The game's vector field and the oracle the update rules query.

Both players *descend* their own loss, so the simultaneous vector field is

.. math::

    v(θ, φ) = (∇_θ ℓ_min, ∇_φ ℓ_max) = (∇_θ Ψ, −∇_φ Ψ)  (zero-sum),

and every rule updates ``x ← x − h·d`` with ``d`` a (preconditioned) direction.
The Hamiltonian is ``H = ½‖v‖²`` with ``∇H = (∇v)ᵀ v`` (Mescheder, Nowozin &
Geiger, *The Numerics of GANs*, 2017), computed as one vector-Jacobian product.
All functions are pure in ``params`` so they run under ``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp

from ..curvature.pytree import tree_map
from ..games.base import Batch, Game, Params
from .function_space import FunctionSpace

BOTH: tuple[int, ...] = (0, 1)


def vector_field(game: Game, params: Params, batch: Batch) -> Params:
    """``v = (∇_θ ℓ_min, ∇_φ ℓ_max)`` at ``params``."""
    if game.zero_sum:
        psi, pull = vjp(lambda p: game.payoff_of(p, batch), params)
        g_th, g_ph = pull(torch.ones_like(psi))[0]
        return g_th, tree_map(torch.neg, g_ph)
    losses, pull = vjp(lambda p: game.player_losses(p, batch), params)
    l_min, l_max = losses
    g_th = pull((torch.ones_like(l_min), torch.zeros_like(l_max)))[0][0]
    g_ph = pull((torch.zeros_like(l_min), torch.ones_like(l_max)))[0][1]
    return g_th, g_ph


def hamiltonian_grad(game: Game, params: Params, batch: Batch) -> tuple[Params, Params]:
    """``(∇H, v)`` with ``H = ½‖v‖²``: ``∇H = (∇v)ᵀ v`` by one vjp through the field."""
    v, pull = vjp(lambda p: vector_field(game, p, batch), params)
    return pull(v)[0], v


@dataclass
class Oracle:
    """What an update rule may ask of the game at the current step.

    Bound to one batch (support points) and one preconditioner; records what each
    call measured in :attr:`infos` so the step returns it without recomputation.
    Every query point is first mapped onto the parameter domain by
    :meth:`Game.project <hcc.games.base.Game.project>` (the identity for unconstrained
    maps), so a rule's extrapolation points are projected like its iterates.
    """

    game: Game
    batch: Batch
    precondition_fn: Callable[[Params, Params, tuple[int, ...]], tuple[Params, dict[str, Any]]]
    infos: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    #: optional fused ``params, players ↦ (P⁻¹ v(params), info)`` (the preconditioner's fast path)
    direction_fn: Callable[[Params, tuple[int, ...]], tuple[Params, dict[str, Any]]] | None = None
    #: ``params, targets, damping ↦ (d, info)``: the preconditioner's pull-back of function-space targets
    pullback_fn: Callable[[Params, tuple[Tensor, Tensor], tuple[float, float]], tuple[Params, dict[str, Any]]] | None \
        = None
    #: the geometry the pull-back works in (:attr:`Preconditioner.geometry`)
    pullback_geometry: str = "logit"
    _fs: Any = None

    def field(self, params: Params) -> Params:
        self.calls += 1
        return vector_field(self.game, self.game.project(params), self.batch)

    def precondition(self, params: Params, vec: Params, players: tuple[int, ...] = BOTH) -> Params:
        d, info = self.precondition_fn(self.game.project(params), vec, players)
        self.infos.append(info)
        return d

    def direction(self, params: Params, players: tuple[int, ...] = BOTH) -> Params:
        """The preconditioned field ``P⁻¹ v`` (only ``players`` are preconditioned)."""
        if self.direction_fn is not None:
            self.calls += 1
            d, info = self.direction_fn(self.game.project(params), players)
            self.infos.append(info)
            return d
        return self.precondition(params, self.field(params), players)

    def hamiltonian_grad(self, params: Params) -> tuple[Params, Params]:
        self.calls += 1
        return hamiltonian_grad(self.game, self.game.project(params), self.batch)

    def function_space(self) -> FunctionSpace:
        """The game's function-space view on this batch (:class:`~hcc.solvers.function_space.FunctionSpace`)."""
        if self._fs is None:
            self._fs = FunctionSpace(self.game, self.batch)
        return self._fs

    def pullback(self, params: Params, targets: tuple[Tensor, Tensor], damping: tuple[float, float]) -> Params:
        """Parameter steps towards the pre-head coordinates ``targets`` (Levenberg-Marquardt ``damping``
        per player) through the preconditioner (:meth:`Preconditioner.pullback`)."""
        if self.pullback_fn is None:
            raise RuntimeError("this oracle has no pull-back")
        self.calls += 1
        d, info = self.pullback_fn(self.game.project(params), targets, damping)
        self.infos.append(info)
        return d

