"""The loop: steps, tolerance, divergence guard, logging, the result record.

Data flows one way: CLI → :func:`run` → :class:`~hcc.solvers.Solver` → game.
A run stops when ``V ≤ tol`` (``V``: the game's :attr:`~hcc.games.base.Game.progress_metric`,
the Lyapunov function or the duality gap; unless ``stop_at_tol=False``), after ``steps``
steps, or at the first step whose iterate or metrics are NaN/inf or exceed
``diverge_at``; in every case the :class:`Result` keeps everything recorded up to
that step.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .games import Game, Params, make_game
from .metrics import evaluate, progress_value
from .registry import OptionError, check_positive
from .solvers import Solver, make_solver
from .solvers.tree import all_finite, sq_norm


@dataclass
class Result:
    """One run's record, as written to ``result.json``."""

    game: str
    game_options: dict[str, Any]
    solver: str
    solver_options: dict[str, Any]
    seed: int
    steps_run: int = 0
    converged: bool | None = None
    steps_to_tol: int | None = None
    tol: float | None = None
    status: str = "running"  # converged | max_steps | diverged
    diverged_at: int | None = None
    message: str = ""
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    device: str = "cpu"
    dtype: str = "float64"
    versions: dict[str, str] = field(default_factory=dict)
    game_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def save(self, out: str | Path, plot: bool = True) -> Path:
        """Write ``result.json``, ``history.csv`` and (if ``plot``) the decay plot into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        write_history_csv(self.history, out / "history.csv")
        if plot and self.history:
            from .plots import plot_run

            plot_run(self, out / "lyapunov.png")
        return out

    @classmethod
    def load(cls, path: str | Path) -> Result:
        p = Path(path)
        data = json.loads((p / "result.json" if p.is_dir() else p).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _jsonable(x: Any) -> Any:
    """NaN/inf → None so result.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def blank_nonfinite(v: Any) -> Any:
    """The default CSV cell: NaN/inf as empty, everything else as it is."""
    return "" if isinstance(v, float) and not math.isfinite(v) else v


def write_history_csv(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    first: Sequence[str] = (),
    cell: Callable[[Any], Any] = blank_nonfinite,
) -> Path:
    """Rows as CSV: columns ``first``, then every other key in order of appearance; each value
    written as ``cell(value)`` (default: NaN/inf → empty)."""
    keys: list[str] = list(first)
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({k: cell(v) for k, v in row.items()})
    return Path(path)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda[:i]`` or ``auto``; a one-line error if CUDA is asked for but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"device: expected 'cpu' or 'auto' on this machine (no CUDA GPU found), got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise OptionError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}") from None


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise OptionError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def solve(
    game: Game,
    solver: Solver,
    *,
    steps: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    log_every: int | None = None,
    stop_at_tol: bool = True,
    diverge_at: float = 1e12,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    callback: Callable[[int, Params], None] | None = None,
) -> Result:
    """Run ``solver`` on ``game`` (already on its device/dtype) and return the record.

    ``history`` holds one row per logged step (step 0 is the initial point): the
    metrics of the iterate after that step plus what the step measured. ``V`` is
    checked every step for the tolerance and the divergence guard.
    ``callback(step, params)`` sees the iterate at every logged step (e.g. to keep
    generator samples over training); ``progress(step, row)`` sees the logged row.
    """
    steps = game.default_steps if steps is None else steps
    log_every = game.default_log_every if log_every is None else log_every
    check_positive("steps", steps)
    check_positive("tol", tol)
    check_positive("log_every", log_every)
    p0 = next(iter(game.parameters()))
    res = Result(
        game=game.name, game_options=asdict(game.options), solver=solver.name, solver_options=solver.options(),
        seed=seed, tol=tol, device=str(p0.device), dtype=str(p0.dtype).replace("torch.", ""),
        versions={"hcc": __version__, "torch": torch.__version__, "python": platform.python_version()},
        game_info=game.describe(),
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = game.init_params()
    batch = game.sample_batch(gen)
    state = solver.init(game, params)
    eval_batch = game.eval_batch() if hasattr(game, "eval_batch") else batch
    t0 = time.perf_counter()
    step_time = 0.0

    def record(t: int, info: dict[str, Any]) -> dict[str, float]:
        row = {"step": t, "time_s": step_time, **evaluate(game, params, eval_batch)}
        row.update({k: float(v) for k, v in info.items() if isinstance(v, (int, float, torch.Tensor))})
        res.history.append(row)
        if callback is not None:
            callback(t, params)
        return row

    metric = game.progress_metric  # "lyapunov" (V) unless the game stops on its duality gap
    name = "V" if metric == "lyapunov" else metric
    row = record(0, {})
    V = row.get(metric)
    has_V = V is not None
    if has_V and V <= tol:
        res.steps_to_tol = 0
    t = 0
    for t in range(1, steps + 1):
        if res.steps_to_tol is not None and stop_at_tol:
            t -= 1
            break
        if game.stochastic:
            batch = game.sample_batch(gen)
        ts = time.perf_counter()
        params, state, info = solver.step(game, params, state, batch)
        step_time += time.perf_counter() - ts
        V = progress_value(game, params, eval_batch) if has_V else None
        bad = not all_finite(params) or (V is not None and not (math.isfinite(V) and V <= diverge_at))
        if bad:
            what = "non-finite parameters" if not all_finite(params) else f"{name} = {V:.3g} beyond {diverge_at:.3g}"
            res.status, res.diverged_at = "diverged", t
            res.message = f"diverged at step {t}: {what}"
            res.history.append({"step": t, "time_s": step_time, **({metric: V} if V is not None else {}),
                                "param_norm": math.sqrt(float(sq_norm(params)))})
            break
        if has_V and V <= tol and res.steps_to_tol is None:
            res.steps_to_tol = t
        last = t == steps or (res.steps_to_tol is not None and stop_at_tol)
        if t % log_every == 0 or last:
            row = record(t, info)
            if progress is not None:
                progress(t, row)
    res.steps_run = t
    res.wall_time_s = time.perf_counter() - t0
    res.converged = (res.steps_to_tol is not None) if has_V else None
    if res.status != "diverged":
        res.status = "converged" if res.converged else "max_steps"
        res.message = (
            f"{name} ≤ {tol:g} after {res.steps_to_tol} steps" if res.converged
            else f"ran {t} steps" + (f" without reaching {name} ≤ {tol:g}" if has_V else "")
        )
    # a diverged run's summary is its last sane record, the one before the divergence row
    res.final = dict(res.history[-1] if res.status != "diverged" else res.history[-2] if len(res.history) > 1 else {})
    game.load_params(params) if all_finite(params) else None
    return res


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
    dtype: str = "float64",
    log_every: int | None = None,
    stop_at_tol: bool = True,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    callback: Callable[[int, Params], None] | None = None,
) -> Result:
    """Build a game and a solver from the registries by name and solve: the CLI's API.

    >>> from hcc import run
    >>> res = run("rps", "eg", steps=500)
    >>> res.converged, res.steps_to_tol
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    g = make_game(game, game_options, seed=seed).to(device=dev, dtype=dt)
    s = make_solver(solver, g, lr=lr, options=solver_options)
    return solve(g, s, steps=steps, tol=tol, seed=seed, log_every=log_every, stop_at_tol=stop_at_tol,
                 progress=progress, callback=callback)
