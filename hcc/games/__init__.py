"""Games: the function-space payoffs and strategy maps, and the game registry."""

from __future__ import annotations

from typing import Any

from ..registry import Registry, build_options
from .base import Batch, Game, Params, seeded
from .bilinear import Bilinear
from .gan import GAN
from .matching_pennies import MatchingPennies
from .matrix import RPS, MatrixGame
from .openspiel import OpenSpielGame

GAMES: Registry[type[Game]] = Registry("game")
for _g in (Bilinear, MatchingPennies, RPS, MatrixGame, GAN, OpenSpielGame):
    GAMES.register(_g.name, _g)


def make_game(name: str, options: dict[str, Any] | None = None, seed: int = 0) -> Game:
    """Build the named game; ``options`` are parsed into its options dataclass.

    >>> game = make_game("rps", {"lam": 0.1}, seed=0)
    """
    cls = GAMES[name]
    return cls(build_options(cls.Options, options, owner=f"game {name!r}"), seed=seed)


__all__ = [
    "GAMES", "GAN", "RPS", "Batch", "Bilinear", "Game", "MatchingPennies", "MatrixGame", "OpenSpielGame", "Params",
    "make_game", "seeded",
]
