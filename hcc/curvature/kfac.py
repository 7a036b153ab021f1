r"""Kronecker-factored curvature (K-FAC / KFLR) for ``nn.Linear`` and ``nn.Conv2d`` layers.

For a layer ``s = W̄ ā`` with weight and bias as *one* block (``W̄ = [W | b]``, ``ā = [a; 1]``;
row-major ``vec``), the exact block of ``A = (1/n) Σ_i Ĵ_iᵀĴ_i`` and its K-FAC approximation
(Martens & Grosse, *Optimizing Neural Networks with Kronecker-factored Approximate
Curvature*, ICML 2015) are

.. math::

    A_ℓ = \frac1n \sum_{i,c} \mathrm{vec}(u_{c,i} āᵢᵀ)\,\mathrm{vec}(u_{c,i} āᵢᵀ)ᵀ
    \;≈\; G_ℓ ⊗ Ā_ℓ, \qquad
    G_ℓ = \frac1n \sum_{i,c} u_{c,i} u_{c,i}ᵀ,\quad Ā_ℓ = \frac1n \sum_i ā_i ā_iᵀ,

with ``u_{c,i}`` the output sensitivities of :mod:`hcc.curvature.layers` (column ``c`` of
``Q_i`` backpropagated to ``s``). ``factors="kflr"`` backpropagates the ``c`` columns of ``Q_i``
exactly (Botev, Ritter & Barber, *Practical Gauss-Newton Optimisation for Deep Learning*,
ICML 2017); ``factors="kfac"`` ``m`` Monte-Carlo columns ``Q_i ε/√m``, ``ε ∼ N(0, I)``
(Martens & Grosse 2015), unbiased for ``G_ℓ``.

**Convolutions** (KFC: Grosse & Martens, *A Kronecker-factored approximate Fisher matrix for
convolution layers*, ICML 2016). A ``Conv2d`` is a linear layer applied at every output
location ``t ∈ T`` to the unfolded input patch ``ā_{i,t}`` (``c_in·k_h·k_w`` entries, then 1;
:func:`torch.nn.functional.unfold`), with ``W`` reshaped to ``c_out × c_in k_h k_w``. Its
per-sample Jacobian is ``Σ_t u_{c,i,t} ā_{i,t}ᵀ``, and the factors are

.. math::

    Ā_ℓ = \frac1n \sum_i \sum_{t∈T} ā_{i,t} ā_{i,t}ᵀ \quad(\text{KFC's } Ω\text{: the spatial sum}),
    \qquad
    G_ℓ = \frac1{n|T|} \sum_{i,c} \Big(\sum_t u_{c,i,t}\Big)\Big(\sum_t u_{c,i,t}\Big)ᵀ .

``|T| G_ℓ`` is the exact GGN of the bias (what BackPACK's ``KFLR``/``KFAC`` return for a
convolution's output side, times ``n``); it equals KFC's ``|T| Γ`` under KFC's assumption of
spatially uncorrelated derivatives, and it keeps the cross-location terms that assumption
drops. ``G ⊗ Ā`` is exact for one convolution without a head (``u = e_{o,t}``: ``G = I``,
``A = I ⊗ Ā``) and for spatially constant inputs at one point.

What is exact: one layer without a head, for any ``n`` (``A = I ⊗ Ā``); with a head, one
point; at one point every layer's block (only the cross-layer blocks are dropped).
Otherwise ``G ⊗ Ā`` is the "expectation of a Kronecker product ≈ Kronecker product of
expectations" approximation (measured accuracy: ``docs/kfac.md``). Parameters outside the
layers get their exact dense block.

**Inverses** per block, with ``λ_b`` from :func:`~hcc.curvature.operators.block_damping`
(``split``): ``"pi"`` — factored Tikhonov ``(G + (√λ/π) I) ⊗ (Ā + π√λ I)`` with
``π = √((tr Ā/\dim Ā)/(tr G/\dim G))`` (Martens & Grosse 2015, §6.3), two Cholesky
factorizations; ``"plain"`` — the same with ``π = 1``; ``"eigen"`` — exactly
``(G ⊗ Ā + λI)⁻¹`` in the factors' eigenbases, ``U_G[(U_GᵀVU_Ā) ⊘ (e_G e_Āᵀ + λ)]U_Āᵀ``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..registry import OptionError
from .heads import Geometry
from .jacobians import metric_map
from .layers import (
    HBP_MODULES,
    REST,
    Backend,
    Layer,
    MapStructure,
    draw_noise,
    layer_sensitivities,
    metric_jacobian,
    run_backpack,
    use_backpack,
)
from .operators import CurvatureOperator, DampingScale, DenseInverse, _one_of, block_damping, check_damping, live
from .pytree import flatten, unflatten

Factors = Literal["kflr", "kfac"]
Split = Literal["pi", "eigen", "plain"]
SPLITS: tuple[str, ...] = ("pi", "eigen", "plain")


class KronFactors(NamedTuple):
    """A layer's block ``≈ G ⊗ A`` (row-major over ``W̄ = [W | b]``); both carry the ``1/n``."""

    G: Tensor
    A: Tensor


def _input_factor(layer: Layer, a: Tensor, outer: Tensor | None = None) -> Tensor:
    """``Ā = (1/n) Σ_i Σ_t ā_{i,t} ā_{i,t}ᵀ`` (``outer`` = its top-left block if already computed)."""
    X = layer.unfold(a)  # (n, d_in, T)
    n, _, T = X.shape
    if outer is None:
        outer = a.T @ a / n if layer.kind == "linear" else torch.einsum("nit,njt->ij", X, X) / n
    if not layer.has_bias:
        return outer
    m = X.sum(-1).mean(0)  # (1/n) Σ_i Σ_t a_{i,t}
    top = torch.cat([outer, m[:, None]], 1)
    bottom = torch.cat([m, torch.full_like(m[:1], float(T))])[None]
    return torch.cat([top, bottom], 0)


def _output_factor(u: Tensor, n: int) -> Tensor:
    """``G = (1/(n|T|)) Σ_{c,i} (Σ_t u)(Σ_t u)ᵀ`` from ``u`` of shape ``(C, n, d_out, *spatial)``."""
    T = u[0, 0, 0].numel()
    s = u.flatten(3).sum(-1) if u.dim() > 3 else u
    return torch.einsum("cni,cnj->ij", s, s) / (n * T)


def kronecker_factors(
    structure: MapStructure,
    params: dict[str, Tensor],
    x: Tensor,
    geometry: Geometry = "l2",
    factors: Factors = "kflr",
    backend: Backend = "auto",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, KronFactors]:
    r"""``{prefix: KronFactors(G_ℓ, Ā_ℓ)}`` for each layer, so that its block ``≈ G_ℓ ⊗ Ā_ℓ``.

    Row-major over ``W̄ = [W | b]`` (``d_out × (d_in + 1)``, a convolution's weight reshaped to
    ``c_out × c_in k_h k_w``); both factors carry the ``1/n`` of ``A``. ``factors="kfac"`` draws ``ε``
    with ``generator`` (on the CPU), so both backends see the same draws.
    """
    if factors not in ("kflr", "kfac"):
        raise OptionError(f"factors: expected one of kflr, kfac, got {factors!r}")
    if not structure.layers:
        return {}
    n = x.shape[0]
    noise = None
    if factors == "kfac":
        noise = draw_noise(mc_samples, x, structure.out_dim(params, x), generator)
    out: dict[str, KronFactors] = {}
    if use_backpack(structure, backend, HBP_MODULES):
        tw = run_backpack(structure, params, x, geometry, factors, noise)
        for layer in structure.layers:
            weight = tw.module.get_submodule(layer.prefix).weight
            G, outer = getattr(weight, factors)
            a = tw.inputs[layer.prefix]
            T = layer.unfold(a).shape[-1]
            out[layer.prefix] = KronFactors(G / (n * T), _input_factor(layer, a, outer))
            delattr(weight, factors)
        tw.inputs.clear()
        return out
    _, inputs, U = layer_sensitivities(structure, params, x, geometry, noise)
    for layer in structure.layers:
        out[layer.prefix] = KronFactors(_output_factor(U[layer.prefix], n), _input_factor(layer, inputs[layer.prefix]))
    return out


def rest_metric(structure: MapStructure, params: dict[str, Tensor], x: Tensor,
                geometry: Geometry = "l2") -> Tensor | None:
    """The exact dense block of the parameters outside the layers (``None`` if there are none)."""
    if not structure.rest:
        return None
    Je = metric_jacobian(structure, params, x, geometry, structure.rest)
    return torch.einsum("ncm,nce->me", Je, Je) / x.shape[0]


# -- inverses ---------------------------------------------------------------------------------------


class FactoredInverse(NamedTuple):
    """``(G + (√λ/π)I)⁻¹ ⊗ (Ā + π√λ I)⁻¹`` (``split`` ``pi``/``plain``); ``damping`` is the block's ``λ``."""

    G_inv: Tensor
    A_inv: Tensor
    live: Tensor
    damping: Tensor

    def apply(self, V: Tensor) -> Tensor:
        return self.live * (self.G_inv @ V @ self.A_inv)


class EigenInverse(NamedTuple):
    """``(G ⊗ Ā + λI)⁻¹`` from ``G = U_G diag(e_G) U_Gᵀ`` and ``Ā = U_Ā diag(e_Ā) U_Āᵀ`` (``split="eigen"``)."""

    eG: Tensor
    UG: Tensor
    eA: Tensor
    UA: Tensor
    live: Tensor
    damping: Tensor

    def apply(self, V: Tensor) -> Tensor:
        UG, UA = self.UG, self.UA
        return self.live * (UG @ ((UG.T @ V @ UA) / (self.eG[:, None] * self.eA[None, :] + self.damping)) @ UA.T)


def invert_factors(f: KronFactors, damping: float, scale: DampingScale, split: Split) -> FactoredInverse | EigenInverse:
    """The damped inverse of one layer's ``G ⊗ Ā`` (module docstring, "Inverses")."""
    G, A = f
    mG, mA = G.diagonal().mean(), A.diagonal().mean()
    alive = live(mG, mA)
    mG, mA = torch.where(alive > 0, mG, 1.0), torch.where(alive > 0, mA, 1.0)
    lam = block_damping(mG * mA, alive, damping, scale)
    if split == "eigen":
        eG, UG = torch.linalg.eigh(G)
        eA, UA = torch.linalg.eigh(A)
        return EigenInverse(eG.clamp_min(0), UG, eA.clamp_min(0), UA, alive, lam)
    pi = (mA / mG).sqrt() if split == "pi" else torch.ones_like(lam)
    IG = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    IA = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    Gi = torch.cholesky_inverse(torch.linalg.cholesky(G + (lam.sqrt() / pi) * IG))
    Ai = torch.cholesky_inverse(torch.linalg.cholesky(A + (pi * lam.sqrt()) * IA))
    return FactoredInverse(Gi, Ai, alive, lam)


def _wbar(layer: Layer, v: dict[str, Tensor]) -> Tensor:
    """``V = [W | b]`` of a layer (a convolution's weight as ``c_out × c_in k_h k_w``)."""
    names = layer.params
    W = v[names[0]].reshape(v[names[0]].shape[0], -1)
    return torch.cat([W, v[names[1]][:, None]], 1) if layer.has_bias else W


def _unwbar(layer: Layer, D: Tensor, like: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    names = layer.params
    out[names[0]] = (D[:, :-1] if layer.has_bias else D).reshape(like[names[0]].shape)
    if layer.has_bias:
        out[names[1]] = D[:, -1]


# -- the operators -------------------------------------------------------------------------------------


class KFACOperator(CurvatureOperator):
    """K-FAC's block-diagonal ``Ã = diag(G_ℓ ⊗ Ā_ℓ, A_rest)``: its product, dense form and damped inverse."""

    def __init__(self, structure: MapStructure, like: dict[str, Tensor], factors: dict[str, KronFactors],
                 rest: Tensor | None = None) -> None:
        self.structure, self.like = structure, like
        self.factors = {k: KronFactors._make(f) for k, f in factors.items()}  # also from a checkpoint's tuples
        self.rest = rest

    def matvec(self, v):  # noqa: D102
        out: dict[str, Tensor] = {}
        for layer in self.structure.layers:
            G, A = self.factors[layer.prefix]
            _unwbar(layer, G @ _wbar(layer, v) @ A, self.like, out)
        if self.rest is not None:
            out.update(unflatten(self.rest @ flatten(v, self.structure.rest), self.like, self.structure.rest))
        return {k: out[k] for k in self.structure.names}

    def inverse(self, damping: float, scale: DampingScale = "absolute",  # type: ignore[override]
                split: Split = "eigen") -> KFACInverse:
        """``(Ã + Λ)⁻¹`` per block (``λ_b``: :func:`~hcc.curvature.operators.block_damping`, ``damping > 0``;
        ``split``: module docstring). The default ``split="eigen"`` with absolute damping is exactly
        ``(Ã + λI)⁻¹``."""
        check_damping(damping)
        blocks: dict[str, FactoredInverse | EigenInverse | DenseInverse] = {
            prefix: invert_factors(f, damping, scale, split) for prefix, f in self.factors.items()}
        if self.rest is not None:
            blocks[REST] = DenseInverse.of(self.rest, damping, scale)
        return KFACInverse(self.structure, self.like, blocks)

    def solve(self, rhs=None, *, residual=None, damping=0.0, scale: DampingScale = "absolute",  # noqa: D102
              split: Split = "eigen"):
        _one_of(rhs, residual, "solve")
        v = self.field(residual) if residual is not None else rhs
        return self.inverse(damping, scale, split).matvec(v)


class KFACInverse(CurvatureOperator):
    """The damped inverse of a :class:`KFACOperator`: per block a :class:`FactoredInverse`,
    :class:`EigenInverse` or (parameters outside the layers, key ``REST``) a dense inverse."""

    def __init__(self, structure: MapStructure, like: dict[str, Tensor],
                 blocks: dict[str, FactoredInverse | EigenInverse | DenseInverse]) -> None:
        self.structure, self.like, self.blocks = structure, like, blocks

    @property
    def state(self) -> dict[str, tuple]:
        """The blocks: a plain pytree (named tuples of tensors) a solver state can keep."""
        return self.blocks  # type: ignore[return-value]

    @classmethod
    def from_blocks(cls, structure: MapStructure, like: dict[str, Tensor], blocks: dict[str, tuple],
                    split: Split) -> KFACInverse:
        """Rebuild from plain tuples (a checkpointed state keeps the blocks as tuples)."""
        kind = EigenInverse if split == "eigen" else FactoredInverse
        return cls(structure, like, {k: (DenseInverse if k == REST else kind)._make(b) for k, b in blocks.items()})

    def block_damping(self) -> list[Tensor]:
        """``λ_b`` for each block of :meth:`MapStructure.blocks`."""
        return [self.blocks[layer.prefix].damping for layer in self.structure.layers] + (
            [self.blocks[REST].damping] if self.structure.rest else [])

    def matvec(self, v):  # noqa: D102
        s = self.structure
        out: dict[str, Tensor] = {}
        for layer in s.layers:
            _unwbar(layer, self.blocks[layer.prefix].apply(_wbar(layer, v)), self.like, out)
        if s.rest:
            out.update(unflatten(self.blocks[REST].apply(flatten(v, s.rest)), v, s.rest))
        return {k: out[k] for k in s.names}


def kfac_operator(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2",
                  factors: Factors = "kflr", backend: Backend = "auto", mc_samples: int = 1,
                  generator: torch.Generator | None = None) -> KFACOperator:
    """The :class:`KFACOperator` of a map at ``params`` on the support ``x``."""
    fac = kronecker_factors(structure, params, x, geometry, factors, backend, mc_samples, generator)
    op = KFACOperator(structure, params, fac, rest_metric(structure, params, x, geometry))
    op.metric = metric_map(structure.module, params, x, geometry)
    return op


__all__ = [
    "EigenInverse", "FactoredInverse", "KFACInverse", "KFACOperator", "KronFactors", "SPLITS", "invert_factors",
    "kfac_operator", "kronecker_factors", "rest_metric",
]
