"""Preconditioners: operators that apply (an approximation of) ``A_θ⁻¹`` to a field.

The generalized natural-gradient flow preconditions each player's
gradient with the inverse of its Jacobian Gram matrix ``A_θ = E_x[J_θ(x)ᵀ J_θ(x)]``.
A preconditioner is a small stateful operator: :meth:`Preconditioner.init` makes
its state (running averages, warm starts) from the parameters, and
:meth:`Preconditioner.apply` maps a field to a direction, returning what it
measured. ``identity`` (plain gradients) gives the classic methods.

A preconditioner may also offer a fused :meth:`Preconditioner.direction` (set
``fused_direction = True``) that computes the preconditioned *field* ``P⁻¹ v``
without the parameter-space field, e.g. from the function-space gradients
``∂ℓ_p/∂F_p`` (the exact natural gradient's row-space form); the oracle uses it
whenever a rule asks for the preconditioned field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..games.base import Batch, Game, Params
from ..registry import Registry
from .oracle import vector_field


class Preconditioner:
    """Base class: ``apply`` returns ``(P⁻¹ vec, new_state, info)`` for ``players``."""

    name: ClassVar[str] = "preconditioner"
    Options: ClassVar[type]
    #: True when :meth:`direction` is faster than ``apply(vector_field(...))``
    fused_direction: ClassVar[bool] = False

    def __init__(self, options: Any) -> None:
        self.options = options
        #: the solver's step size (set by :class:`~hcc.solvers.Solver`; a preconditioner whose output depends
        #: on the step it will be taken with — the surrogate method's target — reads it)
        self.step_size: float | None = None

    def init(self, game: Game, params: Params) -> Any:
        return {}

    def apply(
        self, game: Game, params: Params, batch: Batch, vec: Params, state: Any, players: tuple[int, ...]
    ) -> tuple[Params, Any, dict[str, Any]]:
        raise NotImplementedError

    def direction(
        self, game: Game, params: Params, batch: Batch, state: Any, players: tuple[int, ...]
    ) -> tuple[Params, Any, dict[str, Any]]:
        """The preconditioned field ``P⁻¹ v(params)``; by default ``apply`` on :func:`vector_field`."""
        return self.apply(game, params, batch, vector_field(game, params, batch), state, players)

    @property
    def geometry(self) -> str:
        """The metric this preconditioner approximates (``l2``, ``fisher``, ``logit``)."""
        return getattr(self.options, "geometry", "logit")

    def pullback(
        self, game: Game, params: Params, batch: Batch, targets: tuple[Tensor, Tensor], state: Any,
        damping: tuple[float, float],
    ) -> tuple[Params, Any, dict[str, Any]]:
        r"""Parameter steps that move both maps towards target pre-head coordinates ``z⁺``.

        Per player, the Levenberg-Marquardt step of the least-squares problem

        .. math::

            d = \arg\min_d \; ‖Ĵ d − r̂‖² + μ ‖d‖², \qquad r̂ = \text{target\_residual}(z, z⁺),

        in this preconditioner's :attr:`geometry` (:mod:`hcc.curvature.heads`), ``μ = damping[p]``
        (added to the summed Gram ``ĴᵀĴ``). This generic version applies the preconditioner to the
        gradient ``v = Ĵᵀr̂/n`` of that least-squares loss and fits the step length along the result
        exactly (one Jacobian-vector product): ``α = ⟨d, v⟩ / (‖Ĵd‖²/n + μ‖d‖²/n)``. The exact
        and CG preconditioners solve the problem directly.
        """
        from .pullback import generic_pullback

        return generic_pullback(self, game, params, batch, targets, state, damping,
                                getattr(self.options, "pullback_steps", 1))


#: the preconditioners by name (each registered by ``@PRECONDITIONERS.entry`` at its class)
PRECONDITIONERS: Registry[type[Preconditioner]] = Registry("preconditioner")


@dataclass
class IdentityOptions:
    pass


@PRECONDITIONERS.entry
class Identity(Preconditioner):
    """``P = I``: the plain (Euclidean) gradient field."""

    name = "identity"
    Options = IdentityOptions

    def apply(self, game, params, batch, vec, state, players):  # noqa: D102
        return vec, state, {}


