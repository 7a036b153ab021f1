r"""Output heads and the metrics of function space.

A strategy map ``F_θ(x) = h(z_θ(x))`` is a *body* ``z_θ`` (a network with linear output:
the pre-head coordinates, logits for a probability head) followed by an optional
parameter-free *head* ``h``:

======================  ====================================  ==============================
head                    ``F = h(z)`` per support point         ``D = ∂F/∂z``
======================  ====================================  ==============================
``none``                ``F = z``                              ``I``
``softmax``             ``F = softmax(z)`` on ``Δ_k``          ``S = diag(p) − ppᵀ``
``sigmoid``             ``F = σ(z)`` on ``(0, 1)^k``           ``diag(σ(1 − σ))``
``masked``              softmax over the legal entries          ``S`` (0 off the legal ones)
======================  ====================================  ==============================

The ``masked`` head (:class:`MaskedSoftmax`, OpenSpiel's policies) reads its
coordinates as ``[z | m]`` (``2K`` columns): logits and a legal-action mask that travels with
them and never moves; everything below acts on the logits over the legal actions only.

Every natural metric here is ``A = (1/n) Σ_i J_{z,i}ᵀ Q_i Q_iᵀ J_{z,i}`` for an output-side
factor ``Q_i`` (``n × k × k`` over the support), so a preconditioner works with the
*metric Jacobian* ``Ĵ_i = Q_iᵀ J_{z,i}`` and never needs to know the head:

============  ==============================  =============================  =====================
geometry      softmax ``Q``                   sigmoid ``Q``                  meaning
============  ==============================  =============================  =====================
``l2``        ``S``                           ``σ(1−σ)``                     ``‖ΔF‖²``: the flow's
``fisher``    ``diag(√p) − p√pᵀ`` (QQᵀ = S)   ``√(σ(1−σ))``                  ``KL``, to second order
``logit``     ``P = I − 11ᵀ/k``               ``I``                          ``‖Δz‖²`` (centred)
============  ==============================  =============================  =====================

(``Q = I`` for every geometry without a head; ``fisher`` needs a probability head.)

``l2`` is the metric of the generalized natural-gradient flow: the natural direction moves
``F`` by the projected function-space gradient. ``fisher`` is the softmax / Bernoulli
cross-entropy GGN: the natural direction moves ``F`` by ``−S g`` — replicator dynamics, the
continuous-time form of multiplicative weights, whose extragradient and optimistic forms
converge at a linear last-iterate rate on games with a unique equilibrium, boundary ones
included. ``logit`` measures the body's output itself: the Gauss-Newton metric for
reaching a target in logit space (the proximal rule's pull-back).

Two vector maps go with each geometry:

- :func:`field_residual`: the function-space gradient ``g = ∂ℓ/∂F`` as the residual ``r̂``
  with ``Ĵᵀ r̂ = J_zᵀ Dᵀ g = ∇_θ ℓ`` (the parameter-space field);
- :func:`target_residual`: a displacement ``z → z⁺`` of the pre-head coordinates as the residual
  whose least-squares pull-back ``argmin_d ‖Ĵ d − r̂‖²`` moves the map towards ``z⁺`` in the
  geometry's norm (``l2``: the change of values ``h(z⁺) − h(z)``; ``fisher``: ``Qᵀ(z⁺ − z)``;
  ``logit``: ``P(z⁺ − z)``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..registry import OptionError

Head = Literal["none", "softmax", "sigmoid", "masked"]
Geometry = Literal["l2", "fisher", "logit"]
GEOMETRIES: tuple[str, ...] = ("l2", "fisher", "logit")


def check_geometry(geometry: str, allowed: tuple[str, ...] = GEOMETRIES) -> None:
    if geometry not in allowed:
        raise OptionError(f"geometry: expected one of {', '.join(allowed)}, got {geometry!r}")


class MaskedSoftmax(nn.Module):
    r"""A softmax head over the legal actions, the mask travelling in the input row.

    Contract: the input has ``2K`` columns, ``[z | m]`` — logits ``z ∈ R^K`` and a mask
    ``m ∈ {0, 1}^K`` (1: legal) with at least one legal entry per row — and the output is

    .. math::

        p_a = \frac{m_a e^{z_a}}{\sum_b m_b e^{z_b}} ∈ Δ(\{a : m_a = 1\}),

    exactly 0 at illegal actions. Row ``i`` of the output depends on row ``i`` of the input
    only (per-point Jacobians are valid), its Jacobian in ``z`` is ``diag(p) − ppᵀ`` (the
    softmax head's, restricted to the legal actions) and in ``m`` it is 0. Use it last
    in an ``nn.Sequential`` after a body that passes the mask through
    (:class:`hcc.games.maps.KeepMask`): ``Sequential(KeepMask(mlp, d), MaskedSoftmax())`` maps
    ``[features | mask]`` to a distribution over legal actions.
    """

    def forward(self, zm: Tensor) -> Tensor:
        z, m = zm.chunk(2, dim=-1)
        return torch.softmax(torch.where(m > 0, z, -torch.inf), -1)


def head_of(module: nn.Module) -> Head:
    """The head of a map: a trailing ``nn.Softmax(dim=-1 or 1)``, ``nn.Sigmoid`` or
    :class:`MaskedSoftmax` of an ``nn.Sequential``, else ``"none"``."""
    if isinstance(module, nn.Sequential) and len(module) > 0:
        last = module[-1]
        if isinstance(last, nn.Softmax) and last.dim in (-1, 1):
            return "softmax"
        if isinstance(last, nn.Sigmoid):
            return "sigmoid"
        if isinstance(last, MaskedSoftmax):
            return "masked"
    return "none"


def _split_mask(z: Tensor) -> tuple[Tensor, Tensor]:
    """``[z | m] → (z, legal)`` of a masked head's coordinates."""
    logits, m = z.chunk(2, dim=-1)
    return logits, m > 0


def _masked(z: Tensor, logits: Tensor) -> Tensor:
    """``[logits | m]``: new logits with ``z``'s mask."""
    return torch.cat([logits, z.chunk(2, dim=-1)[1]], -1)


def split_head(module: nn.Module) -> tuple[nn.Module, Head]:
    """``(body, head)``: the map without its head (sharing modules and parameter names) and the head."""
    head = head_of(module)
    if head == "none":
        return module, head
    return nn.Sequential(*list(module)[:-1]), head  # indices (names) unchanged: the head is last


def link(z: Tensor, head: Head) -> Tensor:
    """``F = h(z)`` row by row."""
    if head == "softmax":
        return torch.softmax(z, -1)
    if head == "sigmoid":
        return torch.sigmoid(z)
    if head == "masked":
        logits, legal = _split_mask(z)
        return torch.softmax(torch.where(legal, logits, -torch.inf), -1)
    return z


def link_tangent(z: Tensor, u: Tensor, head: Head) -> Tensor:
    """``D u = (∂F/∂z) u`` row by row (``D`` is symmetric for every head). For the masked head ``u`` and
    the result are in logit coordinates (``K`` columns) — the mask does not move."""
    if head in ("softmax", "masked"):
        p = link(z, head)
        u = u[..., : p.shape[-1]]  # coordinates of a masked head: the logits (the mask does not move)
        return p * (u - (p * u).sum(-1, keepdim=True))
    if head == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s) * u
    return u


def link_jacobian(z: Tensor, head: Head) -> Tensor:
    """``D = ∂F/∂z`` per row, ``(n, k, k)`` (``(n, K, 2K)`` for the masked head: 0 on the mask columns)."""
    n, k = z.shape
    if head in ("softmax", "masked"):
        p = link(z, head)
        S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return S if head == "softmax" else torch.cat([S, torch.zeros_like(S)], -1)
    if head == "sigmoid":
        s = torch.sigmoid(z)
        return torch.diag_embed(s * (1 - s))
    return torch.eye(k, dtype=z.dtype, device=z.device).expand(n, k, k)


def center(u: Tensor, head: Head, z: Tensor | None = None) -> Tensor:
    """Remove the component a head ignores: a softmax is invariant to adding a constant per row (the
    masked head to adding it on the legal entries: ``u`` in logit coordinates, ``z`` the coordinates
    that carry the mask; illegal entries come back 0)."""
    if head == "softmax":
        return u - u.mean(-1, keepdim=True)
    if head == "masked":
        legal = _split_mask(z)[1].to(u.dtype)  # type: ignore[arg-type]
        mean = (u * legal).sum(-1, keepdim=True) / legal.sum(-1, keepdim=True)
        return (u - mean) * legal
    return u


def coordinate_step(u: Tensor, head: Head, z: Tensor) -> Tensor:
    """``C u``: a value-space vector ``u`` (a field) as a change of the coordinates ``z``, without the
    component the head ignores (:func:`center`; the masked head's mask columns get 0)."""
    cu = center(u, head, z)
    return torch.cat([cu, torch.zeros_like(cu)], -1) if head == "masked" else cu


def coordinate_step_matrix(z: Tensor, head: Head) -> Tensor:
    """The matrix of :func:`coordinate_step` per row, ``(n, k_coords, k_values)``."""
    n = z.shape[0]
    if head == "masked":
        _, legal = _split_mask(z)
        w = legal.to(z.dtype)
        P = torch.diag_embed(w) - w[:, :, None] * w[:, None, :] / w.sum(-1)[:, None, None]
        return torch.cat([P, torch.zeros_like(P)], 1)
    k = z.shape[1]
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    return (eye - 1.0 / k if head == "softmax" else eye).expand(n, k, k)


def default_logit_range(dtype: torch.dtype) -> float:
    """``ζ = (2/3)·log(1/ε)``: logits kept within ``ζ`` of a row's maximum (softmax), or within
    ``±ζ`` (sigmoid). ``e^{−ζ} = ε^{2/3}`` (3.7e-11 in float64, 2.4e-5 in float32) is a probability that
    counts as 0 for every metric here, and the softmax stays well-conditioned in the dtype."""
    return (2.0 / 3.0) * math.log(1.0 / torch.finfo(dtype).eps)


def clip_logits(z: Tensor, head: Head, zeta: float) -> Tensor:
    """Bound pre-head coordinates (no effect without a head): a softmax row's entries at least
    ``max − ζ`` (then centred; the masked head's legal ones, the others set to the row's minimum), a
    sigmoid's within ``±ζ``."""
    if head == "softmax":
        z = torch.maximum(z, z.max(-1, keepdim=True).values - zeta)
        return z - z.mean(-1, keepdim=True)
    if head == "masked":
        logits, legal = _split_mask(z)
        top = torch.where(legal, logits, -torch.inf).max(-1, keepdim=True).values
        return _masked(z, center(torch.maximum(logits, top - zeta), head, z))
    if head == "sigmoid":
        return z.clamp(-zeta, zeta)
    return z


def output_factor(z: Tensor, head: Head, geometry: Geometry) -> Tensor:
    r"""``Q_i`` (shape ``(n, k, k)``) with ``A = (1/n) Σ J_{z,i}ᵀ Q_i Q_iᵀ J_{z,i}`` (module docstring).

    >>> z = torch.zeros(1, 3, dtype=torch.float64)
    >>> Q = output_factor(z, "softmax", "fisher")
    >>> torch.allclose(Q[0] @ Q[0].T, torch.eye(3, dtype=z.dtype) / 3 - 1 / 9)
    True
    """
    n, k = z.shape
    check_geometry(geometry)
    if head == "masked":  # the softmax's factors on the legal entries, 0 rows for the mask columns
        logits, legal = _split_mask(z)
        K = logits.shape[1]
        if geometry == "logit":
            w = legal.to(z.dtype)
            Q = torch.diag_embed(w) - w[:, :, None] * w[:, None, :] / w.sum(-1)[:, None, None]
        else:
            Q = output_factor(torch.where(legal, logits, -torch.inf), "softmax", geometry)
        return torch.cat([Q, Q.new_zeros(n, K, K)], 1)
    eye = torch.eye(k, dtype=z.dtype, device=z.device).expand(n, k, k)
    if head == "none":
        if geometry == "fisher":
            raise OptionError(
                "geometry: 'fisher' needs a probability-valued strategy (a softmax or sigmoid head), "
                "got a map with linear output; use geometry='l2'"
            )
        return eye
    if geometry == "logit":
        return eye - 1.0 / k if head == "softmax" else eye
    if head == "softmax":
        p = torch.softmax(z, -1)
        if geometry == "l2":
            return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        sp = p.sqrt()
        return torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]
    s = torch.sigmoid(z)
    w = s * (1 - s)
    return torch.diag_embed(w if geometry == "l2" else w.sqrt())


def apply_factor_t(Q: Tensor, u: Tensor) -> Tensor:
    """``Q_iᵀ u_i`` row by row."""
    return torch.einsum("nkc,nk->nc", Q, u)


def field_residual(z: Tensor, g: Tensor, head: Head, geometry: Geometry) -> Tensor:
    """``r̂`` with ``Ĵᵀ r̂ = J_zᵀ D g``: the residual of the field of ``g = ∂ℓ/∂F`` in the geometry."""
    if head == "none" or geometry == "l2":
        return g
    if geometry == "fisher":
        return apply_factor_t(output_factor(z, head, "fisher"), g)
    return link_tangent(z, g, head)  # logit: Q = P (or I), P D g = D g


def target_residual(z: Tensor, z_target: Tensor, head: Head, geometry: Geometry) -> Tensor:
    """The residual whose pull-back moves the map from ``z`` towards ``z_target`` (module docstring)."""
    if geometry == "l2":
        return link(z_target, head) - link(z, head)
    dz = z_target - z
    if head == "none":
        return dz
    return apply_factor_t(output_factor(z, head, geometry), dz)


def target_error(z: Tensor, dz: Tensor, z_target: Tensor, head: Head, geometry: Geometry) -> Tensor:
    """``‖r̂‖²`` at the coordinates ``z + dz`` in the metric of the pull-back taken at ``z`` (``Q`` held at ``z``):
    the quantity :func:`target_residual`'s least-squares pull-back decreases. For ``l2`` the change of values
    ``h(z + dz) − h(z)`` is passed in as ``dz`` by :func:`value_change` (exact or linearized)."""
    if geometry == "l2":
        return (link(z_target, head) - link(z, head) - dz).pow(2).sum()
    r = z_target - z - dz
    if head == "none":
        return r.pow(2).sum()
    return apply_factor_t(output_factor(z, head, geometry), r).pow(2).sum()


def value_change(z: Tensor, dz: Tensor, head: Head, geometry: Geometry, linear: bool) -> Tensor:
    """What :func:`target_error` expects as ``dz``: the coordinate change itself, except for ``l2`` where it is
    the change of values, exact (``h(z + dz) − h(z)``) or linearized (``D dz``)."""
    if geometry != "l2":
        return dz
    return link_tangent(z, dz, head) if linear else link(z + dz, head) - link(z, head)


__all__ = [
    "GEOMETRIES", "Geometry", "Head", "MaskedSoftmax", "apply_factor_t", "center", "check_geometry", "clip_logits",
    "coordinate_step", "coordinate_step_matrix",
    "default_logit_range", "field_residual", "head_of", "link", "link_jacobian", "link_tangent", "output_factor",
    "split_head", "target_error", "target_residual", "value_change",
]
