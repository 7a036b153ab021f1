r"""The two published preconditioners for hidden games: surrogate losses and PHGD.

**Surrogate losses** (D'Orazio, Vucetic, Liu, Kim, Mitliagkas & Gidel, *Solving hidden
monotone variational inequalities with surrogate losses*, ICLR 2025). Take the step in
function space to a *target*, then make the network reach it approximately by a few steps of
an ordinary optimizer on the surrogate loss ``½‖c(θ) − target‖²``:

.. math::

    y = c(θ_t) − τ\, n\, r̂(θ_t), \qquad
    θ_{t+1} ≈ \arg\min_θ ½ ‖c(θ) − y‖² \quad (K \text{ inner steps from } θ_t),

``c`` the map's outputs in the geometry (``l2``: the values ``F``, the paper's choice;
``logit``: centred logits) and ``r̂`` the function-space gradient there
(:func:`~hcc.curvature.heads.field_residual`). As a preconditioner it returns
``d = (θ_t − θ_K)/τ``, so a rule stepping ``θ − h d`` with ``h = τ`` *is* the surrogate method; the
target step ``τ`` defaults to the solver's step size. With ``K → ∞`` and small ``τ`` the direction
tends to the natural gradient of the geometry; with ``K = 1`` and a line search it is the plain
gradient, rescaled. Inner steps: gradient descent with the exact line search on the linearized
surrogate (``inner_lr = None``) or a fixed step (the paper's SGD inner loop). Composed with the
proximal rule (``prox+surrogate``) it pulls back the proximal target the same way.

**Preconditioned hidden gradient descent** (Sakos, Vlatakis-Gkaragkounis, Mertikopoulos &
Piliouras, *Exploiting hidden structures in non-convex games for convergence to Nash
equilibrium*, NeurIPS 2023). The preconditioner

.. math::

    P(θ) = J^{+} J^{+\,ᵀ} = (JᵀJ)^{+}, \qquad θ_{t+1} = θ_t − γ_t\, P(θ_t)\, \hat v_t,

makes the latent (function-space) variables follow ``ż = −∇_z L`` exactly when ``J`` has full row
rank — the undamped minimum-norm natural gradient (here with the latent gradient taken in the
mean-over-points metric of ``V``, ``∇_z L = n ∂L/∂F``, i.e. ``d = n J⁺J⁺ᵀ v``, as for :class:`Exact`).
Its stochastic form estimates the field and
the metric from a random minibatch of ``batch_size`` support points per step (unbiased for the
field) with a step ``γ_t = h/(1 + t)^{decay}``; the paper's rates hold for ``decay ∈ (½, 1]``
in the stochastic case and ``decay = 0`` in the deterministic one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp

from ..curvature.heads import Geometry, check_geometry, field_residual
from ..curvature.jacobians import head_coords
from ..curvature.operators import conjugate_gradient
from ..games.base import Batch, Game, Params
from ..registry import OptionError, opt
from .natural import Exact, ExactOptions, function_space_gradients, fused_supported
from .precond import PRECONDITIONERS, Identity, IdentityOptions, Preconditioner
from .pullback import least_squares_steps, metric_maps, target_residuals


@dataclass
class SurrogateOptions:
    target_lr: float | None = opt(None, "τ: function-space step of the target (None: the solver's step size)")
    inner_steps: int = opt(5, "K: optimizer steps on the surrogate loss per call")
    inner_lr: float | None = opt(None, "inner step size (None: exact line search on the linearized surrogate)")
    geometry: Geometry = opt(
        "l2", "surrogate ½‖c(θ) − y‖² on the values F (l2, the paper's), Qᵀz (fisher) or the centred logits (logit)")

    def validate(self) -> None:
        for k in ("target_lr", "inner_lr"):
            v = getattr(self, k)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise OptionError(f"{k}: expected a positive finite number (or None), got {v}")
        if self.inner_steps < 1:
            raise OptionError(f"inner_steps: expected a positive integer, got {self.inner_steps}")
        check_geometry(self.geometry)


@PRECONDITIONERS.entry
class Surrogate(Preconditioner):
    r"""The surrogate-loss method as a preconditioner (module docstring): ``K`` gradient steps on
    ``½‖c(θ) − y‖²`` towards the function-space target ``y``; ``d = (θ_t − θ_K)/τ``."""

    name = "surrogate"
    Options = SurrogateOptions
    fused_direction = True

    def _tau(self) -> float:
        tau = self.options.target_lr if self.options.target_lr is not None else self.step_size
        if tau is None:
            raise OptionError("surrogate: expected target_lr or a solver step size, got neither")
        return float(tau)

    def _inner(self, game: Game, params: Params, batch: Batch, r0: tuple[Tensor, Tensor], state: Any,
               damping: tuple[float, float] = (0.0, 0.0)) -> tuple[Params, Any, dict[str, Any]]:
        identity = Identity(IdentityOptions())
        mms = metric_maps(game, params, batch, self.options.geometry)

        def apply(p: Params, vecs: tuple, st: Any) -> tuple[Params, Any, dict[str, Any]]:
            return identity.apply(game, p, batch, vecs, st, (0, 1))

        return least_squares_steps(apply, params, r0, mms, state, damping, self.options.inner_steps,
                                   self.options.inner_lr)

    def _directions(self, game: Game, params: Params, batch: Batch, r: tuple[Tensor, Tensor], state: Any,
                    players: tuple[int, ...], vec: Params) -> tuple[Params, Any, dict[str, Any]]:
        tau = self._tau()
        n = tuple(x.shape[0] for x in game.supports(params, batch))
        r0 = tuple(-tau * ni * ri for ni, ri in zip(n, r, strict=True))
        moved, state, info = self._inner(game, params, batch, r0, state)  # type: ignore[arg-type]
        d = tuple({k: -t / tau for k, t in moved[i].items()} if i in players else vec[i] for i in (0, 1))
        return d, state, {**info, "surrogate_tau": tau}  # type: ignore[return-value]

    def direction(self, game, params, batch, state, players):  # noqa: D102
        if not fused_supported(game):
            return super().direction(game, params, batch, state, players)
        xs, gs = function_space_gradients(game, params, batch)
        r = []
        for m, p, x, g in zip(game.maps(), params, xs, gs, strict=True):
            z, head = head_coords(m, p, x)
            r.append(field_residual(z, g.reshape(z.shape[0], -1), head, self.options.geometry))
        from .oracle import vector_field

        field = vector_field(game, params, batch) if len(players) < 2 else params
        return self._directions(game, params, batch, (r[0], r[1]), state, players, field)

    def apply(self, game, params, batch, vec, state, players):  # noqa: D102
        # a general parameter-space vector: its function-space gradient is the least-squares r̂ with Ĵᵀr̂ = v
        # (conjugate gradients on ĴĴᵀ r̂ = Ĵv, from 0: the minimum-norm one)
        mms = metric_maps(game, params, batch, self.options.geometry)
        r = [_least_squares_residual(mm, p, v) for mm, p, v in zip(mms, params, vec, strict=True)]
        return self._directions(game, params, batch, (r[0], r[1]), state, players, vec)

    def pullback(self, game, params, batch, targets, state, damping):  # noqa: D102
        r0 = target_residuals(game, params, batch, targets, self.options.geometry)
        return self._inner(game, params, batch, r0, state, damping)

    @property
    def geometry(self) -> str:  # noqa: D102
        return self.options.geometry


def _least_squares_residual(mm: Any, params: dict[str, Tensor], vec: dict[str, Tensor]) -> Tensor:
    """The minimum-norm ``r̂`` with ``Ĵᵀr̂ = Π v``: conjugate gradients on ``ĴĴᵀ r̂ = Ĵv`` from 0."""
    p = {k: t.detach() for k, t in params.items()}

    def outputs(q: dict[str, Tensor]) -> Tensor:
        return mm.outputs(q, mm.x)

    _, Jv = jvp(outputs, (p,), ({k: vec[k].detach() for k in p},))
    _, pull = vjp(outputs, p)

    def gram(u: Tensor) -> Tensor:
        return jvp(outputs, (p,), (pull(u.reshape(Jv.shape))[0],))[1].reshape(-1)

    u, _, _ = conjugate_gradient(gram, Jv.reshape(-1), tol=1e-10, maxiter=4 * Jv.numel())
    return u.reshape(Jv.shape)


@dataclass
class PHGDOptions(ExactOptions):
    damping: float = opt(0.0, "Levenberg-Marquardt λ added to JᵀJ (0: PHGD's exact (JᵀJ)⁺)")
    batch_size: int | None = opt(None, "support points per step (stochastic PHGD); None: all (deterministic)")
    decay: float = opt(0.0, "step schedule γ_t = h/(1 + t)^decay (t: preconditioner calls)")
    seed: int = opt(0, "seed of the minibatch draws")

    def validate(self) -> None:
        super().validate()
        if self.batch_size is not None and self.batch_size < 1:
            raise OptionError(f"batch_size: expected a positive integer (or None), got {self.batch_size}")
        if not (0 <= self.decay <= 1):
            raise OptionError(f"decay: expected 0 ≤ decay ≤ 1, got {self.decay}")


@PRECONDITIONERS.entry
class PHGD(Exact):
    r"""Preconditioned hidden gradient descent's preconditioner ``(JᵀJ)⁺`` (module docstring), exact,
    undamped by default, with the stochastic form's minibatches and step schedule."""

    name = "phgd"
    Options = PHGDOptions

    def init(self, game: Game, params: Params) -> dict[str, Any]:  # noqa: D102
        gen = torch.Generator(device="cpu").manual_seed(self.options.seed)
        return {"calls": 0, "rng": gen.get_state()}

    def _subsample(self, x: Tensor, g: Tensor | None, gen: torch.Generator) -> tuple[Tensor, Tensor | None, float]:
        b = self.options.batch_size
        n = x.shape[0]
        if b is None or b >= n:
            return x, g, 1.0
        idx = torch.randperm(n, generator=gen)[:b].to(x.device)
        return x[idx], None if g is None else g[idx], n / b

    def _run(self, game, params, xs, vecs, gs, state, players):  # noqa: D102
        gen = torch.Generator(device="cpu")
        gen.set_state(state["rng"])
        maps = game.maps()
        out, info = [], {}
        gamma = (1.0 + state["calls"]) ** (-self.options.decay)
        for pl in (0, 1):
            if pl not in players:
                out.append(vecs[pl] if vecs is not None else super()._run(game, params, xs, None, gs, state, ())[0][pl])
                continue
            if gs is None:  # a general vector: no per-point split, the full metric
                x, g, scale = xs[pl], None, 1.0
            else:
                x, g, scale = self._subsample(xs[pl], gs[pl], gen)
            r = None if g is None else self._residual(maps[pl], params[pl], x, g) * scale
            lam = self.options.damping / x.shape[0]
            d, _, _ = self._solve(maps[pl], params[pl], x, None if vecs is None else vecs[pl], r, state, pl, lam)
            out.append({k: gamma * t for k, t in d.items()})
        info["phgd_gamma"] = gamma
        return (out[0], out[1]), {"calls": state["calls"] + 1, "rng": gen.get_state()}, info



__all__ = ["PHGD", "PHGDOptions", "Surrogate", "SurrogateOptions"]
