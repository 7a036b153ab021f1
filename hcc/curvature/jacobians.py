r"""Per-sample Jacobians of a map, the structured MLP factors, and the metric Jacobian ``Ĵ``.

A map ``F_θ`` evaluated on ``n`` support points ``x_i`` has per-sample Jacobians

.. math::

    J_i = \frac{∂F_θ(x_i)}{∂θ} ∈ \mathbb R^{k×M},\qquad J ∈ \mathbb R^{nk×M}
    \ (\text{rows ordered (sample, output), columns as } :func:`~hcc.curvature.pytree.flatten`),

valid when row ``i`` of the batched output depends on ``x_i`` only (any module without batch
statistics: MLPs, convolutions, ``nn.LayerNorm``, residual blocks; not ``nn.BatchNorm`` in
training mode, which :func:`check_per_sample` rejects). Every metric of
:mod:`hcc.curvature.heads` is ``A = ĴᵀĴ/n`` with the *metric Jacobian* ``Ĵ_i = Q_iᵀ J_{z,i}``
(:class:`MetricMap`): what the operators of :mod:`hcc.curvature.operators` factor.

Two backends form ``J``: ``func`` (``vmap(jacrev)`` over :func:`~torch.func.functional_call`;
any per-sample module, differentiable and vmappable) and ``backpack`` (BackPACK's
``BatchGrad``, one backward pass per output coordinate, on an extended twin:
:func:`backpack_twin`). For an ``nn.Sequential`` MLP the *structured* form never forms ``J``:
layer ``l`` with inputs ``a_i`` and output sensitivities ``δ_i = ∂Ĵ(x_i)/∂s_l`` contributes

.. math::

    (JJᵀ)_{(i,·),(j,·)} \mathrel{+}= (δ_i δ_jᵀ)\,(a_iᵀa_j + 1),

and ``Jᵀu``, ``Jv`` come from the same factors (:class:`StructuredFactors`).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from ..registry import OptionError
from .heads import Geometry, Head, apply_factor_t, check_geometry, output_factor, split_head

Backend = Literal["func", "backpack"]
BACKENDS: tuple[str, ...] = ("func", "backpack")

#: parameter-free modules that act on each sample (row) separately: allowed between
#: the ``nn.Linear`` layers of the structured method
PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.ReLU, nn.ELU, nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.LeakyReLU, nn.GELU, nn.SiLU,
    nn.Softplus, nn.Identity, nn.Hardtanh, nn.SELU, nn.CELU, nn.Mish,
)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """An :class:`~hcc.registry.OptionError` naming the choices unless ``value`` is one of them."""
    if value not in choices:
        raise OptionError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def check_per_sample(module: nn.Module) -> None:
    """Reject maps whose output rows depend on other support points (batch statistics)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise OptionError(
                f"per-sample Jacobians: expected a map that treats each support point on its own, got "
                f"{type(m).__name__} {name!r} using batch statistics; use nn.LayerNorm/nn.GroupNorm or eval mode"
            )


def output(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``F_θ`` on the support as an ``(n, k)`` matrix (per-sample outputs flattened)."""
    return functional_call(module, params, (x,)).reshape(x.shape[0], -1)


def output_dim(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> int:
    """``k``: the number of output values per support point."""
    with torch.no_grad():
        return output(module, params, x[:1]).shape[1]


# -- per-sample Jacobians ------------------------------------------------------------------------


def per_sample_jacobian(
    module: nn.Module, params: dict[str, Tensor], x: Tensor, backend: Backend = "func",
    names: tuple[str, ...] | None = None,
) -> dict[str, Tensor]:
    r"""Per-sample Jacobians ``J_i = ∂F_θ(x_i)/∂θ``: for each parameter a tensor ``(n, k, *shape)``.

    ``backend="func"``: ``vmap(jacrev)`` over :func:`~torch.func.functional_call`
    (any module that maps each sample on its own; vmappable). ``backend="backpack"``:
    BackPACK's ``BatchGrad`` with one backward pass per output coordinate, on an
    extended deep copy of ``module`` (:func:`backpack_twin`); not differentiable, not
    vmappable. ``names``: only these parameters (the others held fixed; ``func`` only).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "backpack":
        if names is not None:
            raise ValueError("per_sample_jacobian: names needs backend='func'")
        return _backpack_jacobian(module, params, x)
    sub = params if names is None else {k: params[k] for k in names}
    fixed = {} if names is None else {k: v for k, v in params.items() if k not in names}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(module, {**fixed, **p}, (xi.unsqueeze(0),)).reshape(-1)

    return vmap(jacrev(f), in_dims=(None, 0))(sub, x)


def jacobian_matrix(
    module: nn.Module, params: dict[str, Tensor], x: Tensor, backend: Backend = "func",
    names: tuple[str, ...] | None = None,
) -> Tensor:
    """``J ∈ R^{nk × M}``: rows ordered (sample, output), columns as :func:`~hcc.curvature.pytree.flatten`
    (over ``names`` when given)."""
    jac = per_sample_jacobian(module, params, x, backend, names)
    n = x.shape[0]
    J = torch.cat([jac[k].reshape(n, jac[k].shape[1], -1) for k in (params if names is None else names)], dim=-1)
    return J.reshape(-1, J.shape[-1])


# -- BackPACK twins ----------------------------------------------------------------------------------


class BackpackTwin:
    """A BackPACK-extended deep copy of a module, pointed at given parameters on demand.

    BackPACK's hooks break :mod:`torch.func` on the module they extend (even inside
    ``backpack.disable()``), so extensions run on this twin and the original stays clean.
    ``inputs`` collects the inputs of the submodules named in :meth:`record_inputs` during a
    forward pass; ``extras`` holds what a caller keeps per twin (e.g. extended loss modules).
    """

    def __init__(self, module: nn.Module) -> None:
        from backpack import extend

        self.module = extend(copy.deepcopy(module))
        self.params = dict(self.module.named_parameters())
        self.inputs: dict[str, Tensor] = {}
        self._recorded: set[str] = set()
        self.extras: dict[Any, Any] = {}

    def load(self, params: dict[str, Tensor], biases: bool = True) -> None:
        """Point the twin at ``params``; ``biases=False`` stops BackPACK from computing the
        bias quantities (K-FAC reads the weight's factors only)."""
        if set(self.params) != set(params):
            raise ValueError(f"backpack: parameters {sorted(params)} do not match the module's {sorted(self.params)}")
        for k, p in self.params.items():
            p.data = params[k].detach()
            p.grad = None
            p.requires_grad_(biases or not k.endswith("bias"))

    def record_inputs(self, prefixes: tuple[str, ...]) -> None:
        """Record the input of each submodule in ``prefixes`` at every forward pass (into ``inputs``)."""
        for prefix in prefixes:
            if prefix not in self._recorded:
                self.module.get_submodule(prefix).register_forward_pre_hook(
                    lambda m, inp, pre=prefix: self.inputs.__setitem__(pre, inp[0].detach()))
                self._recorded.add(prefix)


# one twin per module (weak keys: dropped with the module)
_TWINS: weakref.WeakKeyDictionary[nn.Module, BackpackTwin] = weakref.WeakKeyDictionary()


def backpack_twin(module: nn.Module) -> BackpackTwin:
    """The cached :class:`BackpackTwin` of ``module``."""
    tw = _TWINS.get(module)
    if tw is None:
        tw = _TWINS[module] = BackpackTwin(module)
    return tw


def _backpack_jacobian(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    from backpack import backpack
    from backpack.extensions import BatchGrad

    tw = backpack_twin(module)
    tw.load(params)
    named = tw.params
    n = x.shape[0]
    rows: dict[str, list[Tensor]] = {k: [] for k in params}
    # BackPACK saves module inputs/outputs only for a forward pass inside its context
    with torch.enable_grad(), backpack(BatchGrad(), retain_graph=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            out = tw.module(x.detach()).reshape(n, -1)
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


# -- the structured (no-J) form for MLPs ----------------------------------------------------------


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


class StructuredFactors(NamedTuple):
    """Per-layer factors of ``Ĵ`` for an MLP: inputs ``a_l`` ``(n, in_l)`` and sensitivities ``δ_l``
    ``(k, n, out_l)``; :meth:`gram`, :meth:`vjp` and :meth:`jvp` never form ``Ĵ``."""

    names: list[tuple[str, str | None]]  # (weight name, bias name or None) per Linear
    acts: list[Tensor]
    deltas: list[Tensor]

    def gram(self, dtype: torch.dtype | None = None) -> Tensor:
        """``ĴĴᵀ`` (unnormalized), ``(nk × nk)``, rows ordered (sample, output), accumulated in ``dtype``
        (default: the factors')."""
        total = None
        for (_, b), a, d in zip(self.names, self.acts, self.deltas, strict=True):
            if dtype is not None:
                a, d = a.to(dtype), d.to(dtype)
            gram = a @ a.T + (1.0 if b is not None else 0.0)  # (n, n)
            blk = torch.einsum("aio,bjo->iajb", d, d) * gram[:, None, :, None]
            total = blk if total is None else total + blk
        n, k = self.acts[0].shape[0], self.deltas[0].shape[0]
        return total.reshape(n * k, n * k)

    def vjp(self, u: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """``Ĵᵀu`` for ``u`` of shape ``(n, k)``."""
        out = {}
        for (w, b), a, d in zip(self.names, self.acts, self.deltas, strict=True):
            sens = torch.einsum("ia,aio->io", u, d)
            out[w] = sens.T @ a
            if b is not None:
                out[b] = sens.sum(0)
        return {k: out[k] for k in like}

    def jvp(self, v: dict[str, Tensor]) -> Tensor:
        """``Ĵv`` as an ``(n, k)`` matrix."""
        total = None
        for (w, b), a, d in zip(self.names, self.acts, self.deltas, strict=True):
            z = a @ v[w].T + (v[b] if b is not None else 0.0)
            t = torch.einsum("aio,io->ia", d, z)
            total = t if total is None else total + t
        return total


def structured_factors(module: nn.Sequential, params: dict[str, Tensor], x: Tensor,
                       Q: Tensor | None = None) -> StructuredFactors:
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
    return StructuredFactors(names, [a.detach() for a in acts], list(deltas))


# -- the metric Jacobian ----------------------------------------------------------------------------


class MetricMap(NamedTuple):
    """What the metric ``A = ĴᵀĴ/n`` differentiates: ``Ĵ_i = Q_iᵀ J_{z,i}`` (:mod:`hcc.curvature.heads`).

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
        """``(n, c)`` outputs whose Jacobian at the current point is ``Ĵ``."""
        out = output(self.module, params, x)
        return out if self.Q is None else apply_factor_t(self.Q, out)

    def n_outputs(self, params: dict[str, Tensor]) -> int:
        """``c``: the rows of ``Ĵ_i`` (the columns of ``Q_i``, or ``k`` without ``Q``)."""
        return output_dim(self.module, params, self.x) if self.Q is None else self.Q.shape[2]

    def jacobian(self, params: dict[str, Tensor], x: Tensor, backend: Backend = "func",
                 names: tuple[str, ...] | None = None) -> Tensor:
        """``Ĵ ∈ R^{nc × M}``, rows ordered (sample, output) (over the parameters ``names`` when given)."""
        J = jacobian_matrix(self.module, params, x, backend, names)
        if self.Q is None:
            return J
        n, k, c = self.Q.shape
        return torch.einsum("nkc,nkm->ncm", self.Q, J.reshape(n, k, -1)).reshape(n * c, -1)


def metric_map(module: nn.Module, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2") -> MetricMap:
    """The :class:`MetricMap` of ``module`` at ``params`` on the support ``x`` in ``geometry``."""
    check_geometry(geometry)
    check_per_sample(module)
    body, head = split_head(module)
    if head == "none":
        if geometry == "fisher":
            output_factor(x.new_zeros(1, 1), head, "fisher")  # raises the explanatory error
        return MetricMap(module, head, geometry, None, None, x)
    if geometry == "l2":
        return MetricMap(module, head, geometry, None, None, x)
    with torch.no_grad():
        z = output(body, params, x)
    return MetricMap(body, head, geometry, output_factor(z, head, geometry), z, x)


def head_coords(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Head]:
    """``(z, head)``: the body's output on ``x`` (detached, ``(n, k)``) and the map's head."""
    body, head = split_head(module)
    with torch.no_grad():
        return output(body, params, x), head


__all__ = [
    "BACKENDS", "BackpackTwin", "MetricMap", "PER_SAMPLE_MODULES", "StructuredFactors", "backpack_twin",
    "check_choice", "check_per_sample", "head_coords", "jacobian_matrix", "metric_map", "output", "output_dim",
    "per_sample_jacobian", "structured_factors", "supports_structured",
]
