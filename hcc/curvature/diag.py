r"""The diagonal of the metric (diagonal GGN) for ``nn.Linear`` and ``nn.Conv2d`` layers.

.. math::

    A_{jj} = \frac1n \sum_i ‖Ĵ_i e_j‖² = \frac1n \sum_{i,c} (Ĵ_i)_{cj}^2 ,

per parameter. For a linear layer ``(Ĵ_i)_{c,(o,j)} = u_{c,i,o}\, a_{i,j}``; for a convolution
``Σ_t u_{c,i,o,t}\, a_{i,j,t}`` over the output locations ``t`` (unfolded inputs,
:mod:`hcc.curvature.kfac`) and ``Σ_t u_{c,i,o,t}`` for the bias. ``estimator="exact"`` is exact
(BackPACK ``DiagGGNExact`` with the ``Q`` loss of :mod:`hcc.curvature.layers`, or autograd);
``"mc"`` backpropagates Monte-Carlo columns ``Q_i ε/√m`` (``DiagGGNMC``), unbiased. Parameters
outside the layers: the diagonal of their exact dense block. References: Martens, Sutskever &
Swersky, *Estimating the Hessian by back-propagating curvature*, ICML 2012; Dangel, Kunstner &
Hennig, *BackPACK*, ICLR 2020.

:class:`DiagOperator` is ``diag(A)`` as an operator; its inverse ``v ⊘ (diag A + λ_b)`` is damped
per block (a layer's weight and bias, or the parameters outside the layers) with
:func:`~hcc.curvature.operators.block_damping` relative to the block's mean diagonal.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..registry import OptionError
from .heads import Geometry
from .jacobians import metric_map
from .layers import (
    DIAG_MODULES,
    Backend,
    MapStructure,
    draw_noise,
    layer_sensitivities,
    metric_jacobian,
    run_backpack,
    use_backpack,
)
from .operators import CurvatureOperator, DampingScale, _one_of, block_damping, check_damping, live
from .pytree import flatten, unflatten

Estimator = Literal["exact", "mc"]


def ggn_diagonal(
    structure: MapStructure,
    params: dict[str, Tensor],
    x: Tensor,
    geometry: Geometry = "l2",
    estimator: Estimator = "exact",
    backend: Backend = "auto",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""The diagonal of ``A`` per parameter (``{name: tensor shaped like the parameter}``; module docstring)."""
    if estimator not in ("exact", "mc"):
        raise OptionError(f"estimator: expected one of exact, mc, got {estimator!r}")
    n = x.shape[0]
    out: dict[str, Tensor] = {}
    if structure.layers:
        noise = None
        if estimator == "mc":
            noise = draw_noise(mc_samples, x, structure.out_dim(params, x), generator)
        if use_backpack(structure, backend, DIAG_MODULES):
            attr = "diag_ggn_exact" if estimator == "exact" else "diag_ggn_mc"
            tw = run_backpack(structure, params, x, geometry, "diag_exact" if estimator == "exact" else "diag_mc",
                              noise)
            for name, p in tw.params.items():
                out[name] = getattr(p, attr) / n
                delattr(p, attr)
            tw.inputs.clear()
        else:
            _, inputs, U = layer_sensitivities(structure, params, x, geometry, noise)
            for layer in structure.layers:
                u, a, names = U[layer.prefix], inputs[layer.prefix], layer.params
                if layer.kind == "linear":
                    u2 = u.pow(2)
                    out[names[0]] = torch.einsum("cno,ni->oi", u2, a.pow(2)) / n
                    s2 = u2.sum((0, 1))
                else:
                    u = u.flatten(3)  # (C, n, c_out, T)
                    Jw = torch.einsum("cnot,nit->cnoi", u, layer.unfold(a))
                    out[names[0]] = (Jw.pow(2).sum((0, 1)) / n).reshape(params[names[0]].shape)
                    s2 = u.sum(-1).pow(2).sum((0, 1))
                if layer.has_bias:
                    out[names[1]] = s2 / n
    if structure.rest:
        Je = metric_jacobian(structure, params, x, geometry, structure.rest)
        d = Je.pow(2).sum((0, 1)) / n
        out.update(unflatten(d, params, structure.rest))
    return {k: out[k] for k in structure.names}


class DiagOperator(CurvatureOperator):
    """``diag(A)`` as an operator; :meth:`inverse` damps it per block."""

    def __init__(self, structure: MapStructure, like: dict[str, Tensor], diagonal: dict[str, Tensor]) -> None:
        self.structure, self.like, self.diagonal = structure, like, diagonal

    def matvec(self, v):  # noqa: D102
        return {k: self.diagonal[k] * v[k] for k in self.structure.names}

    def dense(self):  # noqa: D102
        return torch.diag(flatten(self.diagonal, self.structure.names))

    def inverse(self, damping: float, scale: DampingScale = "absolute") -> DiagInverse:  # type: ignore[override]
        """``v ⊘ (diag A + λ_b)`` with ``λ_b`` per block (``damping > 0``); a dead block maps to 0."""
        check_damping(damping)
        scales: dict[str, Tensor] = {}
        lams = []
        for names in self.structure.blocks():
            mean = flatten(self.diagonal, names).mean()
            alive = live(mean)
            lam = block_damping(mean, alive, damping, scale)
            for k in names:
                scales[k] = alive / (self.diagonal[k].clamp_min(0) + lam)
            lams.append(lam)
        return DiagInverse(self.structure, self.like, {"scale": scales, "damping": lams})

    def solve(self, rhs=None, *, residual=None, damping=0.0, scale: DampingScale = "absolute"):  # noqa: D102
        _one_of(rhs, residual, "solve")
        v = self.field(residual) if residual is not None else rhs
        return self.inverse(damping, scale).matvec(v)


class DiagInverse(CurvatureOperator):
    """The damped inverse of a :class:`DiagOperator`; ``state`` (``{"scale": {name: 1/(A_jj + λ_b)},
    "damping": [λ_b per block]}``) is a plain pytree a solver state can keep."""

    def __init__(self, structure: MapStructure, like: dict[str, Tensor], state: dict[str, Any]) -> None:
        self.structure, self.like, self.state = structure, like, state

    def block_damping(self) -> list[Tensor]:
        """``λ_b`` for each block of :meth:`MapStructure.blocks`."""
        return list(self.state["damping"])

    def matvec(self, v):  # noqa: D102
        return {k: v[k] * self.state["scale"][k] for k in self.structure.names}


def diag_operator(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2",
                  estimator: Estimator = "exact", backend: Backend = "auto", mc_samples: int = 1,
                  generator: torch.Generator | None = None) -> DiagOperator:
    """The :class:`DiagOperator` of a map at ``params`` on the support ``x``."""
    op = DiagOperator(structure, params,
                      ggn_diagonal(structure, params, x, geometry, estimator, backend, mc_samples, generator))
    op.metric = metric_map(structure.module, params, x, geometry)
    return op


__all__ = ["DiagInverse", "DiagOperator", "diag_operator", "ggn_diagonal"]
