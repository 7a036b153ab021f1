"""Games: the function-space payoffs and strategy maps, and the game registry."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..device import DEFAULT_DTYPE, resolve_device, resolve_dtype
from ..registry import OptionError, Registry, build_options, check_mapping, check_name, check_seed
from .base import Batch, Game, Params, seeded
from .bilinear import Bilinear
from .gan import GAN
from .matching_pennies import MatchingPennies
from .matrix import RPS, MatrixGame
from .openspiel import OpenSpielGame

GAMES: Registry[type[Game]] = Registry("game")
for _g in (Bilinear, MatchingPennies, RPS, MatrixGame, GAN, OpenSpielGame):
    GAMES.register(_g.name, _g)


def make_game(
    name: str,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    *,
    dtype: str | torch.dtype = DEFAULT_DTYPE,
    device: str | torch.device = "cpu",
) -> Game:
    """Build the named game; ``options`` are parsed into its options dataclass.

    The game is built in float32 from ``seed`` (so a seed gives the same game in every
    dtype) and cast to ``dtype`` on ``device``: float64 by default, as :func:`hcc.run` and
    the CLI run. Bad names, options or seeds raise :class:`~hcc.registry.OptionError`, as does
    a game too large for memory.

    >>> game = make_game("rps", {"lam": 0.1}, seed=0)
    """
    cls = GAMES[check_name("game", name)]
    options = build_options(cls.Options, check_mapping("game_options", options), owner=f"game {name!r}")
    check_seed("seed", seed)
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    try:
        return cls(options, seed=seed).to(device=dev, dtype=dt)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not re.search(r"alloc|overflow", str(e), re.I):
            raise
        size = re.search(r"allocate (\d+) bytes", str(e))
        why = f"allocating {int(size.group(1)):,} bytes failed" if size else "out of memory"
        raise OptionError(f"game {name!r}: expected options that fit in memory, got {_changed(options)} "
                          f"({why})") from None


def _changed(options: Any) -> str:
    """The options that differ from their defaults, as ``k=v`` text."""
    default = type(options)()
    diff = [f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(default, f.name)]
    return ", ".join(diff) or "the defaults"


__all__ = [
    "GAMES", "GAN", "RPS", "Batch", "Bilinear", "Game", "MatchingPennies", "MatrixGame", "OpenSpielGame", "Params",
    "make_game", "seeded",
]
