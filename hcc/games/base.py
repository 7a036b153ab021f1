"""The game base class: a function-space payoff over two strategy maps.

A hidden convex-concave game is

.. math::

    \\min_\\theta \\max_\\phi \\; \\Psi(\\theta, \\phi) = L(F_\\theta, G_\\phi),

where ``L`` is convex-concave in the *functions* ``F = (F_θ(x_1), …, F_θ(x_n))`` and
``G`` (values on finite support points) while ``Ψ`` is nonconvex-nonconcave in the
parameters. A :class:`Game` owns the two strategy maps (``nn.Module``s), its
support points, the function-space payoff (the one required method) and, where
known, the function-space equilibrium ``(F*, G*)``.

Everything a solver needs is functional: parameters travel as a pair of dicts
``(θ, φ)`` and are plugged into the maps with :func:`torch.func.functional_call`,
so the same code runs on stacked parameters under :func:`torch.vmap`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = tuple[dict[str, Tensor], dict[str, Tensor]]
Batch = dict[str, Tensor]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without touching the global RNG.

    Construction happens in float32 whatever the global default dtype, so a seed
    gives the same game everywhere; cast afterwards with ``.to(dtype)``.
    """
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


class Game(nn.Module):
    """Base class of a two-player zero-sum (or general-sum) game in function space.

    Subclasses set :attr:`min_map` and :attr:`max_map` and implement :meth:`payoff`.
    The min player minimizes ``Ψ``; the max player maximizes it. Non-zero-sum games
    (the non-saturating GAN) override :meth:`losses` and set ``zero_sum = False``.

    Support points live in the batch returned by :meth:`sample_batch`: ``x_min``
    (inputs of ``F_θ``) and ``x_max`` (inputs of ``G_φ``). Fixed-support games return
    the same batch every call; sampling games (GANs) draw a fresh one.
    """

    name: ClassVar[str] = "game"
    Options: ClassVar[type]
    zero_sum: ClassVar[bool] = True
    #: True when the support is resampled each step (GANs).
    stochastic: ClassVar[bool] = False
    #: False when the max player's support depends on the min player's output (a GAN's discriminator
    #: sees the generator's samples): then there is no fixed function-space game to take steps in
    fixed_support: ClassVar[bool] = True
    #: steps a run takes when none are given
    default_steps: ClassVar[int] = 2000
    #: record metrics every this many steps unless told otherwise (the GAN's metrics are costly)
    default_log_every: ClassVar[int] = 1
    #: the metric a run stops on (``≤ tol``) and guards against divergence: ``lyapunov`` (``V``), or
    #: ``exploitability`` (the duality gap) for games whose equilibria are not unique
    progress_metric: ClassVar[str] = "lyapunov"

    def __init__(self, options: Any, seed: int = 0) -> None:
        super().__init__()
        self.options = options
        self.seed = seed
        self.min_map: nn.Module
        self.max_map: nn.Module

    # -- the function-space game ---------------------------------------------------
    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        """``L(F, G)``: the function-space payoff (scalar). Required."""
        raise NotImplementedError

    def losses(self, F: Tensor, G: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The losses each player *minimizes*: ``(Ψ, −Ψ)`` for a zero-sum game."""
        psi = self.payoff(F, G, batch)
        return psi, -psi

    def equilibrium(self, batch: Batch) -> tuple[Tensor, Tensor] | None:
        """``(F*, G*)`` on the batch's support points, or ``None`` if unknown."""
        return None

    def proximal_target(
        self, z: tuple[Tensor, Tensor], eta: float, start: tuple[Tensor, Tensor] | None = None
    ) -> tuple[tuple[Tensor, Tensor], int, float] | None:
        """The game's own solution of the proximal step in function space, or ``None`` (the default).

        ``z`` are the players' pre-head coordinates on the support (logits for a probability head),
        ``eta`` the proximal step, ``start`` the previous target. A game whose function-space game is
        convex-concave only in other coordinates than its strategies' (a sequence-form game played with
        behaviour strategies) returns ``(target coordinates, iterations, residual)``; the proximal rule
        (:mod:`hcc.solvers.prox`) then pulls that target back instead of solving its own implicit step.
        """
        return None

    def duality_gap(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor | None:
        """``max_G' L(F, G') − min_F' L(F', G)`` over the strategy sets, if computable."""
        return None

    def lyapunov(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor | None:
        """``V = ½ E‖F − F*‖² + ½ E‖G − G*‖²`` (mean over support points)."""
        eq = self.equilibrium(batch)
        if eq is None:
            return None
        Fs, Gs = eq
        return 0.5 * _mean_sq(F - Fs) + 0.5 * _mean_sq(G - Gs)

    def extra_metrics(self, params: Params, batch: Batch) -> dict[str, float]:
        """Game-specific metrics (GAN sample quality); empty by default."""
        return {}

    # -- support ---------------------------------------------------------------------
    def sample_batch(self, generator: torch.Generator | None = None) -> Batch:
        """The support points for one step (fixed games: the stored buffers)."""
        return {"x_min": self.x_min, "x_max": self.x_max}

    def max_support(self, F: Tensor, batch: Batch) -> Tensor:
        """Inputs of ``G_φ``; may depend on ``F`` (a GAN's discriminator sees fakes)."""
        return batch["x_max"]

    # -- functional plumbing ---------------------------------------------------------
    def init_params(self) -> Params:
        """Detached copies of the current parameters of both maps."""
        return (
            {k: v.detach().clone() for k, v in self.min_map.named_parameters()},
            {k: v.detach().clone() for k, v in self.max_map.named_parameters()},
        )

    def load_params(self, params: Params) -> None:
        """Copy ``params`` into the maps (for saving / inspection)."""
        with torch.no_grad():
            for mod, p in zip((self.min_map, self.max_map), params, strict=True):
                for k, v in mod.named_parameters():
                    v.copy_(p[k])

    def strategies(self, params: Params, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(F_θ, G_φ)`` on the batch's support, each of shape ``(n, k)``."""
        theta, phi = params
        F = functional_call(self.min_map, theta, (batch["x_min"],))
        G = functional_call(self.max_map, phi, (self.max_support(F, batch),))
        return F, G

    def supports(self, params: Params, batch: Batch) -> tuple[Tensor, Tensor]:
        """The inputs each map is evaluated on (the points its metric ``A`` averages over).

        The max player's support may depend on the min player's output (a GAN's
        discriminator sees ``real ∪ G_θ(z)``); it is taken at the current ``θ``, detached.
        """
        x_min = batch["x_min"]
        with torch.no_grad():
            F = functional_call(self.min_map, params[0], (x_min,))
        return x_min, self.max_support(F, batch)

    def maps(self) -> tuple[nn.Module, nn.Module]:
        return self.min_map, self.max_map

    def project(self, params: Params) -> Params:
        r"""``Π_D(θ, φ)``: each player's parameters mapped back onto their domain.

        Maps with a constrained parameter domain (:class:`~hcc.games.maps.Tabular`: the
        simplex, ``[0, 1]``) define ``project``; the others are unconstrained and
        ``params`` is returned as is (the same object). The solver applies it after
        every step and before every field evaluation, so that on the functional
        parametrization each rule is its projected variant, e.g. extragradient

        .. math::

            x_{t+½} = Π_D(x_t − h\, v(x_t)),\\qquad x_{t+1} = Π_D(x_t − h\, v(x_{t+½})).
        """
        projs = [getattr(m, "project", None) for m in self.maps()]
        if not any(callable(f) for f in projs):
            return params
        th, ph = (f(p) if callable(f) else p for f, p in zip(projs, params, strict=True))
        return th, ph

    def player_losses(self, params: Params, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(ℓ_min, ℓ_max)`` as functions of the parameters."""
        F, G = self.strategies(params, batch)
        return self.losses(F, G, batch)

    def payoff_of(self, params: Params, batch: Batch) -> Tensor:
        F, G = self.strategies(params, batch)
        return self.payoff(F, G, batch)

    @property
    def lr_scale(self) -> float:
        """Factor on the registry's default step sizes for this instance (1: the defaults apply).

        A game whose field scales with a user-given quantity (a payoff matrix) rescales the
        defaults that were tuned for its reference instance, so that ``h·‖∇v‖`` stays put.
        """
        return 1.0

    def describe(self) -> dict[str, Any]:
        n_min = sum(p.numel() for p in self.min_map.parameters())
        n_max = sum(p.numel() for p in self.max_map.parameters())
        return {"params_min": n_min, "params_max": n_max, "lr_scale": self.lr_scale}


def _mean_sq(D: Tensor) -> Tensor:
    """Mean over support points (dim 0) of the squared norm of each point's value."""
    return D.reshape(D.shape[0], -1).pow(2).sum(-1).mean()
