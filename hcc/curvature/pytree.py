"""Pytree helpers: flat vectors, stacking and leaf-wise arithmetic on parameter trees.

A player's parameters are a dict ``{name: tensor}`` (the order of ``named_parameters()``),
both players' a pair of such dicts, a solver state any nesting of tuples, lists and dicts
with tensor leaves. Every flat vector in :mod:`hcc` is laid out by :func:`flatten`: the
leaves in pytree order (a dict's insertion order), each flattened row-major.

>>> import torch
>>> p = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
>>> v = flatten(p)
>>> v.shape, unflatten(v, p)["w"].shape
(torch.Size([8]), torch.Size([2, 3]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


# -- flat vectors -----------------------------------------------------------------------------------


def _leaves(tree: Any, names: Sequence[str] | None) -> list[Tensor]:
    return pytree.tree_leaves(tree) if names is None else [tree[k] for k in names]


def flatten(tree: Any, names: Sequence[str] | None = None) -> Tensor:
    """One vector from a pytree's leaves (or, for a dict, from the entries ``names`` in that order).

    An empty tree gives an empty vector."""
    leaves = _leaves(tree, names)
    return torch.cat([leaf.reshape(-1) for leaf in leaves]) if leaves else torch.zeros(0)


def unflatten(vec: Tensor, like: Any, names: Sequence[str] | None = None) -> Any:
    """The inverse of :func:`flatten`: views of ``vec`` shaped like ``like``'s leaves (a dict of
    the entries ``names`` when given)."""
    if names is not None:
        out, i = {}, 0
        for k in names:
            m = like[k].numel()
            out[k] = vec[i : i + m].reshape(like[k].shape)
            i += m
        return out
    leaves, spec = pytree.tree_flatten(like)
    parts, i = [], 0
    for leaf in leaves:
        parts.append(vec[i : i + leaf.numel()].reshape(leaf.shape))
        i += leaf.numel()
    return pytree.tree_unflatten(parts, spec)


def numel(tree: Any) -> int:
    """The number of entries over all leaves."""
    return sum(leaf.numel() for leaf in pytree.tree_leaves(tree))


# -- stacking -----------------------------------------------------------------------------------------


def stack(trees: Sequence[Any]) -> Any:
    """Stack K pytrees with the same structure leaf-wise along a new leading axis."""
    leaves, spec = zip(*(pytree.tree_flatten(t) for t in trees), strict=True)
    if any(s != spec[0] for s in spec):
        raise ValueError("stack: expected pytrees of one structure, got differing ones")
    return pytree.tree_unflatten([torch.stack(col) for col in zip(*leaves, strict=True)], spec[0])


def unstack(tree: Any, i: int) -> Any:
    """Instance ``i`` of a stacked pytree."""
    return pytree.tree_map(lambda x: x[i], tree)


# -- leaf-wise arithmetic ------------------------------------------------------------------------------


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


def dot(x: Any, y: Any) -> Tensor:
    """``⟨x, y⟩`` summed over all leaves."""
    xs, ys = pytree.tree_leaves(x), pytree.tree_leaves(y)
    return sum(((a * b).sum() for a, b in zip(xs, ys, strict=True)),
               torch.zeros((), dtype=xs[0].dtype, device=xs[0].device))


def sq_norm(x: Any) -> Tensor:
    """``‖x‖²`` summed over all leaves."""
    leaves = pytree.tree_leaves(x)
    return sum((leaf.pow(2).sum() for leaf in leaves), torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device))


def all_finite(x: Any) -> bool:
    return all(bool(torch.isfinite(leaf).all()) for leaf in pytree.tree_leaves(x))


__all__ = [
    "add", "all_finite", "axpy", "dot", "flatten", "numel", "scale", "sq_norm", "stack", "sub",
    "tree_leaves", "tree_map", "unflatten", "unstack", "zeros_like",
]
