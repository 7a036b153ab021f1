r"""Linear operators for a map's metric ``A = ĴᵀĴ/n`` and its damped (pseudo-)inverse.

A :class:`CurvatureOperator` acts on one map's parameter dicts (the layout of
:func:`~hcc.curvature.pytree.flatten`): :meth:`~CurvatureOperator.matvec` applies the matrix,
:meth:`~CurvatureOperator.solve` its damped inverse, :meth:`~CurvatureOperator.dense` forms it
(a reference for small maps), :meth:`~CurvatureOperator.inverse` returns the damped inverse as
an operator. The metric is that of :mod:`hcc.curvature.heads` (``l2``, ``fisher``, ``logit``)
through :class:`~hcc.curvature.jacobians.MetricMap` (Amari, *Natural gradient works efficiently
in learning*, Neural Computation 1998; Martens, *New insights and perspectives on the natural
gradient method*, JMLR 2020; Mladenovic, Sakos & Piliouras, *Generalized natural gradient flows
in hidden convex-concave games and GANs*, ICLR 2022).

**Damping and pseudo-inverse.** The exact operators and CG apply, for ``λ ≥ 0``,

.. math::

    P_λ = (A + λI)^{-1} Π_A = \sum_{σ_j > 0} \frac{u_j u_jᵀ}{σ_j + λ},

``Π_A`` the orthogonal projector onto ``range(A) = row(Ĵ)``: for ``λ = 0`` the pseudo-inverse
``A⁺`` (the minimum-norm solution), and for any vector in ``range(A)`` — every gradient of a
function of ``F``, in particular ``v = Ĵᵀ r̂`` — exactly ``(A + λI)⁻¹ v``. Components in
``null(A)`` do not move ``F`` to first order; they are dropped instead of amplified by ``1/λ``.
``λ`` here is what is added to ``A`` (the preconditioners of :mod:`hcc.solvers.natural` take a
Levenberg-Marquardt ``λ`` on ``ĴᵀĴ = nA`` and pass ``λ/n``). Pseudo-inverses are spectral:
eigenvalues ``σ ≤ rcond · σ_max`` count as zero (default :func:`default_rcond`), with no
data-dependent branching, so the ``func`` methods run under :func:`torch.vmap`.

``solve(residual=r̂)`` means ``v = Ĵᵀ r̂`` (``r̂`` of shape ``(n, c)``): the accurate row-space form

.. math::

    d = Ĵᵀ (ĴĴᵀ/n + λI)^{+} r̂ = (A + λI)^{-1} Ĵᵀ r̂,

which avoids the cancellation of the Woodbury form.

**Implementations.**

- :class:`KernelOperator` — sample space, ``Ĵ`` formed (``vmap(jacrev)`` or BackPACK): ``K = ĴĴᵀ/n``
  (``nc × nc``) and the push-through identity ``(ĴᵀĴ/n + λ)⁻¹Ĵᵀ = Ĵᵀ(K + λ)⁻¹``; a general ``v``
  is first projected onto ``row(Ĵ)`` by least squares: ``d = Ĵᵀ (K + λI)^{+} K^{+} (Ĵv)/n``;
- :class:`StructuredOperator` — the same kernel for an ``nn.Sequential`` MLP without forming ``Ĵ``
  (:class:`~hcc.curvature.jacobians.StructuredFactors`); fastest when ``nc ≪ M``;
- :class:`DenseOperator` — parameter space: ``A`` (``M × M``) formed and eigendecomposed;
- :class:`CGOperator` — matrix-free conjugate gradients on ``(A + λI) d = v`` with one
  Jacobian-vector and one vector-Jacobian product per iteration; from 0 the iterates stay in
  ``range(A)`` (the minimum-norm solution); a general ``v`` is projected first by a
  sample-space CG solve; to its tolerance;
- :class:`~hcc.curvature.kfac.KFACOperator` and :class:`~hcc.curvature.diag.DiagOperator` — the
  block-diagonal approximations; their :meth:`inverse` is the plain inverse of the *damped*
  approximation (``λ > 0``, per block, :func:`block_damping`), not a pseudo-inverse; a dead
  block (zero curvature) maps to 0.

:func:`exact_operator` picks the exact method (:func:`choose_method`: ``dense`` if ``nc > M``;
else ``structured`` for supported MLPs with the ``func`` backend; else ``kernel``).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
>>> params = {k: v.detach() for k, v in net.named_parameters()}
>>> x = torch.randn(2, 4, dtype=torch.float64)
>>> op = exact_operator(net, params, x)
>>> d = op.solve(residual=torch.ones(2, 3, dtype=torch.float64), damping=1e-3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vjp

from ..registry import OptionError
from .heads import Geometry
from .jacobians import Backend, MetricMap, check_choice, metric_map, structured_factors, supports_structured
from .pytree import flatten, numel, unflatten

Method = Literal["auto", "kernel", "structured", "dense"]
METHODS: tuple[str, ...] = ("auto", "kernel", "structured", "dense")
DampingScale = Literal["relative", "absolute"]


def default_rcond(dtype: torch.dtype, size: int) -> float:
    """Relative eigenvalue cutoff ``10 · size · eps(dtype)``: below it an eigenvalue counts as 0."""
    return 10.0 * size * torch.finfo(dtype).eps


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Gram system is formed and eigendecomposed in: float64 for float32/16 maps.

    Forming ``ĴĴᵀ`` squares the condition number of ``Ĵ``: in float32 every eigenvalue below
    ``≈ size·eps₃₂·σ_max`` is lost, and with it the directions in which an ill-conditioned map
    (``rps`` with 64 contexts) still has to move: the exact pull-back stalled at ``V ≈ 6e-6`` there.
    Accumulated in float64 from the float32 ``Ĵ``, eigenvalues are resolved down to
    ``≈ (eps₃₂ σ_max)²`` (the accuracy of ``Ĵ`` itself). The system is ``nk × nk`` (or ``M × M``), so
    this costs little next to the Jacobians.
    """
    return torch.float64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype


def gram_rcond(dtype: torch.dtype, size: int) -> float:
    """Default cutoff of a Gram matrix of ``Ĵ`` in ``dtype`` accumulated in :func:`solve_dtype`:
    ``10 · size · max(eps(solve dtype), eps(dtype)²)``."""
    eps = torch.finfo(dtype).eps
    return 10.0 * size * max(torch.finfo(solve_dtype(dtype)).eps, eps * eps)


def spectral_weights(s: Tensor, damping: float | Tensor, rcond: float, power: int = 1) -> Tensor:
    """``1/(s + λ)`` (``power=1``) or ``1/((s + λ) s)`` (``power=2``) on kept eigenvalues, 0 elsewhere."""
    cutoff = rcond * s.max().clamp_min(torch.finfo(s.dtype).tiny)
    keep = s > cutoff
    s_safe = torch.where(keep, s, torch.ones_like(s))
    w = 1.0 / (s_safe + damping)
    if power == 2:
        w = w / s_safe
    return torch.where(keep, w, torch.zeros_like(w))


def _one_of(rhs: object, residual: object, who: str, rhs_name: str = "rhs") -> None:
    if (rhs is None) == (residual is None):
        raise ValueError(f"{who}: give exactly one of {rhs_name} and residual")


class CurvatureOperator:
    """A symmetric PSD operator on one map's parameters (dicts shaped like :attr:`like`).

    Subclasses implement :meth:`matvec` and either :meth:`solve` or :meth:`inverse` (each
    defaults to the other). ``metric`` (when known) gives the residual form of :meth:`solve`.
    """

    like: dict[str, Tensor]
    metric: MetricMap | None = None

    def matvec(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``A v``."""
        raise NotImplementedError

    def __matmul__(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.matvec(v)

    @property
    def size(self) -> int:
        """``M``, the number of parameters."""
        return numel(self.like)

    def dense(self) -> Tensor:
        """The matrix, ``M × M`` (columns as :func:`~hcc.curvature.pytree.flatten`), from ``M`` products."""
        ref = next(iter(self.like.values()))
        eye = torch.eye(self.size, dtype=ref.dtype, device=ref.device)
        return torch.stack([flatten(self.matvec(unflatten(e, self.like))) for e in eye], 1)

    def field(self, residual: Tensor) -> dict[str, Tensor]:
        """``v = Ĵᵀ r̂`` for a residual ``r̂`` of shape ``(n, c)`` (needs :attr:`metric`)."""
        if self.metric is None:
            raise ValueError(f"{type(self).__name__}: the residual form needs the metric map; pass rhs")
        mm, x = self.metric, self.metric.x
        _, pull = vjp(lambda p: mm.outputs(p, x), self.like)
        return pull(residual.reshape(x.shape[0], -1))[0]

    def inverse(self, damping: float | Tensor = 0.0) -> CurvatureOperator:
        """The damped (pseudo-)inverse as an operator (module docstring)."""
        return InverseOperator(self, damping)

    def solve(self, rhs: dict[str, Tensor] | None = None, *, residual: Tensor | None = None,
              damping: float | Tensor = 0.0) -> dict[str, Tensor]:
        """``P_λ v`` for ``v = rhs`` or ``v = Ĵᵀ residual`` (module docstring)."""
        _one_of(rhs, residual, "solve")
        v = self.field(residual) if residual is not None else rhs
        return self.inverse(damping).matvec(v)  # type: ignore[arg-type]


class InverseOperator(CurvatureOperator):
    """``P_λ`` of an operator whose :meth:`~CurvatureOperator.solve` is primary."""

    def __init__(self, op: CurvatureOperator, damping: float | Tensor) -> None:
        self.op, self.damping, self.like, self.metric = op, damping, op.like, op.metric

    def matvec(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.op.solve(v, damping=self.damping)


# -- exact: sample space (kernel, structured) -----------------------------------------------------------


class _SampleSpace(CurvatureOperator):
    """``A = ĴᵀĴ/n`` through ``Ĵv``, ``Ĵᵀu`` and the kernel ``K = ĴĴᵀ/n`` (``nc × nc``)."""

    def __init__(self, mm: MetricMap, params: dict[str, Tensor], c: int, rcond: float | None) -> None:
        self.metric, self.like, self.c, self.rcond = mm, params, c, rcond
        self.n = mm.x.shape[0]
        self._eig: tuple[Tensor, Tensor] | None = None

    def jvp(self, v: dict[str, Tensor]) -> Tensor:
        """``Ĵv``, flat (rows ordered (sample, output))."""
        raise NotImplementedError

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        """``Ĵᵀu`` for ``u`` flat or ``(n, c)``."""
        raise NotImplementedError

    def gram(self) -> Tensor:
        """``ĴĴᵀ`` (unnormalized)."""
        raise NotImplementedError

    def kernel(self) -> Tensor:
        """``K = ĴĴᵀ/n``, in :func:`solve_dtype`."""
        return self.gram() / self.n

    def eig(self) -> tuple[Tensor, Tensor]:
        """``(s, U)`` of ``K`` (computed once, in :func:`solve_dtype`)."""
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.kernel())
        return self._eig

    def matvec(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: t / self.n for k, t in self.vjp(self.jvp(v)).items()}

    def solve(self, rhs=None, *, residual=None, damping=0.0):  # noqa: D102
        _one_of(rhs, residual, "solve")
        s, U = self.eig()
        dt = next(iter(self.like.values())).dtype
        rc = gram_rcond(dt, self.n * self.c) if self.rcond is None else self.rcond
        r = residual.reshape(-1) if residual is not None else self.jvp(rhs)
        w = spectral_weights(s, damping, rc, power=1 if residual is not None else 2)
        u = U @ (w * (U.T @ r.to(s.dtype)))
        return self.vjp((u if residual is not None else u / self.n).to(dt))


class KernelOperator(_SampleSpace):
    """The exact operator in sample space with ``Ĵ`` formed (``func``: ``vmap(jacrev)``; ``backpack``)."""

    def __init__(self, mm: MetricMap, params: dict[str, Tensor], c: int, rcond: float | None = None,
                 backend: Backend = "func") -> None:
        super().__init__(mm, params, c, rcond)
        self.J = mm.jacobian(params, mm.x, backend)

    def jvp(self, v):  # noqa: D102
        return self.J @ flatten(v)

    def vjp(self, u):  # noqa: D102
        return unflatten(self.J.T @ u.reshape(-1), self.like)

    def gram(self):  # noqa: D102
        J = self.J.to(solve_dtype(self.J.dtype))
        return J @ J.T

    def kernel(self):  # noqa: D102
        return self.gram() / self.n

    def dense(self):  # noqa: D102
        return self.J.T @ self.J / self.n


class StructuredOperator(_SampleSpace):
    """The exact operator in sample space for an ``nn.Sequential`` MLP, ``Ĵ`` never formed."""

    def __init__(self, mm: MetricMap, params: dict[str, Tensor], c: int, rcond: float | None = None) -> None:
        if not supports_structured(mm.module):
            raise OptionError(
                f"method 'structured': expected an nn.Sequential of nn.Linear and per-sample activations, "
                f"got {type(mm.module).__name__}; use method=kernel or auto"
            )
        super().__init__(mm, params, c, rcond)
        self.factors = structured_factors(mm.module, params, mm.x, mm.Q)  # type: ignore[arg-type]

    def jvp(self, v):  # noqa: D102
        return self.factors.jvp(v).reshape(-1)

    def vjp(self, u):  # noqa: D102
        return self.factors.vjp(u.reshape(self.n, self.c), self.like)

    def gram(self):  # noqa: D102
        return self.factors.gram(solve_dtype(self.factors.acts[0].dtype))


# -- exact: parameter space ----------------------------------------------------------------------


class DenseOperator(CurvatureOperator):
    """The exact operator in parameter space: ``A`` (``M × M``) formed and eigendecomposed."""

    def __init__(self, mm: MetricMap, params: dict[str, Tensor], rcond: float | None = None,
                 backend: Backend = "func") -> None:
        self.metric, self.like, self.rcond = mm, params, rcond
        self.J = mm.jacobian(params, mm.x, backend)
        self.n = mm.x.shape[0]
        self.A = self.J.T @ self.J / self.n
        self._eig: tuple[Tensor, Tensor] | None = None

    def matvec(self, v):  # noqa: D102
        return unflatten(self.A @ flatten(v), self.like)

    def dense(self):  # noqa: D102
        return self.A

    def solve(self, rhs=None, *, residual=None, damping=0.0):  # noqa: D102
        _one_of(rhs, residual, "solve")
        if self._eig is None:
            J = self.J.to(solve_dtype(self.J.dtype))
            self._eig = torch.linalg.eigh(J.T @ J / self.n)
        s, U = self._eig
        v = self.J.T @ residual.reshape(-1) if residual is not None else flatten(rhs)
        rc = gram_rcond(self.A.dtype, self.size) if self.rcond is None else self.rcond
        d = U @ (spectral_weights(s, damping, rc) * (U.T @ v.to(s.dtype)))
        return unflatten(d.to(self.A.dtype), self.like)


def choose_method(module: nn.Module, n: int, k: int, n_params: int, backend: Backend = "func") -> str:
    """The ``auto`` rule: ``dense`` if ``nk > M``; else ``structured`` (supported MLPs, func
    backend); else ``kernel``."""
    if n * k > n_params:
        return "dense"
    if backend == "func" and supports_structured(module):
        return "structured"
    return "kernel"


def exact_operator(module: nn.Module, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2", *,
                   method: Method = "auto", backend: Backend = "func", rcond: float | None = None,
                   c: int | None = None) -> CurvatureOperator:
    """The exact metric operator of ``module`` at ``params`` on the support ``x`` (``method`` as in the
    module docstring; ``c``: the rows of ``Ĵ_i`` if known, e.g. from a residual)."""
    check_choice("method", method, METHODS)
    check_choice("backend", backend, ("func", "backpack"))
    mm = metric_map(module, params, x, geometry)
    c = mm.n_outputs(params) if c is None else c
    if method == "auto":
        method = choose_method(mm.module, x.shape[0], c, numel(params), backend)  # type: ignore[assignment]
    if method == "dense":
        return DenseOperator(mm, params, rcond, backend)
    if method == "structured":
        return StructuredOperator(mm, params, c, rcond)
    return KernelOperator(mm, params, c, rcond, backend)


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
    r"""One map's natural direction ``P_λ v`` (module docstring), exactly.

    Give either ``vec`` (any parameter-space vector, a dict like ``params``) or
    ``residual`` ``r̂`` of shape ``(n, c)``, meaning ``v = Ĵᵀ r̂``; the latter is the accurate
    row-space form. In the ``l2`` geometry ``Ĵ = J`` and ``r̂ = g = ∂ℓ/∂F``; in the others
    ``Ĵ_i = Q_iᵀ J_{z,i}`` (:func:`~hcc.curvature.heads.field_residual` turns ``g`` into ``r̂``).
    ``x`` is the support (``n`` points); ``rcond`` the relative eigenvalue cutoff.
    """
    _one_of(vec, residual, "exact_natural_direction", "vec")
    c = residual.reshape(x.shape[0], -1).shape[1] if residual is not None else None
    op = exact_operator(module, params, x, geometry, method=method, backend=backend, rcond=rcond, c=c)
    return op.solve(vec, residual=residual, damping=damping)


# -- conjugate gradients -------------------------------------------------------------------------


class CGResult(NamedTuple):
    """What :meth:`CGOperator.solve_result` returns."""

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


class CGOperator(CurvatureOperator):
    r"""``A = ĴᵀĴ/n`` matrix-free, solved by conjugate gradients to a tolerance.

    .. math::

        (A + λI)\,p = \tfrac1n Ĵᵀ(Ĵp) + λp

    with ``Ĵᵀu`` from a cached :func:`torch.func.vjp` and ``Ĵp`` as the vjp of that linear map:
    one linearization per operator (a single forward pass, no re-tracing), as fast per product
    as :func:`torch.func.linearize`'s jvp without its tracing cost.
    """

    def __init__(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2", *,
                 tol: float = 1e-6, maxiter: int = 100, early_stop: bool = True) -> None:
        self.like, self.tol, self.maxiter, self.early_stop = params, tol, maxiter, early_stop
        self.metric = mm = metric_map(module, params, x, geometry)
        self.n = x.shape[0]

        def f(t: Tensor) -> Tensor:
            return mm.outputs(unflatten(t, params), x)

        out, pull = vjp(f, flatten(params))
        self._shape = out.shape
        self._pull = pull
        _, self._pull_t = vjp(self.Jt, torch.zeros_like(out).reshape(-1))

    def Jt(self, u: Tensor) -> Tensor:
        """``Ĵᵀu``, flat."""
        return self._pull(u.reshape(self._shape))[0]

    def J(self, p: Tensor) -> Tensor:
        """``Ĵp``, flat."""
        return self._pull_t(p)[0]

    def matvec(self, v):  # noqa: D102
        return unflatten(self.Jt(self.J(flatten(v))) / self.n, self.like)

    def solve_result(self, rhs: dict[str, Tensor] | None = None, *, residual: Tensor | None = None,
                     damping: float | Tensor = 0.0, x0: Tensor | None = None) -> CGResult:
        """The solve with its record; ``x0`` warm-starts the main solve (flat; from 0 the solution
        is the minimum-norm one)."""
        _one_of(rhs, residual, "solve")
        n = self.n
        if residual is not None:
            b = self.Jt(residual.reshape(-1))
        else:
            # least-squares g with Ĵᵀg = Π v: CG on K g = Ĵv/n from 0 (stays in range(K))
            g_ls, _, _ = conjugate_gradient(
                lambda u: self.J(self.Jt(u)) / n, self.J(flatten(rhs)) / n, tol=self.tol * 1e-2,
                maxiter=self.maxiter, early_stop=self.early_stop,
            )
            b = self.Jt(g_ls)
        sol, iters, rel = conjugate_gradient(
            lambda p: self.Jt(self.J(p)) / n + damping * p, b, x0, tol=self.tol, maxiter=self.maxiter,
            early_stop=self.early_stop,
        )
        return CGResult(unflatten(sol, self.like), sol, iters, rel)

    def solve(self, rhs=None, *, residual=None, damping=0.0):  # noqa: D102
        return self.solve_result(rhs, residual=residual, damping=damping).direction


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
    r"""One map's natural direction by matrix-free CG on ``(A + λI) d = v`` (:class:`CGOperator`).

    ``residual`` ``r̂`` gives ``v = Ĵᵀr̂``; a general ``vec`` is first projected onto ``row(Ĵ)``
    (least squares, CG on ``K g = Ĵv/n`` from 0) so the result is ``P_λ v`` as for the exact
    method. ``x0`` warm-starts the main solve. ``early_stop=False``: exactly ``maxiter`` masked
    iterations (vmappable).
    """
    _one_of(vec, residual, "cg_natural_direction", "vec")
    op = CGOperator(module, params, x, geometry, tol=tol, maxiter=maxiter, early_stop=early_stop)
    return op.solve_result(vec, residual=residual, damping=damping, x0=x0)


# -- block damping, shared by the block-diagonal approximations ------------------------------------------


def check_damping(damping: float | Tensor) -> None:
    """The block-diagonal inverses need ``λ > 0`` (they invert the damped approximation, no pseudo-inverse)."""
    if not float(damping) > 0:
        raise OptionError(f"damping: expected λ > 0 for a block-diagonal inverse, got {float(damping)}")


def live(*means: Tensor) -> Tensor:
    """1 for a block with curvature, 0 for a dead one (a zero factor: ``Ĵ_b = 0``, so its
    field is 0 and moving it cannot change ``F``; its direction is set to 0, not 0/0)."""
    return torch.stack(means).gt(0).all().to(means[0].dtype)


def block_damping(mean_diag: Tensor, alive: Tensor, damping: float, scale: DampingScale) -> Tensor:
    """``λ_b``: ``damping × mean diagonal of the block`` (``relative``, scale-free) or ``damping`` (``absolute``)."""
    if scale == "absolute":
        return torch.as_tensor(damping, dtype=mean_diag.dtype, device=mean_diag.device)
    return damping * torch.where(alive > 0, mean_diag, torch.ones_like(mean_diag))


class DenseInverse(NamedTuple):
    """``(A_b + λ_b I)⁻¹`` of a dense block from its eigendecomposition ``A_b = U diag(e) Uᵀ``."""

    e: Tensor
    U: Tensor
    live: Tensor
    damping: Tensor

    @classmethod
    def of(cls, A: Tensor, damping: float, scale: DampingScale) -> DenseInverse:
        m = A.diagonal().mean()
        alive = live(m)
        e, U = torch.linalg.eigh(A)
        return cls(e.clamp_min(0), U, alive, block_damping(m, alive, damping, scale))

    def apply(self, v: Tensor) -> Tensor:
        return self.live * (self.U @ ((self.U.T @ v) / (self.e + self.damping)))


__all__ = [
    "CGOperator", "CGResult", "CurvatureOperator", "DenseInverse", "DenseOperator", "InverseOperator",
    "KernelOperator", "METHODS", "StructuredOperator", "block_damping", "check_damping", "cg_natural_direction",
    "choose_method", "conjugate_gradient", "default_rcond", "exact_natural_direction", "exact_operator", "gram_rcond",
    "live", "solve_dtype", "spectral_weights",
]
