r"""Game optimizers for your own networks and your own training loop.

:class:`GameOptimizer` is the ``torch.optim``-style front end of every hcc solver (any named
solver or ``RULE+PRECOND``). It works in two modes:

- on a :class:`~hcc.games.base.Game` (built in, or your own subclass): ``opt.step()`` takes
  one solver step on the game's support and writes the new parameters into its maps; the
  trajectory is the one :func:`hcc.solve` follows (bitwise, same seed);
- on two ``nn.Module`` s with a **closure**, the way :class:`torch.optim.LBFGS` takes one:
  ``opt.step(closure)`` where ``closure()`` evaluates the game with the modules as they are
  and returns the payoff ``Ψ`` (a scalar tensor the min player minimizes and the max player
  maximizes) or the pair of losses ``(ℓ_min, ℓ_max)`` each player minimizes (a general-sum
  game, e.g. a non-saturating GAN). Do not call ``backward``: the solver evaluates the closure
  as often as its rule needs (twice for extragradient), each time with the parameters it
  queries swapped in by :func:`torch.func.functional_call`, and differentiates it itself.

The natural preconditioners need each player's **support**: the inputs its module's metric
``A = E[JᵀJ]`` averages over. By default they are captured from the closure (the first
positional argument of every call of the module, concatenated: a discriminator called on real
and fake samples gets both), at each query point; pass ``supports=(x_min, x_max)`` (tensors, or
a callable returning them) to fix them instead. The proximal rule (``exact-natgrad`` & co) needs
the game in function space, which a closure does not expose; on modules use the field solvers
(``eg+exact``, ``eg+cg``, ``eg+kfac``, …), or write a :class:`~hcc.games.base.Game`.

Functional form: :meth:`~hcc.solvers.Solver.init` and :meth:`~hcc.solvers.Solver.step` of
:func:`~hcc.solvers.make_solver` are pure functions of ``(game, params, state, batch)``, for
``torch.func`` users; :func:`hcc.batch.solve_batch` vmaps them over stacked instances.

>>> import torch
>>> from torch import nn
>>> from hcc import GameOptimizer
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> f, g = nn.Linear(2, 1).double(), nn.Linear(2, 1).double()
>>> x = torch.randn(8, 2, dtype=torch.float64)
>>> opt = GameOptimizer((f, g), "eg+exact", lr=0.1)
>>> psi = opt.step(lambda: (f(x) * g(x)).mean() + 0.05 * (f(x).pow(2).mean() - g(x).pow(2).mean()))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .games import NoOptions
from .games.base import Batch, Game, Params
from .registry import OptionError
from .solvers import Solver, make_solver
from .solvers.function_space import has_function_space

Closure = Callable[[], Any]
Supports = tuple[Tensor, Tensor] | Callable[[], tuple[Tensor, Tensor]]


class _Pair(nn.Module):
    """The two user modules as one, whose ``forward`` is the closure (so that
    :func:`~torch.func.functional_call` swaps both players' parameters in for one evaluation)."""

    def __init__(self, min_module: nn.Module, max_module: nn.Module) -> None:
        super().__init__()
        self.min_map, self.max_map = min_module, max_module
        self.closure: Closure | None = None

    def forward(self) -> Any:
        if self.closure is None:
            raise OptionError("GameOptimizer.step: expected a closure for a game on modules, got none")
        return self.closure()


class ModuleGame(Game):
    """A game given by two ``nn.Module`` s and a closure (module docstring); what
    :class:`GameOptimizer` builds from ``(min_module, max_module)``.

    ``payoff_of``/``player_losses`` evaluate the closure at the queried parameters; ``supports``
    are the fixed tensors given, or the inputs each module received in a closure evaluation at
    the queried parameters (no gradient).
    """

    name = "module-game"
    Options = NoOptions
    fixed_support = False  # the closure decides what each module sees

    def __init__(self, min_module: nn.Module, max_module: nn.Module, closure: Closure | None = None, *,
                 supports: Supports | None = None) -> None:
        for what, m in (("min_module", min_module), ("max_module", max_module)):
            if not isinstance(m, nn.Module):
                raise OptionError(f"GameOptimizer: expected {what} to be an nn.Module, got {type(m).__name__}")
        if min_module is max_module:
            raise OptionError("GameOptimizer: expected two different modules, got the same one twice")
        super().__init__(NoOptions(), seed=0)
        self.pair = _Pair(min_module, max_module)
        self.min_map, self.max_map = min_module, max_module
        self.fixed_supports = supports
        self.zero_sum = True  # per instance: set from what the closure returns
        if closure is not None:
            self.set_closure(closure)

    def set_closure(self, closure: Closure | None) -> Any:
        """Use ``closure`` from now on; evaluates it once at the modules' current parameters (no
        gradient), sets :attr:`zero_sum` from what it returns and returns that, detached."""
        self.pair.closure = closure
        if closure is None:
            return None
        with torch.no_grad():
            first = closure()
        if isinstance(first, Tensor) and first.numel() == 1:
            self.zero_sum = True
            return first.detach()
        self.zero_sum = False
        return tuple(t.detach() for t in _check_losses(first))

    def _call(self, params: Params) -> Any:
        theta, phi = params
        flat = {**{f"min_map.{k}": v for k, v in theta.items()}, **{f"max_map.{k}": v for k, v in phi.items()}}
        return functional_call(self.pair, flat, (), strict=False)

    def payoff_of(self, params: Params, batch: Batch) -> Tensor:
        out = self._call(params)
        if not (isinstance(out, Tensor) and out.numel() == 1):
            raise OptionError(f"closure: expected the payoff Ψ (a scalar tensor), got {_describe(out)}")
        return out.reshape(())

    def player_losses(self, params: Params, batch: Batch) -> tuple[Tensor, Tensor]:
        out = self._call(params)
        if isinstance(out, Tensor):
            out = out.reshape(())
            return out, -out
        return _check_losses(out)

    def strategies(self, params: Params, batch: Batch) -> tuple[Tensor, Tensor]:
        raise OptionError("a game on modules has no function-space strategies; write an hcc.Game for that")

    def supports(self, params: Params, batch: Batch) -> tuple[Tensor, Tensor]:
        if self.fixed_supports is not None:
            s = self.fixed_supports() if callable(self.fixed_supports) else self.fixed_supports
            if not (isinstance(s, tuple | list) and len(s) == 2 and all(isinstance(t, Tensor) for t in s)):
                raise OptionError(f"supports: expected two tensors (x_min, x_max), got {_describe(s)}")
            return s[0], s[1]
        with torch.no_grad(), _capture(self.min_map, self.max_map) as seen:
            self._call(params)
        return _joined(seen[0], "min_module"), _joined(seen[1], "max_module")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "min_module": type(self.min_map).__name__,
                "max_module": type(self.max_map).__name__}


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:120]


def _check_losses(out: Any) -> tuple[Tensor, Tensor]:
    ok = isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(t, Tensor) and t.numel() == 1 for t in out)
    if not ok:
        raise OptionError("closure: expected the payoff Ψ (a scalar tensor) or the two losses (ℓ_min, ℓ_max), "
                          f"got {_describe(out)}")
    return out[0].reshape(()), out[1].reshape(())


@contextlib.contextmanager
def _capture(*modules: nn.Module) -> Iterator[list[list[Tensor]]]:
    """The first positional input of every call of each module while the block runs."""
    seen: list[list[Tensor]] = [[] for _ in modules]
    handles = []
    for i, m in enumerate(modules):

        def hook(_m: nn.Module, args: tuple, i: int = i) -> None:
            if args and isinstance(args[0], Tensor):
                seen[i].append(args[0].detach())

        handles.append(m.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _joined(xs: list[Tensor], what: str) -> Tensor:
    if not xs:
        raise OptionError(f"supports: the closure never called the {what} on a tensor; pass supports=(x_min, x_max)")
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise OptionError(f"supports: the {what} was called on inputs of different shapes {sorted(shapes)}; "
                          "pass supports=(x_min, x_max)")
    return xs[0] if len(xs) == 1 else torch.cat(xs, 0)


class GameOptimizer:
    """One hcc solver on a game, driven step by step from your own loop (module docstring).

    Args:
        game: a :class:`~hcc.games.base.Game`, or ``(min_module, max_module)``.
        solver: a named solver or ``RULE+PRECOND`` (``hcc list solvers``); default
            ``exact-natgrad`` on a game, ``eg+exact`` on modules.
        lr: the step size (default: the solver's for this game; the ``"*"`` default for modules).
        options: options of the solver's rule or preconditioner (``{"damping": 0.1}``).
        supports: modules only: the inputs ``(x_min, x_max)`` of the metric, or a callable
            returning them (default: captured from the closure).
        seed: game only: the sampling stream of a stochastic game (default: the game's seed,
            as :func:`hcc.solve`).

    Attributes: ``solver`` (the :class:`~hcc.solvers.Solver`), ``game``, ``state`` (the solver
    state), ``last_info`` (what the last step measured: field evaluations, CG iterations, …).
    """

    def __init__(
        self,
        game: Game | tuple[nn.Module, nn.Module],
        solver: str | Solver | None = None,
        *,
        lr: float | None = None,
        options: dict[str, Any] | None = None,
        supports: Supports | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(game, Game):
            if supports is not None:
                raise OptionError("supports: a Game defines its own supports; expected supports=None")
            self.game, self.on_modules = game, False
        elif isinstance(game, tuple | list) and len(game) == 2:
            self.game, self.on_modules = ModuleGame(game[0], game[1], supports=supports), True
        else:
            raise OptionError(f"GameOptimizer: expected an hcc.Game or (min_module, max_module), got {_describe(game)}")
        if isinstance(solver, Solver):
            if lr is not None or options:
                raise OptionError("GameOptimizer: a built Solver carries its lr and options; expected neither")
            self.solver = solver
        else:
            name = solver or ("eg+exact" if self.on_modules else "exact-natgrad")
            self.solver = make_solver(name, self.game, lr=lr, options=options)
        if self.on_modules and self.solver.rule.name == "prox":
            raise OptionError(
                f"solver {self.solver.name!r}: the proximal rule steps in function space, which a closure does not "
                "expose; on modules use a field solver (eg+exact, eg+cg, eg+kfac, …) or write an hcc.Game "
                f"({has_function_space(self.game) or 'no fixed support'})"
            )
        self._gen = torch.Generator(device="cpu").manual_seed(self.game.seed if seed is None else seed)
        self._batch: Batch = {} if self.on_modules else self.game.sample_batch(self._gen)
        self.state: dict[str, Any] | None = None
        self.last_info: dict[str, Any] = {}
        self.steps = 0

    # -- parameters --------------------------------------------------------------------------
    def _modules(self) -> tuple[nn.Module, nn.Module]:
        return self.game.min_map, self.game.max_map

    def params(self) -> Params:
        """The players' current parameters (detached views of the modules')."""
        a, b = self._modules()
        return ({k: v.detach() for k, v in a.named_parameters()}, {k: v.detach() for k, v in b.named_parameters()})

    # -- the step ----------------------------------------------------------------------------
    def step(self, closure: Closure | None = None, batch: Batch | None = None) -> Tensor | tuple[Tensor, Tensor] | None:
        """One solver step; returns what the closure returned at the current point (detached),
        or ``None`` on a game without a closure.

        On modules ``closure`` is required (it is evaluated at every point the rule queries).
        On a game, ``batch`` replaces the game's own support for this step (default: the
        fixed support, or a fresh sample of a stochastic game, as :func:`hcc.solve` draws).
        """
        game = self.game
        first: Any = None
        if self.on_modules:
            if closure is None:
                raise OptionError("GameOptimizer.step: expected a closure returning Ψ or (ℓ_min, ℓ_max), got none")
            assert isinstance(game, ModuleGame)
            first = game.set_closure(closure)
        elif closure is not None:
            raise OptionError("GameOptimizer.step: a Game defines its own payoff; expected closure=None")
        if batch is None and not self.on_modules:
            if self.steps > 0 and game.stochastic:
                self._batch = game.sample_batch(self._gen)
            batch = self._batch
        params = self.params()
        if self.state is None:
            self.state = self.solver.init(game, params)
        try:
            new, self.state, self.last_info = self.solver.step(game, params, self.state, batch or {})
        finally:
            if self.on_modules:
                game.set_closure(None)  # type: ignore[union-attr]
        bad = [f"{('min', 'max')[i]}:{k}" for i, p in enumerate(new) for k, v in p.items()
               if not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(
                f"GameOptimizer.step: step {self.steps + 1} of {self.solver.name} produced non-finite parameters "
                f"({', '.join(bad[:4])}{', …' if len(bad) > 4 else ''}); the modules keep the step-{self.steps} "
                "parameters (try a smaller lr)")
        game.load_params(new)
        self.steps += 1
        return first

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The solver state, the step count and the sampling stream (not the modules' parameters:
        save those with the modules' own ``state_dict``)."""
        return {"state": self.state, "steps": self.steps, "rng": self._gen.get_state(),
                "solver": self.solver.name, "options": self.solver.options()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("solver") != self.solver.name:
            raise OptionError(f"load_state_dict: expected a state of solver {self.solver.name!r}, "
                              f"got one of {sd.get('solver')!r}")
        self.state, self.steps = sd["state"], int(sd["steps"])
        self._gen.set_state(sd["rng"])

    def __repr__(self) -> str:
        o = self.solver.options()
        return f"GameOptimizer({self.solver.name}, lr={o['lr']:.4g}, game={self.game.name}, steps={self.steps})"


__all__ = ["GameOptimizer", "ModuleGame"]
