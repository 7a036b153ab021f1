"""hcc: hidden convex-concave games and generalized natural-gradient flows in PyTorch.

Public API, grouped by concept:

- games: :data:`GAMES`, :func:`make_game`, :class:`Game`, :func:`register_game` (or name one
  outside the package as ``file.py:Class``)
- your own training loop: :class:`GameOptimizer` (``torch.optim``-style, on a game or two modules)
- solvers: :data:`SOLVERS`, :func:`make_solver`, :class:`Solver`, :data:`RULES`,
  :data:`PRECONDITIONERS`
- running: :func:`run` (by names, like the CLI), :func:`solve`, :class:`Result`,
  :func:`load_results` (every run of any saved folder), :class:`Checkpoint` (interrupt and resume)
- metrics: :func:`evaluate`
"""

__version__ = "0.1.0"

from .checkpoint import Checkpoint  # noqa: E402
from .games import GAMES, Game, make_game, register_game  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .optim import GameOptimizer  # noqa: E402
from .run import Result, load_results, run, solve  # noqa: E402
from .solvers import PRECONDITIONERS, RULES, SOLVERS, Solver, make_solver  # noqa: E402

__all__ = [
    # games
    "GAMES", "Game", "make_game", "register_game",
    # solvers
    "PRECONDITIONERS", "RULES", "SOLVERS", "Solver", "make_solver",
    # your own loop
    "GameOptimizer",
    # running
    "Checkpoint", "Result", "load_results", "run", "solve",
    # metrics
    "evaluate",
    "__version__",
]
