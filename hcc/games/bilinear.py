"""Bilinear games ``min_θ max_φ θᵀAφ + λ/2 (‖θ‖² − ‖φ‖²)``.

The strategy maps are the identity (:class:`~hcc.games.maps.Direct`): the
parameters are the functions, so every method's behaviour here is the classic
one of Gidel et al., *Negative Momentum for Improved Game Dynamics* (AISTATS 2019):
simultaneous GDA diverges for every momentum β; alternating GDA diverges for
β > 0, stays bounded for β = 0 and converges for β < 0.

The equilibrium set is ``{θ : Aᵀθ = 0} × {φ : Aφ = 0}`` when λ = 0 (the origin
when ``A`` is nonsingular) and the origin when λ > 0; ``V`` is the squared
distance to that set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..registry import OptionError, opt
from .base import Batch, Game, seeded
from .maps import Direct


@dataclass
class BilinearOptions:
    dim: int = opt(1, "dimension of θ and φ (A is dim × dim)")
    matrix: Literal["identity", "random", "rotation"] = opt(
        "identity", "A: identity, a seeded random well-conditioned matrix, or a rotation-like one"
    )
    lam: float = opt(0.0, "λ, strength of the ±λ/2‖·‖² regularizer (0: pure bilinear)")
    init_scale: float = opt(1.0, "θ₀, φ₀ drawn from N(0, init_scale²)")

    def validate(self) -> None:
        if self.dim < 1:
            raise OptionError(f"dim: expected a positive integer, got {self.dim}")
        if self.lam < 0:
            raise OptionError(f"lam: expected λ ≥ 0, got {self.lam}")


class Bilinear(Game):
    """``Ψ(θ, φ) = θᵀAφ + λ/2 (‖θ‖² − ‖φ‖²)`` with identity strategy maps."""

    name = "bilinear"
    Options = BilinearOptions

    def __init__(self, options: BilinearOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        d = options.dim
        with seeded(seed):
            if options.matrix == "identity":
                A = torch.eye(d)
            elif options.matrix == "random":
                # singular values in [0.5, 1.5]: nonsingular and well conditioned
                U, _ = torch.linalg.qr(torch.randn(d, d))
                V, _ = torch.linalg.qr(torch.randn(d, d))
                A = U @ torch.diag(torch.linspace(0.5, 1.5, d)) @ V.T
            else:
                A = torch.eye(d) + torch.triu(torch.ones(d, d), 1) - torch.tril(torch.ones(d, d), -1)
            theta0 = options.init_scale * torch.randn(d)
            phi0 = options.init_scale * torch.randn(d)
        self.register_buffer("A", A)
        self.min_map = Direct(theta0)
        self.max_map = Direct(phi0)
        self.register_buffer("x_min", torch.zeros(1, 1))
        self.register_buffer("x_max", torch.zeros(1, 1))

    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        lam = self.options.lam
        th, ph = F[0], G[0]
        return th @ self.A @ ph + 0.5 * lam * (th.pow(2).sum() - ph.pow(2).sum())

    def equilibrium(self, batch: Batch) -> tuple[Tensor, Tensor]:
        z = torch.zeros_like(self.x_min[:, :1]).expand(1, self.options.dim)
        return z, z

    def lyapunov(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        if self.options.lam > 0:
            return super().lyapunov(F, G, batch)
        # distance to the equilibrium set: project out null(Aᵀ) for θ and null(A) for φ
        P_th = self.A @ torch.linalg.pinv(self.A)  # projector onto range(A) = null(Aᵀ)^⊥
        P_ph = torch.linalg.pinv(self.A) @ self.A  # projector onto row(A) = null(A)^⊥
        return 0.5 * (F[0] @ P_th).pow(2).sum() + 0.5 * (G[0] @ P_ph).pow(2).sum()

    def duality_gap(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor | None:
        lam = self.options.lam
        if lam == 0:
            return None  # unbounded best responses: the gap is +∞ off the equilibrium set
        th, ph = F[0], G[0]
        return ((self.A.T @ th).pow(2).sum() + (self.A @ ph).pow(2).sum()) / (2 * lam)
