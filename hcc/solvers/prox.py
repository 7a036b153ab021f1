r"""The natural proximal-point rule: an implicit step in function space, pulled back to the parameters.

A hidden game is a small explicit convex-concave game in function space
(:mod:`hcc.solvers.function_space`). This rule solves a *local* version of that game
exactly — a proximal-point step — and moves the networks towards its solution:

1. **Proximal target** in the heads' natural (Bregman) geometry. With pre-head coordinates
   ``z`` (logits for a softmax / sigmoid head, the values otherwise), ``F = h(z)`` and the
   function-space field ``v`` (:meth:`FunctionSpace.field`), the target ``z⁺`` solves

   .. math::

       z⁺ = z − η\, C\, v\big(h(z⁺)\big),

   ``C`` the centring of a softmax row. For a softmax this is the optimality condition of
   the entropic (KL) proximal step ``F⁺ = argmin ⟨v(F⁺), F'⟩ + KL(F' ‖ F)/η`` — implicit
   multiplicative weights, the proximal point method of Martinet (1970) / Rockafellar
   (1976) in the mirror geometry of Nemirovski's mirror prox (2004); for a sigmoid the
   Bernoulli KL; without a head the Euclidean proximal point. It is solved by Newton's
   method on ``R(z⁺) = z⁺ − z + ηCv(h(z⁺))``, whose Jacobian ``I + ηC H D`` (``H = ∂v/∂F``,
   ``D = ∂F/∂z``) is nonsingular for every η when ``L`` is convex-concave; backtracking on
   ``‖R‖``; warm-started from the previous target. The proximal point converges for *every*
   ``η > 0`` on monotone games, at the rate ``1/(1 + ημ)`` on μ-strongly monotone ones, so η is
   large (default ``10³``): the target is close to the equilibrium of the function-space
   game, boundary equilibria included (an action that should vanish gets its logit pushed
   down by ``η·(its excess cost)``, i.e. its probability multiplied by ``e^{−η·gap}``). Logits are
   kept within ``ζ`` of the row's maximum (:func:`~hcc.curvature.heads.clip_logits`), so a
   vanishing action's logit stays finite. A game may solve this step itself
   (:meth:`Game.proximal_target <hcc.games.base.Game.proximal_target>`): a sequence-form game
   played with behaviour strategies, whose payoff is multilinear in the behaviours, takes it in the
   realization plans with the dilated entropy instead (:mod:`hcc.games.openspiel`).

2. **Pull-back** through the preconditioner (:meth:`Preconditioner.pullback`): the
   Levenberg-Marquardt (Gauss-Newton) step ``d = argmin ‖Ĵd − r̂‖² + μ‖d‖²`` of the
   least-squares distance to the target — the surrogate loss of D'Orazio et al. (ICLR 2025)
   minimized by one damped Gauss-Newton step — exact for ``exact``/``cg``, approximate with
   a fitted length for ``kfac``/``diag``/``identity``.

3. **Damping control** (Moré 1978): per player, the reduction of the distance to the
   target actually achieved against the reduction the linearization predicted,
   ``ρ = (e(z) − e(z_new)) / (e(z) − e_lin(z + h·J_z d))``, with ``e`` the least-squares distance
   the pull-back minimizes (:func:`~hcc.curvature.heads.target_error`, in the preconditioner's
   geometry, metric held at ``z``) — in any other norm a damped step need not be a descent
   step: ``ρ > ¾`` divides μ by 3, ``ρ < ¼`` doubles it, and a step that does
   not reduce the distance (``ρ ≤ 0``) is rejected (that player stays; μ × 4). No step size to
   tune: ``lr`` multiplies the pull-back step and defaults to 1 (the full Gauss-Newton step).
   ``pullback_iters`` repeats 2–3 towards the same target (default once): for a target far from
   what one Gauss-Newton step reaches (Leduc poker's 468 information sets a player).

Not vectorizable (Newton's method and the damping control branch on data) and only for
games with a fixed support (not the continuous GAN, whose discriminator sees the
generator's samples). The dense Newton system has ``N = n_F k_F + n_G k_G`` unknowns.

>>> from hcc import run
>>> res = run("rps", "exact-natgrad", tol=1e-8)
>>> res.steps_to_tol <= 5
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..curvature.heads import (
    Head,
    clip_logits,
    coordinate_step,
    coordinate_step_matrix,
    default_logit_range,
    link,
    link_jacobian,
    target_error,
    value_change,
)
from ..curvature.pytree import axpy
from ..games.base import Params
from ..registry import OptionError, opt
from .function_space import has_function_space
from .oracle import Oracle
from .rules import RULES, Rule


@dataclass
class ProxOptions:
    eta: float = opt(1e3, "η, the proximal step in function space (large: the target is near the equilibrium)")
    mu: float = opt(1e-3, "initial Levenberg-Marquardt μ of the pull-back (added to the summed Gram ĴᵀĴ)")
    mu_min: float = opt(1e-9, "lower bound of the adaptive μ")
    mu_max: float = opt(1e6, "upper bound of the adaptive μ")
    adapt: bool = opt(True, "adapt μ by the achieved/predicted reduction of the distance to the target")
    newton_iters: int = opt(50, "Newton iterations per proximal solve (cap)")
    newton_tol: float | None = opt(None, "relative residual of the proximal solve (None: 1e4·eps of the dtype)")
    logit_range: float | None = opt(None, "ζ: logits kept within ζ of the row maximum (None: (2/3)·log(1/eps))")
    warm_start: bool = opt(True, "start Newton from the previous target")
    pullback_iters: int = opt(1, "Levenberg-Marquardt pull-backs towards each target (each with its damping control)")

    def validate(self) -> None:
        for k in ("eta", "mu", "mu_min", "mu_max"):
            v = getattr(self, k)
            if not (v > 0 and math.isfinite(v)):
                raise OptionError(f"{k}: expected a positive finite number, got {v}")
        if not self.mu_min <= self.mu <= self.mu_max:
            raise OptionError(f"mu: expected mu_min ≤ mu ≤ mu_max, got {self.mu_min}, {self.mu}, {self.mu_max}")
        for k in ("newton_iters", "pullback_iters"):
            if getattr(self, k) < 1:
                raise OptionError(f"{k}: expected a positive integer, got {getattr(self, k)}")
        for k in ("newton_tol", "logit_range"):
            v = getattr(self, k)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise OptionError(f"{k}: expected a positive finite number (or None), got {v}")


@dataclass
class ProxSolve:
    """What :func:`proximal_target` returns."""

    target: tuple[Tensor, Tensor]
    iterations: int
    #: final ``‖R‖ / scale`` of the Newton solve
    residual: float
    #: the field Jacobian last used (``None`` if it stopped predicting the field), for the next solve
    hessian: Tensor | None = None
    #: whether the field was found affine in the values (evaluated by ``hessian`` in the next solve)
    affine: bool = False


def _blocks_apply(blocks: tuple[Tensor, Tensor], X: Tensor, split: int) -> Tensor:
    """``blockdiag(B₀, B₁) X`` for per-point blocks ``Bₚ`` of shape ``(n, a, b)``: rows ``[:split]`` of ``X``
    belong to the first player."""
    out = []
    for B, Xp in zip(blocks, (X[:split], X[split:]), strict=True):
        n, a, b = B.shape
        out.append(torch.einsum("nab,nbm->nam", B, Xp.reshape(n, b, -1)).reshape(n * a, -1))
    return torch.cat(out)


def _newton_step(C: tuple[Tensor, Tensor], H: Tensor, D: tuple[Tensor, Tensor], R: Tensor, e: float,
                 nv: int) -> Tensor:
    r"""``−(I + e·C H D)⁻¹ R`` in the coordinates, by the push-through identity

    .. math:: (I + eCHD)^{-1} = I − eCH\,(I + eDCH)^{-1} D,

    so the dense solve is in the values (``N_v``, not the coordinates: a masked head has twice as many),
    and the block-diagonal ``C``, ``D`` are applied blockwise: ``O(N_v³ + N_v² k)`` instead of the
    ``O(N_z³)`` of three dense products and a dense solve (Leduc poker: ``N_v = 2808``, ``N_z = 5616``).
    """
    nc = C[0].shape[0] * C[0].shape[1]  # the first player's coordinates
    DC = tuple(torch.einsum("nab,nbc->nac", d, c) for d, c in zip(D, C, strict=True))  # values × values blocks
    DCH = _blocks_apply(DC, H, nv)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    DR = _blocks_apply(D, R[:, None], nc)
    u = torch.linalg.solve(eye + e * DCH, DR)
    return -R + e * _blocks_apply(C, H @ u, nv)[:, 0]


def proximal_target(fs: Any, z: tuple[Tensor, Tensor], eta: float, *, start: tuple[Tensor, Tensor] | None = None,
                    iters: int = 50, tol: float | None = None, hessian: Tensor | None = None,
                    affine: bool = False) -> ProxSolve:
    r"""Solve ``z⁺ = z − ηCv(h(z⁺))`` for both players by Newton's method (module docstring).

    Newton's method on ``R(w) = w − z + ηCv(h(w))`` with backtracking on ``‖R‖``, from the better of ``z``
    and ``start``. Where it stalls (far from the solution, a saturated head makes the linearization
    useless for a large η) it continues in η: the solution for ``η/10`` (solved the same way, down to
    a contraction) starts the solve for η; the solution path ``η ↦ z⁺(η)`` is smooth. ``iters`` caps
    the Newton iterations of all stages together.

    ``H = ∂v/∂(F, G)`` is computed where it is needed and reused while it predicts the field:
    after each Newton step the change of ``v`` is compared with ``H·ΔF``, and ``H`` is recomputed at
    the new point when they differ by more than ``10⁻⁶`` relative. When they agree to ``10⁻⁹`` the field
    is affine in the values (a quadratic ``L``: every matrix game) and, with ``affine``, the solve
    evaluates it as ``v₀ + H·(F − F₀)`` — one matrix product instead of a backward pass — checking the
    solution with one true evaluation. ``hessian`` and ``affine`` come back in :class:`ProxSolve` for the
    next solve.
    """
    heads: tuple[Head, Head] = fs.heads
    shapes = (z[0].shape, z[1].shape)
    nF = z[0].numel()
    z0 = torch.cat([z[0].reshape(-1), z[1].reshape(-1)])
    dt = z0.dtype
    tol = 1e4 * torch.finfo(dt).eps if tol is None else tol
    # C (coordinates × values) and D = ∂F/∂z (values × coordinates) are block-diagonal, a k × k block per
    # support point: kept as blocks and applied by einsum
    C = (coordinate_step_matrix(z[0], heads[0]), coordinate_step_matrix(z[1], heads[1]))
    budget = [iters]
    # the values F = h(z) may have fewer columns than the coordinates (the masked head's mask)
    vshapes = tuple(link(t, h).shape for t, h in zip(z, heads, strict=True))
    nv = vshapes[0].numel()
    n_values = nv + vshapes[1].numel()
    H_cell: list[Tensor | None] = [hessian if hessian is not None and hessian.shape == (n_values, n_values) else None]
    model: list[tuple[Tensor, Tensor] | None] = [None]  # (values, field) anchor of the affine model
    affine_cell = [affine and H_cell[0] is not None]

    def split(w: Tensor) -> tuple[Tensor, Tensor]:
        return w[:nF].reshape(shapes[0]), w[nF:].reshape(shapes[1])

    def values(w: Tensor) -> Tensor:
        a, b = split(w)
        return torch.cat([link(a, heads[0]).reshape(-1), link(b, heads[1]).reshape(-1)])

    def field(w: Tensor, true: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(v, Cv, F|G)`` at coordinates ``w``."""
        FG = values(w)
        if affine_cell[0] and model[0] is not None and not true:
            v = model[0][1] + H_cell[0] @ (FG - model[0][0])  # type: ignore[operator]
        else:
            vF, vG = fs.field(FG[:nv].reshape(vshapes[0]), FG[nv:].reshape(vshapes[1]))
            v = torch.cat([vF.reshape(-1), vG.reshape(-1)])
            model[0] = (FG, v)
        vF, vG = v[:nv].reshape(vshapes[0]), v[nv:].reshape(vshapes[1])
        Cv = torch.cat([coordinate_step(vF, heads[0], z[0]).reshape(-1),
                        coordinate_step(vG, heads[1], z[1]).reshape(-1)])
        return v, Cv, FG

    def rel(R: Tensor, Cv: Tensor, e: float) -> float:
        return float(R.norm()) / (1.0 + float(z0.norm()) + e * float(Cv.norm()))

    def newton(e: float, w: Tensor) -> tuple[Tensor, float, int]:
        """Newton iterations for one η: (solution, relative residual, iterations)."""
        v, Cv, FG = field(w)
        R = w - z0 + e * Cv
        n_it = 0
        while budget[0] > 0:
            if rel(R, Cv, e) <= tol:
                if not affine_cell[0]:
                    break
                v_true, Cv_true, _ = field(w, true=True)  # check the affine model once at the solution
                if float((v_true - v).norm()) <= 1e-9 * (1.0 + float(v_true.norm())):
                    break
                affine_cell[0], H_cell[0] = False, None
                v, Cv, R = v_true, Cv_true, w - z0 + e * Cv_true
                continue
            budget[0] -= 1
            n_it += 1
            a, b = split(w)
            D = (link_jacobian(a, heads[0]), link_jacobian(b, heads[1]))
            if H_cell[0] is None:
                H_cell[0] = fs.field_jacobian(FG[:nv].reshape(vshapes[0]), FG[nv:].reshape(vshapes[1]))
            H = H_cell[0]
            step = _newton_step(C, H, D, R, e, nv)
            s, rn = 1.0, R.norm()
            while True:
                w_try = w + s * step
                v_try, Cv_try, FG_try = field(w_try)
                R_try = w_try - z0 + e * Cv_try
                if bool(R_try.norm() < (1 - 1e-4 * s) * rn) or s < 2.0**-8:
                    break
                s /= 2
            if not bool(R_try.norm() < rn):
                break  # no progress along the Newton direction
            if not affine_cell[0]:
                err = float((v_try - v - H @ (FG_try - FG)).norm())
                scale = float((v_try - v).norm()) + float(torch.finfo(dt).eps)
                if err > 1e-6 * scale:
                    H_cell[0] = None  # the field is not quadratic here: a new Jacobian at the next iterate
                elif err <= 1e-9 * scale and float((FG_try - FG).norm()) > 1e-6:
                    affine_cell[0] = True  # an affine field: evaluate it by H from now on
            w, v, Cv, FG, R = w_try, v_try, Cv_try, FG_try, R_try
        return w, rel(R, Cv, e), n_it

    w = z0
    if start is not None and all(a.shape == b.shape for a, b in zip(start, z, strict=True)):
        ws = torch.cat([start[0].reshape(-1), start[1].reshape(-1)])
        if bool(torch.isfinite(ws).all()):
            _, Cv0, _ = field(z0)
            _, Cvs, _ = field(ws)
            if (ws - z0 + eta * Cvs).norm() < eta * Cv0.norm():
                w = ws
    w_sol, res, n_total = newton(eta, w)
    if res > tol:  # continuation: from a small η (a contraction there) up to η, each stage starting the next
        e_lo = eta
        _, Cv0, _ = field(z0)
        while e_lo * float(Cv0.norm()) > 1e-2 * (1.0 + float(z0.norm())) and e_lo > eta * 1e-8:
            e_lo /= 10
        w_stage, e = z0, e_lo
        while budget[0] > 0:
            w_stage, res_stage, it = newton(e, w_stage)
            n_total += it
            if e >= eta:
                if res_stage < res:
                    w_sol, res = w_stage, res_stage
                break
            e = min(10 * e, eta)
    return ProxSolve(split(w_sol), n_total, res, H_cell[0], affine_cell[0])


@RULES.entry
class Prox(Rule):
    r"""The natural proximal-point rule (module docstring): an implicit function-space step
    ``z⁺ = z − ηCv(h(z⁺))`` pulled back by a Levenberg-Marquardt step with adaptive damping.

    State: the damping ``μ`` per player and the last target (Newton's warm start). Info:
    ``prox_newton`` (iterations), ``prox_residual``, ``mu_theta``/``mu_phi``, ``rho_theta``/``rho_phi``
    (achieved/predicted reduction), ``rejected_total`` (player steps rejected).
    """

    name = "prox"
    Options = ProxOptions
    lr_scales_with_game = False
    untraceable = ("the proximal rule's Newton solve and damping control branch on data, which torch.func "
                   "transforms (vmap, jacfwd) cannot trace")

    def check_game(self, game: Any) -> None:  # noqa: D102
        why = has_function_space(game)
        if why:
            raise OptionError(f"rule 'prox' needs a game with a fixed function-space support; {why} "
                              "(use a field-based rule there, e.g. eg+exact)")

    def init(self, params: Params) -> dict[str, Any]:
        m = self.options.mu
        return {"mu": (m, m), "target": None, "hessian": None, "affine": False}

    def step(self, oracle: Oracle, params: Params, state: dict[str, Any], lr: float) -> tuple[Params, dict, dict]:
        o = self.options
        fs = oracle.function_space()
        z = fs.coords(params)
        start = state["target"] if o.warm_start else None
        own = oracle.game.proximal_target(z, o.eta, start)
        if own is not None:  # the game solves its proximal step itself (e.g. a sequence-form game)
            sol = ProxSolve(*own)
        else:
            sol = proximal_target(fs, z, o.eta, start=start, iters=o.newton_iters, tol=o.newton_tol,
                                  hessian=state.get("hessian"), affine=bool(state.get("affine", False)))
        zeta = o.logit_range if o.logit_range is not None else default_logit_range(z[0].dtype)
        target = tuple(clip_logits(t, h, zeta) for t, h in zip(sol.target, fs.heads, strict=True))
        info: dict[str, Any] = {"prox_newton": sol.iterations, "prox_residual": sol.residual}
        mu, rejected = state["mu"], 0
        for _ in range(o.pullback_iters):
            params, z, mu, fit = self._pullback(oracle, fs, params, z, target, mu, lr)  # type: ignore[arg-type]
            rejected += fit.pop("rejected")
            info.update(fit)
        info["rejected_total"] = rejected
        new_state = {"mu": mu, "target": target, "hessian": sol.hessian, "affine": sol.affine}
        return params, new_state, info

    def _pullback(self, oracle: Oracle, fs: Any, params: Params, z: tuple[Tensor, Tensor],
                  target: tuple[Tensor, Tensor], mu: tuple[float, float], lr: float
                  ) -> tuple[Params, tuple[Tensor, Tensor], tuple[float, float], dict[str, Any]]:
        """One Levenberg-Marquardt pull-back towards ``target`` with its damping control (module docstring, 2–3):
        ``(params, coordinates, μ, info)``, a player whose step does not reduce the distance staying where it was."""
        o = self.options
        d = oracle.pullback(params, target, mu)
        trial = tuple(axpy(lr, d[i], params[i]) for i in (0, 1))
        z_new = fs.coords(trial)  # type: ignore[arg-type]
        out, coords, new_mu, info = [], [], [], {}
        rejected = 0
        geometry = oracle.pullback_geometry
        for i, tag in enumerate(("theta", "phi")):
            head, zi = fs.heads[i], z[i]

            def err(dz: Tensor, linear: bool, i: int = i, head: Head = head, zi: Tensor = zi) -> float:
                return float(target_error(zi, value_change(zi, dz, head, geometry, linear), target[i], head, geometry))

            e0 = err(torch.zeros_like(zi), False)
            pred = e0 - err(lr * fs.coords_jvp(params, d, i), True)
            actual = e0 - err(z_new[i] - zi, False)
            rho = actual / pred if pred > 0 else (1.0 if actual >= 0 else -1.0)
            m = mu[i]
            if o.adapt:
                m = m / 3 if rho > 0.75 else (m * 2 if rho > 0 else m * 4) if rho < 0.25 else m
                m = min(max(m, o.mu_min), o.mu_max)
            accept = rho > 0 or e0 == 0.0
            out.append(trial[i] if accept else params[i])
            coords.append(z_new[i] if accept else zi)
            rejected += 0 if accept else 1
            new_mu.append(m)
            info[f"mu_{tag}"], info[f"rho_{tag}"] = m, rho
        info["rejected"] = rejected
        return (out[0], out[1]), (coords[0], coords[1]), (new_mu[0], new_mu[1]), info



__all__ = ["Prox", "ProxOptions", "ProxSolve", "proximal_target"]
