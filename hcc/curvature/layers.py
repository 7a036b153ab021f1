r"""A map's curvature blocks and the per-layer quantities K-FAC and the diagonal GGN are built from.

A map ``F = h(z)``, ``z = f_θ(x)`` a body and ``h`` an optional head
(:mod:`hcc.curvature.heads`), has the metric ``A = (1/n) Σ_i J_{z,i}ᵀ Q_i Q_iᵀ J_{z,i}``.
For a layer ``s = W̄ ā`` (weight and bias as *one* block ``W̄ = [W | b]``, ``ā = [a; 1]``)
everything the block-diagonal approximations need is

- the layer inputs ``a_i`` (for a convolution: the unfolded input patches ``ā_{i,t}`` at every
  output location ``t``, :func:`torch.nn.functional.unfold`), and
- the *output sensitivities* ``u_{c,i} = B_iᵀ q_{c,i}``: column ``c`` of ``Q_i`` (or a
  Monte-Carlo column ``Q_i ε/√m``) backpropagated to the layer's output ``s``,
  ``B_i = ∂z_i/∂s_i``.

:func:`analyze_map` splits a map into body, head and blocks: one per ``nn.Linear`` and
per ``nn.Conv2d`` (``groups = 1``, zero padding given as numbers) anywhere in the body; all
other parameters form one dense block. Two ways compute the per-layer quantities:
BackPACK (Dangel, Kunstner & Hennig, *BackPACK: Packing more into Backprop*, ICLR 2020) on
an extended twin of the body ending in :class:`MetricLoss`, a loss whose symmetric Hessian
factor is ``Q_i`` (BackPACK's second-order extensions cannot differentiate ``nn.Softmax``,
so the head enters only through ``Q``), where it applies (:meth:`MapStructure.backpack_ok`);
and :func:`layer_sensitivities`, autograd with forward hooks, for any body.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.loss import _Loss

from ..registry import OptionError
from .heads import Geometry, Head, output_factor, split_head
from .jacobians import BackpackTwin, backpack_twin, check_choice, metric_map

Backend = Literal["auto", "backpack", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "backpack", "torch")
#: key of the dense block of the parameters outside K-FAC layers (never a module path)
REST = "(rest)"

# Modules the BackPACK extensions handle (KFLR/KFAC: the HBP table; DiagGGN: more activations).
HBP_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity,
                                            nn.Flatten, nn.Dropout, nn.MaxPool2d, nn.ZeroPad2d)
DIAG_MODULES: tuple[type[nn.Module], ...] = HBP_MODULES + (nn.ELU, nn.SELU, nn.LeakyReLU, nn.LogSigmoid)


# -- the map's structure --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One Kronecker-factored block: an ``nn.Linear`` or ``nn.Conv2d`` at ``prefix`` in the body."""

    prefix: str
    kind: Literal["linear", "conv2d"]
    has_bias: bool
    #: ``nn.Conv2d``'s ``kernel_size``, ``dilation``, ``padding``, ``stride`` (unfold's arguments)
    conv: tuple[tuple[int, int], ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        """``(weight, bias)`` or ``(weight,)``: the block's parameter names."""
        p = f"{self.prefix}." if self.prefix else ""
        return (p + "weight", p + "bias") if self.has_bias else (p + "weight",)

    def unfold(self, a: Tensor) -> Tensor:
        """The layer input as ``(n, d_in, T)``: a convolution's unfolded patches (``T`` output locations),
        a linear layer's input with ``T = 1``."""
        if self.kind == "linear":
            return a[:, :, None]
        kernel_size, dilation, padding, stride = self.conv
        return torch.nn.functional.unfold(a, kernel_size, dilation, padding, stride)


def _layer(prefix: str, m: nn.Module) -> Layer | None:
    if isinstance(m, nn.Linear):
        return Layer(prefix, "linear", m.bias is not None)
    if (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)):
        return Layer(prefix, "conv2d", m.bias is not None, (m.kernel_size, m.dilation, m.padding, m.stride))
    return None


@dataclass
class MapStructure:
    """How a strategy map splits into a body, a head and curvature blocks."""

    #: the map itself
    module: nn.Module
    #: the map without its head (shares modules and parameter names with the map)
    body: nn.Module
    head: Head
    #: the Kronecker-factored layers of ``body`` (K-FAC blocks)
    layers: tuple[Layer, ...]
    #: parameter names outside those layers (one exact dense block)
    rest: tuple[str, ...]
    #: parameter names in the map's order
    names: tuple[str, ...]

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(layer.prefix for layer in self.layers)

    def blocks(self) -> list[tuple[str, ...]]:
        """The curvature blocks: each layer's ``(weight, bias)``, then the other parameters."""
        return [layer.params for layer in self.layers] + ([self.rest] if self.rest else [])

    def backpack_ok(self, modules: tuple[type[nn.Module], ...]) -> str:
        """Why BackPACK does not apply ('' if it does): it needs a ``Sequential`` body of
        supported modules and no parameters outside the layers."""
        if not isinstance(self.body, nn.Sequential):
            return f"the body is a {type(self.body).__name__}, not an nn.Sequential"
        if self.rest or not self.layers:
            return "it has parameters outside nn.Linear/nn.Conv2d layers"
        bad = sorted({type(m).__name__ for m in self.body if not isinstance(m, modules)})
        return f"unsupported modules {', '.join(bad)}" if bad else ""

    def out_dim(self, params: dict[str, Tensor], x: Tensor) -> int:
        """``k``, the body's output size per point."""
        if isinstance(self.body, nn.Sequential) and len(self.body) and isinstance(self.body[-1], nn.Linear):
            return self.body[-1].out_features
        with torch.no_grad():
            return functional_call(self.body, params, (x[:1],)).reshape(1, -1).shape[1]


def analyze_map(module: nn.Module) -> MapStructure:
    """Split ``module`` into body and head and find its layers.

    A trailing head of an ``nn.Sequential`` (:func:`~hcc.curvature.heads.split_head`) is the
    head; everything else is the body. ``nn.Linear`` and ``nn.Conv2d`` layers anywhere in the
    body are K-FAC blocks; all other parameters form one exact dense block.
    """
    body, head = split_head(module)
    layers, owned = [], set()
    for prefix, m in body.named_modules():
        layer = _layer(prefix, m)
        if layer is not None:
            layers.append(layer)
            owned.update(layer.params)
    names = tuple(n for n, _ in module.named_parameters())
    rest = tuple(n for n in names if n not in owned)
    return MapStructure(module, body, head, tuple(layers), rest, names)


def metric_jacobian(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2",
                    names: tuple[str, ...] | None = None) -> Tensor:
    r"""``Ĵ_i = Q_iᵀ J_{z,i}`` per support point, ``(n, c, m)`` over the parameters ``names`` (flattened in order).

    ``A = (1/n) Σ_i Ĵ_iᵀĴ_i``; for the l2 geometry ``Ĵ_i = J_i``.
    """
    names = structure.names if names is None else names
    p = {k: v.detach() for k, v in params.items()}
    J = metric_map(structure.module, p, x, geometry).jacobian(p, x, "func", names)
    return J.reshape(x.shape[0], -1, J.shape[-1])


def dense_metric(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2") -> Tensor:
    """The exact ``A`` (``M × M``, parameters flattened in the map's order): a reference for small maps."""
    Je = metric_jacobian(structure, params, x, geometry)
    return torch.einsum("ncm,nce->me", Je, Je) / x.shape[0]


# -- output columns ---------------------------------------------------------------------------------


def output_columns(z: Tensor, head: Head, geometry: Geometry, noise: Tensor | None) -> Tensor:
    """The vectors backpropagated through the body, ``(C, *z.shape)``: ``Q``'s columns, or ``Q ε/√m``
    for Monte-Carlo draws ``noise`` ``(m, n, k)``."""
    n = z.shape[0]
    Q = output_factor(z.reshape(n, -1), head, geometry)
    if noise is None:
        cols = Q.permute(2, 0, 1)
    else:
        noise = noise[..., : Q.shape[-1]]  # a masked head's factor has K columns for its 2K coordinates
        cols = torch.einsum("nkc,mnc->mnk", Q, noise) / math.sqrt(noise.shape[0])
    return cols.reshape(cols.shape[0], *z.shape)


def draw_noise(mc_samples: int, like: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """``ε ∼ N(0, I)``, ``(mc_samples, n, k)``, drawn on the CPU (the same draws on every device and backend)."""
    eps = torch.randn(mc_samples, like.shape[0], k, generator=generator, dtype=like.dtype, device="cpu")
    return eps.to(like.device)


# -- autograd with hooks -------------------------------------------------------------------------------


def layer_sensitivities(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry,
                        noise: Tensor | None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``(z, inputs, U)``: each layer's input ``a`` and backpropagated columns ``U_ℓ`` (``C × n × *out_shape``)."""
    inputs: dict[str, Tensor] = {}
    perturb: dict[str, Tensor] = {}
    hooks = []

    def hook(prefix: str):
        def fn(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            if prefix in inputs:
                raise ValueError(f"K-FAC: layer {prefix!r} is called more than once per forward pass")
            inputs[prefix] = inp[0].detach()
            e = torch.zeros_like(out, requires_grad=True)  # ∂z/∂e = ∂z/∂s: the layer's output sensitivity
            perturb[prefix] = e
            return out + e

        return fn

    prefixes = structure.prefixes
    for prefix in prefixes:
        hooks.append(structure.body.get_submodule(prefix).register_forward_hook(hook(prefix)))
    try:
        with torch.enable_grad():
            z = functional_call(structure.body, {k: v.detach() for k, v in params.items()}, (x,))
            cols = output_columns(z.detach(), structure.head, geometry, noise)
            es = [perturb[p] for p in prefixes]
            U: dict[str, list[Tensor]] = {p: [] for p in prefixes}
            for c in range(cols.shape[0]):
                grads = torch.autograd.grad(z, es, grad_outputs=cols[c], retain_graph=c + 1 < cols.shape[0])
                for p, g in zip(prefixes, grads, strict=True):
                    U[p].append(g)
    finally:
        for h in hooks:
            h.remove()
    return z.detach(), inputs, {p: torch.stack(u) for p, u in U.items()}


def use_backpack(structure: MapStructure, backend: Backend, modules: tuple[type[nn.Module], ...]) -> bool:
    """Whether to use BackPACK; ``backend="backpack"`` where it cannot apply is an error."""
    check_choice("backend", backend, BACKENDS)
    why = structure.backpack_ok(modules)
    if backend == "backpack" and why:
        raise OptionError(
            f"backend: 'backpack' cannot run on this map ({why}; it handles an nn.Sequential of "
            f"{', '.join(m.__name__ for m in modules)}); use backend='torch' or 'auto'"
        )
    return not why and backend != "torch"


# -- BackPACK: a loss whose Hessian factor is Q ----------------------------------------------------


class MetricLoss(_Loss):
    """A loss module for BackPACK whose per-sample symmetric Hessian factor is ``Q_i``.

    Its value is 0 (only its backward hooks matter); its derivatives hand ``Q_i`` (or
    ``Q_i ε/√m``) to BackPACK's second-order extensions, so ``KFLR``/``KFAC``/``DiagGGN*``
    on ``body → MetricLoss`` give the factors of ``(1/n)·Σ J_zᵀ Q Qᵀ J_z`` times ``n``
    (BackPACK sums over the batch).
    """

    def __init__(self, head: Head, geometry: Geometry) -> None:
        super().__init__(reduction="sum")
        self.head, self.geometry = head, geometry
        self.noise: Tensor | None = None

    def forward(self, z: Tensor) -> Tensor:
        return (z * 0).sum()


def _metric_loss_derivatives() -> Any:
    from backpack.core.derivatives.basederivatives import BaseLossDerivatives

    class _MetricLossDerivatives(BaseLossDerivatives):
        def _sqrt_hessian(self, module, g_inp, g_out, subsampling=None):
            return output_columns(module.input0, module.head, module.geometry, None)

        def _sqrt_hessian_sampled(self, module, g_inp, g_out, mc_samples=1, subsampling=None):
            return output_columns(module.input0, module.head, module.geometry, module.noise)

        def hessian_is_psd(self) -> bool:
            return True

    return _MetricLossDerivatives()


Extension = Literal["kflr", "kfac", "diag_exact", "diag_mc"]


@functools.lru_cache(maxsize=16)
def _backpack_extension(kind: Extension, mc_samples: int) -> Any:
    from backpack.extensions import KFAC, KFLR, DiagGGNExact, DiagGGNMC
    from backpack.extensions.secondorder.diag_ggn.losses import DiagGGNLoss
    from backpack.extensions.secondorder.hbp.losses import HBPLoss

    if kind in ("kflr", "kfac"):
        ext = KFLR() if kind == "kflr" else KFAC(mc_samples=mc_samples)
        ext.set_module_extension(MetricLoss, HBPLoss(derivatives=_metric_loss_derivatives()))
    else:
        ext = DiagGGNExact() if kind == "diag_exact" else DiagGGNMC(mc_samples=mc_samples)
        ext.set_module_extension(MetricLoss, DiagGGNLoss(derivatives=_metric_loss_derivatives()))
    return ext


def run_backpack(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry,
                 kind: Extension, noise: Tensor | None) -> BackpackTwin:
    """One backward pass of the BackPACK extension ``kind`` on the body's twin with the ``Q`` loss;
    the results sit on the twin's parameters, the layer inputs in ``twin.inputs``."""
    from backpack import backpack, extend

    tw = backpack_twin(structure.body)
    tw.record_inputs(structure.prefixes)
    tw.load(params, biases=kind.startswith("diag"))
    key = ("metric_loss", structure.head, geometry)
    if key not in tw.extras:
        tw.extras[key] = extend(MetricLoss(structure.head, geometry))
    loss_mod = tw.extras[key]
    loss_mod.noise = noise
    ext = _backpack_extension(kind, 1 if noise is None else noise.shape[0])
    with warnings.catch_warnings():
        # BackPACK's full backward hooks warn when the input does not require grad
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with torch.enable_grad(), backpack(ext):
            loss_mod(tw.module(x)).backward()
    return tw


__all__ = [
    "BACKENDS", "DIAG_MODULES", "HBP_MODULES", "Layer", "MapStructure", "MetricLoss", "REST", "analyze_map",
    "dense_metric", "draw_noise", "layer_sensitivities", "metric_jacobian", "output_columns", "run_backpack",
    "use_backpack",
]
