"""The loop: steps, tolerance, divergence and stall guard, logging, checkpoints, the result record.

Data flows one way: CLI → :func:`run` → :class:`~hcc.solvers.Solver` → game.
A run ends (``V``: the game's :attr:`~hcc.games.base.Game.progress_metric`, the Lyapunov function or,
for games whose equilibria are not unique, the duality gap)

- ``converged`` when ``V ≤ tol`` (unless ``stop_at_tol=False``);
- ``max_steps`` after ``steps`` steps;
- ``diverged`` at the first step whose iterate or ``V`` is NaN/inf, or whose ``V`` exceeds
  ``diverge_at``;
- ``stationary`` (games without ``V`` only) when the strategies are frozen as below and the field
  norm ``|v|`` is at most ``tol`` (but above the ``1e-30`` of a saturated map): a zero of the field,
  the best a run can certify without a known equilibrium;
- ``stalled`` when the iterate is frozen away from the equilibrium: over the last
  ``stall_window`` steps ``V`` (games without ``V``: the payoff at the logged steps) varied
  by at most ``stall_rtol`` relative to its value, while ``V > tol``. This is how a huge
  step shows on a bounded game: the strategies saturate, the field through the softmax
  dies (``|v| ≈ 1e-79``) and nothing moves again, with ``V`` stuck at its maximum.

The guard works in function space on purpose: growing *parameters* are no failure (at a
boundary equilibrium the logits legitimately run to ±∞ while the strategies converge),
and a fast solver's ``V`` changes by decades per step, far from frozen. The thresholds
are :class:`GuardOptions` (``--guard key=value`` on the command line).

In every case the :class:`Result` keeps everything recorded up to the last step. With a
:class:`~hcc.checkpoint.Checkpoint` the loop saves its full state at an interval and on
SIGINT/SIGTERM, and resumes from it bit for bit; with ``history_csv`` it streams the
history as it is produced.
"""

from __future__ import annotations

import collections
import contextlib
import math
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import Checkpoint, global_rng_state, set_global_rng_state
from .curvature.pytree import all_finite, sq_norm, tree_map
from .device import DEFAULT_DTYPE, DTYPES, resolve_device, resolve_dtype
from .games import Game, Params, make_game
from .metrics import evaluate, progress_value
from .records import (
    HistoryStream,
    atomic_write,
    blank_nonfinite,
    jsonable,
    read_csv_rows,
    read_record,
    save_figure,
    write_history_csv,
    write_json,
)
from .registry import OptionError, build_options, check_mapping, check_name, check_number, check_positive, check_seed
from .registry import opt as _opt
from .solvers import Solver, make_solver
from .solvers.oracle import vector_field

_jsonable = jsonable  # the name compare/sweep used

#: statuses of a run that ended without failing, and of one that failed (exit code 3 in the CLI)
OK_STATUSES = ("converged", "stationary", "max_steps")
FAILED_STATUSES = ("diverged", "stalled")
#: a field norm at or below this on a frozen iterate is a saturated (dead) map, not a stationary point
DEAD_FIELD = 1e-30


@dataclass
class GuardOptions:
    """When a run is stopped as failed (module docstring); ``--guard key=value`` in the CLI."""

    diverge_at: float = _opt(1e12, "diverged when V exceeds this", domain="positive")
    stall_window: int = _opt(20, "steps over which a frozen iterate is detected (0: never stalled)")
    stall_rtol: float = _opt(1e-10, "stalled when V (no V: the payoff) varies by at most this, relative, "
                                    "over the window, while V > tol", domain="nonnegative")

    def validate(self) -> None:
        if self.stall_window < 0:
            raise OptionError(f"stall_window: expected an integer ≥ 0, got {self.stall_window}")


def guard_options(guard: GuardOptions | Mapping[str, Any] | None) -> GuardOptions:
    """:class:`GuardOptions` from an instance, a mapping (strings parsed) or ``None`` (the defaults)."""
    if isinstance(guard, GuardOptions):
        return guard
    return build_options(GuardOptions, check_mapping("guard", guard), owner="the guard")


def is_frozen(window: torch.Tensor, rtol: float, batched: bool = False) -> torch.Tensor:
    """``window``: a monitored value (a scalar or a tensor) over a full stall window along dim 0,
    oldest first, with the instances along dim 1 if ``batched``. True (per instance) where its
    largest change over the window is at most ``rtol`` times its largest magnitude at the end."""
    span = (window.amax(0) - window.amin(0)).abs()
    last = window[-1].abs()
    if batched:
        return span.reshape(span.shape[0], -1).amax(1) <= rtol * last.reshape(last.shape[0], -1).amax(1)
    return span.max() <= rtol * last.max()


#: what each monitored quantity is, for the stall message
_MONITORS = {"V": "V", "F": "the min player's strategies F", "G": "the max player's strategies G"}


@dataclass
class Result:
    """One run's record, as written to ``result.json`` (``params``, the final iterate, goes to
    ``params.pt`` instead)."""

    game: str
    game_options: dict[str, Any]
    solver: str
    solver_options: dict[str, Any]
    seed: int
    steps_run: int = 0
    converged: bool | None = None
    steps_to_tol: int | None = None
    tol: float | None = None
    status: str = "running"  # converged | stationary | max_steps | diverged | stalled (| interrupted: read back)
    diverged_at: int | None = None
    stalled_at: int | None = None
    message: str = ""
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    device: str = "cpu"
    dtype: str = "float64"
    versions: dict[str, str] = field(default_factory=dict)
    game_info: dict[str, Any] = field(default_factory=dict)
    #: the resolved settings: steps, log_every, stop_at_tol and the guard's thresholds
    settings: dict[str, Any] = field(default_factory=dict)
    #: the final iterate (the last sane one of a diverged run); not part of the JSON record
    params: Any = field(default=None, repr=False, compare=False)

    @property
    def failed(self) -> bool:
        """True if the run diverged or stalled."""
        return self.status in FAILED_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return jsonable({f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"})

    def save(self, out: str | Path, plot: bool = True) -> Path:
        """Write ``result.json``, ``history.csv``, ``params.pt`` (the final iterate) and, if ``plot``,
        the decay plot into ``out``; every file atomically."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_history_csv(self.history, out / "history.csv")
        if self.params is not None:
            params = tree_map(lambda x: x.detach().cpu(), self.params)
            atomic_write(out / "params.pt", lambda tmp: torch.save(params, tmp))
        if plot and self.history:
            from .plots import run_figure

            save_figure(run_figure(self), out / "lyapunov.png", dpi=150)
        write_json(out / "result.json", "solve", self.to_dict())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every field, values as they are (NaN kept, ``params`` included): what a checkpoint stores."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Result:
        """The record :meth:`state_dict` saved."""
        return cls(**dict(state))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        """A record from its JSON form (unknown keys ignored)."""
        names = {f.name for f in fields(cls)} - {"params"}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """The run saved at ``path`` (an ``hcc solve`` folder or its ``result.json``; an unfinished one
        comes back from its streamed ``history.csv`` with status ``interrupted``). Folders holding
        several runs raise a one-line error pointing to :func:`load_results`."""
        runs = load_results(path)
        if len(runs) != 1:
            rec = read_record(path)
            raise OptionError(f"{path}: expected the folder of one run (hcc solve), got an hcc {rec.kind} folder "
                              f"holding {len(runs)} runs; read it with hcc.load_results")
        return runs[0]


def load_results(path: str | Path) -> list[Result]:
    """Every run saved at ``path``, whichever command wrote it: ``solve`` (one), ``solve --seeds``
    (one per seed), ``sweep`` (one per instance, summaries without histories), ``compare`` (every
    run); an unfinished ``solve`` from its checkpoint spec and streamed ``history.csv``."""
    rec = read_record(path)
    if not rec.finished:
        if rec.kind != "solve":
            raise OptionError(f"{path}: expected a finished run, got an unfinished hcc {rec.kind} (in progress or "
                              f"interrupted); finish it with `hcc resume {rec.path}`")
        return [_unfinished_solve(rec.path, rec.data.get("args", {}))]
    if rec.kind == "solve":
        return [Result.from_dict(rec.data)]
    if rec.kind in ("seeds", "sweep"):
        return [Result.from_dict(r) for r in rec.data["records"]]
    if rec.kind == "compare":
        from .compare import Comparison

        cmp = Comparison.load(rec.path)
        return [r for name in cmp.solvers for r in cmp.results[name]]
    raise OptionError(f"{path}: expected a folder of runs, got an hcc {rec.kind} folder (no runs to load)")


def _unfinished_solve(folder: Path, args: Mapping[str, Any]) -> Result:
    hist = read_csv_rows(folder / "history.csv") if (folder / "history.csv").is_file() else []
    return Result(game=str(args.get("game", "")), game_options=dict(args.get("game_options") or {}),
                  solver=str(args.get("solver", "")), solver_options={"lr": args.get("lr")},
                  seed=int(args.get("seed") or 0), tol=args.get("tol"), status="interrupted",
                  steps_run=int(hist[-1]["step"]) if hist else 0, history=hist,  # type: ignore[arg-type]
                  message=f"unfinished: continue with `hcc resume {folder}`")


# -- the loop ----------------------------------------------------------------------------------


class _Stall:
    """The stall test over the monitored values (``{"V": V}``, or without V the players' strategies
    ``{"F": F, "G": G}`` on the evaluation batch) since the last record at or before ``t − window``.

    :meth:`add` returns ``{name: frozen}`` (a bool, or a ``(K,)`` bool tensor for a batch) once the
    window is full, else ``None``.
    """

    def __init__(self, window: int, rtol: float, batched: bool = False,
                 points: list[tuple[int, dict[str, Any]]] | None = None) -> None:
        self.window, self.rtol, self.batched = window, rtol, batched
        self.points: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(points or [])

    def add(self, t: int, values: dict[str, Any]) -> dict[str, Any] | None:
        if self.window <= 0:
            return None
        self.points.append((t, values))
        while len(self.points) > 1 and self.points[1][0] <= t - self.window:
            self.points.popleft()
        if self.points[0][0] > t - self.window:
            return None
        out = {}
        for name in values:
            vals = [p[name] if isinstance(p[name], torch.Tensor) else torch.tensor(p[name], dtype=torch.float64)
                    for _, p in self.points]
            frozen = is_frozen(torch.stack(vals), self.rtol, self.batched)
            out[name] = frozen if self.batched else bool(frozen)
        return out

    def state(self) -> list[list[Any]]:
        return [[t, v] for t, v in self.points]


def _monitored(game: Game, params: Params, batch: Any, V: float | None) -> dict[str, Any]:
    """What the stall test watches: V, or (games without V) both players' strategies."""
    if V is not None:
        return {"V": V}
    with torch.no_grad():
        F, G = game.strategies(params, batch)
    return {"F": F.detach(), "G": G.detach()}


def solve(
    game: Game,
    solver: Solver,
    *,
    steps: int | None = None,
    tol: float = 1e-6,
    seed: int | None = None,
    log_every: int | None = None,
    stop_at_tol: bool = True,
    guard: GuardOptions | Mapping[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
    history_csv: str | Path | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    callback: Callable[[int, Params], None] | None = None,
) -> Result:
    """Run ``solver`` on ``game`` (already on its device/dtype) and return the record.

    ``history`` holds one row per logged step (step 0 is the initial point): the metrics of
    the iterate after that step plus what the step measured. ``V`` is checked every step
    for the tolerance and the guard (module docstring). ``seed`` seeds the sampling stream
    (default: the game's own seed) and is the seed recorded. The game is not changed: every
    call starts from its initial parameters, and the final iterate is ``result.params``.

    ``checkpoint``: save the full state (parameters, solver state, RNG states, history) at its
    interval and on SIGINT/SIGTERM (then raise :class:`~hcc.checkpoint.Interrupted`); if it
    holds a saved state of this run, continue from it (bitwise the uninterrupted run).
    ``history_csv``: stream the history there, one flushed row at a time.
    ``callback(step, params)`` sees the iterate at every logged step (e.g. to keep generator
    samples); a callback with ``state_dict()``/``load_state_dict()`` is checkpointed too.
    ``progress(step, row)`` sees the logged row.
    """
    if not isinstance(game, Game):
        raise OptionError(f"game: expected a Game (hcc.make_game), got {type(game).__name__}")
    if not isinstance(solver, Solver):
        raise OptionError(f"solver: expected a Solver (hcc.make_solver), got {type(solver).__name__}")
    steps = game.default_steps if steps is None else steps
    log_every = game.default_log_every if log_every is None else log_every
    for name, value in (("steps", steps), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{name}: expected a positive integer, got {type(value).__name__} {value!r}")
        check_positive(name, value)
    check_positive("tol", check_number("tol", tol, allow_none=False))
    seed = game.seed if seed is None else check_seed("seed", seed)
    g = guard_options(guard)
    p0 = next(iter(game.parameters()))
    res = Result(
        game=game.name, game_options=asdict(game.options), solver=solver.name, solver_options=solver.options(),
        seed=seed, tol=tol, device=str(p0.device), dtype=str(p0.dtype).replace("torch.", ""),
        versions={"hcc": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
        game_info=game.describe(),
        settings={"steps": steps, "log_every": log_every, "stop_at_tol": stop_at_tol, "guard": asdict(g)},
    )
    fingerprint = jsonable({k: getattr(res, k) for k in ("game", "game_options", "solver", "solver_options", "seed",
                                                         "tol", "device", "dtype", "game_info")}
                           | {k: v for k, v in res.settings.items() if k != "steps"})
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = game.init_params()
    batch = game.sample_batch(gen)
    state = solver.init(game, params)
    eval_batch = game.eval_batch() if hasattr(game, "eval_batch") else batch
    t0 = time.perf_counter()
    step_time, wall_before = 0.0, 0.0
    stall = _Stall(g.stall_window, g.stall_rtol)

    def record(t: int, info: dict[str, Any]) -> dict[str, float]:
        row = {"step": t, "time_s": step_time, **evaluate(game, params, eval_batch)}
        row.update({k: float(v) for k, v in info.items() if isinstance(v, (int, float, torch.Tensor))})
        res.history.append(row)
        if stream is not None:
            stream.append(row)
        if callback is not None:
            callback(t, params)
        return row

    metric = game.progress_metric  # "lyapunov" (V) unless the game stops on its duality gap
    name = "V" if metric == "lyapunov" else metric
    saved = checkpoint.state if checkpoint is not None else None
    stream = None
    if saved is not None:
        if saved.get("fingerprint") != fingerprint:
            raise OptionError(f"checkpoint in {checkpoint.out}: expected a saved state of this run "  # type: ignore
                              f"({res.game} x {res.solver}, seed {seed}), got one of another run or settings")
        t, params, state = saved["step"], saved["params"], saved["solver_state"]
        gen.set_state(saved["gen"])
        set_global_rng_state(saved["torch_rng"])
        res.history, res.steps_to_tol = list(saved["history"]), saved["steps_to_tol"]
        step_time, wall_before = saved["step_time"], saved["wall_time_s"]
        stall = _Stall(g.stall_window, g.stall_rtol, points=[tuple(p) for p in saved["stall"]])  # type: ignore[misc]
        if callback is not None and hasattr(callback, "load_state_dict"):
            callback.load_state_dict(saved["callback"])
        if history_csv is not None:
            stream = HistoryStream(history_csv, res.history)
    else:
        stream = HistoryStream(history_csv) if history_csv is not None else None
        t = 0
        row = record(0, {})
        if metric in row and row[metric] <= tol:
            res.steps_to_tol = 0
    has_V = metric in res.history[0]

    def snapshot() -> dict[str, Any]:
        return {
            "fingerprint": fingerprint, "step": t, "params": params, "solver_state": state, "gen": gen.get_state(),
            "torch_rng": global_rng_state(), "history": res.history, "steps_to_tol": res.steps_to_tol,
            "step_time": step_time, "wall_time_s": wall_before + time.perf_counter() - t0,
            "stall": stall.state(),
            "callback": callback.state_dict() if callback is not None and hasattr(callback, "state_dict") else None,
        }

    with contextlib.ExitStack() as stack:
        if checkpoint is not None:
            stack.enter_context(checkpoint.signals())
        if stream is not None:
            stack.callback(stream.close)
        while t < steps and not (stop_at_tol and res.steps_to_tol is not None):
            t += 1
            if game.stochastic:
                batch = game.sample_batch(gen)
            sane = params
            ts = time.perf_counter()
            failed = None
            try:
                params, state, info = solver.step(game, params, state, batch)
            except torch.linalg.LinAlgError as e:  # a solve on a non-finite or degenerate system: diverged
                failed, params, info = f"a linear solve failed ({str(e).splitlines()[0][:100]})", sane, {}
            step_time += time.perf_counter() - ts
            V = progress_value(game, params, eval_batch) if has_V and failed is None else None
            finite = failed is None and all_finite(params)
            if not finite or (V is not None and not (math.isfinite(V) and V <= g.diverge_at)):
                what = failed or ("non-finite parameters" if not finite
                                  else f"{name} = {V:.3g} beyond {g.diverge_at:.3g}")
                res.status, res.diverged_at, res.message = "diverged", t, f"diverged at step {t}: {what}"
                bad = {"step": t, "time_s": step_time, **({metric: V} if V is not None else {}),
                       "param_norm": math.sqrt(float(sq_norm(params)))}
                res.history.append(bad)
                if stream is not None:
                    stream.append(bad)
                params = sane
                break
            if V is not None and V <= tol and res.steps_to_tol is None:
                res.steps_to_tol = t
            last = t == steps or (res.steps_to_tol is not None and stop_at_tol)
            row = record(t, info) if t % log_every == 0 or last else None
            if row is not None and progress is not None:
                progress(t, row)
            frozen = stall.add(t, _monitored(game, params, eval_batch, V)) if has_V or row is not None else None
            stuck = [name for name, f in (frozen or {}).items() if f]
            if stuck and (V is None or V > tol):
                row = row or record(t, info)
                res.status, res.message = frozen_status(t, g, stuck[0], V, _field_norm(game, params, eval_batch, row),
                                                        tol)
                res.stalled_at = t if res.status == "stalled" else None
                break
            if not last and checkpoint is not None:
                checkpoint.poll(snapshot, f"step {t} of {steps}")
    res.steps_run = t
    res.wall_time_s = wall_before + time.perf_counter() - t0
    res.converged = (res.steps_to_tol is not None) if has_V else None
    if res.status == "running":
        res.status = "converged" if res.converged else "max_steps"
        res.message = (
            f"{name} ≤ {tol:g} after {res.steps_to_tol} steps" if res.converged
            else f"ran {t} steps" + (f" without reaching {name} ≤ {tol:g}" if has_V else "")
        )
    # a diverged run's summary is its last sane record, the one before the divergence row
    res.final = dict(res.history[-1] if res.status != "diverged" else res.history[-2] if len(res.history) > 1 else {})
    res.params = params
    return res


def _field_norm(game: Game, params: Params, batch: Any, row: Mapping[str, float]) -> float:
    if "field_norm" in row:
        return float(row["field_norm"])
    return math.sqrt(float(sq_norm(vector_field(game, params, batch))))


def frozen_status(t: int, g: GuardOptions, name: str, V: float | None, field_norm: float, tol: float
                  ) -> tuple[str, str]:
    """``(status, message)`` of a run frozen at step ``t``: ``stationary`` for a game without ``V``
    whose field norm is at most ``tol`` (and above :data:`DEAD_FIELD`), else ``stalled``."""
    if V is None and DEAD_FIELD < field_norm <= tol:
        return "stationary", (f"stationary at step {t}: the strategies varied by at most {g.stall_rtol:g} (relative) "
                              f"over the last {g.stall_window} steps and the field |v| = {field_norm:.3g} ≤ tol = "
                              f"{tol:g} (the game knows no equilibrium, so V is not measured)")
    return "stalled", _stall_message(t, g, name, V, field_norm)


def _stall_message(t: int, g: GuardOptions, name: str, V: float | None, field_norm: float) -> str:
    what = f"V = {V:.4g}" if name == "V" else _MONITORS[name]
    return (f"stalled at step {t}: {what} varied by at most {g.stall_rtol:g} (relative) over the last "
            f"{g.stall_window} steps, field |v| = {field_norm:.3g}"
            + (" (dead: the strategies saturated; try a smaller --lr)" if field_norm <= DEAD_FIELD else ""))


def run(
    game: str,
    solver: str,
    *,
    game_options: dict[str, Any] | None = None,
    solver_options: dict[str, Any] | None = None,
    lr: float | None = None,
    steps: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = DEFAULT_DTYPE,
    log_every: int | None = None,
    stop_at_tol: bool = True,
    guard: GuardOptions | Mapping[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
    history_csv: str | Path | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    callback: Callable[[int, Params], None] | None = None,
) -> Result:
    """Build a game and a solver from the registries by name and solve: the CLI's API.

    Every argument is checked first (names, option mappings, numbers, seed, device, dtype):
    wrong input raises a one-line :class:`~hcc.registry.OptionError`.

    >>> from hcc import run
    >>> res = run("rps", "eg", steps=500)
    >>> res.converged, res.steps_to_tol
    """
    check_name("game", game), check_name("solver", solver)
    check_positive("lr", check_number("lr", lr))
    check_seed("seed", seed)
    game_options, solver_options = check_mapping("game_options", game_options), check_mapping(
        "solver_options", solver_options)
    g = make_game(game, game_options, seed=seed, device=device, dtype=dtype)
    s = make_solver(solver, g, lr=lr, options=solver_options)
    return solve(g, s, steps=steps, tol=tol, seed=seed, log_every=log_every, stop_at_tol=stop_at_tol, guard=guard,
                 checkpoint=checkpoint, history_csv=history_csv, progress=progress, callback=callback)


__all__ = [
    "DTYPES", "FAILED_STATUSES", "OK_STATUSES", "GuardOptions", "Result", "blank_nonfinite", "frozen_status",
    "guard_options",
    "is_frozen", "load_results", "resolve_device", "resolve_dtype", "run", "solve", "write_history_csv",
]
