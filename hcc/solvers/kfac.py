r"""K-FAC (KFLR / Monte-Carlo KFAC) and diagonal-GGN preconditioners for the natural flow.

Each player's metric (design.md §2) is the Gram matrix of its per-point Jacobians,

.. math::

    A = \frac1n \sum_{i=1}^n J_iᵀ J_i, \qquad J_i = \frac{∂F_θ(x_i)}{∂θ} ∈ R^{k×M},

the generalized Gauss-Newton matrix of ``½‖F_θ(x) − y‖²``. This module approximates
``A`` block-diagonally, one block per ``nn.Linear`` layer, and applies its inverse.

**Heads and geometries.** A map ``F = h(z)``, ``z = f_θ(x)`` a network body and ``h``
an optional head (``nn.Softmax(-1)`` or ``nn.Sigmoid`` at the end of an
``nn.Sequential``), has ``J_i = (∂h/∂z) J_{z,i}``. Both geometries are written as
``A = (1/n) Σ_i J_{z,i}ᵀ Q_i Q_iᵀ J_{z,i}`` with an output-side factor ``Q_i``:

============  ===========================  ==========================================
head          ``geometry="l2"`` (default)   ``geometry="fisher"``
============  ===========================  ==========================================
none          ``Q = I``                     error (no probabilities to take a Fisher of)
softmax       ``Q = S = diag(p) − ppᵀ``     ``Q = diag(√p) − p√pᵀ``, ``QQᵀ = S``
sigmoid       ``Q = σ(1−σ)``                ``Q = √(σ(1−σ))``
============  ===========================  ==========================================

``l2`` is the metric of the flow, ``J_zᵀS²J_z`` for a softmax; ``fisher`` is the
softmax/cross-entropy (or Bernoulli) GGN ``J_zᵀ S J_z``, the other geometry of the
hidden convex-concave paper. One is never swapped for the other: asking for
``fisher`` on a map without a probability head is an error.

**Kronecker factors.** For a linear layer ``s = W̄ ā`` with ``W̄ = [W | b]`` (weight
and bias as *one* block) and ``ā = [a; 1]``, the exact block and its K-FAC
approximation (Martens & Grosse 2015; row-major ``vec``) are

.. math::

    A_ℓ = \frac1n \sum_i (B_iᵀ Q_i Q_iᵀ B_i) ⊗ ā_i ā_iᵀ
    \;≈\; G_ℓ ⊗ Ā_ℓ, \qquad
    G_ℓ = \frac1n \sum_i B_iᵀ Q_i Q_iᵀ B_i,\quad Ā_ℓ = \frac1n \sum_i ā_i ā_iᵀ,

with ``B_i = ∂z_i/∂s_i``. ``factors="kflr"`` computes ``G_ℓ`` exactly by
backpropagating the ``k`` columns of ``Q_i`` (Botev, Ritter & Barber 2017);
``factors="kfac"`` backpropagates ``mc_samples`` Monte-Carlo columns ``Q_i ε/√m``,
``ε ∼ N(0, I)`` (Martens & Grosse 2015), unbiased for ``G_ℓ``. What is exact:

- one linear layer without a head: ``B_i Q_i = I``, so ``G ⊗ Ā`` *is* ``A`` for any ``n``
  (with a softmax/sigmoid head ``Q_i`` varies over the points: exact only for ``n = 1``);
- one support point (``n = 1``): every layer's block is exact; only the
  cross-layer blocks are dropped;
- otherwise ``G ⊗ Ā`` is the "expectation of a Kronecker product ≈ Kronecker
  product of expectations" approximation, and the off-diagonal blocks are dropped.
  For MLPs it is a poor approximation of ``A`` (curvature-notes.md: 50–80 %
  Frobenius error at n ≥ 64), which the step rescaling below compensates for.

BackPACK (Dangel, Kunstner & Hennig 2020) computes ``G_ℓ`` and ``Σ a aᵀ`` where it
applies: its ``KFLR`` / ``KFAC`` / ``DiagGGNExact`` / ``DiagGGNMC`` extensions run on
an extended twin of the body (BackPACK's hooks break :mod:`torch.func` on the
module they extend), ending in a loss module :class:`MetricLoss` whose symmetric
Hessian factor is ``Q_i`` — BackPACK cannot differentiate ``nn.Softmax`` in its
second-order extensions, so the head enters only through ``Q``. The mean input (the
bias row of ``Ā``) is added from the recorded layer inputs. Where BackPACK does not
apply (non-``Sequential`` bodies, ``nn.ELU`` for KFLR) the same quantities come from
``torch.autograd`` with forward hooks (``backend="torch"``); the two agree to
round-off. Parameters outside linear layers (e.g. the identity map
:class:`~hcc.games.maps.Direct` of the bilinear game, where ``A = I``) get their
exact dense block from :func:`torch.func.jacrev`.

**Damping** (Tikhonov, ``A + λI``) per block: ``λ_b = damping × mean diagonal of the
block`` (``damping_scale="relative"``, scale-free; the default) or ``damping``
(``"absolute"``). ``damping_split`` says how it meets the Kronecker product:

- ``"pi"`` (default): factored Tikhonov ``(G + (√λ/π) I) ⊗ (Ā + π√λ I)`` with
  ``π = √((tr Ā/\dim Ā)/(tr G/\dim G))`` (Martens & Grosse 2015, §6.3). With relative
  damping each factor gets ``√damping ×`` its own mean diagonal. It adds the cross
  terms ``π√λ G ⊗ I + (√λ/π) I ⊗ Ā`` to ``λI`` (more damping where one factor is
  small); two Cholesky factorizations per layer;
- ``"eigen"``: exactly ``(G ⊗ Ā + λI)⁻¹``, in the factors' eigenbases
  (``U_G[(U_GᵀVU_Ā) ⊘ (e_G e_Āᵀ + λ)]U_Āᵀ``); two ``eigh`` per layer (≈ 5× the
  Cholesky cost at width 300); the same iteration counts (±1) on the shipped games;
- ``"plain"``: factored with ``π = 1``.

``damping`` is the target's ``λ_b`` in all three (it is what ``α`` below fits to and
what is logged). Its default, ``1e-2`` (relative), is a deliberate Levenberg-Marquardt
choice: with the ``α`` fit the size of ``λ`` barely matters on the shipped games
(``1e-3`` and ``1e-2`` give the same step counts), but with few support points the
factors are rank deficient (``Ā = āāᵀ`` at ``n = 1``) and a *stale* inverse
(``refresh > 1``) amplifies the parts of the new field outside the old range by up to
``1/λ``: at ``1e-3``, width-320 RPS with ``refresh=2`` jumped into a saturated corner
(``V`` 0.0145 → 0.58, stuck), at ``1e-2`` it converges in 20 steps (``refresh=4``: 25);
``1e-1`` slows multi-point RPS (``n_support=8``: 47 steps instead of 29).

**Function-space step rescaling** (``rescale="player"``, default). A block-diagonal
inverse moves the function by about the whole function-space step *per layer*
(curvature-notes.md), so the direction ``d = P⁻¹v`` is rescaled by the scalar

.. math::

    α = \arg\min_α ‖αd − d_*‖²_{A+Λ} = \frac{⟨d, v⟩}{dᵀ(A+Λ)d}
      = \frac{⟨d, v⟩}{\frac1n\sum_i ‖Q_iᵀ J_{z,i} d‖² + \sum_b λ_b ‖d_b‖²},

where ``d_* = (A + Λ)⁻¹ v`` is the exact (damped) natural direction and ``Λ`` the
block damping; ``dᵀ(A+Λ)d*`` = ``dᵀv`` needs no ``d_*``. For a gradient field
``v = Jᵀ r / n`` (``r = n ∂ℓ/∂F``, the function-space gradient) and ``Λ → 0`` this is
``α = ⟨J d, r⟩ / ‖J d‖²``: the least-squares fit of the moved function ``J(αd)`` to
the function-space step ``J d_* = Π_{range J} r``. It costs one Jacobian-vector
product (``J d``) and is 1 whenever ``d`` is exact (e.g. the ``Direct`` block).
For gradient fields ``⟨d, v⟩ = vᵀP⁻¹v > 0``, so ``α > 0``. ``rescale="block"`` fits
one scalar per block instead (:func:`rescale_direction`; ``B`` jvps): it rescues the
diagonal preconditioner on multi-point RPS (``n_support=8``: 258 EG steps to
``V ≤ 1e-6``, where one scalar is at ``V = 6e-5`` after 400) and does not help K-FAC
there (34 steps against 30).

**Trust region at saturated heads** (``logit_damping = μ``, default ``3e-3``). The
relative damping above is scale-free, so it bounds nothing where a softmax/sigmoid head
saturates: there ``Q_i → 0``, every block of ``A`` shrinks like ``‖Q‖²`` together with its
damping, and the step in θ needed for the requested function-space move grows like
``1/‖Q‖`` (design.md §2). On the 2×2 game ``3,-1;-2,1`` (seed 0, step 0.148) the
extragradient extrapolation asks the min player for ``ΔF₀ = −0.119`` at ``F₀ = 0.007``; the
half point lands at ``F₀ = 9·10⁻¹⁰`` (logit gap 21), where the field is ``10⁻⁹`` and
the fitted K-FAC step is ``‖h·αd‖ = 2·10⁶`` (undamped exact natural: ``10⁶``); applied at
the iterate it sends the logits to ``±2·10⁶``, ``F`` to a corner with ``J = 0`` in floating
point, and both players freeze. (The K-FAC approximation is not the cause: the fitted
step moves ``F`` as the exact one does to 4 digits, and exact-natgrad with ``damping=1e-3``
fails the same way; its Levenberg-Marquardt ``λ = 0.5`` is what saves it.) So ``α`` is fitted
in the metric ``A + Λ + μ A_z``, ``A_z = (1/n) Σ_i J_{z,i}ᵀ P J_{z,i}``,

.. math::

    α = \frac{⟨d, v⟩}{\frac1n\sum_i \big(‖Q_iᵀ δz_i‖² + μ ‖P δz_i‖²\big) + \sum_b λ_b ‖d_b‖²},
    \qquad δz_i = J_{z,i} d,

i.e. the output-side factor ``Q_iQ_iᵀ`` is damped to ``Q_iQ_iᵀ + μP`` (``P = I − 11ᵀ/k`` for a
softmax, which ignores logit shifts along ``1``; ``I`` for a sigmoid): a Levenberg-Marquardt
trust region on the *logits*, whose linearization stays valid where ``F``'s does not. It
needs no extra pass (``δz`` is the jvp ``α`` already takes), is invariant to the body's
parametrization, and bounds the logit move by ``‖δz‖ ≲ ‖Q‖‖r‖/μ`` when ``‖Q‖² ≪ μ``, while
for ``‖Q‖² ≫ μ`` it changes ``α`` by a factor ``≈ 1 − μ/‖Q‖²`` (RPS at uniform:
``‖S‖² = 1/9``; matching pennies at ½: ``1/16``). Measured (float64, seeds 0-3, defaults,
``V ≤ 1e-6``): 2×2 game ``μ = 0``: —, 43, 40, 42 (seed 5: — too); ``3e-3``: 49, 43, 41, 43
(10/10 seeds converge); rps 24, 22, 25, 25 at both; matching pennies 29, 31, 31, 29 →
29, 33, 32, 31; ``μ = 10⁻²`` costs 2-6 steps more there. A Levenberg-Marquardt ``λ‖d‖²`` in
*parameter* space (the exact solver's choice, and K-FAC's model damping in Martens &
Grosse 2015, §6.4) also fixes the 2×2 game but penalizes the K-FAC direction's excess
parameter norm everywhere: ``λ = 0.02`` took rps with ``n_support=8`` from 30 to 51 steps.
Maps without a head (``Q = I``) cannot saturate and are left as they are.

**Logging.** Per call and player (``theta``/``phi``): ``damping_*`` (mean ``λ_b``),
``alpha_*``, and ``cos_exact_*``, the cosine to the exact minimum-norm natural
direction ``A⁺v`` (:func:`hcc.solvers.natural.exact_natural_direction` for ``l2``,
:func:`dense_natural_direction` for ``fisher``). ``log_cosine=None`` logs it when the
player has at most 5000 parameters and ``n·k ≤ 256`` (the exact reference costs ~5×
a K-FAC step on the default GAN, ``n·k = 512``).

The diagonal preconditioner (:class:`DiagGGN`) uses the exact diagonal of ``A``
(BackPACK ``DiagGGNExact`` with the same ``Q`` loss, or ``DiagGGNMC``), damped the same way.

**Named solvers.** ``kfac-natgrad`` and ``diag-natgrad`` are extragradient on these
directions. Simultaneous Euler on the natural flow is stable only for
``h < 2a/(a² + b²) ≈ 0.066`` on regularized RPS (design.md §2); extragradient
converges for steps of order 1 over a wide range, optimistic GDA (one call per step
instead of two) is cheaper at its best step but that step sits next to its stability
edge. Steps to ``V ≤ 1e-6`` by step size (float64, seed 0, game and preconditioner
defaults; ``—``: not within 400):

- rps: 0.2: 68, 0.3: 35, **0.4: 24**, 0.5: 23, 0.6: 59, 0.7: —; OGDA 0.3: 20, 0.35: —;
- matching pennies (λ = 0.1): 0.1: 60, 0.15: 33, **0.18: 29**, 0.2: 30, 0.22: 36,
  0.25: —; OGDA 0.12: 23, 0.15: —;
- bilinear: 0.3: 168, 0.5: 69, **0.7: 49**, 0.9: 79, 1.0: —; OGDA 0.5: 30, 0.6: diverges.

``diag-natgrad``: rps 0.3: 36, **0.4: 25**, 0.5: 27; matching pennies 0.15: 33,
**0.18: 26**, 0.2: 30, 0.25: 82, 0.3: —; bilinear as ``kfac-natgrad`` (``Direct``:
both exact). Exact natural
EG (``exact-natgrad`` with ``damping=1e-3``) takes the same counts at every step size
on rps (24 at 0.4; 34 to ``V ≤ 1e-8``, as ``kfac-natgrad``) and on matching pennies
(a one-dimensional function space, where ``α`` makes any positive-definite
preconditioner's step the damped exact one); with one support point the per-layer
blocks are exact. With ``n_support=8`` on rps K-FAC takes 30 steps to exact's 25
(undamped exact: stuck in a saturated corner; ``damping=1e-2``: 78). GAN (step 0.1, not tuned beyond
0.02–0.2): MMD 2.68 → 0.30 in 500 steps (Adam 1e-3: 0.54).

>>> from hcc import run
>>> res = run("rps", "kfac-natgrad")
>>> res.converged
True
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp
from torch.nn.modules.loss import _Loss

from ..games.base import Batch, Game, Params
from ..registry import OptionError, opt
from . import SolverSpec, register_solver
from .heads import Geometry, Head, check_geometry, output_factor, split_head
from .precond import PRECONDITIONERS, Preconditioner

Backend = Literal["auto", "backpack", "torch"]

#: largest parameter block outside linear layers that gets an exact dense block
MAX_DENSE_BLOCK = 8192
#: ``log_cosine=None`` logs the cosine when a player has at most this many parameters …
AUTO_COSINE_MAX_PARAMS = 5000
#: … and at most this many function values ``n·k``
AUTO_COSINE_MAX_VALUES = 256
#: default ``μ`` of the α fit's logit trust region (module docstring, "Trust region at saturated heads")
LOGIT_DAMPING = 3e-3
#: relative singular-value cutoff of the dense reference ``A⁺ v``
PINV_RCOND = 1e-7
PLAYER_NAMES = ("theta", "phi")

# Modules the BackPACK extensions handle (KFLR/KFAC: the HBP table; DiagGGN: more activations).
_HBP_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity, nn.Flatten,
                                             nn.Dropout)
_DIAG_MODULES: tuple[type[nn.Module], ...] = _HBP_MODULES + (nn.ELU, nn.SELU, nn.LeakyReLU, nn.LogSigmoid)


# -- the map's structure --------------------------------------------------------------------


@dataclass
class MapStructure:
    """How a strategy map splits into a body, a head and curvature blocks."""

    #: the map without its head (shares modules and parameter names with the map)
    body: nn.Module
    head: Head
    #: module prefixes of the ``nn.Linear`` layers in ``body`` (K-FAC blocks)
    linear: tuple[str, ...]
    #: whether each linear layer has a bias
    has_bias: tuple[bool, ...]
    #: parameter names outside linear layers (one exact dense block)
    rest: tuple[str, ...]
    #: parameter names in the map's order
    names: tuple[str, ...]

    def layer_params(self, prefix: str, has_bias: bool) -> tuple[str, ...]:
        p = f"{prefix}." if prefix else ""
        return (p + "weight", p + "bias") if has_bias else (p + "weight",)

    def backpack_ok(self, modules: tuple[type[nn.Module], ...]) -> str:
        """Why BackPACK does not apply ('' if it does): it needs a ``Sequential`` body of
        supported modules and no parameters outside linear layers."""
        if not isinstance(self.body, nn.Sequential):
            return f"the body is a {type(self.body).__name__}, not an nn.Sequential"
        if self.rest or not self.linear:
            return "it has parameters outside nn.Linear layers"
        bad = sorted({type(m).__name__ for m in self.body if not isinstance(m, modules)})
        return f"unsupported modules {', '.join(bad)}" if bad else ""

    def out_dim(self, params: dict[str, Tensor], x: Tensor) -> int:
        """``k``, the body's output size per point."""
        if isinstance(self.body, nn.Sequential) and len(self.body) and isinstance(self.body[-1], nn.Linear):
            return self.body[-1].out_features
        with torch.no_grad():
            return functional_call(self.body, params, (x[:1],)).reshape(1, -1).shape[1]


def analyze_map(module: nn.Module) -> MapStructure:
    """Split ``module`` into body and head and find its linear layers.

    A trailing ``nn.Softmax(dim=-1 or 1)`` or ``nn.Sigmoid`` of an ``nn.Sequential`` is the
    head; everything else is the body. Linear layers anywhere in the body are K-FAC
    blocks; all other parameters form one exact dense block.
    """
    body, head = split_head(module)
    linear, has_bias, owned = [], [], set()
    for prefix, m in body.named_modules():
        if isinstance(m, nn.Linear):
            linear.append(prefix)
            has_bias.append(m.bias is not None)
            p = f"{prefix}." if prefix else ""
            owned.update({p + "weight"} | ({p + "bias"} if m.bias is not None else set()))
    names = tuple(n for n, _ in module.named_parameters())
    rest = tuple(n for n in names if n not in owned)
    return MapStructure(body, head, tuple(linear), tuple(has_bias), rest, names)


# -- the output-side factor Q ------------------------------------------------------------------


#: ``Q_i`` of the geometry (:func:`hcc.solvers.heads.output_factor`; the name K-FAC's docs use)
output_sqrt_factor = output_factor


def _output_columns(Q: Tensor, noise: Tensor | None) -> Tensor:
    """The vectors backpropagated through the body, ``(C, n, k)``: ``Q``'s columns or ``Q ε/√m``."""
    if noise is None:
        return Q.permute(2, 0, 1)
    noise = noise[..., : Q.shape[-1]]  # a masked head's factor has K columns for its 2K coordinates
    return torch.einsum("nkc,mnc->mnk", Q, noise) / math.sqrt(noise.shape[0])


# -- BackPACK: a loss whose Hessian factor is Q ------------------------------------------------


class MetricLoss(_Loss):
    """A loss module for BackPACK whose per-sample symmetric Hessian factor is ``Q_i``.

    Its value is 0 (only its backward hooks matter); :class:`_MetricLossDerivatives`
    hands ``Q_i`` (or ``Q_i ε/√m``) to BackPACK's second-order extensions, so
    ``KFLR``/``KFAC``/``DiagGGN*`` on ``body → MetricLoss`` give the factors of
    ``(1/n)·Σ J_zᵀ Q Qᵀ J_z`` times ``n`` (BackPACK sums over the batch).
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
            Q = output_sqrt_factor(module.input0, module.head, module.geometry)
            return _output_columns(Q, None)

        def _sqrt_hessian_sampled(self, module, g_inp, g_out, mc_samples=1, subsampling=None):
            Q = output_sqrt_factor(module.input0, module.head, module.geometry)
            return _output_columns(Q, module.noise)

        def hessian_is_psd(self) -> bool:
            return True

    return _MetricLossDerivatives()


@functools.lru_cache(maxsize=16)
def _backpack_extension(kind: Literal["kflr", "kfac", "diag_exact", "diag_mc"], mc_samples: int) -> Any:
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


class _Twin:
    """A BackPACK-extended deep copy of a body, with recorded linear-layer inputs."""

    def __init__(self, structure: MapStructure) -> None:
        from backpack import extend

        self.module = extend(copy.deepcopy(structure.body))
        self.inputs: dict[str, Tensor] = {}
        for prefix in structure.linear:
            sub = self.module.get_submodule(prefix)
            sub.register_forward_pre_hook(lambda m, inp, pre=prefix: self.inputs.__setitem__(pre, inp[0].detach()))
        self.params = dict(self.module.named_parameters())
        self.losses: dict[tuple[str, str], MetricLoss] = {}

    def loss(self, head: Head, geometry: Geometry) -> MetricLoss:
        from backpack import extend

        key = (head, geometry)
        if key not in self.losses:
            self.losses[key] = extend(MetricLoss(head, geometry))
        return self.losses[key]

    def load(self, params: dict[str, Tensor], biases: bool) -> None:
        """Point the twin at ``params``; ``biases=False`` stops BackPACK from computing the
        bias quantities (K-FAC reads the weight's factors only: KFLR/KFAC compute ``G`` again
        for the bias)."""
        for k, p in self.params.items():
            p.data = params[k].detach()
            p.grad = None
            if k.endswith("bias"):
                p.requires_grad_(biases)


_TWINS: weakref.WeakKeyDictionary[nn.Module, _Twin] = weakref.WeakKeyDictionary()


def _twin(structure: MapStructure) -> _Twin:
    tw = _TWINS.get(structure.body)
    if tw is None:
        tw = _TWINS[structure.body] = _Twin(structure)
    return tw


def _run_backpack(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry,
                  kind: Literal["kflr", "kfac", "diag_exact", "diag_mc"], noise: Tensor | None) -> _Twin:
    from backpack import backpack

    tw = _twin(structure)
    tw.load(params, biases=kind.startswith("diag"))
    loss_mod = tw.loss(structure.head, geometry)
    loss_mod.noise = noise
    ext = _backpack_extension(kind, 1 if noise is None else noise.shape[0])
    with warnings.catch_warnings():
        # BackPACK's full backward hooks warn when the input does not require grad
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with torch.enable_grad(), backpack(ext):
            loss_mod(tw.module(x)).backward()
    return tw


# -- the torch (autograd + hooks) way ----------------------------------------------------------


def _torch_backprop(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry,
                    noise: Tensor | None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``(z, inputs, U)``: layer inputs ``a`` and backpropagated columns ``U_ℓ`` (``C × n × d_out``)."""
    inputs: dict[str, Tensor] = {}
    perturb: dict[str, Tensor] = {}
    hooks = []

    def hook(prefix: str):
        def fn(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            if prefix in inputs:
                raise ValueError(f"K-FAC: linear layer {prefix!r} is called more than once per forward pass")
            inputs[prefix] = inp[0].detach()
            e = torch.zeros_like(out, requires_grad=True)  # ∂z/∂e = ∂z/∂s: the layer's output sensitivity
            perturb[prefix] = e
            return out + e

        return fn

    for prefix in structure.linear:
        hooks.append(structure.body.get_submodule(prefix).register_forward_hook(hook(prefix)))
    try:
        with torch.enable_grad():
            z = functional_call(structure.body, {k: v.detach() for k, v in params.items()}, (x,))
            cols = _output_columns(output_sqrt_factor(z.detach(), structure.head, geometry), noise)
            es = [perturb[p] for p in structure.linear]
            U: dict[str, list[Tensor]] = {p: [] for p in structure.linear}
            for c in range(cols.shape[0]):
                grads = torch.autograd.grad(z, es, grad_outputs=cols[c], retain_graph=c + 1 < cols.shape[0])
                for p, g in zip(structure.linear, grads, strict=True):
                    U[p].append(g)
    finally:
        for h in hooks:
            h.remove()
    return z.detach(), inputs, {p: torch.stack(u) for p, u in U.items()}


def _input_factor(a: Tensor, has_bias: bool, outer: Tensor | None = None) -> Tensor:
    """``Ā = (1/n) Σ ā āᵀ``, ``ā = [a; 1]`` (``outer`` = ``(1/n) Σ a aᵀ`` if already computed)."""
    n = a.shape[0]
    if outer is None:
        outer = a.T @ a / n
    if not has_bias:
        return outer
    m = a.mean(0)
    top = torch.cat([outer, m[:, None]], 1)
    bottom = torch.cat([m, torch.ones_like(m[:1])])[None]
    return torch.cat([top, bottom], 0)


def _check_backend(structure: MapStructure, backend: Backend, modules: tuple[type[nn.Module], ...]) -> bool:
    """Whether to use BackPACK; ``backend="backpack"`` where it cannot apply is an error."""
    if backend not in ("auto", "backpack", "torch"):
        raise OptionError(f"backend: expected one of auto, backpack, torch, got {backend!r}")
    why = structure.backpack_ok(modules)
    if backend == "backpack" and why:
        raise OptionError(
            f"backend: 'backpack' cannot run on this map ({why}; it handles an nn.Sequential of "
            f"{', '.join(m.__name__ for m in modules)}); use backend='torch' or 'auto'"
        )
    return not why and backend != "torch"


def _draw_noise(mc_samples: int, like: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    eps = torch.randn(mc_samples, like.shape[0], k, generator=generator, dtype=like.dtype, device="cpu")
    return eps.to(like.device)


def kronecker_factors(
    structure: MapStructure,
    params: dict[str, Tensor],
    x: Tensor,
    geometry: Geometry = "l2",
    factors: Literal["kflr", "kfac"] = "kflr",
    backend: Backend = "auto",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    r"""``{prefix: (G_ℓ, Ā_ℓ)}`` for each linear layer, so that its block ``≈ G_ℓ ⊗ Ā_ℓ``.

    Row-major over ``W̄ = [W | b]`` (``d_out × (d_in + 1)``); both factors carry
    the ``1/n`` of ``A = (1/n) Σ J_iᵀJ_i``. ``factors="kfac"`` draws ``ε`` with
    ``generator`` (on the CPU), so both backends see the same draws.
    """
    if factors not in ("kflr", "kfac"):
        raise OptionError(f"factors: expected one of kflr, kfac, got {factors!r}")
    if not structure.linear:
        return {}
    n = x.shape[0]
    noise = None
    if factors == "kfac":
        noise = _draw_noise(mc_samples, x, structure.out_dim(params, x), generator)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    if _check_backend(structure, backend, _HBP_MODULES):
        tw = _run_backpack(structure, params, x, geometry, factors, noise)
        for prefix, bias in zip(structure.linear, structure.has_bias, strict=True):
            lin = tw.module.get_submodule(prefix)
            G, outer = getattr(lin.weight, factors)
            out[prefix] = (G / n, _input_factor(tw.inputs[prefix], bias, outer))
            if hasattr(lin.weight, factors):
                delattr(lin.weight, factors)
        tw.inputs.clear()
        return out
    _, inputs, U = _torch_backprop(structure, params, x, geometry, noise)
    for prefix, bias in zip(structure.linear, structure.has_bias, strict=True):
        u = U[prefix]
        G = torch.einsum("cni,cnj->ij", u, u) / n
        out[prefix] = (G, _input_factor(inputs[prefix], bias))
    return out


def ggn_diagonal(
    structure: MapStructure,
    params: dict[str, Tensor],
    x: Tensor,
    geometry: Geometry = "l2",
    estimator: Literal["exact", "mc"] = "exact",
    backend: Backend = "auto",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""The diagonal of ``A`` per parameter (``{name: tensor shaped like the parameter}``).

    ``exact``: BackPACK ``DiagGGNExact`` (or autograd) with the ``Q`` loss — exact;
    ``mc``: ``DiagGGNMC``, unbiased. Parameters outside linear layers: the diagonal of
    their exact dense block.
    """
    if estimator not in ("exact", "mc"):
        raise OptionError(f"estimator: expected one of exact, mc, got {estimator!r}")
    n = x.shape[0]
    out: dict[str, Tensor] = {}
    if structure.linear:
        noise = None
        if estimator == "mc":
            noise = _draw_noise(mc_samples, x, structure.out_dim(params, x), generator)
        if _check_backend(structure, backend, _DIAG_MODULES):
            attr = "diag_ggn_exact" if estimator == "exact" else "diag_ggn_mc"
            tw = _run_backpack(structure, params, x, geometry, "diag_exact" if estimator == "exact" else "diag_mc",
                               noise)
            for name, p in tw.params.items():
                out[name] = getattr(p, attr) / n
                delattr(p, attr)
            tw.inputs.clear()
        else:
            _, inputs, U = _torch_backprop(structure, params, x, geometry, noise)
            for prefix, bias in zip(structure.linear, structure.has_bias, strict=True):
                u2, a = U[prefix].pow(2), inputs[prefix]
                names = structure.layer_params(prefix, bias)
                out[names[0]] = torch.einsum("cno,ni->oi", u2, a.pow(2)) / n
                if bias:
                    out[names[1]] = u2.sum((0, 1)) / n
    if structure.rest:
        Je = metric_jacobian(structure, params, x, geometry, structure.rest)
        d = Je.pow(2).sum((0, 1)) / n
        off = 0
        for name in structure.rest:
            m = params[name].numel()
            out[name] = d[off:off + m].view_as(params[name])
            off += m
    return {k: out[k] for k in structure.names}


# -- exact references (dense; small maps) -------------------------------------------------------


def metric_jacobian(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2",
                    names: tuple[str, ...] | None = None) -> Tensor:
    r"""``Q_iᵀ J_{z,i}`` per support point, ``(n, k, m)`` over the parameters ``names`` (flattened in order).

    ``A = (1/n) Σ_i (Q_iᵀJ_{z,i})ᵀ(Q_iᵀJ_{z,i})``; for the l2 geometry ``Q_iᵀ J_{z,i} = J_i``.
    """
    names = structure.names if names is None else names
    fixed = {k: v.detach() for k, v in params.items() if k not in names}

    def f(p: dict[str, Tensor]) -> Tensor:
        return functional_call(structure.body, {**fixed, **p}, (x,))

    sub = {k: params[k].detach() for k in names}
    z = f(sub)
    n, k = z.shape
    jac = jacrev(f)(sub)
    Jz = torch.cat([jac[name].reshape(n, k, -1) for name in names], -1)
    Q = output_sqrt_factor(z.detach(), structure.head, geometry)
    return torch.einsum("nkc,nkm->ncm", Q, Jz)


def dense_metric(structure: MapStructure, params: dict[str, Tensor], x: Tensor, geometry: Geometry = "l2") -> Tensor:
    """The exact ``A`` (``M × M``, parameters flattened in the map's order): a reference for small maps."""
    Je = metric_jacobian(structure, params, x, geometry)
    return torch.einsum("ncm,nce->me", Je, Je) / x.shape[0]


def dense_natural_direction(structure: MapStructure, params: dict[str, Tensor], x: Tensor, v: Tensor,
                            geometry: Geometry = "l2", rcond: float = PINV_RCOND) -> Tensor:
    r"""``A⁺ v`` (flat), the minimum-norm exact natural direction, from the SVD of ``J/√n``.

    With ``J/√n = UΣVᵀ``: ``A⁺v = V Σ⁻² Vᵀ v`` over singular values above ``rcond · σ_max``
    (a softmax ``J`` is rank deficient: its rows sum to 0).
    """
    Je = metric_jacobian(structure, params, x, geometry)
    L = Je.reshape(-1, Je.shape[-1]) / math.sqrt(x.shape[0])
    _, S, Vh = torch.linalg.svd(L, full_matrices=False)
    keep = S > rcond * S.max() if S.numel() else S > 0
    Vk, Sk = Vh[keep], S[keep]
    return Vk.T @ ((Vk @ v) / Sk.pow(2))


# -- shared preconditioner machinery -------------------------------------------------------------


def blocks(s: MapStructure) -> list[tuple[str, ...]]:
    """The curvature blocks: each linear layer's ``(weight, bias)``, then the other parameters."""
    out = [s.layer_params(pre, b) for pre, b in zip(s.linear, s.has_bias, strict=True)]
    return out + ([s.rest] if s.rest else [])


def rescale_direction(
    s: MapStructure,
    params: dict[str, Tensor],
    x: Tensor,
    v: dict[str, Tensor],
    d: dict[str, Tensor],
    damping: list[Tensor],
    geometry: Geometry = "l2",
    per_block: bool = False,
    logit_damping: float = 0.0,
) -> tuple[dict[str, Tensor], Tensor]:
    r"""The function-space fit of the step: ``(α d, α)``.

    One scalar (``per_block=False``): ``α = ⟨d, v⟩ / (‖Qᵀ J_z d‖²/n + Σ_b λ_b‖d_b‖²)``, the
    minimizer of ``‖αd − d_*‖_{A+Λ}`` (module docstring), one Jacobian-vector product.
    Per block: ``d = Σ_b d_b`` and ``α ∈ R^B`` minimizes ``‖Σ_b α_b d_b − d_*‖_{A+Λ}``, i.e.

    .. math::

        \big(CᵀC/n + \mathrm{diag}(λ_b ‖d_b‖²)\big) α = \big(⟨d_b, v_b⟩\big)_b,
        \qquad C = [Qᵀ J_z d_1, …, Qᵀ J_z d_B],

    ``B`` Jacobian-vector products. A degenerate fit (``d_b = 0``) gives ``α_b = 0``.
    ``logit_damping = μ > 0`` (maps with a head) adds ``μ‖P J_z d‖²/n`` to the fitted metric,
    i.e. stacks ``√μ·P J_z d_b`` under each column of ``C``: the logit trust region of the
    module docstring.
    """
    blks = blocks(s)
    primal = {k: t.detach() for k, t in params.items()}
    f = lambda q: functional_call(s.body, q, (x,))  # noqa: E731
    if per_block:
        tangents = [{k: (d[k] if k in names else torch.zeros_like(d[k])).detach() for k in primal} for names in blks]
    else:
        tangents = [{k: d[k].detach() for k in primal}]
    cols = []
    mu = logit_damping if s.head != "none" else 0.0
    for t in tangents:
        z, dz = jvp(f, (primal,), (t,))
        col = torch.einsum("nkc,nk->nc", output_sqrt_factor(z, s.head, geometry), dz).reshape(-1)
        if mu > 0:  # metric J_zᵀ(QQᵀ + μP)J_z: stack √μ·Pδz under Qᵀδz (a softmax ignores shifts along 1)
            Pdz = dz - dz.mean(-1, keepdim=True) if s.head == "softmax" else dz
            col = torch.cat([col, math.sqrt(mu) * Pdz.reshape(-1)])
        cols.append(col)
    C = torch.stack(cols, 1)
    sq = torch.stack([sum(d[k].pow(2).sum() for k in names) for names in blks])
    dv = torch.stack([sum((d[k] * v[k]).sum() for k in names) for names in blks])
    lam = torch.stack([torch.as_tensor(lb, dtype=C.dtype) for lb in damping])
    if per_block:
        D = C.T @ C / x.shape[0] + torch.diag(lam * sq)
        # pseudo-inverse: a block with d_b = 0 (a zero row and column) gets α_b = 0, not 0/0
        alpha = torch.linalg.pinv(D, hermitian=True) @ dv
        scale = {k: alpha[b] for b, names in enumerate(blks) for k in names}
        return {k: scale[k] * d[k] for k in d}, alpha
    den = C.pow(2).sum() / x.shape[0] + (lam * sq).sum()
    tiny = torch.finfo(den.dtype).tiny
    alpha = torch.where(den > tiny, dv.sum() / den.clamp_min(tiny), torch.zeros_like(den)).reshape(1)
    return {k: alpha[0] * t for k, t in d.items()}, alpha


def _flat(d: dict[str, Tensor], names: tuple[str, ...]) -> Tensor:
    return torch.cat([d[k].reshape(-1) for k in names])


def _unflat(v: Tensor, like: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    out, off = {}, 0
    for k in names:
        m = like[k].numel()
        out[k] = v[off:off + m].view_as(like[k])
        off += m
    return out


def _ema(old: Any, new: Any, decay: float) -> Any:
    if old is None or decay == 0:
        return new
    return torch.utils._pytree.tree_map(lambda o, w: w if o is None else decay * o + (1 - decay) * w, old, new)


def _live(*means: Tensor) -> Tensor:
    """1 for a block with curvature, 0 for a dead one (a zero factor: ``J_b = 0``, so its
    field is 0 and moving it cannot change ``F``; its direction is set to 0, not 0/0)."""
    live = torch.stack(means).gt(0).all()
    return live.to(means[0].dtype)


def _damping(mean_diag: Tensor, live: Tensor, damping: float, scale: str) -> Tensor:
    if scale == "absolute":
        return torch.as_tensor(damping, dtype=mean_diag.dtype, device=mean_diag.device)
    return damping * torch.where(live > 0, mean_diag, torch.ones_like(mean_diag))


def _dense_inverse(A: Tensor, damping: float, scale: str) -> tuple[str, Tensor, Tensor, Tensor, Tensor]:
    m = A.diagonal().mean()
    live = _live(m)
    e, U = torch.linalg.eigh(A)
    return "dense", e.clamp_min(0), U, live, _damping(m, live, damping, scale)


def _apply_dense(inv: tuple[str, Tensor, Tensor, Tensor, Tensor], v: Tensor) -> Tensor:
    _, e, U, live, lam = inv
    return live * (U @ ((U.T @ v) / (e + lam)))


@dataclass
class _CommonOptions:
    """Options shared by the K-FAC and diagonal preconditioners (docs: module docstring)."""

    geometry: Geometry = opt(
        "l2", "metric: l2 (J_zᵀS²J_z, the flow's) | fisher (J_zᵀSJ_z, probability heads only) | logit (J_zᵀPJ_z)")
    damping: float = opt(1e-2, "Tikhonov damping λ per block (× the block's mean diagonal if relative)")
    damping_scale: Literal["relative", "absolute"] = opt(
        "relative", "λ_b = damping × mean diagonal of block b (relative) or damping (absolute)"
    )
    decay: float = opt(0.0, "running-average decay β of the curvature statistics (0: fresh)")
    refresh: int = opt(
        1, "recompute inverses (and, if decay = 0, statistics) every T preconditioner calls (EG: 2 per step)"
    )
    logit_damping: float = opt(
        LOGIT_DAMPING, "μ: the α fit penalizes μ‖δz‖² (the head's input, i.e. logit, change): a trust region that "
        "bounds the step at saturated softmax/sigmoid heads; 0: none; maps without a head: no effect"
    )
    rescale: Literal["player", "block", "none"] = opt(
        "player", "fit the step in function space: one α per player (one jvp), one per block (B jvps), or none"
    )
    log_cosine: bool | None = opt(
        None, f"log the cosine to the exact natural direction (None: if ≤ {AUTO_COSINE_MAX_PARAMS} parameters "
        f"and n·k ≤ {AUTO_COSINE_MAX_VALUES})"
    )
    backend: Backend = opt("auto", "BackPACK where it applies (auto), always (backpack), or autograd hooks (torch)")
    pullback_steps: int = opt(1, "preconditioned Gauss-Newton steps per pull-back of a function-space target (prox)")
    mc_samples: int = opt(1, "Monte-Carlo samples per point for the sampled estimators")
    seed: int = opt(0, "seed of the Monte-Carlo draws")

    def validate(self) -> None:
        if not (self.damping > 0 and math.isfinite(self.damping)):
            raise OptionError(f"damping: expected a positive finite number, got {self.damping}")
        if not (self.logit_damping >= 0 and math.isfinite(self.logit_damping)):
            raise OptionError(f"logit_damping: expected a non-negative finite number, got {self.logit_damping}")
        if not 0 <= self.decay < 1:
            raise OptionError(f"decay: expected 0 ≤ β < 1, got {self.decay}")
        if self.refresh < 1:
            raise OptionError(f"refresh: expected a positive integer, got {self.refresh}")
        if self.mc_samples < 1:
            raise OptionError(f"mc_samples: expected a positive integer, got {self.mc_samples}")
        if self.pullback_steps < 1:
            raise OptionError(f"pullback_steps: expected a positive integer, got {self.pullback_steps}")
        check_geometry(self.geometry)
        for k, valid in (("damping_scale", ("relative", "absolute")),
                         ("rescale", ("player", "block", "none")),
                         ("backend", ("auto", "backpack", "torch"))):
            if getattr(self, k) not in valid:
                raise OptionError(f"{k}: expected one of {', '.join(valid)}, got {getattr(self, k)!r}")


class _BlockPreconditioner(Preconditioner):
    """Per-player block-diagonal curvature with statistics, inverses, rescaling and logging.

    Subclasses implement :meth:`_statistics` (curvature statistics at the current
    point, averaged by ``decay``), :meth:`_invert` and :meth:`_solve`.
    """

    #: prefix of the info keys
    tag = "precond"

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        self._structures: weakref.WeakKeyDictionary[nn.Module, MapStructure] = weakref.WeakKeyDictionary()

    def structure(self, module: nn.Module) -> MapStructure:
        s = self._structures.get(module)
        if s is None:
            s = self._structures[module] = analyze_map(module)
            if s.rest and sum(p.numel() for n, p in module.named_parameters() if n in s.rest) > MAX_DENSE_BLOCK:
                raise OptionError(
                    f"{self.name}: {type(module).__name__} has more than {MAX_DENSE_BLOCK} parameters outside "
                    "nn.Linear layers, too many for an exact dense block"
                )
        return s

    def init(self, game: Game, params: Params) -> dict[str, Any]:
        for module in game.maps():
            s = self.structure(module)
            if s.head == "none" and self.options.geometry == "fisher":
                output_sqrt_factor(torch.zeros(1, 1), s.head, "fisher")  # raises the explanatory error
        gen = torch.Generator(device="cpu").manual_seed(self.options.seed)
        return {"players": ({"calls": 0, "stats": None, "inv": None}, {"calls": 0, "stats": None, "inv": None}),
                "rng": gen.get_state()}

    # subclass API
    def _statistics(self, s: MapStructure, p: dict[str, Tensor], x: Tensor, gen: torch.Generator) -> Any:
        raise NotImplementedError

    def _invert(self, s: MapStructure, stats: Any) -> Any:
        raise NotImplementedError

    def _solve(self, s: MapStructure, inv: Any, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``d = P⁻¹ v`` with the current inverses."""
        raise NotImplementedError

    def _block_damping(self, s: MapStructure, inv: Any) -> list[Tensor]:
        """``λ_b`` for each block of :func:`blocks`."""
        raise NotImplementedError

    def apply(self, game: Game, params: Params, batch: Batch, vec: Params, state: dict[str, Any],
              players: tuple[int, ...]) -> tuple[Params, dict[str, Any], dict[str, Any]]:
        o = self.options
        xs = game.supports(params, batch)
        gen = torch.Generator(device="cpu")
        gen.set_state(state["rng"])
        out = list(vec)
        pstates = list(state["players"])
        info: dict[str, Any] = {}
        refreshes = 0
        for i in players:
            module = game.maps()[i]
            s = self.structure(module)
            p, v, x = params[i], vec[i], xs[i]
            ps = dict(pstates[i])
            due = ps["calls"] % o.refresh == 0
            if due or o.decay > 0:
                ps["stats"] = _ema(ps["stats"], self._statistics(s, p, x, gen), o.decay)
            if due:
                ps["inv"] = self._invert(s, ps["stats"])
                refreshes += 1
            ps["calls"] += 1
            d = self._solve(s, ps["inv"], v)
            lams = self._block_damping(s, ps["inv"])
            tag = PLAYER_NAMES[i]
            info[f"damping_{tag}"] = float(torch.stack(lams).mean())
            if o.rescale != "none":
                d, alpha = rescale_direction(s, p, x, v, d, lams, o.geometry, per_block=o.rescale == "block",
                                             logit_damping=o.logit_damping)
                info[f"alpha_{tag}"] = float(alpha.mean())
                if o.rescale == "block":
                    info[f"alpha_min_{tag}"], info[f"alpha_max_{tag}"] = float(alpha.min()), float(alpha.max())
            log_cos = o.log_cosine
            if log_cos is None:
                log_cos = (sum(t.numel() for t in p.values()) <= AUTO_COSINE_MAX_PARAMS
                           and x.shape[0] * s.out_dim(p, x) <= AUTO_COSINE_MAX_VALUES)
            if log_cos:
                info[f"cos_exact_{tag}"] = float(self._cosine(module, s, p, x, v, d))
            out[i] = d
            pstates[i] = ps
        info[f"{self.tag}_refreshes_total"] = refreshes
        return tuple(out), {"players": tuple(pstates), "rng": gen.get_state()}, info

    def _cosine(self, module: nn.Module, s: MapStructure, p: dict[str, Tensor], x: Tensor, v: dict[str, Tensor],
                d: dict[str, Tensor]) -> Tensor:
        """Cosine between ``d`` and the exact minimum-norm natural direction ``A⁺v`` (undamped)."""
        from .natural import exact_natural_direction

        exact = _flat(exact_natural_direction(module, p, x, v, damping=0.0, geometry=self.options.geometry), s.names)
        approx = _flat(d, s.names)
        den = exact.norm() * approx.norm()
        return (exact @ approx) / den if den > 0 else torch.ones(())


# -- K-FAC --------------------------------------------------------------------------------------


@dataclass
class KFACOptions(_CommonOptions):
    factors: Literal["kflr", "kfac"] = opt(
        "kflr", "output-side factor: exact (KFLR, Botev et al. 2017) or Monte-Carlo (KFAC, Martens & Grosse 2015)"
    )
    damping_split: Literal["pi", "eigen", "plain"] = opt(
        "pi", "how λ meets G ⊗ Ā: factored with π-correction (pi), exact in the eigenbases (eigen), or π = 1"
    )

    def validate(self) -> None:
        super().validate()
        if self.factors not in ("kflr", "kfac"):
            raise OptionError(f"factors: expected one of kflr, kfac, got {self.factors!r}")
        if self.damping_split not in ("eigen", "pi", "plain"):
            raise OptionError(f"damping_split: expected one of eigen, pi, plain, got {self.damping_split!r}")


class KFAC(_BlockPreconditioner):
    r"""K-FAC natural-gradient preconditioner: ``d_b = (G_b ⊗ Ā_b + λ_b I)⁻¹ v_b`` per linear layer.

    .. math::

        d_ℓ = \mathrm{unvec}\big((G_ℓ ⊗ Ā_ℓ + λ_ℓ I)^{-1} \mathrm{vec}(V_ℓ)\big),
        \qquad V_ℓ = [∇_W ℓ \,|\, ∇_b ℓ],

    computed as ``(G + (√λ/π)I)⁻¹ V (Ā + π√λ I)⁻¹`` (``damping_split="pi"``, the
    default, or ``"plain"``: π = 1), which factors the damping, or exactly as
    ``U_G[(U_Gᵀ V U_Ā) ⊘ (e_G e_Āᵀ + λ)]U_Āᵀ`` from the factors' eigendecompositions
    (``"eigen"``); parameters outside linear layers use their exact damped block.
    Then each player's direction is rescaled by the function-space ``α`` (module
    docstring). References: Martens & Grosse, *Optimizing Neural Networks with
    Kronecker-factored Approximate Curvature*, ICML 2015; Botev, Ritter & Barber,
    *Practical Gauss-Newton Optimisation for Deep Learning*, ICML 2017 (KFLR);
    Dangel, Kunstner & Hennig, *BackPACK: Packing more into Backprop*, ICLR 2020.

    State per player: the running-averaged factors (``decay``), their inverses
    (refreshed every ``refresh`` calls; the factors too, every call if ``decay > 0``)
    and a call counter; info: ``damping_theta/phi`` (mean ``λ_b``), ``alpha_theta/phi``,
    ``cos_exact_theta/phi`` (cosine to ``A⁺v``), ``kfac_refreshes_total``.

    >>> from hcc import make_game, make_solver
    >>> game = make_game("rps", {"width": 300}).double()   # 92k parameters per player
    >>> solver = make_solver("kfac-natgrad", game, options={"refresh": 2, "factors": "kfac"})
    """

    name = "kfac"
    Options = KFACOptions
    tag = "kfac"

    def _statistics(self, s, p, x, gen):  # noqa: D102
        o = self.options
        fac = kronecker_factors(s, p, x, o.geometry, o.factors, o.backend, o.mc_samples, gen)
        rest = None
        if s.rest:
            Je = metric_jacobian(s, p, x, o.geometry, s.rest)
            rest = torch.einsum("ncm,nce->me", Je, Je) / x.shape[0]
        return {"factors": fac, "rest": rest}

    def _invert(self, s, stats):  # noqa: D102
        o = self.options
        inv: dict[str, Any] = {}
        for prefix, (G, A) in stats["factors"].items():
            mG, mA = G.diagonal().mean(), A.diagonal().mean()
            live = _live(mG, mA)
            mG, mA = torch.where(live > 0, mG, 1.0), torch.where(live > 0, mA, 1.0)
            lam = _damping(mG * mA, live, o.damping, o.damping_scale)
            if o.damping_split == "eigen":
                eG, UG = torch.linalg.eigh(G)
                eA, UA = torch.linalg.eigh(A)
                inv[prefix] = ("eigen", eG.clamp_min(0), UG, eA.clamp_min(0), UA, live, lam)
            else:
                pi = (mA / mG).sqrt() if o.damping_split == "pi" else torch.ones_like(lam)
                IG = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
                IA = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                Gi = torch.cholesky_inverse(torch.linalg.cholesky(G + (lam.sqrt() / pi) * IG))
                Ai = torch.cholesky_inverse(torch.linalg.cholesky(A + (pi * lam.sqrt()) * IA))
                inv[prefix] = ("factored", Gi, Ai, live, lam)
        if stats["rest"] is not None:
            inv[""] = _dense_inverse(stats["rest"], o.damping, o.damping_scale)
        return inv

    def _block_damping(self, s, inv):  # noqa: D102
        return [inv[prefix][-1] for prefix in s.linear] + ([inv[""][-1]] if s.rest else [])

    def _solve(self, s, inv, v):  # noqa: D102
        d: dict[str, Tensor] = {}
        for prefix, bias in zip(s.linear, s.has_bias, strict=True):
            names = s.layer_params(prefix, bias)
            V = torch.cat([v[names[0]], v[names[1]][:, None]], 1) if bias else v[names[0]]
            blk = inv[prefix]
            if blk[0] == "eigen":
                _, eG, UG, eA, UA, live, lam = blk
                D = live * (UG @ ((UG.T @ V @ UA) / (eG[:, None] * eA[None, :] + lam)) @ UA.T)
            else:
                D = blk[3] * (blk[1] @ V @ blk[2])
            d[names[0]] = D[:, :-1] if bias else D
            if bias:
                d[names[1]] = D[:, -1]
        if s.rest:
            d.update(_unflat(_apply_dense(inv[""], _flat(v, s.rest)), v, s.rest))
        return {k: d[k] for k in s.names}


# -- diagonal GGN ---------------------------------------------------------------------------------


@dataclass
class DiagOptions(_CommonOptions):
    estimator: Literal["exact", "mc"] = opt(
        "exact", "diagonal: exact (BackPACK DiagGGNExact) or Monte-Carlo (DiagGGNMC)"
    )

    def validate(self) -> None:
        super().validate()
        if self.estimator not in ("exact", "mc"):
            raise OptionError(f"estimator: expected one of exact, mc, got {self.estimator!r}")


class DiagGGN(_BlockPreconditioner):
    r"""Diagonal natural-gradient preconditioner: ``d = v ⊘ (diag A + λ_b)``, then the ``α`` rescaling.

    .. math::

        d_j = \frac{v_j}{A_{jj} + λ_{b(j)}}, \qquad
        A_{jj} = \frac1n \sum_i ‖Q_iᵀ J_{z,i} e_j‖²,

    with ``λ_b`` per block (a linear layer's weight and bias, or the parameters
    outside linear layers) relative to the block's mean diagonal. The diagonal is
    BackPACK's ``DiagGGNExact`` (Dangel, Kunstner & Hennig 2020) on the ``Q`` loss, or
    ``DiagGGNMC`` (``estimator="mc"``). The cheapest approximation: it ignores all
    parameter correlations, so without the function-space ``α`` its step size is
    arbitrary. Info keys as for :class:`KFAC` (``diag_refreshes_total``).
    """

    name = "diag"
    Options = DiagOptions
    tag = "diag"

    def _statistics(self, s, p, x, gen):  # noqa: D102
        o = self.options
        return ggn_diagonal(s, p, x, o.geometry, o.estimator, o.backend, o.mc_samples, gen)

    def _invert(self, s, stats):  # noqa: D102
        inv: dict[str, Any] = {}
        for names in blocks(s):
            mean = torch.cat([stats[k].reshape(-1) for k in names]).mean()
            live = _live(mean)
            lam = _damping(mean, live, self.options.damping, self.options.damping_scale)
            for k in names:
                inv[k] = (live / (stats[k].clamp_min(0) + lam), lam)
        return inv

    def _block_damping(self, s, inv):  # noqa: D102
        return [inv[names[0]][1] for names in blocks(s)]

    def _solve(self, s, inv, v):  # noqa: D102
        return {k: v[k] * inv[k][0] for k in s.names}


PRECONDITIONERS.register(KFAC.name, KFAC)
PRECONDITIONERS.register(DiagGGN.name, DiagGGN)

# Extragradient on the rescaled natural direction (module docstring, "Named solvers", for the rule
# choice and the step-size sweeps): the field-based presets, for every game.
register_solver("eg+kfac", SolverSpec(
    "eg", precond="kfac", summary="extragradient on the K-FAC (KFLR) natural direction, step fitted in function space",
    lr={"*": 0.3, "rps": 0.4, "matching-pennies": 0.18, "bilinear": 0.7, "gan": 0.1, "openspiel": 0.1},
))
register_solver("eg+diag", SolverSpec(
    "eg", precond="diag", summary="extragradient on the diagonal-GGN natural direction, step fitted in function space",
    lr={"*": 0.3, "rps": 0.4, "matching-pennies": 0.18, "bilinear": 0.7, "gan": 0.05},
))
# The natural proximal-point solvers with K-FAC / diagonal pull-backs (hcc.solvers.prox).
# Ten preconditioned steps per pull-back: with one, a block-diagonal step realizes the target poorly where
# many contexts couple the layers (rps n_support=64: 33 iterations at 3 steps, 10 at 10, exact: 3); the
# cosine to the exact direction is not logged (it would cost an exact solve per inner step).
_APPROX_PULLBACK = {"geometry": "logit", "pullback_steps": 10, "log_cosine": False}
register_solver("kfac-natgrad", SolverSpec(
    "prox", precond="kfac", precond_defaults=_APPROX_PULLBACK, lr={"*": 1.0},
    summary="natural proximal point, K-FAC (KFLR) pull-back: 10 preconditioned Gauss-Newton steps",
))
register_solver("diag-natgrad", SolverSpec(
    "prox", precond="diag", precond_defaults=_APPROX_PULLBACK, lr={"*": 1.0},
    summary="natural proximal point, diagonal-GGN pull-back: 10 preconditioned Gauss-Newton steps",
))

__all__ = [
    # preconditioners
    "KFAC", "KFACOptions", "DiagGGN", "DiagOptions",
    # curvature
    "MapStructure", "analyze_map", "output_sqrt_factor", "kronecker_factors", "ggn_diagonal", "MetricLoss",
    "blocks", "rescale_direction",
    # dense references
    "metric_jacobian", "dense_metric", "dense_natural_direction",
]
