r"""Small GANs on 2-D mixtures of Gaussians.

The generator ``G_θ : R^d → R²`` (an MLP with linear output, the min player) maps
latent draws ``z ~ N(0, I_d)`` to points; the discriminator (the max player) is an
MLP ``R² → R`` returning a *logit* ``ℓ_φ(x)``, with ``D_φ = σ(ℓ_φ)``. In function
space the min player's strategy is ``F = G_θ(z)`` on the latent batch and the max
player's is ``ℓ_φ`` on ``real ∪ fake``:

.. math::

    Ψ(θ, φ) = \mathbb{E}_{x∼p_{data}} \log σ(ℓ_φ(x))
             + \mathbb{E}_{z} \log\big(1 − σ(ℓ_φ(G_θ(z)))\big)

(Goodfellow et al., *Generative Adversarial Nets*, NeurIPS 2014), evaluated
stably as ``log σ(ℓ) = −softplus(−ℓ)`` and ``log(1 − σ(ℓ)) = −softplus(ℓ)``. The
generator minimizes ``Ψ`` and the discriminator maximizes it (``loss="standard"``,
zero-sum). With ``loss="nonsaturating"`` the generator instead minimizes
``−E_z log σ(ℓ_φ(G_θ(z)))`` and the game is no longer zero-sum.

``Ψ`` is concave in the discriminator's values; it is *not* convex in the sample
positions ``F`` (they enter through ``ℓ_φ``), so unlike the matrix games there is
no closed-form ``(F*, G*)`` and no Lyapunov ``V``. Progress is measured by sample
quality on a fixed evaluation batch (:meth:`GAN.eval_batch`): the squared MMD to
the data (:func:`mmd2`), the modes covered and the share of high-quality samples
(:func:`mode_stats`, after Metz et al. 2017 and Srivastava et al. 2017), and the
discriminator's mean distance from ½.

>>> from hcc import run
>>> res = run("gan", "adam", steps=200, game_options={"dataset": "ring"}, dtype="float32", log_every=100)
>>> sorted(k for k in res.final if k in ("mmd", "modes_covered", "high_quality", "d_distance"))
['d_distance', 'high_quality', 'mmd', 'modes_covered']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as Fn
from torch import Tensor
from torch.func import functional_call

from ..registry import OptionError, opt
from .base import Batch, Game, Params, seeded
from .maps import ACTIVATIONS, mlp

#: kernel bandwidths σ of the MMD (data scale: modes 0.02 wide, 2 apart)
MMD_BANDWIDTHS: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)


# -- data ----------------------------------------------------------------------------------


def mixture_centres(dataset: str, radius: float = 2.0, spacing: float = 2.0, n_ring: int = 8) -> Tensor:
    """The mode centres (float64, ``K × 2``) of the ``ring`` or ``grid`` mixture.

    ``ring``: ``n_ring`` points ``r (cos 2πk/K, sin 2πk/K)``; ``grid``: the 5 × 5
    points ``spacing · {−2, …, 2}²`` (centred at 0).
    """
    if dataset == "ring":
        a = torch.arange(n_ring, dtype=torch.float64) * (2 * math.pi / n_ring)
        return radius * torch.stack([a.cos(), a.sin()], dim=-1)
    if dataset == "grid":
        g = spacing * torch.arange(-2, 3, dtype=torch.float64)
        return torch.cartesian_prod(g, g)
    raise OptionError(f"dataset: expected one of ring, grid, got {dataset!r}")


def sample_mixture(centres: Tensor, std: float, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws from the equal-weight mixture ``(1/K) Σ_k N(c_k, std² I)`` (on CPU, float64)."""
    idx = torch.randint(centres.shape[0], (n,), generator=generator)
    noise = torch.randn(n, centres.shape[1], generator=generator, dtype=torch.float64)
    return centres.to(torch.float64)[idx] + std * noise


# -- sample-quality metrics -----------------------------------------------------------------


def mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS, unbiased: bool = False) -> Tensor:
    r"""Squared maximum mean discrepancy between samples ``x`` (n × d) and ``y`` (m × d).

    .. math::

        \widehat{\mathrm{MMD}}^2 = \frac{1}{n^2}\sum_{i,j} k(x_i, x_j)
            + \frac{1}{m^2}\sum_{i,j} k(y_i, y_j) − \frac{2}{nm}\sum_{i,j} k(x_i, y_j),
        \qquad k(a, b) = \sum_{σ} \exp\!\big(−‖a − b‖² / 2σ²\big),

    the biased (V-statistic) estimator, always ≥ 0; ``unbiased=True`` drops the
    diagonal terms ``i = j`` of the within-sample sums (dividing by ``n(n−1)``,
    ``m(m−1)``): the U-statistic, unbiased but possibly negative. A sum of Gaussian
    kernels is characteristic, so the population MMD is 0 iff the laws agree
    (Gretton et al., *A Kernel Two-Sample Test*, JMLR 2012, eqs. 3 and 5).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd2: expected x (n, d) and y (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if unbiased and (n < 2 or m < 2):
        raise ValueError(f"mmd2: the unbiased estimator needs ≥ 2 samples each, got {n} and {m}")
    B = len(bandwidths)

    def ksum(d: Tensor) -> Tensor:
        # Σ over the given distances of k; exp dominates the cost, hence in place
        d2 = d.pow(2)
        return sum(torch.mul(d2, -0.5 / (s * s)).exp_().sum() for s in bandwidths)

    # within-sample sums from the i < j pairs only (k is symmetric, k(a, a) = B)
    off_xx, off_yy = 2 * ksum(torch.pdist(x)), 2 * ksum(torch.pdist(y))
    kxy = ksum(torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")) / (n * m)
    if unbiased:
        sxx, syy = off_xx / (n * (n - 1)), off_yy / (m * (m - 1))
    else:
        sxx, syy = (off_xx + n * B) / (n * n), (off_yy + m * B) / (m * m)
    return sxx + syy - 2 * kxy


@dataclass(frozen=True)
class ModeStats:
    """What :func:`mode_stats` measured."""

    #: modes holding at least ``min_count`` high-quality samples
    covered: int
    #: share of samples within ``3·std`` of their nearest centre
    high_quality: float
    #: high-quality samples per mode (``K`` integers)
    counts: Tensor


def mode_stats(samples: Tensor, centres: Tensor, std: float, min_count: int = 1) -> ModeStats:
    r"""Mode coverage and sample quality of ``samples`` (n × 2) for a mixture with ``centres`` (K × 2).

    A sample is *high quality* if it lies within three standard deviations of its
    nearest centre, ``min_k ‖x − c_k‖ ≤ 3·std``; a mode is *covered* if at least
    ``min_count`` high-quality samples have it as nearest centre:

    .. math::

        \mathrm{hq} = \frac{1}{n}\sum_i \mathbb{1}\big[\min_k ‖x_i − c_k‖ ≤ 3σ\big],\qquad
        \mathrm{covered} = \#\{k : |\{i : x_i \text{ hq},\ \arg\min_{k'} ‖x_i − c_{k'}‖ = k\}| ≥ c_{\min}\}.

    This is the protocol of Srivastava et al., *VEEGAN* (NeurIPS 2017, §5.1; there
    ``c_min = 1``) on the ring / grid benchmarks of Metz et al., *Unrolled
    Generative Adversarial Networks* (ICLR 2017). Modes closer than ``6·std`` would
    make the 3σ balls overlap; the nearest-centre assignment keeps counts disjoint.
    """
    if samples.ndim != 2 or centres.ndim != 2 or samples.shape[1] != centres.shape[1]:
        raise ValueError(
            f"mode_stats: expected samples (n, d) and centres (K, d), "
            f"got {tuple(samples.shape)} and {tuple(centres.shape)}"
        )
    dist = torch.cdist(samples, centres.to(samples))
    dmin, nearest = dist.min(dim=1)
    hq = dmin <= 3 * std
    counts = torch.bincount(nearest[hq], minlength=centres.shape[0])
    share = float(hq.float().mean()) if samples.shape[0] else 0.0
    return ModeStats(covered=int((counts >= min_count).sum()), high_quality=share, counts=counts)


# -- the game --------------------------------------------------------------------------------


def check_gan_options(o: Any) -> None:
    """The checks every GAN's options share: loss, activation, sizes."""
    if o.loss not in ("standard", "nonsaturating"):
        raise OptionError(f"loss: expected one of standard, nonsaturating, got {o.loss!r}")
    if o.activation not in ACTIVATIONS:
        raise OptionError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {o.activation!r}")
    for k in ("latent_dim", "width", "batch_size"):
        if getattr(o, k) < 1:
            raise OptionError(f"{k}: expected a positive integer, got {getattr(o, k)}")
    if o.depth < 0:
        raise OptionError(f"depth: expected ≥ 0, got {o.depth}")
    if o.n_eval < 2:
        raise OptionError(f"n_eval: expected an integer ≥ 2, got {o.n_eval}")


@dataclass
class GANOptions:
    dataset: Literal["ring", "grid"] = opt("ring", "data: 8 Gaussians on a circle (ring) or 5×5 on a grid (grid)")
    std: float = opt(0.02, "standard deviation of each mixture component")
    radius: float = opt(2.0, "radius of the ring")
    spacing: float = opt(2.0, "distance between neighbouring grid modes (grid centred at 0)")
    loss: Literal["standard", "nonsaturating"] = opt(
        "standard", "generator loss: saturating minimax (zero-sum) or non-saturating −E log D(G(z))"
    )
    latent_dim: int = opt(4, "dimension of the latent z ~ N(0, I)")
    width: int = opt(64, "hidden width of both MLPs")
    depth: int = opt(2, "number of hidden layers of both MLPs")
    activation: str = opt("tanh", "hidden activation (tanh, relu, elu)")
    batch_size: int = opt(256, "latent draws and real samples per step (each)")
    n_eval: int = opt(1024, "latent draws and real samples of the fixed evaluation batch (each)")
    mode_share: float = opt(
        0.1, "a mode is covered if it holds ≥ mode_share · n/K high-quality samples (n/K: its share under the data)"
    )

    def validate(self) -> None:
        if self.dataset not in ("ring", "grid"):
            raise OptionError(f"dataset: expected one of ring, grid, got {self.dataset!r}")
        check_gan_options(self)
        for k in ("std", "radius", "spacing"):
            v = getattr(self, k)
            if not (v > 0 and math.isfinite(v)):
                raise OptionError(f"{k}: expected a positive finite number, got {v}")
        if not 0 <= self.mode_share <= 1:
            raise OptionError(f"mode_share: expected a value in [0, 1], got {self.mode_share}")


class GANGame(Game):
    """What every GAN here shares: the payoff and losses on the discriminator's logits over
    ``real ∪ fake`` (module docstring), fresh minibatches, sample snapshots.

    Subclasses build the maps and define ``_draw(n,
    generator)`` (a batch of ``n`` latent draws ``x_min`` and data samples ``real``),
    :meth:`eval_batch` and their metrics.
    """

    stochastic = True
    fixed_support = False
    default_log_every = 20

    def __init__(self, options: Any, seed: int = 0) -> None:
        super().__init__(options, seed)
        # zero-sum only for the saturating loss (the base class reads a ClassVar default)
        self.zero_sum = options.loss == "standard"  # type: ignore[misc]

    def _draw(self, n: int, generator: torch.Generator | None) -> Batch:
        raise NotImplementedError

    def eval_batch(self) -> Batch:
        raise NotImplementedError

    def sample_batch(self, generator: torch.Generator | None = None) -> Batch:
        """A fresh minibatch: ``batch_size`` latent draws and ``batch_size`` data samples."""
        return self._draw(self.options.batch_size, generator)

    def max_support(self, F: Tensor, batch: Batch) -> Tensor:
        return torch.cat([batch["real"], F])

    # -- payoff ----------------------------------------------------------------------------
    @staticmethod
    def _split(G: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        n_real = batch["real"].shape[0]
        return G[:n_real, 0], G[n_real:, 0]

    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        """``Ψ = E log σ(ℓ(real)) + E log(1 − σ(ℓ(fake)))``; ``G`` are the logits on ``real ∪ fake``."""
        l_real, l_fake = self._split(G, batch)
        return Fn.logsigmoid(l_real).mean() - Fn.softplus(l_fake).mean()

    def losses(self, F: Tensor, G: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(Ψ, −Ψ)`` (standard) or ``(−E log σ(ℓ(fake)), −Ψ)`` (non-saturating)."""
        psi = self.payoff(F, G, batch)
        if self.options.loss == "standard":
            return psi, -psi
        _, l_fake = self._split(G, batch)
        return -Fn.logsigmoid(l_fake).mean(), -psi

    def samples(self, params: Params) -> tuple[Tensor, Tensor]:
        """``(G_θ(z), real)`` on the fixed evaluation batch: what the sample grids draw."""
        batch = self.eval_batch()
        with torch.no_grad():
            return functional_call(self.min_map, params[0], (batch["x_min"],)), batch["real"]


class GAN(GANGame):
    """A GAN on a 2-D mixture of Gaussians: generator ``G_θ(z)`` vs discriminator logit ``ℓ_φ(x)``.

    Batches hold ``x_min`` (latent draws, ``batch_size × latent_dim``) and ``real``
    (data samples, ``batch_size × 2``); the discriminator's support is
    ``real ∪ G_θ(z)`` (real first), not detached, so ``∇_θ Ψ`` flows through it.
    """

    name = "gan"
    Options = GANOptions
    default_steps = 3000

    def __init__(self, options: GANOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        o = options
        with seeded(seed):
            self.min_map = mlp(o.latent_dim, o.width, o.depth, 2, o.activation)
            self.max_map = mlp(2, o.width, o.depth, 1, o.activation)
        centres = mixture_centres(o.dataset, o.radius, o.spacing)
        self._centres64 = centres  # .to(float64) restores full precision
        # the reference for the batch's device and dtype: made like the maps' parameters
        self.register_buffer("centres", centres.to(next(self.min_map.parameters()).dtype))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        ref = self.centres
        self.centres = self._centres64.to(device=ref.device, dtype=ref.dtype)
        return self

    # -- support -------------------------------------------------------------------------
    def _draw(self, n: int, generator: torch.Generator | None) -> Batch:
        # draws on CPU in float64, then cast: the same samples for every device/dtype
        z = torch.randn(n, self.options.latent_dim, generator=generator, dtype=torch.float64)
        real = sample_mixture(self._centres64, self.options.std, n, generator)
        ref = self.centres
        return {"x_min": z.to(ref), "real": real.to(ref)}

    def eval_batch(self) -> Batch:
        """The fixed evaluation batch (``n_eval`` each), seeded from the game seed.

        Its own stream (not the training one), so metrics compare across steps and solvers.
        """
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1_000_003)
        return self._draw(self.options.n_eval, gen)

    # -- metrics ---------------------------------------------------------------------------
    def extra_metrics(self, params: Params, batch: Batch) -> dict[str, float]:
        """Sample quality on ``batch`` (the runner passes :meth:`eval_batch`).

        ``mmd``: :func:`mmd2` (biased) between ``G_θ(z)`` and the real samples;
        ``modes_covered``, ``high_quality``: :func:`mode_stats` with
        ``min_count = max(1, ⌈mode_share · n / K⌉)``; ``d_distance``: mean ``|D(x) − ½|``
        over ``real ∪ fake``.
        """
        o = self.options
        with torch.no_grad():
            fake = functional_call(self.min_map, params[0], (batch["x_min"],))
            logits = functional_call(self.max_map, params[1], (self.max_support(fake, batch),))
            if not bool(torch.isfinite(fake).all()):
                nan = float("nan")
                return {"mmd": nan, "modes_covered": nan, "high_quality": nan, "d_distance": nan}
            K = self.centres.shape[0]
            min_count = max(1, math.ceil(o.mode_share * fake.shape[0] / K))
            ms = mode_stats(fake, self.centres, o.std, min_count)
            return {
                "mmd": float(mmd2(fake, batch["real"])),
                "modes_covered": float(ms.covered),
                "high_quality": ms.high_quality,
                "d_distance": float((torch.sigmoid(logits) - 0.5).abs().mean()),
            }

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "n_modes": int(self.centres.shape[0])}
