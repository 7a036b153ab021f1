r"""A small image GAN: scikit-learn's 8 × 8 handwritten digits, and its quality metrics.

Data: :func:`sklearn.datasets.load_digits` (1797 images shipped with scikit-learn, no
download), scaled from ``0…16`` to ``[−1, 1]``; a fixed seeded split keeps 297 images out of
training as the held-out reference.

Metrics (:class:`DigitMetrics`), after Heusel et al., *GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium* (NeurIPS 2017), with a small classifier in place of
Inception: an MLP ``64 → 64 → 32 → 10`` trained on the training digits (deterministic, once per
process). The *Fréchet distance* between two sets of images is that of Gaussians fitted to their
32-dimensional penultimate features,

.. math:: d^2 = ‖μ_a − μ_b‖² + \operatorname{tr}\big(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}\big),

and the *class histogram* is the classifier's predictions; a class is covered if it holds at
least ``share · n/10`` of ``n`` samples.

:class:`DigitsGAN` is the ``gan`` game on these images (``digits-gan``): MLP or convolutional
generator and discriminator (``arch``), the same payoff and losses; its metrics are ``fid``,
``classes_covered`` and ``d_distance``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..registry import OptionError, opt
from .base import Batch, Params, seeded
from .gan import GANGame, check_gan_options
from .maps import mlp

#: images kept out of training (the held-out reference of the metrics)
N_HELD_OUT = 297


@functools.cache
def digit_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, held_x, held_y)``: the digits in ``[−1, 1]`` (float64, ``n × 64``), split by a
    fixed permutation (seed 0)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise OptionError("the digits data needs scikit-learn: pip install 'hcc[digits]'") from None
    d = load_digits()
    x = torch.from_numpy(d.data).to(torch.float64) / 8.0 - 1.0
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held, train = perm[:N_HELD_OUT], perm[N_HELD_OUT:]
    return x[train], y[train], x[held], y[held]


class DigitMetrics:
    """The feature classifier and the metrics of the module docstring (build with :func:`digit_metrics`)."""

    def __init__(self, epochs: int = 60, seed: int = 0) -> None:
        x, y, hx, hy = digit_images()
        with seeded(seed):
            self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        self.net = self.net.double()
        opt_ = torch.optim.Adam(self.net.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():  # built lazily, possibly inside a metric's no_grad block
            for _ in range(epochs):
                for idx in torch.randperm(len(y), generator=gen).split(128):
                    opt_.zero_grad()
                    nn.functional.cross_entropy(self.net(x[idx]), y[idx]).backward()
                    opt_.step()
        self.net.requires_grad_(False)
        #: the classifier's accuracy on the held-out digits
        self.accuracy = float((self.predict(hx) == hy).double().mean())

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features before their tanh (``n × 32``) of images ``n × 64`` (or ``n × 1 × 8 × 8``)."""
        return self.net[:3](images.reshape(images.shape[0], 64).to(torch.float64))

    def predict(self, images: Tensor) -> Tensor:
        return self.net(images.reshape(images.shape[0], 64).to(torch.float64)).argmax(-1)

    def frechet(self, a: Tensor, b: Tensor) -> float:
        """The Fréchet distance ``d²`` between image sets ``a`` and ``b`` (module docstring)."""
        fa, fb = self.features(a).numpy(), self.features(b).numpy()
        mu = fa.mean(0) - fb.mean(0)
        ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        root = scipy.linalg.sqrtm(ca @ cb)
        root = root.real if np.iscomplexobj(root) else root
        return float(mu @ mu + np.trace(ca + cb - 2 * root))

    def class_counts(self, images: Tensor) -> Tensor:
        return torch.bincount(self.predict(images), minlength=10)

    def covered(self, images: Tensor, share: float = 0.1) -> int:
        """Classes holding at least ``share · n/10`` of the ``n`` images."""
        need = max(1, math.ceil(share * images.shape[0] / 10))
        return int((self.class_counts(images) >= need).sum())


@functools.cache
def digit_metrics() -> DigitMetrics:
    """The process-wide :class:`DigitMetrics` (trained once, about a second)."""
    return DigitMetrics()


def conv_generator(latent_dim: int, width: int) -> nn.Sequential:
    """``z ↦`` a ``1 × 8 × 8`` image in ``(−1, 1)``: linear to ``width × 4 × 4``, upsample, two 3 × 3 convolutions."""
    return nn.Sequential(nn.Linear(latent_dim, width * 16), nn.Unflatten(1, (width, 4, 4)), nn.Tanh(),
                         nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(width, 1, 3, padding=1), nn.Flatten(), nn.Tanh())


def conv_discriminator(width: int) -> nn.Sequential:
    """A ``64``-vector (an 8 × 8 image) ``↦`` a logit: two strided 3 × 3 convolutions, then linear."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, width, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(width * 4, 1))


@dataclass
class DigitsGANOptions:
    arch: Literal["mlp", "conv"] = opt("conv", "generator and discriminator: convolutional (conv), or MLPs")
    loss: Literal["standard", "nonsaturating"] = opt(
        "nonsaturating", "generator loss: saturating minimax (zero-sum) or non-saturating −E log D(G(z))")
    latent_dim: int = opt(16, "dimension of the latent z ~ N(0, I)")
    width: int = opt(8, "channels (conv) or hidden width (mlp) of both networks")
    depth: int = opt(2, "hidden layers of the MLPs")
    activation: str = opt("tanh", "hidden activation of the MLPs (tanh, relu, elu)")
    batch_size: int = opt(64, "latent draws and real images per step (each)")
    n_eval: int = opt(512, "latent draws of the fixed evaluation batch")
    class_share: float = opt(0.1, "a class is covered if it holds ≥ class_share · n/10 of n generated images")

    def validate(self) -> None:
        if self.arch not in ("mlp", "conv"):
            raise OptionError(f"arch: expected one of mlp, conv, got {self.arch!r}")
        check_gan_options(self)
        if not 0 <= self.class_share <= 1:
            raise OptionError(f"class_share: expected a value in [0, 1], got {self.class_share}")


class DigitsGAN(GANGame):
    """The GAN on 8 × 8 digits (module docstring); batches hold latent draws and real images (``n × 64``)."""

    name = "digits-gan"
    Options = DigitsGANOptions
    default_steps = 2000
    default_log_every = 50

    def __init__(self, options: DigitsGANOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        o = options
        digit_images()  # fails early, with the install hint, without scikit-learn
        with seeded(seed):
            if o.arch == "conv":
                self.min_map, self.max_map = conv_generator(o.latent_dim, o.width), conv_discriminator(o.width)
            else:
                self.min_map = mlp(o.latent_dim, o.width, o.depth, 64, o.activation, nn.Tanh())
                self.max_map = mlp(64, o.width, o.depth, 1, o.activation)
        self.register_buffer("ref", torch.zeros(()))  # the device and dtype batches are made in

    def _draw(self, n: int, generator: torch.Generator | None) -> Batch:
        train = digit_images()[0]
        idx = torch.randint(train.shape[0], (n,), generator=generator)
        z = torch.randn(n, self.options.latent_dim, generator=generator, dtype=torch.float64)
        return {"x_min": z.to(self.ref), "real": train[idx].to(self.ref)}

    def eval_batch(self) -> Batch:
        """``n_eval`` fixed latent draws and the held-out digits."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1_000_003)
        z = torch.randn(self.options.n_eval, self.options.latent_dim, generator=gen, dtype=torch.float64)
        return {"x_min": z.to(self.ref), "real": digit_images()[2].to(self.ref)}

    def extra_metrics(self, params: Params, batch: Batch) -> dict[str, float]:
        """``fid``: Fréchet distance of ``G_θ(z)`` to the held-out digits; ``classes_covered``;
        ``d_distance``: mean ``|D(x) − ½|`` over ``real ∪ fake``."""
        with torch.no_grad():
            fake = functional_call(self.min_map, params[0], (batch["x_min"],))
            if not bool(torch.isfinite(fake).all()):
                return {"fid": float("nan"), "classes_covered": float("nan"), "d_distance": float("nan")}
            logits = functional_call(self.max_map, params[1], (self.max_support(fake, batch),))
            m = digit_metrics()
            return {"fid": m.frechet(fake.cpu(), batch["real"].cpu()),
                    "classes_covered": float(m.covered(fake.cpu(), self.options.class_share)),
                    "d_distance": float((torch.sigmoid(logits) - 0.5).abs().mean())}


    def describe(self) -> dict[str, object]:
        return {**super().describe(), "arch": self.options.arch}


__all__ = ["DigitMetrics", "DigitsGAN", "DigitsGANOptions", "digit_images", "digit_metrics"]
