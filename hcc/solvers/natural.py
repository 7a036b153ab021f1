r"""Generalized natural gradients: per-sample Jacobians, the exact direction, and CG.

Each player preconditions its gradient with the inverse of the Gram matrix of its
strategy map's Jacobians over its ``n`` support points (design.md §2):

.. math::

    A_θ = \frac1n \sum_{i=1}^n J_iᵀ J_i = \frac1n JᵀJ,\qquad
    J_i = \frac{∂F_θ(x_i)}{∂θ} ∈ \mathbb R^{k×M},\qquad J ∈ \mathbb R^{nk×M},

the L2 "hidden mapping" metric: the generalized Gauss-Newton matrix of
``½‖F_θ(x) − y‖²`` (Amari, *Natural gradient works efficiently in learning*,
Neural Computation 1998; Martens, *New insights and perspectives on the natural
gradient method*, JMLR 2020; Mladenovic, Sakos & Piliouras, *Generalized natural
gradient flows in hidden convex-concave games and GANs*, ICLR 2022).

**The operator.** With damping ``λ ≥ 0`` every method here applies the same operator

.. math::

    P_λ = (A + λI)^{-1} Π_A = \sum_{σ_j > 0} \frac{u_j u_jᵀ}{σ_j + λ},

``Π_A`` the orthogonal projector onto ``range(A) = row(J)``. For ``λ = 0`` it is the
pseudo-inverse ``A⁺`` (the minimum-norm natural direction, ``d = J⁺ (n g)``); for any
vector in ``range(A)`` — every gradient of a function of ``F``, in particular the
field ``v = Jᵀ g`` with ``g = ∂ℓ/∂F`` — it is exactly ``(A + λI)⁻¹ v``. Components in
``null(A)`` do not move ``F`` to first order; they are dropped instead of amplified by
``1/λ`` (the numerical pitfall of rank-deficient softmax Jacobians, design.md §2).

**Methods** (:func:`exact_natural_direction`, option ``method``):

- ``kernel`` — sample space, ``J`` formed (``vmap(jacrev)`` or BackPACK ``BatchGrad``):
  with ``K = JJᵀ/n`` (``nk × nk``) and the push-through identity
  ``(JᵀJ/n + λ)⁻¹Jᵀ = Jᵀ(K + λ)⁻¹``,

  .. math::

      d = Jᵀ (K + λI)^{+} g \quad (v = Jᵀ g \text{ given through } g),\qquad
      d = Jᵀ (K + λI)^{+} K^{+} (J v)/n \quad (\text{any } v),

  the second form first projects ``v`` onto ``row(J)`` by least squares. The
  row-space form fed with ``g`` avoids the cancellation of the Woodbury form.
- ``structured`` — the same kernel for an ``nn.Sequential`` MLP without forming ``J``:
  layer ``l`` with inputs ``a_i`` and output sensitivities ``δ_i = ∂F(x_i)/∂z_l`` adds
  ``(δ_i δ_jᵀ) · (a_iᵀa_j + 1)`` to block ``(i, j)`` of ``JJᵀ``; ``Jᵀu`` and ``Jv`` come
  from the same factors. Fastest when ``nk ≪ M``.
- ``dense`` — parameter space: ``A`` (``M × M``) formed and eigendecomposed; for
  ``nk > M`` (or as a reference).
- ``auto`` — ``dense`` if ``nk > M``; else ``structured`` for supported MLPs with the
  ``func`` backend; else ``kernel``.

Pseudo-inverses are spectral: eigenvalues ``σ ≤ rcond · σ_max`` count as zero, so
the path is the same for every input (no data-dependent branching: the ``func``
methods run under :func:`torch.vmap` over stacked parameters).

:func:`cg_natural_direction` applies ``P_λ`` matrix-free by conjugate gradients on
``(A + λI) x = v`` with one Jacobian-vector and one vector-Jacobian product per
iteration (``torch.func.vjp``, linearized once per solve). From
``x₀ = 0`` and ``v ∈ range(A)`` the iterates stay in ``range(A)``: the minimum-norm
solution. A general ``v`` is first projected onto ``row(J)`` by a sample-space CG
solve of ``K g = Jv/n``. With ``early_stop=False`` it runs a fixed number of masked
iterations and vmaps too.

The functions here take ``λ`` as the value added to ``A``; the preconditioners
:class:`Exact` and :class:`CG` take the Levenberg-Marquardt ``λ`` added to
``JᵀJ = nA`` and pass ``λ/n`` (see :class:`Exact`).

>>> import torch
>>> from hcc import make_game
>>> game = make_game("rps").double()
>>> params = game.init_params()
>>> x = game.supports(params, game.sample_batch())[0]
>>> d = exact_natural_direction(game.min_map, params[0], x, residual=torch.ones(1, 3, dtype=torch.float64))
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from ..games.base import Batch, Game, Params
from ..registry import OptionError, opt
from .heads import (
    Geometry,
    Head,
    apply_factor_t,
    check_geometry,
    field_residual,
    output_factor,
    split_head,
    target_residual,
)
from .precond import Preconditioner

Method = Literal["auto", "kernel", "structured", "dense"]
Backend = Literal["func", "backpack"]
METHODS: tuple[str, ...] = ("auto", "kernel", "structured", "dense")
BACKENDS: tuple[str, ...] = ("func", "backpack")

#: parameter-free modules that act on each sample (row) separately: allowed between
#: the ``nn.Linear`` layers of the structured method
PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.ReLU, nn.ELU, nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.LeakyReLU, nn.GELU, nn.SiLU,
    nn.Softplus, nn.Identity, nn.Hardtanh, nn.SELU, nn.CELU, nn.Mish,
)


# -- flat parameter vectors ------------------------------------------------------------------


def _names(params: dict[str, Tensor]) -> list[str]:
    return list(params)


def flatten(params: dict[str, Tensor]) -> Tensor:
    """One vector from a parameter dict (its insertion order)."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflatten(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`flatten`: views of ``vec`` shaped like ``like``."""
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i : i + t.numel()].view(t.shape)
        i += t.numel()
    return out


def _output(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``F_θ`` on the support as an ``(n, k)`` matrix (per-sample outputs flattened)."""
    return functional_call(module, params, (x,)).reshape(x.shape[0], -1)


def output_dim(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> int:
    """``k``: the number of output values per support point."""
    with torch.no_grad():
        return _output(module, params, x[:1]).shape[1]


# -- Jacobians ----------------------------------------------------------------------------------


def per_sample_jacobian(
    module: nn.Module, params: dict[str, Tensor], x: Tensor, backend: Backend = "func"
) -> dict[str, Tensor]:
    r"""Per-sample Jacobians ``J_i = ∂F_θ(x_i)/∂θ``: for each parameter a tensor ``(n, k, *shape)``.

    ``backend="func"``: ``vmap(jacrev)`` over :func:`~torch.func.functional_call`
    (any module that maps each sample on its own; vmappable). ``backend="backpack"``:
    BackPACK's ``BatchGrad`` with one backward pass per output coordinate, on an
    extended deep copy of ``module`` (BackPACK's hooks break ``torch.func`` on the
    module itself); not differentiable, not vmappable.
    """
    _check_backend(backend)
    if backend == "backpack":
        return _backpack_jacobian(module, params, x)

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(module, p, (xi.unsqueeze(0),)).reshape(-1)

    return vmap(jacrev(f), in_dims=(None, 0))(params, x)


def jacobian_matrix(
    module: nn.Module, params: dict[str, Tensor], x: Tensor, backend: Backend = "func"
) -> Tensor:
    """``J ∈ R^{nk × M}``: rows ordered (sample, output), columns as :func:`flatten`."""
    jac = per_sample_jacobian(module, params, x, backend)
    n = x.shape[0]
    J = torch.cat([jac[k].reshape(n, jac[k].shape[1], -1) for k in params], dim=-1)
    return J.reshape(-1, J.shape[-1])


# BackPACK-extended deep copies, one per module (weak keys: dropped with the module)
_BACKPACK_TWINS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _backpack_jacobian(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    twin = _BACKPACK_TWINS.get(module)
    if twin is None:
        twin = extend(copy.deepcopy(module))
        _BACKPACK_TWINS[module] = twin
    named = dict(twin.named_parameters())
    if set(named) != set(params):
        raise ValueError(f"backpack backend: parameters {sorted(params)} do not match the module's {sorted(named)}")
    with torch.no_grad():
        for k, p in named.items():
            p.data = params[k].detach().clone()
            p.requires_grad_(True)
    n = x.shape[0]
    rows: dict[str, list[Tensor]] = {k: [] for k in params}
    # BackPACK saves module inputs/outputs only for a forward pass inside its context
    with torch.enable_grad(), backpack(BatchGrad(), retain_graph=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            out = twin(x.detach()).reshape(n, -1)
            k_out = out.shape[1]
            for a in range(k_out):  # one backward pass per output coordinate
                for p in named.values():
                    p.grad = None
                out[:, a].sum().backward(retain_graph=True)
                for k, p in named.items():
                    rows[k].append(p.grad_batch.detach().clone())
        except (NotImplementedError, AttributeError) as e:
            raise OptionError(f"backend 'backpack': BackPACK does not support this map ({e}); use backend=func") from e
    for p in named.values():
        p.grad = None
    return {k: torch.stack(v, dim=1) for k, v in rows.items()}  # (n, k, *shape)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise OptionError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")


# -- the structured (no-J) form for MLPs --------------------------------------------------------


def supports_structured(module: nn.Module) -> bool:
    """True for an ``nn.Sequential`` of ``nn.Linear`` layers and per-sample parameter-free modules."""
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        return False
    has_linear = False
    for child in module:
        if isinstance(child, nn.Linear):
            has_linear = True
        elif not isinstance(child, PER_SAMPLE_MODULES) or any(True for _ in child.parameters()):
            return False
    return has_linear


class _Structured(NamedTuple):
    """Per-layer factors: inputs ``a_l`` ``(n, in_l)`` and sensitivities ``δ_l`` ``(k, n, out_l)``."""

    names: list[tuple[str, str | None]]  # (weight name, bias name or None) per Linear
    acts: list[Tensor]
    deltas: list[Tensor]


def _structured_factors(module: nn.Sequential, params: dict[str, Tensor], x: Tensor,
                        Q: Tensor | None = None) -> _Structured:
    """Per-layer factors of ``J`` (``Q is None``) or of the metric Jacobian ``Ĵ_i = Q_iᵀ J_i``: the
    backpropagated basis is ``Q_i``'s columns instead of the unit vectors."""
    names: list[tuple[str, str | None]] = []
    for i, child in enumerate(module):
        if isinstance(child, nn.Linear):
            names.append((f"{i}.weight", f"{i}.bias" if child.bias is not None else None))
    n = x.shape[0]

    def forward(eps: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        a, acts, j = x, [], 0
        for child in module:
            if isinstance(child, nn.Linear):
                acts.append(a)
                w, b = names[j]
                a = torch.nn.functional.linear(a, params[w], params[b] if b is not None else None) + eps[j]
                j += 1
            else:
                a = child(a)
        return a.reshape(n, -1), acts

    eps0 = [x.new_zeros(n, params[w].shape[0]) for w, _ in names]
    out, pull, acts = vjp(forward, eps0, has_aux=True)
    k = out.shape[1]
    if Q is None:
        basis = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, n, k)
    else:
        basis = Q.permute(2, 0, 1)  # column c of every Q_i: (k, n, k)
    (deltas,) = vmap(pull)(basis)  # per layer: (k, n, out_l)
    return _Structured(names, [a.detach() for a in acts], list(deltas))


def _structured_gram(s: _Structured) -> Tensor:
    """``JJᵀ`` (unnormalized), ``(nk × nk)``, rows ordered (sample, output)."""
    total = None
    for (_, b), a, d in zip(s.names, s.acts, s.deltas, strict=True):
        gram = a @ a.T + (1.0 if b is not None else 0.0)  # (n, n)
        blk = torch.einsum("aio,bjo->iajb", d, d) * gram[:, None, :, None]
        total = blk if total is None else total + blk
    n, k = s.acts[0].shape[0], s.deltas[0].shape[0]
    return total.reshape(n * k, n * k)


def _structured_vjp(s: _Structured, u: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """``Jᵀu`` for ``u`` of shape ``(n, k)``."""
    out = {}
    for (w, b), a, d in zip(s.names, s.acts, s.deltas, strict=True):
        sens = torch.einsum("ia,aio->io", u, d)
        out[w] = sens.T @ a
        if b is not None:
            out[b] = sens.sum(0)
    return {k: out[k] for k in like}


def _structured_jvp(s: _Structured, v: dict[str, Tensor]) -> Tensor:
    """``Jv`` as an ``(n, k)`` matrix."""
    total = None
    for (w, b), a, d in zip(s.names, s.acts, s.deltas, strict=True):
        z = a @ v[w].T + (v[b] if b is not None else 0.0)
        t = torch.einsum("aio,io->ia", d, z)
        total = t if total is None else total + t
    return total


# -- spectral (pseudo-)inverses -----------------------------------------------------------------


def default_rcond(dtype: torch.dtype, size: int) -> float:
    """Relative eigenvalue cutoff ``10 · size · eps(dtype)``: below it an eigenvalue counts as 0."""
    return 10.0 * size * torch.finfo(dtype).eps


def _spectral_weights(s: Tensor, damping: float | Tensor, rcond: float, power: int = 1) -> Tensor:
    """``1/(s + λ)`` (``power=1``) or ``1/((s + λ) s)`` (``power=2``) on kept eigenvalues, 0 elsewhere."""
    cutoff = rcond * s.max().clamp_min(torch.finfo(s.dtype).tiny)
    keep = s > cutoff
    s_safe = torch.where(keep, s, torch.ones_like(s))
    w = 1.0 / (s_safe + damping)
    if power == 2:
        w = w / s_safe
    return torch.where(keep, w, torch.zeros_like(w))


# -- the exact direction --------------------------------------------------------------------------


class MetricMap(NamedTuple):
    """What the metric ``A = ĴᵀĴ/n`` differentiates: ``Ĵ_i = Q_iᵀ J_{z,i}`` (:mod:`hcc.solvers.heads`).

    For the ``l2`` geometry (and maps without a head) ``module`` is the map itself and ``Q`` is
    ``None`` (``Ĵ = J``, through the head by autograd); otherwise ``module`` is the body and ``Q``
    the output factor at the current point (held fixed: ``A`` is the metric *at* ``θ``).
    """

    module: nn.Module
    head: Head
    geometry: Geometry
    Q: Tensor | None
    #: the body's output at the current point (``None`` on the plain path)
    z: Tensor | None
    #: the support the metric averages over
    x: Tensor

    def outputs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``(n, k)`` outputs whose Jacobian at the current point is ``Ĵ``."""
        out = _output(self.module, params, x)
        return out if self.Q is None else apply_factor_t(self.Q, out)

    def jacobian(self, params: dict[str, Tensor], x: Tensor, backend: str) -> Tensor:
        """``Ĵ ∈ R^{nk × M}``, rows ordered (sample, output)."""
        J = jacobian_matrix(self.module, params, x, backend)  # type: ignore[arg-type]
        if self.Q is None:
            return J
        n, k, c = self.Q.shape
        return torch.einsum("nkc,nkm->ncm", self.Q, J.reshape(n, k, -1)).reshape(n * c, -1)


def metric_map(module: nn.Module, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2") -> MetricMap:
    """The :class:`MetricMap` of ``module`` at ``params`` on the support ``x`` in ``geometry``."""
    check_geometry(geometry)
    body, head = split_head(module)
    if head == "none":
        if geometry == "fisher":
            output_factor(x.new_zeros(1, 1), head, "fisher")  # raises the explanatory error
        return MetricMap(module, head, geometry, None, None, x)
    if geometry == "l2":
        return MetricMap(module, head, geometry, None, None, x)
    with torch.no_grad():
        z = _output(body, params, x)
    return MetricMap(body, head, geometry, output_factor(z, head, geometry), z, x)


def choose_method(module: nn.Module, n: int, k: int, n_params: int, backend: Backend = "func") -> str:
    """The ``auto`` rule: ``dense`` if ``nk > M``; else ``structured`` (supported MLPs, func
    backend); else ``kernel``."""
    if n * k > n_params:
        return "dense"
    if backend == "func" and supports_structured(module):
        return "structured"
    return "kernel"


def exact_natural_direction(
    module: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    vec: dict[str, Tensor] | None = None,
    *,
    residual: Tensor | None = None,
    damping: float | Tensor = 0.0,
    method: Method = "auto",
    backend: Backend = "func",
    rcond: float | None = None,
    geometry: Geometry = "l2",
) -> dict[str, Tensor]:
    r"""One player's natural direction ``P_λ v`` (module docstring), exactly.

    Give either ``vec`` (any parameter-space vector, a dict like ``params``) or
    ``residual`` ``r̂`` of shape ``(n, k)``, meaning ``v = Ĵᵀ r̂``; the latter is the accurate
    row-space form:

    .. math::

        d = Ĵᵀ (ĴĴᵀ/n + λI)^{+} r̂ = (A + λI)^{-1} Ĵᵀ r̂ .

    In the ``l2`` geometry ``Ĵ = J`` and ``r̂ = g = ∂ℓ/∂F``; in the others ``Ĵ_i = Q_iᵀ J_{z,i}``
    (:mod:`hcc.solvers.heads`; :func:`~hcc.solvers.heads.field_residual` turns ``g`` into ``r̂``).
    ``x`` is the player's support (``n`` points); ``rcond`` the relative eigenvalue
    cutoff (default :func:`default_rcond`).
    """
    return _exact(module, params, x, vec, residual, damping, method, backend, rcond, geometry)


def _exact(
    module: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    vec: dict[str, Tensor] | None,
    residual: Tensor | None,
    damping: float | Tensor,
    method: str,
    backend: str,
    rcond: float | None,
    geometry: Geometry = "l2",
) -> dict[str, Tensor]:
    if (vec is None) == (residual is None):
        raise ValueError("exact_natural_direction: give exactly one of vec and residual")
    if method not in METHODS:
        raise OptionError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    _check_backend(backend)
    mm = metric_map(module, params, x, geometry)
    module = mm.module
    n = x.shape[0]
    n_params = sum(t.numel() for t in params.values())
    k = residual.reshape(n, -1).shape[1] if residual is not None else output_dim(module, params, x)
    if method == "auto":
        method = choose_method(module, n, k, n_params, backend)  # type: ignore[arg-type]
    if method == "structured" and not supports_structured(module):
        raise OptionError(
            f"method 'structured': expected an nn.Sequential of nn.Linear and per-sample activations, "
            f"got {type(module).__name__}; use method=kernel or auto"
        )
    g = residual.reshape(n, k) if residual is not None else None
    dt = next(iter(params.values())).dtype

    if method == "dense":
        J = mm.jacobian(params, x, backend)
        A = J.T @ J / n
        s, U = torch.linalg.eigh(A)
        v = J.T @ g.reshape(-1) if g is not None else flatten(vec)  # type: ignore[arg-type]
        w = _spectral_weights(s, damping, default_rcond(dt, n_params) if rcond is None else rcond)
        return unflatten(U @ (w * (U.T @ v)), params)

    if method == "structured":
        fac = _structured_factors(module, params, x, mm.Q)  # type: ignore[arg-type]
        K = _structured_gram(fac) / n
        jvp_fn: Callable[[dict[str, Tensor]], Tensor] = lambda v: _structured_jvp(fac, v).reshape(-1)  # noqa: E731
        vjp_fn: Callable[[Tensor], dict[str, Tensor]] = lambda u: _structured_vjp(fac, u.reshape(n, k), params)  # noqa: E731
    else:
        J = mm.jacobian(params, x, backend)
        K = J @ J.T / n
        jvp_fn = lambda v: J @ flatten(v)  # noqa: E731
        vjp_fn = lambda u: unflatten(J.T @ u, params)  # noqa: E731

    s, U = torch.linalg.eigh(K)
    rc = default_rcond(dt, n * k) if rcond is None else rcond
    if g is not None:
        u = U @ (_spectral_weights(s, damping, rc) * (U.T @ g.reshape(-1)))
    else:
        u = U @ (_spectral_weights(s, damping, rc, power=2) * (U.T @ jvp_fn(vec))) / n  # type: ignore[arg-type]
    return vjp_fn(u)


# -- conjugate gradients -------------------------------------------------------------------------


class CGResult(NamedTuple):
    """What :func:`cg_natural_direction` returns."""

    direction: dict[str, Tensor]
    #: the solution as a flat vector (the next warm start)
    solution: Tensor
    #: iterations of the main solve (the projection solve of a general ``vec`` not counted)
    iterations: int
    #: final relative residual ``‖(A + λI)x − b‖ / ‖b‖`` (0 when ``b = 0``)
    residual: Tensor


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    tol: float = 1e-6,
    maxiter: int = 100,
    early_stop: bool = True,
) -> tuple[Tensor, int, Tensor]:
    r"""Conjugate gradients (Hestenes & Stiefel 1952) for a symmetric PSD ``matvec``.

    Stops when ``‖b − Ax‖ ≤ tol·‖b‖`` or after ``maxiter`` iterations. The updates
    are masked once converged, so with ``early_stop=False`` it runs exactly
    ``maxiter`` iterations with no data-dependent branching (vmappable).
    Returns ``(x, iterations, relative residual)``.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = r @ r
    bnorm2 = b @ b
    thresh = (tol * tol) * bnorm2
    iters = 0
    for _ in range(maxiter):
        active = rs > thresh
        if early_stop and not bool(active):
            break
        Ap = matvec(p)
        pAp = p @ Ap
        alpha = torch.where(active & (pAp > 0), rs / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), 0.0)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = r @ r
        beta = torch.where(active & (rs > 0), rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), 0.0)
        p = torch.where(active, r + beta * p, p)
        rs = torch.where(active, rs_new, rs)
        iters += 1
    rel = torch.where(bnorm2 > 0, (rs / torch.where(bnorm2 > 0, bnorm2, torch.ones_like(bnorm2))).sqrt(), 0.0)
    return x, iters, rel


def cg_natural_direction(
    module: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    vec: dict[str, Tensor] | None = None,
    *,
    residual: Tensor | None = None,
    damping: float | Tensor = 0.0,
    tol: float = 1e-6,
    maxiter: int = 100,
    x0: Tensor | None = None,
    early_stop: bool = True,
    geometry: Geometry = "l2",
) -> CGResult:
    r"""One player's natural direction by matrix-free CG on ``(A + λI) d = v``.

    .. math::

        (A + λI)\,p = \tfrac1n Jᵀ(Jp) + λp

    with ``Jᵀu`` from a cached :func:`torch.func.vjp` and ``Jp`` as the vjp of that
    linear map (one linearization per solve: a single forward pass, no re-tracing). ``residual`` ``g`` gives
    ``v = Jᵀg``; a general ``vec`` is first projected onto ``row(J)`` (least squares,
    CG on ``K g = Jv/n`` from 0) so the result is ``P_λ v`` as for the exact method.
    ``x0`` warm-starts the main solve (flat vector; from 0 the solution is the
    minimum-norm one). ``geometry`` and ``residual`` as for :func:`exact_natural_direction`.
    """
    if (vec is None) == (residual is None):
        raise ValueError("cg_natural_direction: give exactly one of vec and residual")
    n = x.shape[0]
    theta = flatten(params)
    mm = metric_map(module, params, x, geometry)

    def f(t: Tensor) -> Tensor:
        return mm.outputs(unflatten(t, params), x)

    # linearize once: the vjp caches the forward; J p is the vjp of the (linear) map u ↦ Jᵀu,
    # as fast per product as torch.func.linearize's jvp without its ~100 ms tracing
    out, pull = vjp(f, theta)
    shape = out.shape

    def Jt(u: Tensor) -> Tensor:
        return pull(u.reshape(shape))[0]

    _, pull_t = vjp(Jt, torch.zeros_like(out).reshape(-1))

    def J(p: Tensor) -> Tensor:
        return pull_t(p)[0]

    if residual is not None:
        b = Jt(residual.reshape(-1))
    else:
        # least-squares g with Jᵀg = Π v: CG on K g = Jv/n from 0 (stays in range(K))
        g_ls, _, _ = conjugate_gradient(
            lambda u: J(Jt(u)) / n, J(flatten(vec)) / n, tol=tol * 1e-2, maxiter=maxiter,  # type: ignore[arg-type]
            early_stop=early_stop,
        )
        b = Jt(g_ls)
    sol, iters, rel = conjugate_gradient(
        lambda p: Jt(J(p)) / n + damping * p, b, x0, tol=tol, maxiter=maxiter, early_stop=early_stop
    )
    return CGResult(unflatten(sol, params), sol, iters, rel)


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
        if self.method not in METHODS:
            raise OptionError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        _check_backend(self.backend)
        _check_common(self)
        check_geometry(self.geometry)


def head_coords(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Head]:
    """``(z, head)``: the body's output on ``x`` (detached, ``(n, k)``) and the map's head."""
    body, head = split_head(module)
    with torch.no_grad():
        return _output(body, params, x), head


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


class Exact(_Natural):
    r"""The exact generalized natural gradient ``(A + λ/n·I)⁻¹Π_A`` per player.

    .. math::

        d_θ = \Big(\tfrac1n JᵀJ + \tfrac{λ}{n} I\Big)^{-1} ∇_θ ℓ_{\min}
            = Jᵀ\Big(\tfrac1n JJᵀ + \tfrac{λ}{n} I\Big)^{+} \frac{∂ℓ_{\min}}{∂F}

    (and likewise for φ), computed by the sample-space kernel, the structured MLP
    kernel or the dense parameter-space solve (:func:`exact_natural_direction`).
    The preconditioned *field* is computed from ``∂ℓ_p/∂F_p`` directly (one
    forward/backward in function space, no parameter-space field needed).

    **Damping** (Levenberg-Marquardt, a deliberate choice). Option ``damping = λ``
    is added to the *summed* Gram ``JᵀJ = nA``, i.e. ``λ/n`` is added to ``A``:

    .. math::

        d = \arg\min_d \; ‖J d − n g‖² + λ ‖d‖² = (A + \tfrac{λ}{n} I)^{-1} v,

    so its strength per support point does not change with ``n``. Default
    ``λ = 0.5``. Near saturated softmax/sigmoid strategies the smallest singular
    values ``σ`` of ``J`` vanish and the undamped step in θ grows like ``1/σ``,
    throwing the logits across the simplex into the opposite corner, where every
    method stalls; damping caps the gain ``σ/(σ² + λ)`` at ``1/(2√λ)``. Measured
    (extragradient, float64, 10 seeds, V ≤ 1e-6 within 300 steps): on RPS (step 0.4) from
    ``out_scale = 15`` starts λ ∈ {0.1, 0.3, 0.5, 1} converge in 4, 7, 10, 10 of 10
    runs; on matching pennies (λ_game = 0.1, step 0.2) from ``out_scale = 20``: 7, 9, 9, 9 of
    10. At the defaults ``JJᵀ`` has eigenvalues 0.6-5 (n = 1), so ``λ = 0.5`` costs
    a few iterations (RPS median 29 vs 25 at λ = 0.1; matching pennies 42 vs 31).
    The per-step value added to ``A`` is logged as ``damping``. ``λ = 0`` gives the
    exact pseudo-inverse (and exact parametrization invariance).

    References: Amari 1998; Martens 2020; Mladenovic, Sakos & Piliouras, ICLR 2022.
    """

    name = "exact"
    Options = ExactOptions

    def _solve(self, module, p, x, vec, r, state, player, lam):  # noqa: D102
        o = self.options
        d = _exact(module, p, x, vec, r, lam, o.method, o.backend, o.rcond, o.geometry)
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


class CG(_Natural):
    r"""The natural gradient by matrix-free conjugate gradients on ``A + λ/n·I``.

    .. math::

        (A + \tfrac{λ}{n} I)\,d = v,\qquad Ap = \tfrac1n\,Jᵀ(Jp),

    one Jacobian-vector and one vector-Jacobian product per iteration
    (:func:`cg_natural_direction`). From 0 it returns the minimum-norm solution;
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
    "BACKENDS", "CG", "CGOptions", "CGResult", "DEFAULT_DAMPING", "Exact", "ExactOptions", "METHODS",
    "cg_natural_direction", "choose_method", "conjugate_gradient", "default_rcond", "exact_natural_direction",
    "flatten", "function_space_gradients", "fused_supported", "jacobian_matrix", "output_dim",
    "per_sample_jacobian", "supports_structured", "unflatten",
]
