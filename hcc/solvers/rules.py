"""Update rules: how a step is built from (preconditioned) field evaluations.

Every rule is written against the :class:`~hcc.solvers.field.Oracle`, so it works
with every preconditioner (the identity gives the classic method). Conventions:
both players descend their own loss, ``d = P⁻¹ v`` is the direction returned by
``oracle.direction`` and ``h`` is the step size. Rules are functional: ``init``
builds a state pytree, ``step`` maps ``(params, state)`` to new ones with no
data-dependent Python control flow, so they vectorize with :func:`torch.vmap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..curvature.pytree import axpy, sub, tree_map, zeros_like
from ..games.base import Params
from ..registry import OptionError, Registry, opt
from .oracle import Oracle

StepInfo = dict[str, Any]


class Rule:
    """Base class of an update rule with options dataclass :attr:`Options`."""

    name: ClassVar[str] = "rule"
    Options: ClassVar[type]
    #: whether a default step size is multiplied by :attr:`Game.lr_scale` (False for rules whose
    #: ``lr`` is not a step along the game's field, e.g. the Gauss-Newton fraction of ``prox``)
    lr_scales_with_game: ClassVar[bool] = True
    #: why torch.func transforms (vmap, jacfwd) cannot trace the rule's step ('' if they can): data-dependent
    #: control flow. Such solvers run batches one instance at a time and have no spectrum.
    untraceable: ClassVar[str] = ""

    def __init__(self, options: Any) -> None:
        self.options = options

    def check_game(self, game: Any) -> None:
        """Raise :class:`~hcc.registry.OptionError` if the rule cannot run on ``game`` (before any work)."""

    def init(self, params: Params) -> dict[str, Any]:
        return {}

    def step(self, oracle: Oracle, params: Params, state: dict[str, Any], lr: float) -> tuple[Params, dict, StepInfo]:
        raise NotImplementedError


# -- gradient descent-ascent with (negative) heavy-ball momentum ------------------------


#: the update rules by name (each registered by ``@RULES.entry`` at its class)
RULES: Registry[type[Rule]] = Registry("update rule")


@dataclass
class GDAOptions:
    beta: float = opt(0.0, "heavy-ball momentum β (negative: negative momentum)")
    alternating: bool = opt(False, "update φ after θ, using the new θ (Gauss-Seidel)")

    def validate(self) -> None:
        if not -1.0 < self.beta < 1.0:
            raise OptionError(f"beta: expected -1 < β < 1, got {self.beta}")


@RULES.entry
class GDA(Rule):
    r"""Gradient descent-ascent, simultaneous or alternating, with heavy-ball momentum.

    .. math::

        x_{t+1} = x_t - h\, d(x_t) + β (x_t - x_{t-1})

    (Polyak 1964). Alternating: ``θ`` moves first, then ``φ`` with ``d_φ(θ_{t+1}, φ_t)``.
    On bilinear games (Gidel et al., *Negative Momentum for Improved Game Dynamics*,
    AISTATS 2019, Table 1) simultaneous updates diverge for every β; alternating
    ones diverge for β > 0, stay bounded for β = 0 and converge for β < 0.

    >>> from hcc import make_game, make_solver
    >>> game = make_game("bilinear"); solver = make_solver("negmom", game)
    """

    name = "gda"
    Options = GDAOptions

    def init(self, params: Params) -> dict[str, Any]:
        return {"prev": tree_map(torch.clone, params)} if self.options.beta != 0 else {}

    def step(self, oracle, params, state, lr):  # noqa: D102
        beta = self.options.beta

        def heavy_ball(i: int, p: Params, d: Params) -> dict:
            moved = axpy(-lr, d[i], p[i])
            return axpy(beta, sub(p[i], state["prev"][i]), moved) if beta != 0 else moved

        if self.options.alternating:
            th = heavy_ball(0, params, oracle.direction(params, players=(0,)))
            ph = heavy_ball(1, params, oracle.direction((th, params[1]), players=(1,)))
            new = (th, ph)
        else:
            d = oracle.direction(params)
            new = (heavy_ball(0, params, d), heavy_ball(1, params, d))
        return new, ({"prev": params} if beta != 0 else state), {}


# -- extragradient and optimistic GDA ------------------------------------------------------


@dataclass
class EGOptions:
    extra_lr: float | None = opt(None, "step of the extrapolation (None: same as lr)")

    def validate(self) -> None:
        if self.extra_lr is not None and not self.extra_lr > 0:
            raise OptionError(f"extra_lr: expected a positive number, got {self.extra_lr}")


@RULES.entry
class Extragradient(Rule):
    r"""Extragradient (Korpelevich 1976).

    .. math::

        x_{t+½} = x_t - h' d(x_t), \qquad x_{t+1} = x_t - h\, d(x_{t+½}).

    Converges on bilinear games where GDA diverges; on the natural direction it
    tolerates far larger steps than simultaneous Euler.
    """

    name = "eg"
    Options = EGOptions

    def step(self, oracle, params, state, lr):  # noqa: D102
        h_extra = self.options.extra_lr if self.options.extra_lr is not None else lr
        half = axpy(-h_extra, oracle.direction(params), params)
        return axpy(-lr, oracle.direction(half), params), state, {}


@dataclass
class NoOptions:
    pass


@RULES.entry
class Optimistic(Rule):
    r"""Optimistic GDA (Popov 1980; Daskalakis et al., ICLR 2018).

    .. math::

        x_{t+1} = x_t - 2h\, d(x_t) + h\, d(x_{t-1}),

    with ``d(x_{-1}) = d(x_0)`` (the first step is plain GDA). One field evaluation
    per step: extragradient that reuses the last gradient as its extrapolation.
    """

    name = "ogda"
    Options = NoOptions

    def init(self, params: Params) -> dict[str, Any]:
        return {"prev": zeros_like(params), "started": torch.zeros(())}

    def step(self, oracle, params, state, lr):  # noqa: D102
        d = oracle.direction(params)
        started = state["started"].to(dtype=next(iter(params[0].values())).dtype)
        # 2d − d_prev, or d on the first step
        step_dir = tree_map(lambda di, pi: di + started * (di - pi), d, state["prev"])
        return axpy(-lr, step_dir, params), {"prev": d, "started": torch.ones(())}, {}


# -- consensus optimization and Hamiltonian descent ----------------------------------------


@dataclass
class ConsensusOptions:
    gamma: float = opt(1.0, "γ, weight of the ½‖v‖² regularizer")

    def validate(self) -> None:
        if self.gamma < 0:
            raise OptionError(f"gamma: expected γ ≥ 0, got {self.gamma}")


@RULES.entry
class Consensus(Rule):
    r"""Consensus optimization (Mescheder, Nowozin & Geiger 2017, Algorithm 2).

    .. math::

        x_{t+1} = x_t - h\, P^{-1}\big(v(x_t) + γ ∇H(x_t)\big), \qquad H = ½‖v‖².

    The ``γ∇H`` term makes the field more conservative: it shifts the eigenvalues
    of its Jacobian by ``γ (∇v)ᵀ∇v`` (positive semidefinite), away from the
    imaginary axis that makes simultaneous GDA cycle on bilinear games.
    """

    name = "consensus"
    Options = ConsensusOptions

    def step(self, oracle, params, state, lr):  # noqa: D102
        gH, v = oracle.hamiltonian_grad(params)
        d = oracle.precondition(params, axpy(self.options.gamma, gH, v))
        return axpy(-lr, d, params), state, {}


@RULES.entry
class Hamiltonian(Rule):
    r"""Hamiltonian gradient descent (Balduzzi et al. 2018; Abernethy et al. 2019).

    .. math::

        x_{t+1} = x_t - h\, P^{-1} ∇H(x_t), \qquad H = ½‖v‖².

    Descends the field's squared norm: converges on bilinear games; can be drawn
    to non-equilibrium stationary points of ``H`` in nonconvex games.
    """

    name = "hamiltonian"
    Options = NoOptions

    def step(self, oracle, params, state, lr):  # noqa: D102
        gH, _ = oracle.hamiltonian_grad(params)
        return axpy(-lr, oracle.precondition(params, gH), params), state, {}


# -- normalized SGDA and Adam ---------------------------------------------------------------


@dataclass
class NSGDAOptions:
    normalize: Literal["player", "layer"] = opt("player", "normalize each player's direction, or each tensor")
    eps: float = opt(1e-12, "added to the norm before dividing (0: exact normalization)", domain="nonnegative")


@RULES.entry
class NormalizedGDA(Rule):
    r"""Normalized (stochastic) GDA: unit-norm steps per player or per layer.

    .. math::

        θ_{t+1} = θ_t - h\, d_θ / ‖d_θ‖,\qquad φ_{t+1} = φ_t - h\, d_φ / ‖d_φ‖

    (per layer: each parameter tensor is normalized on its own). Studied for GANs
    in the seeds (Gidel et al., on Adam's implicit bias: normalized SGDA as the
    essence of Adam for GAN training).
    """

    name = "nsgda"
    Options = NSGDAOptions

    def step(self, oracle, params, state, lr):  # noqa: D102
        d = oracle.direction(params)
        eps = self.options.eps
        out = []
        for p, dp in zip(params, d, strict=True):
            if self.options.normalize == "layer":
                out.append({k: p[k] - lr * dp[k] / (dp[k].norm() + eps) for k in p})
            else:
                nrm = torch.sqrt(sum(t.pow(2).sum() for t in dp.values())) + eps
                out.append({k: p[k] - lr * dp[k] / nrm for k in p})
        return tuple(out), state, {}


@dataclass
class AdamOptions:
    beta1: float = opt(0.9, "Adam β₁ (first-moment decay)")
    beta2: float = opt(0.999, "Adam β₂ (second-moment decay)")
    eps: float = opt(1e-8, "Adam ε", domain="positive")

    def validate(self) -> None:
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise OptionError(f"{k}: expected a value in [0, 1), got {getattr(self, k)}")


@RULES.entry
class Adam(Rule):
    r"""Adam-GDA (Kingma & Ba 2015) applied to each player's direction, simultaneously.

    .. math::

        m ← β₁m + (1-β₁)d,\quad s ← β₂s + (1-β₂)d^2,\quad
        x ← x - h\,\frac{m/(1-β₁^t)}{\sqrt{s/(1-β₂^t)} + ε}

    Equal to ``torch.optim.Adam`` on the min player and ``Adam(maximize=True)`` on
    the max player. The practitioners' baseline for GANs.
    """

    name = "adam"
    Options = AdamOptions

    def init(self, params: Params) -> dict[str, Any]:
        return {"m": zeros_like(params), "s": zeros_like(params), "t": torch.zeros(())}

    def step(self, oracle, params, state, lr):  # noqa: D102
        o = self.options
        d = oracle.direction(params)
        t = state["t"] + 1
        m = tree_map(lambda mi, di: o.beta1 * mi + (1 - o.beta1) * di, state["m"], d)
        s = tree_map(lambda si, di: o.beta2 * si + (1 - o.beta2) * di * di, state["s"], d)
        bc1 = 1 - o.beta1**t
        bc2 = 1 - o.beta2**t
        new = tree_map(
            lambda p, mi, si: p - lr * (mi / bc1.to(p)) / ((si / bc2.to(p)).sqrt() + o.eps), params, m, s
        )
        return new, {"m": m, "s": s, "t": t}, {}

