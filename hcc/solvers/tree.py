"""Tiny pytree helpers for parameter pairs ``(θ, φ)`` (tuples of dicts of tensors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

tree_map = pytree.tree_map


def axpy(a: float | Tensor, x: Any, y: Any) -> Any:
    """``y + a·x`` leaf-wise."""
    return tree_map(lambda xi, yi: yi + a * xi, x, y)


def add(x: Any, y: Any) -> Any:
    return tree_map(torch.add, x, y)


def sub(x: Any, y: Any) -> Any:
    return tree_map(torch.sub, x, y)


def scale(a: float | Tensor, x: Any) -> Any:
    return tree_map(lambda xi: a * xi, x)


def zeros_like(x: Any) -> Any:
    return tree_map(torch.zeros_like, x)


def sq_norm(x: Any) -> Tensor:
    """``‖x‖²`` summed over all leaves."""
    leaves = pytree.tree_leaves(x)
    return sum((leaf.pow(2).sum() for leaf in leaves), torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device))


def all_finite(x: Any) -> bool:
    return all(bool(torch.isfinite(leaf).all()) for leaf in pytree.tree_leaves(x))


def per_player(fn: Callable[[dict[str, Tensor]], dict[str, Tensor]], x: Any) -> Any:
    """Apply ``fn`` to each player's dict separately."""
    return tuple(fn(p) for p in x)
