r"""The exact and CG natural-gradient preconditioners (on :mod:`hcc.curvature.operators`).

Each player preconditions its gradient with the inverse of the Gram matrix of its
strategy map's Jacobians over its ``n`` support points,

.. math::

    A_θ = \frac1n \sum_{i=1}^n Ĵ_iᵀ Ĵ_i, \qquad Ĵ_i = Q_iᵀ \frac{∂z_θ(x_i)}{∂θ},

in the geometry of option ``geometry`` (:mod:`hcc.curvature.heads`; ``l2``: ``Ĵ = J``, the
generalized Gauss-Newton matrix of ``½‖F_θ(x) − y‖²``). :class:`Exact` applies
``P_λ = (A + λI)⁻¹Π_A`` exactly (:func:`~hcc.curvature.operators.exact_operator`: sample-space
kernel, structured MLP kernel or dense), :class:`CG` by conjugate gradients
(:class:`~hcc.curvature.operators.CGOperator`); both take the Levenberg-Marquardt ``λ`` added to
``JᵀJ = nA`` and pass ``λ/n`` to the operators. Their fused path feeds the function-space
gradient ``∂ℓ_p/∂F_p`` in as the residual (:func:`function_space_gradients`): the accurate
row-space form, with no parameter-space field formed. References: Amari, *Natural gradient
works efficiently in learning*, Neural Computation 1998; Martens, *New insights and
perspectives on the natural gradient method*, JMLR 2020; Mladenovic, Sakos & Piliouras,
*Generalized natural gradient flows in hidden convex-concave games and GANs*, ICLR 2022.
Measurements (speed of each method, damping, step sizes): ``docs/curvature.md``.

>>> from hcc import make_game
>>> game = make_game("rps").double()
>>> pre = Exact(ExactOptions(damping=0.1))
>>> params = game.init_params()
>>> d, _, info = pre.direction(game, params, game.sample_batch(), pre.init(game, params), (0, 1))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp

from ..curvature.heads import Geometry, check_geometry, field_residual, target_residual
from ..curvature.jacobians import BACKENDS, Backend, check_choice, head_coords
from ..curvature.operators import METHODS, Method, cg_natural_direction, exact_natural_direction
from ..curvature.pytree import flatten
from ..games.base import Batch, Game, Params
from ..registry import OptionError, opt
from .precond import PRECONDITIONERS, Preconditioner

# -- the function-space gradients the fast path feeds in -------------------------------------------


def fused_supported(game: Game) -> bool:
    """True when ``ℓ_p`` is :meth:`Game.losses` of :meth:`Game.strategies` (the base-class plumbing)."""
    cls = type(game)
    return cls.strategies is Game.strategies and cls.player_losses is Game.player_losses


def function_space_gradients(
    game: Game, params: Params, batch: Batch
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    r"""Supports and ``(g_min, g_max) = (∂ℓ_min/∂F, ∂ℓ_max/∂G)``, so that ``v = (J_θᵀ g_min, J_φᵀ g_max)``.

    ``g_min`` is the total derivative (through the max player's support when that
    depends on ``F``, as a GAN discriminator's does); ``g_max`` holds the support
    fixed. Needs the base-class :meth:`Game.strategies` (:func:`fused_supported`).
    Returns ``((x_min, x_max), (g_min, g_max))`` with ``x_max`` detached.
    """
    theta, phi = params
    min_map, max_map = game.maps()
    x_min = batch["x_min"]
    F = functional_call(min_map, theta, (x_min,))
    x_max = game.max_support(F.detach(), batch)
    G = functional_call(max_map, phi, (x_max,))

    def losses(F_: Tensor, dG: Tensor) -> tuple[Tensor, Tensor]:
        G_ = functional_call(max_map, phi, (game.max_support(F_, batch),)) + dG
        return game.losses(F_, G_, batch)

    (l_min, l_max), pull = vjp(losses, F, torch.zeros_like(G))
    g_min = pull((torch.ones_like(l_min), torch.zeros_like(l_max)))[0]
    g_max = pull((torch.zeros_like(l_min), torch.ones_like(l_max)))[1]
    return (x_min, x_max), (g_min, g_max)


def _field_entry(module: nn.Module, params: dict[str, Tensor], x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``Jᵀg``: a player's (unpreconditioned) field from its function-space gradient."""
    _, pull = vjp(lambda p: functional_call(module, p, (x,)), params)
    return pull(g)[0]


# -- the preconditioners ---------------------------------------------------------------------------


#: default Levenberg-Marquardt damping λ (added to ``JᵀJ = nA``): see :class:`Exact`
DEFAULT_DAMPING = 0.5

_DAMPING_HELP = "Levenberg-Marquardt λ added to JᵀJ = n·A, i.e. λ/n added to A (0: exact pseudo-inverse)"


def _check_common(o: Any) -> None:
    if not (o.damping >= 0 and o.damping != float("inf")):
        raise OptionError(f"damping: expected a finite λ ≥ 0, got {o.damping}")
    if getattr(o, "rcond", None) is not None and not 0 <= o.rcond < 1:
        raise OptionError(f"rcond: expected 0 ≤ rcond < 1 (or None), got {o.rcond}")


_GEOMETRY_HELP = ("metric: l2 (A = JᵀJ/n on the values F: the flow's) | fisher (J_zᵀSJ_z: softmax/sigmoid "
                  "heads; replicator dynamics) | logit (J_zᵀPJ_z on the centred pre-head values)")


@dataclass
class ExactOptions:
    method: Method = opt("auto", "kernel (sample space, J formed) | structured (MLP, no J) | dense (M×M) | auto")
    backend: Backend = opt("func", "per-sample Jacobians: func (vmap(jacrev)) | backpack (BatchGrad)")
    damping: float = opt(DEFAULT_DAMPING, _DAMPING_HELP)
    rcond: float | None = opt(None, "relative eigenvalue cutoff of the pseudo-inverse (None: 10·size·eps)")
    geometry: Geometry = opt("l2", _GEOMETRY_HELP)

    def validate(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("backend", self.backend, BACKENDS)
        _check_common(self)
        check_geometry(self.geometry)


class _Natural(Preconditioner):
    """Shared plumbing: per-player solves, the fused field path, the pull-back, the info record.

    :meth:`_solve` gets the residual ``r̂`` in the metric Jacobian's output space (or a general
    ``vec``) and the damping ``λ`` added to ``A``.
    """

    fused_direction = True

    def _solve(self, module: nn.Module, p: dict[str, Tensor], x: Tensor, vec: dict[str, Tensor] | None,
               r: Tensor | None, state: Any, player: int, lam: float | Tensor
               ) -> tuple[dict[str, Tensor], Any, dict[str, Any]]:
        raise NotImplementedError

    def _residual(self, module: nn.Module, p: dict[str, Tensor], x: Tensor, g: Tensor) -> Tensor:
        """``r̂`` of the function-space gradient ``g = ∂ℓ/∂F`` in this preconditioner's geometry."""
        geometry = self.options.geometry
        if geometry == "l2":
            return g
        z, head = head_coords(module, p, x)
        return field_residual(z, g.reshape(z.shape[0], -1), head, geometry)

    def _run(self, game: Game, params: Params, xs: tuple[Tensor, Tensor], vecs: Params | None,
             gs: tuple[Tensor, Tensor] | None, state: Any, players: tuple[int, ...]
             ) -> tuple[Params, Any, dict[str, Any]]:
        maps = game.maps()
        out: list[dict[str, Tensor]] = []
        infos: list[dict[str, Any]] = []
        for pl in (0, 1):
            if pl in players:
                r = None if gs is None else self._residual(maps[pl], params[pl], xs[pl], gs[pl])
                lam = self.options.damping / xs[pl].shape[0]
                d, state, info = self._solve(maps[pl], params[pl], xs[pl], None if vecs is None else vecs[pl],
                                             r, state, pl, lam)
                infos.append(info)
            elif vecs is not None:
                d = vecs[pl]
            else:
                d = _field_entry(maps[pl], params[pl], xs[pl], gs[pl])  # type: ignore[index]
            out.append(d)
        return (out[0], out[1]), state, _combine(infos)

    def apply(self, game, params, batch, vec, state, players):  # noqa: D102
        return self._run(game, params, game.supports(params, batch), vec, None, state, players)

    def direction(self, game, params, batch, state, players):  # noqa: D102
        if not fused_supported(game):
            return super().direction(game, params, batch, state, players)
        xs, gs = function_space_gradients(game, params, batch)
        return self._run(game, params, xs, None, gs, state, players)

    def pullback(self, game, params, batch, targets, state, damping):  # noqa: D102
        # exactly argmin ‖Ĵd − r̂‖² + μ‖d‖²: the residual form with r̂/n and λ = μ/n
        maps, xs = game.maps(), game.supports(params, batch)
        out, infos = [], []
        for pl in (0, 1):
            n = xs[pl].shape[0]
            z, head = head_coords(maps[pl], params[pl], xs[pl])
            r = target_residual(z, targets[pl].reshape(z.shape), head, self.options.geometry)
            d, state, info = self._solve(maps[pl], params[pl], xs[pl], None, r / n, state, pl, damping[pl] / n)
            out.append(d)
            infos.append(info)
        return (out[0], out[1]), state, _combine(infos)


def _combine(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """One call's record: max over the preconditioned players; ``*_total`` keys summed."""
    out: dict[str, Any] = {}
    for info in infos:
        for k, v in info.items():
            if k in out:
                out[k] = out[k] + v if k.endswith("_total") else (max(out[k], v) if isinstance(v, int)
                                                                   else torch.maximum(out[k], v))
            else:
                out[k] = v
    return out


@PRECONDITIONERS.entry
class Exact(_Natural):
    r"""The exact generalized natural gradient ``(A + λ/n·I)⁻¹Π_A`` per player.

    .. math::

        d_θ = \Big(\tfrac1n JᵀJ + \tfrac{λ}{n} I\Big)^{-1} ∇_θ ℓ_{\min}
            = Jᵀ\Big(\tfrac1n JJᵀ + \tfrac{λ}{n} I\Big)^{+} \frac{∂ℓ_{\min}}{∂F}

    (and likewise for φ), computed by the sample-space kernel, the structured MLP
    kernel or the dense parameter-space solve
    (:func:`~hcc.curvature.operators.exact_natural_direction`, option ``method``). The
    preconditioned *field* is computed from ``∂ℓ_p/∂F_p`` directly (one forward/backward in
    function space, no parameter-space field needed).

    **Damping** (Levenberg-Marquardt). Option ``damping = λ`` is added to the *summed* Gram
    ``JᵀJ = nA``, i.e. ``λ/n`` is added to ``A``:

    .. math::

        d = \arg\min_d \; ‖J d − n g‖² + λ ‖d‖² = (A + \tfrac{λ}{n} I)^{-1} v,

    so its strength per support point does not change with ``n``. Near saturated
    softmax/sigmoid strategies the smallest singular values ``σ`` of ``J`` vanish and the
    undamped step in θ grows like ``1/σ``; damping caps the gain ``σ/(σ² + λ)`` at
    ``1/(2√λ)``. Why ``λ = 0.5``: it keeps extragradient converging from saturated starts at
    the cost of a few iterations at well-conditioned ones (``docs/curvature.md``, "Damping").
    The per-step value added to ``A`` is logged as ``damping``; ``λ = 0`` gives the exact
    pseudo-inverse (and exact parametrization invariance).

    References: Amari 1998; Martens 2020; Mladenovic, Sakos & Piliouras, ICLR 2022.
    """

    name = "exact"
    Options = ExactOptions

    def _solve(self, module, p, x, vec, r, state, player, lam):  # noqa: D102
        o = self.options
        d = exact_natural_direction(module, p, x, vec, residual=r, damping=lam, method=o.method, backend=o.backend,
                                    rcond=o.rcond, geometry=o.geometry)
        return d, state, {"damping": torch.as_tensor(lam)}


@dataclass
class CGOptions:
    damping: float = opt(DEFAULT_DAMPING, _DAMPING_HELP)
    tol: float = opt(1e-6, "relative residual ‖(A+λI)d − v‖/‖v‖ at which CG stops")
    maxiter: int = opt(100, "iteration cap per solve")
    warm_start: bool = opt(True, "start from the previous solve's solution (else from 0: minimum norm)")
    early_stop: bool = opt(True, "stop at the tolerance (False: always maxiter masked iterations; vmappable)")
    geometry: Geometry = opt("l2", _GEOMETRY_HELP)

    def validate(self) -> None:
        _check_common(self)
        check_geometry(self.geometry)
        if not self.tol > 0:
            raise OptionError(f"tol: expected a positive number, got {self.tol}")
        if self.maxiter < 1:
            raise OptionError(f"maxiter: expected a positive integer, got {self.maxiter}")


@PRECONDITIONERS.entry
class CG(_Natural):
    r"""The natural gradient by matrix-free conjugate gradients on ``A + λ/n·I``.

    .. math::

        (A + \tfrac{λ}{n} I)\,d = v,\qquad Ap = \tfrac1n\,Jᵀ(Jp),

    one Jacobian-vector and one vector-Jacobian product per iteration
    (:class:`~hcc.curvature.operators.CGOperator`). From 0 it returns the minimum-norm solution;
    ``warm_start`` starts each solve from the player's previous solution (state),
    which saves iterations when directions change slowly. Logs ``cg_iters``
    (max over players, last solve), ``cg_iters_total`` (summed over the step) and
    ``cg_residual`` (final relative residual). Damping as for :class:`Exact`.
    """

    name = "cg"
    Options = CGOptions

    def init(self, game: Game, params: Params) -> dict[str, Any]:  # noqa: D102
        return {"x": tuple(torch.zeros_like(flatten(p)) for p in params)}

    def _solve(self, module, p, x, vec, r, state, player, lam):  # noqa: D102
        o = self.options
        x0 = state["x"][player] if o.warm_start else None
        res = cg_natural_direction(module, p, x, vec, residual=r, damping=lam, tol=o.tol, maxiter=o.maxiter,
                                   x0=x0, early_stop=o.early_stop, geometry=o.geometry)
        xs = list(state["x"])
        xs[player] = res.solution.detach()
        info = {"damping": torch.as_tensor(lam), "cg_iters": res.iterations,
                "cg_iters_total": res.iterations, "cg_residual": res.residual.detach()}
        return res.direction, {**state, "x": tuple(xs)}, info


__all__ = [
    "CG", "CGOptions", "DEFAULT_DAMPING", "Exact", "ExactOptions", "function_space_gradients", "fused_supported",
]
