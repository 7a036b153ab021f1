"""Strategy maps: small networks and the identity parametrization.

Heads (softmax, sigmoid) are separate modules at the end of an ``nn.Sequential``
so curvature code can split the linear body from the output nonlinearity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
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


class Direct(nn.Module):
    """The identity parametrization: the parameter *is* the strategy, ``F_θ(x) = θ``.

    Returns ``θ`` broadcast to one row per support point: shape ``(n, dim)``.
    """

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(init.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.theta.expand(x.shape[0], *self.theta.shape)
