"""Games: the function-space payoffs and strategy maps, and the game registry."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..device import DEFAULT_DTYPE, resolve_device, resolve_dtype
from ..plugins import is_spec, load_object
from ..registry import OptionError, Registry, build_options, check_mapping, check_name, check_seed
from .base import Batch, Game, Params, seeded
from .bilinear import Bilinear
from .digits import DigitsGAN
from .discrete_gan import DiscreteGAN
from .gan import GAN
from .matching_pennies import MatchingPennies
from .matrix import RPS, MatrixGame
from .openspiel import OpenSpielGame


@dataclasses.dataclass
class NoOptions:
    """The options of a game that takes none."""


class GameRegistry(Registry[type[Game]]):
    """The game table; a name of the form ``file.py:Class`` / ``package.module:Class`` is a game
    defined outside the package, imported and registered under that name on first lookup (so the
    CLI, :func:`make_game`, checkpoints and resumed runs all accept it)."""

    def __getitem__(self, name: str) -> type[Game]:
        if name not in self._entries and is_spec(name):
            cls = check_game_class(load_object(name, "game"), name)
            if cls.name == Game.name:  # unnamed: records name it by its spec, so a resumed run finds it
                cls.name = name
            self._entries[name] = cls
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._entries and is_spec(name):
            try:
                self[name]
            except OptionError:
                return False
        return super().__contains__(name)


def check_game_class(cls: Any, where: str) -> type[Game]:
    """``cls`` if it is a :class:`Game` subclass the registry can build (``cls(options, seed=…)``); a
    class without ``Options`` gets :class:`NoOptions`."""
    if not (isinstance(cls, type) and issubclass(cls, Game)):
        raise OptionError(f"game {where!r}: expected a subclass of hcc.Game, got {cls!r}")
    if not hasattr(cls, "Options"):
        cls.Options = NoOptions
    if not dataclasses.is_dataclass(cls.Options):
        raise OptionError(f"game {where!r}: expected Options to be a dataclass, got {cls.Options!r}")
    return cls


GAMES: GameRegistry = GameRegistry("game")


def register_game(cls: type[Game] | None = None, *, name: str | None = None) -> Any:
    """Class decorator: register a :class:`Game` subclass under ``name`` (default: its ``name``).

    >>> @register_game
    ... class Duel(Game):
    ...     name = "duel-doc"
    ...     def payoff(self, F, G, batch): ...
    >>> "duel-doc" in GAMES
    True
    """

    def deco(c: type[Game]) -> type[Game]:
        key = name or c.name
        if key == Game.name:
            raise OptionError(f"register_game: expected a class with its own `name`, got {c.__name__} without one")
        return GAMES.register(key, check_game_class(c, key))

    return deco(cls) if cls is not None else deco


for _g in (Bilinear, MatchingPennies, RPS, MatrixGame, GAN, DigitsGAN, DiscreteGAN, OpenSpielGame):
    register_game(_g)


def make_game(
    name: str,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    *,
    dtype: str | torch.dtype = DEFAULT_DTYPE,
    device: str | torch.device = "cpu",
) -> Game:
    """Build the named game; ``options`` are parsed into its options dataclass.

    ``name`` is a registered game or a game defined outside the package,
    ``path/to/file.py:Class`` or ``package.module:Class`` (a :class:`Game` subclass).

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
    "GAMES", "GAN", "RPS", "Batch", "Bilinear", "DigitsGAN", "DiscreteGAN", "Game", "GameRegistry", "MatchingPennies",
    "MatrixGame", "NoOptions", "OpenSpielGame", "Params", "make_game", "register_game", "seeded",
]
