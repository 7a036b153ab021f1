r"""The function-space game of a hidden game, at one batch of support points.

A hidden game ``Ψ(θ, φ) = L(F_θ, G_φ)`` is convex-concave in the functions'
values on the support. When the support does not depend on the strategies (every game
here but the continuous GAN, whose discriminator sees the generator's samples) the
function-space game is a small explicit game in ``n_F·k_F + n_G·k_G`` variables, and
a solver can work on it directly: take a step there — even an implicit one, solving
a local game exactly — and pull it back to the parameters through the natural metric.

Coordinates. Each player's map is ``F = h(z)`` (:mod:`hcc.curvature.heads`): its
*coordinates* are the pre-head values ``z`` (logits for a probability head, the values
themselves otherwise), its *values* ``F = h(z)``. The field is taken in the mean-over-
points metric of ``V``: ``v_F = n_F ∂ℓ_min/∂F``, ``v_G = n_G ∂ℓ_max/∂G`` (each player descends
its own loss), so that ``Ḟ = −v_F`` is function-space gradient descent-ascent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from ..curvature.heads import Head, link, link_jacobian, split_head
from ..games.base import Batch, Game, Params
from ..registry import OptionError


def has_function_space(game: Game) -> str:
    """Why ``game`` has no fixed-support function-space game ('' if it has one)."""
    from .natural import fused_supported

    if not fused_supported(game):
        return f"{type(game).__name__} overrides strategies()/player_losses()"
    if not getattr(game, "fixed_support", True):
        return f"the {game.name} game's max-player support depends on the min player's output"
    return ""


@dataclass
class FunctionSpace:
    """The function-space view of ``game`` on ``batch`` (see the module docstring)."""

    game: Game
    batch: Batch

    def __post_init__(self) -> None:
        why = has_function_space(self.game)
        if why:
            raise OptionError(f"a function-space step needs a game with a fixed support; {why}")
        split = [split_head(m) for m in self.game.maps()]
        self.bodies: tuple[nn.Module, nn.Module] = (split[0][0], split[1][0])
        self.heads: tuple[Head, Head] = (split[0][1], split[1][1])
        self.supports: tuple[Tensor, Tensor] = (self.batch["x_min"], self.batch["x_max"])

    # -- coordinates and values ------------------------------------------------------------
    def coords(self, params: Params) -> tuple[Tensor, Tensor]:
        """The pre-head coordinates ``(z_F, z_G)`` at ``params`` (detached, ``(n_p, k_p)`` each)."""
        with torch.no_grad():
            return tuple(  # type: ignore[return-value]
                functional_call(b, p, (x,)).reshape(x.shape[0], -1)
                for b, p, x in zip(self.bodies, params, self.supports, strict=True)
            )

    def coords_jvp(self, params: Params, direction: Params, player: int) -> Tensor:
        """``J_z d``: the first-order change of a player's coordinates along ``direction``."""
        body, x = self.bodies[player], self.supports[player]
        primal = {k: v.detach() for k, v in params[player].items()}
        tangent = {k: direction[player][k].detach() for k in primal}
        _, dz = jvp(lambda p: functional_call(body, p, (x,)).reshape(x.shape[0], -1), (primal,), (tangent,))
        return dz

    def values(self, z: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return link(z[0], self.heads[0]), link(z[1], self.heads[1])

    # -- the field and its Jacobian ------------------------------------------------------------
    def field(self, F: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        """``(v_F, v_G) = (n_F ∂ℓ_min/∂F, n_G ∂ℓ_max/∂G)`` at the values ``(F, G)``.

        By :func:`torch.autograd.grad` (the proximal solve is not traced, and eager autograd costs half of
        :func:`torch.func.grad` on these small graphs); :meth:`field_jacobian` differentiates the same
        losses with :mod:`torch.func`."""
        F_, G_ = F.detach().requires_grad_(), G.detach().requires_grad_()
        with torch.enable_grad():
            l_min, l_max = self._losses(F_, G_)
            if self.game.zero_sum:
                gF, gG = torch.autograd.grad(l_min, (F_, G_))
                return F.shape[0] * gF, -G.shape[0] * gG
            (gF,) = torch.autograd.grad(l_min, F_, retain_graph=True)
            (gG,) = torch.autograd.grad(l_max, G_)
        return F.shape[0] * gF, G.shape[0] * gG

    def _losses(self, F: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        return self.game.losses(F, G, self.batch)

    def _functional_field(self, F: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`field` by :func:`torch.func.grad` (composable with ``vjp``/``vmap``)."""
        gF = torch.func.grad(lambda a: self._losses(a, G)[0])(F)
        gG = torch.func.grad(lambda b: self._losses(F, b)[1])(G)
        return F.shape[0] * gF, G.shape[0] * gG

    def field_jacobian(self, F: Tensor, G: Tensor) -> Tensor:
        """``∂v/∂(F, G)`` at the values, ``N × N`` with ``N = n_F k_F + n_G k_G`` (dense: the
        function-space game is small). Its symmetric part is PSD for a convex-concave ``L``."""
        nF = F.numel()

        def flat_field(w: Tensor) -> Tensor:
            vF, vG = self._functional_field(w[:nF].reshape(F.shape), w[nF:].reshape(G.shape))
            return torch.cat([vF.reshape(-1), vG.reshape(-1)])

        # rows of the Jacobian as vector-Jacobian products with the unit vectors (vmap of one vjp: as fast
        # as jacrev, without its first-call cost)
        w = torch.cat([F.reshape(-1), G.reshape(-1)])
        _, pull = vjp(flat_field, w)
        return vmap(pull)(torch.eye(w.numel(), dtype=w.dtype, device=w.device))[0]

    def link_jacobians(self, z: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``∂F/∂z`` per support point for both players, ``(n_p, k_p, k_p)`` each."""
        return link_jacobian(z[0], self.heads[0]), link_jacobian(z[1], self.heads[1])

    def size(self, params: Params) -> int:
        """``N``, the number of function values of both players."""
        return sum(z.numel() for z in self.coords(params))


__all__ = ["FunctionSpace", "has_function_space"]
