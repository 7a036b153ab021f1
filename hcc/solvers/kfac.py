r"""K-FAC (KFLR / Monte-Carlo KFAC) and diagonal-GGN preconditioners for the natural flow.

Each player's metric ``A = (1/n) Σ_i Ĵ_iᵀĴ_i`` (:mod:`hcc.curvature.heads` for the geometries)
is approximated block-diagonally, one block per ``nn.Linear`` or ``nn.Conv2d`` layer
(:class:`~hcc.curvature.kfac.KFACOperator`: ``G_ℓ ⊗ Ā_ℓ``;
:class:`~hcc.curvature.diag.DiagOperator`: ``diag A``), damped per block and inverted; the
parameters outside those layers get their exact dense block. This module adds what makes the
approximate direction a good step: statistics averaged over calls, inverses refreshed every
``refresh`` calls, and a step length fitted in function space. Measurements behind the
defaults (accuracy of the approximation, damping, step sizes): ``docs/kfac.md``.

**Damping** (Tikhonov, ``A + λI``) per block: ``λ_b = damping × mean diagonal of the block``
(``damping_scale="relative"``, scale-free; the default) or ``damping`` (``"absolute"``);
``damping_split`` says how it meets the Kronecker product (``pi``: factored with Martens &
Grosse's π-correction; ``eigen``: exactly ``(G ⊗ Ā + λI)⁻¹``; ``plain``: factored, π = 1;
:mod:`hcc.curvature.kfac`). Why ``1e-2`` relative: with few support points the factors are
rank deficient and a stale inverse (``refresh > 1``) amplifies new directions by up to ``1/λ``;
``1e-3`` lets wide RPS jump into a saturated corner there, ``1e-1`` slows multi-point RPS.

**Function-space step rescaling** (``rescale="player"``, default). A block-diagonal inverse
moves the function by about the whole function-space step *per layer*, so the direction
``d = P⁻¹v`` is rescaled by the scalar

.. math::

    α = \arg\min_α ‖αd − d_*‖²_{A+Λ} = \frac{⟨d, v⟩}{dᵀ(A+Λ)d}
      = \frac{⟨d, v⟩}{\frac1n\sum_i ‖Q_iᵀ J_{z,i} d‖² + \sum_b λ_b ‖d_b‖²},

``d_* = (A + Λ)⁻¹ v`` the exact damped natural direction (``dᵀ(A+Λ)d_* = dᵀv`` needs no
``d_*``). For a gradient field ``v = Jᵀr/n`` and ``Λ → 0`` it is ``α = ⟨J d, r⟩ / ‖J d‖²``, the
least-squares fit of the moved function ``J(αd)`` to the function-space step; one
Jacobian-vector product; ``α = 1`` whenever ``d`` is exact; ``α > 0`` for gradient fields.
``rescale="block"`` fits one scalar per block (:func:`rescale_direction`; ``B`` jvps).

**Trust region at saturated heads** (``logit_damping = μ``, default ``3e-3``). The relative
damping is scale-free, so it bounds nothing where a softmax/sigmoid head saturates (``Q_i → 0``
shrinks every block with its damping, and the step needed grows like ``1/‖Q‖``). So ``α`` is
fitted in the metric ``A + Λ + μ A_z``, ``A_z = (1/n) Σ_i J_{z,i}ᵀ P J_{z,i}``,

.. math::

    α = \frac{⟨d, v⟩}{\frac1n\sum_i \big(‖Q_iᵀ δz_i‖² + μ ‖P δz_i‖²\big) + \sum_b λ_b ‖d_b‖²},
    \qquad δz_i = J_{z,i} d,

the output factor ``Q_iQ_iᵀ`` damped to ``Q_iQ_iᵀ + μP`` (``P = I − 11ᵀ/k`` for a softmax, ``I``
for a sigmoid): a Levenberg-Marquardt trust region on the *logits*, whose linearization stays
valid where ``F``'s does not. It needs no extra pass, is invariant to the body's
parametrization, bounds the logit move by ``‖δz‖ ≲ ‖Q‖‖r‖/μ`` when ``‖Q‖² ≪ μ`` and changes
``α`` by a factor ``≈ 1 − μ/‖Q‖²`` otherwise. Why ``3e-3``: it rescues the saturating 2×2 game
``3,-1;-2,1`` and costs at most a few steps elsewhere. Maps without a head are left as they are.

**Logging.** Per call and player (``theta``/``phi``): ``damping_*`` (mean ``λ_b``),
``alpha_*``, and ``cos_exact_*``, the cosine to the exact minimum-norm natural direction
``A⁺v`` (:func:`~hcc.curvature.operators.exact_natural_direction`), logged by default
(``log_cosine=None``) when the player has at most 5000 parameters and ``n·k ≤ 256``.

References: Martens & Grosse, *Optimizing Neural Networks with Kronecker-factored Approximate
Curvature*, ICML 2015; Grosse & Martens, *A Kronecker-factored approximate Fisher matrix for
convolution layers*, ICML 2016; Botev, Ritter & Barber, *Practical Gauss-Newton Optimisation
for Deep Learning*, ICML 2017 (KFLR); Dangel, Kunstner & Hennig, *BackPACK: Packing more into
Backprop*, ICLR 2020.

>>> from hcc import run
>>> res = run("rps", "kfac-natgrad")
>>> res.converged
True
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from ..curvature.diag import DiagInverse, DiagOperator, ggn_diagonal
from ..curvature.heads import Geometry, check_geometry, output_factor
from ..curvature.kfac import SPLITS, KFACInverse, KFACOperator, KronFactors, kronecker_factors, rest_metric
from ..curvature.layers import BACKENDS, Backend, MapStructure, analyze_map
from ..curvature.operators import exact_natural_direction
from ..curvature.pytree import flatten
from ..games.base import Batch, Game, Params
from ..registry import OptionError, opt
from .precond import PRECONDITIONERS, Preconditioner

#: largest parameter block outside the K-FAC layers that gets an exact dense block
MAX_DENSE_BLOCK = 8192
#: ``log_cosine=None`` logs the cosine when a player has at most this many parameters …
AUTO_COSINE_MAX_PARAMS = 5000
#: … and at most this many function values ``n·k``
AUTO_COSINE_MAX_VALUES = 256
#: default ``μ`` of the α fit's logit trust region (module docstring, "Trust region at saturated heads")
LOGIT_DAMPING = 3e-3
PLAYER_NAMES = ("theta", "phi")


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
    blks = s.blocks()
    primal = {k: t.detach() for k, t in params.items()}
    n = x.shape[0]
    f = lambda q: functional_call(s.body, q, (x,)).reshape(n, -1)  # noqa: E731
    if per_block:
        tangents = [{k: (d[k] if k in names else torch.zeros_like(d[k])).detach() for k in primal} for names in blks]
    else:
        tangents = [{k: d[k].detach() for k in primal}]
    cols = []
    mu = logit_damping if s.head != "none" else 0.0
    for t in tangents:
        z, dz = jvp(f, (primal,), (t,))
        col = torch.einsum("nkc,nk->nc", output_factor(z, s.head, geometry), dz).reshape(-1)
        if mu > 0:  # metric J_zᵀ(QQᵀ + μP)J_z: stack √μ·Pδz under Qᵀδz (a softmax ignores shifts along 1)
            Pdz = dz - dz.mean(-1, keepdim=True) if s.head == "softmax" else dz
            col = torch.cat([col, math.sqrt(mu) * Pdz.reshape(-1)])
        cols.append(col)
    C = torch.stack(cols, 1)
    sq = torch.stack([sum(d[k].pow(2).sum() for k in names) for names in blks])
    dv = torch.stack([sum((d[k] * v[k]).sum() for k in names) for names in blks])
    lam = torch.stack([torch.as_tensor(lb, dtype=C.dtype) for lb in damping])
    if per_block:
        D = C.T @ C / n + torch.diag(lam * sq)
        # pseudo-inverse: a block with d_b = 0 (a zero row and column) gets α_b = 0, not 0/0
        alpha = torch.linalg.pinv(D, hermitian=True) @ dv
        scale = {k: alpha[b] for b, names in enumerate(blks) for k in names}
        return {k: scale[k] * d[k] for k in d}, alpha
    den = C.pow(2).sum() / n + (lam * sq).sum()
    tiny = torch.finfo(den.dtype).tiny
    alpha = torch.where(den > tiny, dv.sum() / den.clamp_min(tiny), torch.zeros_like(den)).reshape(1)
    return {k: alpha[0] * t for k, t in d.items()}, alpha


def _ema(old: Any, new: Any, decay: float) -> Any:
    if old is None or decay == 0:
        return new
    return torch.utils._pytree.tree_map(lambda o, w: w if o is None else decay * o + (1 - decay) * w, old, new)


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
                         ("backend", BACKENDS)):
            if getattr(self, k) not in valid:
                raise OptionError(f"{k}: expected one of {', '.join(valid)}, got {getattr(self, k)!r}")


class _BlockPreconditioner(Preconditioner):
    """Per-player block-diagonal curvature with statistics, inverses, rescaling and logging.

    Subclasses implement :meth:`_statistics` (curvature statistics at the current point,
    averaged by ``decay``), :meth:`_invert` (the damped inverse of those statistics as a plain
    pytree the solver state keeps) and :meth:`_inverse` (that state as an operator).
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
                    "nn.Linear/nn.Conv2d layers, too many for an exact dense block"
                )
        return s

    def init(self, game: Game, params: Params) -> dict[str, Any]:
        for module in game.maps():
            s = self.structure(module)
            if s.head == "none" and self.options.geometry == "fisher":
                output_factor(torch.zeros(1, 1), s.head, "fisher")  # raises the explanatory error
        gen = torch.Generator(device="cpu").manual_seed(self.options.seed)
        return {"players": ({"calls": 0, "stats": None, "inv": None}, {"calls": 0, "stats": None, "inv": None}),
                "rng": gen.get_state()}

    # subclass API
    def _statistics(self, s: MapStructure, p: dict[str, Tensor], x: Tensor, gen: torch.Generator) -> Any:
        raise NotImplementedError

    def _restore(self, stats: Any) -> Any:
        """The statistics as :meth:`_statistics` makes them (a checkpoint keeps named tuples as tuples)."""
        return stats

    def _invert(self, s: MapStructure, p: dict[str, Tensor], stats: Any) -> Any:
        raise NotImplementedError

    def _inverse(self, s: MapStructure, like: dict[str, Tensor], inv: Any) -> KFACInverse | DiagInverse:
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
                old = None if ps["stats"] is None else self._restore(ps["stats"])
                ps["stats"] = _ema(old, self._statistics(s, p, x, gen), o.decay)
            if due:
                ps["inv"] = self._invert(s, p, self._restore(ps["stats"]))
                refreshes += 1
            ps["calls"] += 1
            inverse = self._inverse(s, v, ps["inv"])
            d = inverse.matvec(v)
            lams = inverse.block_damping()
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
        exact = flatten(exact_natural_direction(module, p, x, v, damping=0.0, geometry=self.options.geometry), s.names)
        approx = flatten(d, s.names)
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
        if self.damping_split not in SPLITS:
            raise OptionError(f"damping_split: expected one of {', '.join(SPLITS)}, got {self.damping_split!r}")


@PRECONDITIONERS.entry
class KFAC(_BlockPreconditioner):
    r"""K-FAC natural-gradient preconditioner: ``d_b = (G_b ⊗ Ā_b + λ_b I)⁻¹ v_b`` per layer.

    .. math::

        d_ℓ = \mathrm{unvec}\big((G_ℓ ⊗ Ā_ℓ + λ_ℓ I)^{-1} \mathrm{vec}(V_ℓ)\big),
        \qquad V_ℓ = [∇_W ℓ \,|\, ∇_b ℓ],

    for every ``nn.Linear`` and ``nn.Conv2d`` layer (a convolution's ``∇_W`` reshaped to
    ``c_out × c_in k_h k_w``; factors: :func:`~hcc.curvature.kfac.kronecker_factors`), the damping
    split by ``damping_split`` (:class:`~hcc.curvature.kfac.KFACOperator`); parameters outside
    those layers use their exact damped block. Then each player's direction is rescaled by the
    function-space ``α`` (module docstring).

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
        return {"factors": fac, "rest": rest_metric(s, p, x, o.geometry)}

    def _restore(self, stats):  # noqa: D102
        return {"factors": {k: KronFactors._make(f) for k, f in stats["factors"].items()}, "rest": stats["rest"]}

    def _invert(self, s, p, stats):  # noqa: D102
        o = self.options
        op = KFACOperator(s, p, stats["factors"], stats["rest"])
        return op.inverse(o.damping, o.damping_scale, o.damping_split).state

    def _inverse(self, s, like, inv):  # noqa: D102
        return KFACInverse.from_blocks(s, like, inv, self.options.damping_split)


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


@PRECONDITIONERS.entry
class DiagGGN(_BlockPreconditioner):
    r"""Diagonal natural-gradient preconditioner: ``d = v ⊘ (diag A + λ_b)``, then the ``α`` rescaling.

    .. math::

        d_j = \frac{v_j}{A_{jj} + λ_{b(j)}}, \qquad
        A_{jj} = \frac1n \sum_i ‖Q_iᵀ J_{z,i} e_j‖²,

    with ``λ_b`` per block (a layer's weight and bias, or the parameters outside the
    layers) relative to the block's mean diagonal. The diagonal
    (:func:`~hcc.curvature.diag.ggn_diagonal`) is BackPACK's ``DiagGGNExact`` on the ``Q``
    loss, or ``DiagGGNMC`` (``estimator="mc"``), for ``nn.Linear`` and ``nn.Conv2d`` layers. The
    cheapest approximation: it ignores all parameter correlations, so without the
    function-space ``α`` its step size is arbitrary. Info keys as for :class:`KFAC`
    (``diag_refreshes_total``).
    """

    name = "diag"
    Options = DiagOptions
    tag = "diag"

    def _statistics(self, s, p, x, gen):  # noqa: D102
        o = self.options
        return ggn_diagonal(s, p, x, o.geometry, o.estimator, o.backend, o.mc_samples, gen)

    def _invert(self, s, p, stats):  # noqa: D102
        return DiagOperator(s, p, stats).inverse(self.options.damping, self.options.damping_scale).state

    def _inverse(self, s, like, inv):  # noqa: D102
        return DiagInverse(s, like, inv)



# The named solvers on these preconditioners (eg+kfac, eg+diag, kfac-natgrad, diag-natgrad): hcc/solvers/presets.toml.

__all__ = ["KFAC", "KFACOptions", "DiagGGN", "DiagOptions", "rescale_direction"]
