"""Strategy maps: small networks, the identity and the functional (tabular) parametrization.

Heads (softmax, sigmoid) are separate modules at the end of an ``nn.Sequential``
so curvature code can split the linear body from the output nonlinearity.

A map whose parameters live on a constrained domain (:class:`Tabular`: a
probability simplex or ``[0, 1]``) has a ``project`` method; :meth:`Game.project
<hcc.games.base.Game.project>` applies it and the solvers call that after every
step and before every field evaluation, which makes every update rule its
projected variant.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..curvature.heads import MaskedSoftmax
from ..registry import OptionError
from .simplex import project_simplex

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def mlp(
    in_dim: int,
    width: int,
    depth: int,
    out_dim: int,
    activation: str = "tanh",
    head: nn.Module | None = None,
    out_scale: float = 1.0,
) -> nn.Sequential:
    """``in_dim → width (× depth hidden layers) → out_dim`` MLP, optional output head.

    ``out_scale`` multiplies the last layer's initial weights and bias: > 1 starts
    the strategies farther from the uniform / ½ point.
    """
    if activation not in ACTIVATIONS:
        raise OptionError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), ACTIVATIONS[activation]()]
        d = width
    last = nn.Linear(d, out_dim)
    with torch.no_grad():
        last.weight.mul_(out_scale)
        last.bias.mul_(out_scale)
    layers.append(last)
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers)


NETWORK_HELP = ("strategy network: mlp (width/depth/activation/out_scale) or a factory 'file.py:make' / "
                "'package.module:make', make(input_dim, n_outputs) -> nn.Module of logits (the head is appended)")


def check_network(network: str) -> None:
    """``network`` is ``"mlp"`` or an importable factory spec (:func:`hcc.plugins.is_spec`)."""
    from ..plugins import is_spec

    if network != "mlp" and not is_spec(network):
        raise OptionError(f"network: expected 'mlp' or a factory 'file.py:make' / 'package.module:make', "
                          f"got {network!r}")


def strategy_network(
    network: str, in_dim: int, width: int, depth: int, out_dim: int, activation: str, head: nn.Module,
    out_scale: float,
) -> nn.Sequential:
    """A finite game's strategy map: :func:`mlp`, or ``nn.Sequential(make(in_dim, out_dim), head)`` for a
    user factory ``network = "file.py:make"`` (any ``nn.Module`` from inputs ``(n, in_dim)`` to logits
    ``(n, out_dim)``; ``width``/``depth``/``activation``/``out_scale`` are the MLP's and not passed on)."""
    if network == "mlp":
        return mlp(in_dim, width, depth, out_dim, activation, head, out_scale)
    from ..plugins import load_object

    make = load_object(network, "network")
    if not callable(make):
        raise OptionError(f"network {network!r}: expected a callable make(input_dim, n_outputs), got {make!r}")
    try:
        body = make(in_dim, out_dim)
    except Exception as e:
        raise OptionError(f"network {network!r}: make({in_dim}, {out_dim}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(body, nn.Module):
        raise OptionError(f"network {network!r}: expected make() to return an nn.Module, got {type(body).__name__}")
    with torch.no_grad():
        out = body(torch.zeros(2, in_dim))
    if not (isinstance(out, Tensor) and tuple(out.shape) == (2, out_dim)):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise OptionError(f"network {network!r}: expected outputs of shape (n, {out_dim}) for inputs (n, {in_dim}), "
                          f"got {got}")
    return nn.Sequential(body, head)


class Direct(nn.Module):
    """The identity parametrization: the parameter *is* the strategy, ``F_θ(x) = θ``.

    Returns ``θ`` broadcast to one row per support point: shape ``(n, dim)``.
    """

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(init.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.theta.expand(x.shape[0], *self.theta.shape)


Domain = Literal["simplex", "interval"]
DOMAINS: tuple[str, ...] = ("simplex", "interval")


class Tabular(nn.Module):
    r"""The functional parametrization on a finite domain: the parameter *is* the function.

    With support points ``x_1, …, x_n`` (buffer ``points``) and the table
    ``θ = values ∈ R^{n×k}`` (one row per point),

    .. math::

        F_θ(x_i) = θ_i, \qquad θ_i ∈ D,

    where ``D`` is the probability simplex ``Δ_k`` (``domain="simplex"``: mixed
    strategies) or ``[0, 1]^k`` (``domain="interval"``: matching pennies' ``f``).
    A query ``x`` is matched to its nearest support point (exact on the support; a
    lookup keeps per-sample evaluation, hence ``vmap(jacrev)`` Jacobians, correct).

    Its per-sample Jacobian is a selector, ``J = I_{nk}``, so the metric is
    ``A = JᵀJ/n = I/n``: plain gradient steps on this map *are* gradient steps in
    function space (with ``n = 1`` the natural and the plain direction coincide), and
    with :meth:`project` (the Euclidean projection ``Π_D``) applied after each step
    and at each extrapolation point, GDA / extragradient / … on it are projected
    GDA / extragradient / … on the function-space game ``L(F, G)``.
    """

    def __init__(self, values: Tensor, points: Tensor, domain: Domain = "simplex") -> None:
        super().__init__()
        if domain not in DOMAINS:
            raise ValueError(f"domain: expected one of {', '.join(DOMAINS)}, got {domain!r}")
        if values.dim() != 2 or points.dim() != 2 or values.shape[0] != points.shape[0]:
            raise ValueError(
                f"Tabular: expected values (n, k) and points (n, d) with the same n, "
                f"got {tuple(values.shape)} and {tuple(points.shape)}"
            )
        self.domain = domain
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("points", points.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        # nearest support point: (m, n) squared distances → row of the table
        idx = (x[:, None, :] - self.points[None]).pow(2).sum(-1).argmin(-1)
        return self.values[idx]

    def project(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""``Π_D`` of a parameter dict: ``argmin_{y ∈ D} ‖y − θ‖`` row by row."""
        v = params["values"]
        v = project_simplex(v) if self.domain == "simplex" else v.clamp(0.0, 1.0)
        return {**params, "values": v}


@torch.no_grad()
def tabulate(module: nn.Module, points: Tensor, domain: Domain) -> Tabular:
    """The functional parametrization of ``module`` on ``points``: a :class:`Tabular` map
    whose table is ``module``'s current values there, projected onto ``domain``."""
    table = Tabular(module(points).reshape(points.shape[0], -1), points, domain)
    table.values.copy_(table.project({"values": table.values})["values"])
    return table


class KeepMask(nn.Module):
    """``[x | m] ↦ [body(x) | m]``: a body that sees the first ``n_features`` columns of its
    input and passes the rest (a legal-action mask) through to a :class:`MaskedSoftmax`."""

    def __init__(self, body: nn.Module, n_features: int) -> None:
        super().__init__()
        self.body, self.n_features = body, n_features

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.body(x[..., : self.n_features]), x[..., self.n_features :]], -1)


def masked_policy(n_features: int, n_actions: int, width: int, depth: int, activation: str = "tanh",
                  out_scale: float = 1.0) -> nn.Sequential:
    """``[features | legal mask] ↦`` a distribution over the legal actions: an :func:`mlp` on
    the features, then a :class:`MaskedSoftmax` head (input width ``n_features + n_actions``)."""
    body = mlp(n_features, width, depth, n_actions, activation, None, out_scale)
    return nn.Sequential(KeepMask(body, n_features), MaskedSoftmax())
