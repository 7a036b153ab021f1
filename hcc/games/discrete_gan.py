r"""A GAN that is hidden convex-concave: a generator of a distribution over a finite support.

The data is a distribution ``q`` over ``K`` fixed points ``x_1, …, x_K`` (a ring in the plane).
The generator ``F_θ`` is a network whose softmax output is a distribution ``p`` over the same
points; the discriminator ``G_φ`` is a network with a sigmoid output evaluated on the points,
``D_k = G_φ(x_k) ∈ (0, 1)``. The standard GAN payoff (Goodfellow et al., 2014)

.. math::

    L(p, D) = \sum_k q_k \log D_k + \sum_k p_k \log(1 − D_k)

is linear (convex) in ``p`` and concave in ``D``: a convex-concave game in function space,
nonconvex-nonconcave in ``(θ, φ)``. Its unique saddle point is ``p* = q``, ``D* = ½`` (the
discriminator's best response to ``p`` is ``D_k = q_k/(q_k + p_k)``, and only ``p = q`` makes
the generator indifferent between all points), so ``V = ½‖p − q‖² + ½ mean_k (D_k − ½)²`` is
exact, as for ``rps``. The duality gap is exact too: ``max_D L(p, ·)`` is
``Σ q log(q/(q+p)) + p log(p/(q+p))`` (``2·JS(p‖q) − log 4``) and ``min_p L(·, D)`` is
``Σ q log D + min_k log(1 − D_k)``.

The game is not strictly convex on the generator's side (``L`` is linear in ``p``), so it is
a test of the solvers' behaviour on merely monotone games.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..registry import OptionError, opt
from .base import Batch, Game, seeded
from .maps import NETWORK_HELP, check_network, strategy_network


@dataclass
class DiscreteGANOptions:
    n_points: int = opt(8, "K, the number of support points (on a circle of radius 2)")
    data: Literal["uniform", "random"] = opt("random", "data distribution q: uniform, or Dirichlet(1) from the seed")
    width: int = opt(32, "hidden width of both networks")
    depth: int = opt(2, "number of hidden layers")
    input_dim: int = opt(4, "dimension of the generator's fixed input")
    activation: str = opt("tanh", "hidden activation (tanh, relu, elu)")
    out_scale: float = opt(2.0, "gain on the last layers' init (larger: start farther from uniform / ½)")
    network: str = opt("mlp", NETWORK_HELP)

    def validate(self) -> None:
        check_network(self.network)
        if self.n_points < 2:
            raise OptionError(f"n_points: expected an integer ≥ 2, got {self.n_points}")
        for k in ("width", "input_dim"):
            if getattr(self, k) < 1:
                raise OptionError(f"{k}: expected a positive integer, got {getattr(self, k)}")
        if self.depth < 0:
            raise OptionError(f"depth: expected ≥ 0, got {self.depth}")


class DiscreteGAN(Game):
    """A softmax generator over ``K`` fixed points against a sigmoid discriminator on them (module docstring)."""

    name = "discrete-gan"
    Options = DiscreteGANOptions

    def __init__(self, options: DiscreteGANOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        o = options
        K = o.n_points
        with seeded(seed):
            net = (o.network, o.input_dim, o.width, o.depth)
            self.min_map = strategy_network(*net, K, o.activation, nn.Softmax(-1), o.out_scale)
            self.max_map = strategy_network(o.network, 2, o.width, o.depth, 1, o.activation, nn.Sigmoid(),
                                            o.out_scale)
            self.register_buffer("x_min", torch.randn(1, o.input_dim))
            q = torch.distributions.Dirichlet(torch.ones(K)).sample() if o.data == "random" else torch.full((K,), 1 / K)
        angle = torch.arange(K, dtype=torch.float32) * (2 * math.pi / K)
        self.register_buffer("x_max", 2.0 * torch.stack([angle.cos(), angle.sin()], -1))
        q = q.double()
        self.register_buffer("q", q / q.sum())  # exactly normalized in float64 (the game is cast after)

    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        p, D = F[0], G[:, 0]
        return (self.q * torch.log(D)).sum() + (p * torch.log1p(-D)).sum()

    def equilibrium(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.q[None, :], torch.full_like(batch["x_max"][:, :1], 0.5)

    def duality_gap(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        p, D, q = F[0], G[:, 0], self.q
        m = q + p
        best_D = torch.xlogy(q, q / m).sum() + torch.xlogy(p, p / m).sum()
        best_p = (q * torch.log(D)).sum() + torch.log1p(-D).min()
        return best_D - best_p

    def describe(self) -> dict:
        return {**super().describe(), "q": [round(float(v), 6) for v in self.q]}


__all__ = ["DiscreteGAN", "DiscreteGANOptions"]
