"""Hidden matching pennies (Mladenovic, Sakos & Piliouras; Gidel's seed slides).

.. math::

    Ψ(θ, φ) = (1 − 2f(θ))(1 − 2g(φ)) + λ/2 ((f − ½)² − (g − ½)²),

with ``f = σ(MLP_θ(x))`` and ``g = σ(MLP_φ(x'))`` in (0, 1): convex-concave in
``(f, g)``, nonconvex-nonconcave in the parameters. The unique equilibrium is
``f* = g* = ½``; for λ > 0 the game is strictly convex-concave and the natural
gradient flow drives ``V = ½(f − ½)² + ½(g − ½)²`` to 0.

With ``param="functional"`` the parameters are ``f`` and ``g`` themselves
(:class:`~hcc.games.maps.Tabular`, kept in ``[0, 1]``, initialised to the networks'
values): the same solvers then run projected dynamics directly in function space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..registry import OptionError, opt
from .base import Batch, Game, seeded
from .maps import NETWORK_HELP, check_network, strategy_network, tabulate


@dataclass
class MatchingPenniesOptions:
    lam: float = opt(0.1, "λ ≥ 0, strength of the regularizer (λ > 0: strictly convex-concave; 0: the pure game)")
    width: int = opt(8, "hidden width of each player's network")
    depth: int = opt(2, "number of hidden layers")
    input_dim: int = opt(2, "dimension of the fixed input x")
    activation: str = opt("tanh", "hidden activation (tanh, relu, elu)")
    out_scale: float = opt(4.0, "gain on the last layer's init (larger: start farther from ½)")
    param: Literal["network", "functional"] = opt(
        "network", "strategy parametrization: network (σ∘MLP, the hidden game) | functional (f itself, kept in [0, 1])"
    )
    network: str = opt("mlp", NETWORK_HELP)

    def validate(self) -> None:
        check_network(self.network)
        if self.lam < 0:
            raise OptionError(f"lam: expected λ ≥ 0, got {self.lam}")
        for k in ("width", "input_dim"):
            if getattr(self, k) < 1:
                raise OptionError(f"{k}: expected a positive integer, got {getattr(self, k)}")
        if self.depth < 0:
            raise OptionError(f"depth: expected ≥ 0, got {self.depth}")


class MatchingPennies(Game):
    """Matching pennies with sigmoid-of-MLP strategies ``f, g ∈ (0, 1)`` (or ``f, g`` themselves)."""

    name = "matching-pennies"
    Options = MatchingPenniesOptions

    def __init__(self, options: MatchingPenniesOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        o = options
        with seeded(seed):
            net = (o.network, o.input_dim, o.width, o.depth, 1, o.activation)
            self.min_map = strategy_network(*net, nn.Sigmoid(), o.out_scale)
            self.max_map = strategy_network(*net, nn.Sigmoid(), o.out_scale)
            self.register_buffer("x_min", torch.randn(1, o.input_dim))
            self.register_buffer("x_max", torch.randn(1, o.input_dim))
        if o.param == "functional":  # f and g themselves, starting where the networks start
            self.min_map = tabulate(self.min_map, self.x_min, "interval")
            self.max_map = tabulate(self.max_map, self.x_max, "interval")

    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        f, g = F[..., 0], G[..., 0]
        lam = self.options.lam
        per_point = (1 - 2 * f) * (1 - 2 * g) + 0.5 * lam * ((f - 0.5) ** 2 - (g - 0.5) ** 2)
        return per_point.mean()

    def equilibrium(self, batch: Batch) -> tuple[Tensor, Tensor]:
        half = torch.full_like(batch["x_min"][:, :1], 0.5)
        return half, torch.full_like(batch["x_max"][:, :1], 0.5)

    def duality_gap(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        """Exact gap over ``f', g' ∈ [0, 1]`` (concave quadratics: clipped stationary points)."""
        f, g = F[..., 0].mean(), G[..., 0].mean()
        lam = self.options.lam

        def best(coef: Tensor) -> Tensor:  # max_{x∈[0,1]} coef·(1−2x) − λ/2 (x − ½)²
            cands = [torch.zeros_like(coef), torch.ones_like(coef)]
            if lam > 0:
                cands.append(torch.clamp(0.5 - 2 * coef / lam, 0.0, 1.0))
            vals = torch.stack([coef * (1 - 2 * x) - 0.5 * lam * (x - 0.5) ** 2 for x in cands])
            return vals.max(0).values

        max_g = best(1 - 2 * f) + 0.5 * lam * (f - 0.5) ** 2
        min_f = -best(-(1 - 2 * g)) - 0.5 * lam * (g - 0.5) ** 2
        return max_g - min_f
