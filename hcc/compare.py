"""Compare solvers on one game: same seeds, same initial functions, median over seeds.

:func:`compare` runs every solver on the game instances ``seed = 0, …, K − 1`` (the
seed fixes the maps' initialization and the sampling, so every solver starts from the
same ``F_θ₀, G_φ₀`` and the same ``V₀``), optionally tunes each solver's step size on
a small grid first, and returns a :class:`Comparison`. :meth:`Comparison.save` writes
what ``hcc compare`` leaves in its folder:

==================  ===============================================================
``compare.png/pdf`` V against iterations and against solver time: median over seeds
                    with a 25–75 % band, one colour per solver
``histories.csv``   every logged row of every run (solver, lr, seed, step, time_s, …)
``table.md``        per solver: step size, median steps to tolerance, final V median,
                    time per step, converged fraction (and the tuning grid if tuned)
``compare.json``    the settings, the per-solver summary and tuning, per-run summaries
``runs/``           ``<solver>-seed<k>/result.json`` + ``history.csv`` per run
==================  ===============================================================

Games without a Lyapunov function (the GAN) are compared on MMD to the data instead;
steps to tolerance are then undefined and tuning ranks by the final MMD.

>>> from hcc.compare import compare
>>> cmp = compare("rps", ["gda", "exact-natgrad"], seeds=2, steps=100)
>>> print(cmp.table())  # doctest: +SKIP
>>> cmp.save("runs/compare-rps")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import Checkpoint
from .games import GAMES, make_game
from .records import (
    jsonable,
    read_csv_rows,
    read_json,
    read_record,
    save_figure,
    write_history_csv,
    write_json,
    write_text,
)
from .registry import OptionError, check_positive
from .run import GuardOptions, Result, run
from .solvers import check_solver_name, make_solver

#: default tuning grid: multiples of each solver's default step size
DEFAULT_GRID_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
#: default step cap: the game's ``default_steps`` but at most this, so a comparison takes minutes
#: (the natural-gradient solvers need tens of steps; a baseline that needs thousands shows it by then)
DEFAULT_MAX_STEPS = 500
#: the band drawn around the median, as quantiles over seeds
BAND = (0.25, 0.75)
#: metric compared when the game has no Lyapunov function
FALLBACK_METRIC = "mmd"
#: fixed leading columns of ``histories.csv``
CSV_KEYS = ("solver", "lr", "seed", "step", "time_s")


@dataclass
class GridPoint:
    """One step size tried while tuning: the medians over seeds it scored."""

    lr: float
    median_steps_to_tol: float | None
    final_median: float | None
    converged_fraction: float | None


@dataclass
class SolverSummary:
    """One solver's line of the comparison table (medians over seeds, at its chosen step size)."""

    solver: str
    lr: float
    default_lr: float
    median_steps_to_tol: float | None
    final_median: float | None
    final_q25: float | None
    final_q75: float | None
    ms_per_step: float
    converged_fraction: float | None
    diverged: int
    runs: int
    #: runs stopped as stalled (frozen away from the equilibrium)
    stalled: int = 0
    #: the step sizes tried (``None`` when not tuned) and what each scored
    grid: list[float] | None = None
    tuning: list[GridPoint] | None = None


@dataclass
class Comparison:
    """Solvers × seeds on one game: the runs, the per-solver summaries, the settings."""

    game: str
    game_options: dict[str, Any]
    metric: str
    tol: float
    steps: int
    seeds: list[int]
    solvers: list[str]
    results: dict[str, list[Result]]
    summaries: list[SolverSummary]
    tuned: bool = False
    wall_time_s: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    # -- views ---------------------------------------------------------------------------------

    def groups(self) -> list[tuple[str, list[Result]]]:
        """``[(legend label, runs over seeds), …]`` in solver order, as the plots take them."""
        name = "V" if self.metric == "lyapunov" else self.metric
        out = []
        for s in self.summaries:
            label = _label(s)
            if s.converged_fraction is not None:
                label += (f": {name} ≤ tol in {s.median_steps_to_tol:g} steps" if s.median_steps_to_tol is not None
                          else f": {name} > tol after {self.steps} steps")
            out.append((label, self.results[s.solver]))
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Every logged row of every run, with ``solver``, ``lr`` and ``seed`` in front."""
        out = []
        for s in self.summaries:
            for res in self.results[s.solver]:
                out += [{"solver": s.solver, "lr": s.lr, "seed": res.seed, **row} for row in res.history]
        return out

    def table(self) -> str:
        """The Markdown table (and, if tuned, the tuning grid per solver)."""
        name = "V" if self.metric == "lyapunov" else self.metric
        head = [f"# {self.game}: {len(self.solvers)} solvers × {len(self.seeds)} seeds", "",
                f"Medians over seeds {_seed_range(self.seeds)}; at most {self.steps} steps; "
                f"tolerance {name} ≤ {self.tol:g}." + (" Step sizes tuned (see below)." if self.tuned else ""), ""]
        cols = ["solver", "lr", f"median steps to {name} ≤ tol", f"final {name} median [25%, 75%]",
                "time per step (ms)", "converged", "diverged"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
        for s in self.summaries:
            lr = f"{s.lr:g}" + (" (tuned)" if s.grid is not None else "")
            band = f"{_e(s.final_median)} [{_e(s.final_q25)}, {_e(s.final_q75)}]"
            conv = "–" if s.converged_fraction is None else f"{round(s.converged_fraction * s.runs)}/{s.runs}"
            steps = self._steps(s.median_steps_to_tol, s.converged_fraction)
            stalled = f" (+{s.stalled} stalled)" if s.stalled else ""
            lines.append(f"| {s.solver} | {lr} | {steps} | {band} | {s.ms_per_step:.2f} | {conv} "
                         f"| {s.diverged}/{s.runs}{stalled} |")
        out = head + lines
        tuned = [s for s in self.summaries if s.tuning]
        if tuned:
            out += ["", "## Step-size tuning", "",
                    f"Each solver's step size is the grid point with the smallest median steps to tolerance; "
                    f"ties and never-converged grid points are ranked by the smallest median final {name} "
                    "(a diverged run counts as ∞).", "",
                    f"| solver | lr | median steps | final {name} median | converged | chosen |",
                    "|---|---:|---:|---:|---:|:---:|"]
            for s in tuned:
                for g in s.tuning or []:
                    conv = "–" if g.converged_fraction is None else f"{g.converged_fraction:.0%}"
                    steps = self._steps(g.median_steps_to_tol, g.converged_fraction)
                    out.append(f"| {s.solver} | {g.lr:g} | {steps} | {_e(g.final_median)} | {conv} "
                               f"| {'✓' if g.lr == s.lr else ''} |")
        return "\n".join(out) + "\n"

    def _steps(self, median: float | None, converged: float | None) -> str:
        """``12``; ``> N`` when fewer than half the runs converged in ``N`` steps; ``–`` without V."""
        return "–" if converged is None else f"> {self.steps}" if median is None else f"{median:g}"

    def to_dict(self) -> dict[str, Any]:
        """The ``compare.json`` record: settings, summaries, one summary line per run."""
        runs = [
            {"solver": name, "seed": r.seed, "lr": r.solver_options.get("lr"), "status": r.status,
             "steps_run": r.steps_run, "steps_to_tol": r.steps_to_tol, "diverged_at": r.diverged_at,
             "stalled_at": r.stalled_at, "message": r.message, "converged": r.converged,
             "final": r.final.get(self.metric), "wall_time_s": r.wall_time_s,
             "dir": f"runs/{run_dir_name(name, r.seed)}"}
            for name in self.solvers for r in self.results[name]
        ]
        return jsonable({
            "game": self.game, "game_options": self.game_options, "metric": self.metric, "tol": self.tol,
            "steps": self.steps, "seeds": self.seeds, "solvers": self.solvers, "tuned": self.tuned,
            "band": list(BAND), "summaries": [asdict(s) for s in self.summaries], "runs": runs,
            "wall_time_s": self.wall_time_s, "versions": self.versions,
        })

    # -- files ---------------------------------------------------------------------------------

    def save(self, out: str | Path, *, runs: bool = True, pdf: bool = True, dpi: int = 150) -> Path:
        """Write the plot (PNG, and PDF if ``pdf``), ``histories.csv``, ``table.md``, ``compare.json``
        and (if ``runs``) every run's record under ``runs/``; returns ``out``.

        Every file is written atomically, and ``compare.json`` last: it lists only files that exist."""
        from .plots import compare_figure

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if runs:
            for name in self.solvers:
                for res in self.results[name]:
                    res.save(out / "runs" / run_dir_name(name, res.seed), plot=False)
        write_history_csv(self.rows(), out / "histories.csv", first=CSV_KEYS)
        write_text(out / "table.md", self.table())
        fig = compare_figure(self.groups(), self.metric, title=self.title(), tol=self._tol_line())
        save_figure(fig, out / "compare.png", dpi=dpi)
        if pdf:
            save_figure(fig, out / "compare.pdf")
        data = self.to_dict()
        if not runs:
            for r in data["runs"]:
                r.pop("dir")
        data["files"] = ["compare.png", *(["compare.pdf"] if pdf else []), "histories.csv", "table.md",
                         *(["runs/"] if runs else [])]
        write_json(out / "compare.json", "compare", data)
        return out

    def title(self) -> str:
        lo, hi = (round(100 * q) for q in BAND)
        return f"{self.game}: median over {len(self.seeds)} seeds, band {lo}–{hi} %"

    def _tol_line(self) -> float | None:
        return self.tol if self.metric == "lyapunov" else None

    @classmethod
    def load(cls, path: str | Path) -> Comparison:
        """Rebuild a saved comparison from ``compare.json`` and ``histories.csv`` (``runs/`` not needed).

        The runs come back as :class:`~hcc.run.Result` records holding their history and
        summary (status, steps to tolerance, divergence step), enough to plot and tabulate.
        """
        p = Path(path)
        data = read_json(p / "compare.json")
        hist = read_histories(p / "histories.csv")
        results: dict[str, list[Result]] = {name: [] for name in data["solvers"]}
        for r in data["runs"]:
            res = Result(game=data["game"], game_options=data["game_options"], solver=r["solver"],
                         solver_options={"lr": r["lr"]}, seed=r["seed"], steps_run=r["steps_run"],
                         converged=r["converged"], steps_to_tol=r["steps_to_tol"], tol=data["tol"],
                         status=r["status"], diverged_at=r["diverged_at"], stalled_at=r.get("stalled_at"),
                         message=r.get("message", ""), wall_time_s=r["wall_time_s"],
                         history=hist.get((r["solver"], r["seed"]), []))
            res.final = dict(res.history[-1]) if res.history else {}
            results[r["solver"]].append(res)
        summaries = []
        for s in data["summaries"]:
            tuning = [GridPoint(**g) for g in s["tuning"]] if s.get("tuning") else None
            summaries.append(SolverSummary(**{**s, "tuning": tuning}))
        return cls(game=data["game"], game_options=data["game_options"], metric=data["metric"], tol=data["tol"],
                   steps=data["steps"], seeds=data["seeds"], solvers=data["solvers"], results=results,
                   summaries=summaries, tuned=data["tuned"], wall_time_s=data["wall_time_s"],
                   versions=data.get("versions", {}))


def compare(
    game: str,
    solvers: Sequence[str],
    seeds: int | Sequence[int] = 5,
    steps: int | None = None,
    tol: float = 1e-6,
    *,
    tune: bool = False,
    grid: Sequence[float] | None = None,
    grid_factors: Sequence[float] = DEFAULT_GRID_FACTORS,
    game_options: dict[str, Any] | None = None,
    device: str = "cpu",
    dtype: str = "float64",
    log_every: int | None = None,
    guard: GuardOptions | dict[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
    on_run: Callable[[str, float, int, Result], None] | None = None,
) -> Comparison:
    """Run each solver in ``solvers`` on ``game`` for every seed and summarize.

    ``seeds`` is a count ``K`` (seeds ``0 … K−1``) or explicit seeds; seed ``k`` builds the
    same game instance and initial iterate for every solver. Runs stop at ``V ≤ tol``
    or after ``steps`` (default: the game's ``default_steps``, at most :data:`DEFAULT_MAX_STEPS`),
    or when the guard stops them (:func:`hcc.run.solve`).

    With ``tune=True`` each solver is run at every step size of ``grid`` (absolute
    values) or, by default, of its default step size × ``grid_factors``; the chosen
    one minimizes

    .. math::

        \\big(\\operatorname{median}_k \\text{steps to tol},\\;
              \\operatorname{median}_k \\text{final } V\\big)

    lexicographically, a run that never converges counting ∞ steps and a diverged
    run ∞ final ``V`` (so never-converged grid points rank by final ``V``). The chosen
    point's runs are the comparison's runs (no re-run). ``on_run(solver, lr, seed,
    result)`` is called after every run (progress).

    ``checkpoint``: every finished run and the running one's state are saved; a resumed
    call skips the finished runs and continues the running one (bitwise).
    """
    names = _check_solvers(game, solvers)
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if isinstance(seeds, int):
        check_positive("seeds", seeds)
    if not seed_list:
        raise OptionError("seeds: expected at least one seed, got none")
    steps = min(GAMES[game].default_steps, DEFAULT_MAX_STEPS) if steps is None else steps
    check_positive("steps", steps)
    check_positive("tol", tol)
    if grid is not None:
        grid = [float(g) for g in grid]
        if not grid:
            raise OptionError("lr grid: expected at least one step size, got none")
        for g in grid:
            check_positive("lr grid value", g)
    for f in grid_factors:
        check_positive("lr grid factor", f)
    probe = make_game(game, game_options, seed=seed_list[0])  # bad game options fail here, before any run

    saved = checkpoint.state if checkpoint is not None else None
    done: dict[str, dict[str, Any]] = dict(saved["done"]) if saved is not None else {}
    current = saved.get("current") if saved is not None else None
    t0 = time.perf_counter() - (saved["wall_time_s"] if saved is not None else 0.0)

    def wrap(key: str) -> Callable[[Any], dict[str, Any]]:
        return lambda st: {"done": done, "current": None if st is None else {"key": key, "state": st},
                           "wall_time_s": time.perf_counter() - t0}

    metric: str | None = None
    results: dict[str, list[Result]] = {}
    summaries: list[SolverSummary] = []
    for name in names:
        default_lr = make_solver(name, probe).lr
        lrs = ([default_lr] if not tune else
               sorted(set(grid)) if grid is not None else [default_lr * f for f in grid_factors])
        by_lr: dict[float, list[Result]] = {}
        for lr in lrs:
            by_lr[lr] = []
            for seed in seed_list:
                key = f"{name}|{lr!r}|{seed}"
                if key in done:
                    res = Result.from_state(done[key])
                else:
                    inner = None
                    if checkpoint is not None:
                        resume = current["state"] if current is not None and current["key"] == key else None
                        inner = checkpoint.nested(wrap(key), resume, label=f"{name} lr={lr:g} seed {seed}")
                    res = run(game, name, game_options=game_options, lr=lr, steps=steps, tol=tol, seed=seed,
                              device=device, dtype=dtype, log_every=log_every, guard=guard, checkpoint=inner)
                    done[key] = res.state_dict()
                    if checkpoint is not None:
                        checkpoint.save(wrap(key)(None))
                by_lr[lr].append(res)
                if on_run is not None:
                    on_run(name, lr, seed, res)
            metric = metric or _metric_of(by_lr[lr])
        scores = {lr: _score(rs, metric or FALLBACK_METRIC) for lr, rs in by_lr.items()}
        best = pick_lr([scores[lr] for lr in lrs])
        results[name] = by_lr[best]
        summaries.append(_summary(name, best, default_lr, by_lr[best], metric or FALLBACK_METRIC,
                                  grid=lrs if tune else None, tuning=[scores[lr] for lr in lrs] if tune else None))
    opts = dict(results[names[0]][0].game_options) if results[names[0]] else dict(game_options or {})
    return Comparison(
        game=game, game_options=opts, metric=metric or FALLBACK_METRIC, tol=tol, steps=steps, seeds=seed_list,
        solvers=names, results=results, summaries=summaries, tuned=tune, wall_time_s=time.perf_counter() - t0,
        versions={"hcc": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
    )


def pick_lr(points: Sequence[GridPoint]) -> float:
    """The tuning rule: fewest median steps to tolerance; ties and never-converged points by the
    smallest median final metric (``None`` = ∞: no convergence, or diverged); then the smaller step.

    >>> pick_lr([GridPoint(0.1, 40, 9e-7, 1.0), GridPoint(0.2, 25, 8e-7, 1.0), GridPoint(0.4, None, 1e-3, 0.0)])
    0.2
    """
    if not points:
        raise OptionError("lr grid: expected at least one scored step size, got none")
    return min(points, key=lambda g: (_inf(g.median_steps_to_tol), _inf(g.final_median), g.lr)).lr


def parse_grid(text: str) -> tuple[list[float] | None, list[float] | None]:
    """``"0.1,0.2,0.4"`` → absolute step sizes; ``"x0.5,x1,x2"`` → multiples of each default.

    Returns ``(grid, factors)``, one of them ``None``.
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise OptionError(f"--lr-grid: expected step sizes like 0.1,0.2 or factors like x0.5,x1,x2, got {text!r}")
    rel = [t.lower().startswith("x") for t in items]
    if any(rel) and not all(rel):
        raise OptionError(f"--lr-grid: expected all absolute (0.1,0.2) or all factors (x0.5,x2), got {text!r}")
    try:
        values = [float(t[1:] if r else t) for t, r in zip(items, rel)]
    except ValueError:
        raise OptionError(f"--lr-grid: expected comma-separated positive numbers, got {text!r}") from None
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise OptionError(f"--lr-grid: expected positive step sizes, got {text!r}")
    return (None, values) if all(rel) else (values, None)


def parse_solvers(text: str) -> list[str]:
    """``"gda, eg,exact-natgrad"`` → ``["gda", "eg", "exact-natgrad"]`` (names checked by :func:`compare`)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise OptionError(f"--solvers: expected a comma-separated list of solver names (see `hcc list`), "
                          f"got {text!r}")
    return names


def run_dir_name(solver: str, seed: int) -> str:
    """The folder of one run under ``runs/``: ``<solver>-seed<k>``."""
    return f"{solver}-seed{seed}"


def read_histories(path: str | Path) -> dict[tuple[str, int], list[dict[str, float]]]:
    """``histories.csv`` → ``{(solver, seed): [row, …]}`` with numeric values (empty cells dropped)."""
    out: dict[tuple[str, int], list[dict[str, float]]] = {}
    if not Path(path).is_file():
        raise OptionError(f"{path}: expected the comparison's per-step rows (histories.csv), got no such file")
    for row in read_csv_rows(path):
        if "solver" not in row or "seed" not in row:
            raise OptionError(f"{path}: expected hcc compare histories (columns solver, seed, step, …), got columns "
                              f"{', '.join(row)}")
        key = (str(row.pop("solver")), int(row.pop("seed")))  # type: ignore[arg-type]
        out.setdefault(key, []).append(row)  # type: ignore[arg-type]
    return out


# -- re-plotting saved results (hcc plot) ----------------------------------------------------------


def load_groups(path: str | Path) -> tuple[list[tuple[str, list[Result]]], float | None]:
    """The curves saved at ``path``: ``([(label, runs), …], tol)``.

    ``path`` is any folder :func:`hcc.records.read_record` reads: ``hcc compare`` (one group
    per solver), ``hcc solve`` (one run; an unfinished one from its streamed history),
    ``hcc solve --seeds`` (one group of every seed), or a folder holding only a compare's
    ``histories.csv`` (one group per solver and step size); or one of their record files.
    Other folders (``hcc sweep``: no per-step histories; ``hcc spectrum``) get a one-line error.
    """
    from .plots import run_label
    from .run import load_results

    p = Path(path)
    if p.is_file() and p.name == "histories.csv":
        return _csv_groups(p), None
    if p.is_dir() and not any((p / n).is_file() for n in ("result.json", "compare.json")) \
            and (p / "histories.csv").is_file() and not (p / ".checkpoint").is_dir():
        return _csv_groups(p / "histories.csv"), None
    rec = read_record(p)
    if rec.kind == "compare" and rec.finished:
        cmp = Comparison.load(rec.path)
        return cmp.groups(), cmp._tol_line()
    if rec.kind == "sweep":
        raise OptionError(f"{path}: expected runs with per-step histories, got an hcc sweep folder (per-instance "
                          "summaries only: see its sweep.png, or run hcc solve --seeds for curves)")
    if rec.kind == "spectrum":
        raise OptionError(f"{path}: expected runs to plot, got an hcc spectrum folder (see its spectrum.png)")
    runs = load_results(p)
    label = run_label(runs[0]) + (" (unfinished)" if not rec.finished else "")
    if rec.kind == "seeds":
        label += f", {len(runs)} seeds"
    return [(label, runs)], runs[0].tol


def _csv_groups(path: Path) -> list[tuple[str, list[Result]]]:
    groups: dict[tuple[str, float], list[Result]] = {}
    for (solver, seed), hist in read_histories(path).items():
        lr = hist[0].get("lr", math.nan) if hist else math.nan
        res = Result(game="", game_options={}, solver=solver, solver_options={"lr": lr}, seed=seed,
                     history=hist, steps_run=int(hist[-1]["step"]) if hist else 0)
        groups.setdefault((solver, lr), []).append(res)
    return [(f"{s} (lr = {lr:g})", rs) for (s, lr), rs in groups.items()]


def plot_saved(
    paths: Sequence[str | Path], out: str | Path | None = None, metric: str | None = None, *, dpi: int = 150
) -> tuple[Path, str]:
    """Draw the saved runs and comparisons at ``paths`` together (two panels, as ``hcc compare``)
    into ``out`` (format from its suffix; default ``plot-<metric>.png`` in the current folder);
    returns ``(out, metric)``.

    ``metric`` defaults to ``lyapunov`` if any run recorded it, else ``mmd``. Labels that
    repeat across folders get the folder's name appended.
    """
    from .plots import compare_figure

    if not paths:
        raise OptionError("expected at least one folder of saved results, got none")
    formats = _image_formats()
    if out is not None and Path(out).suffix.lstrip(".").lower() not in formats:
        raise OptionError(f"--out: expected an image file ending in one of {', '.join('.' + f for f in formats)}, "
                          f"got {str(out)!r}")
    loaded = [(Path(p), *load_groups(p)) for p in paths]
    keys = {k for _, groups, _ in loaded for _, runs in groups for r in runs for row in r.history for k in row}
    metric = metric or ("lyapunov" if "lyapunov" in keys else FALLBACK_METRIC)
    if metric not in keys:
        have = ", ".join(sorted(k for k in keys if k not in ("step", "time_s", "lr"))) or "none"
        raise OptionError(f"--metric: expected a recorded metric ({have}), got {metric!r}")
    labels = [label for _, groups, _ in loaded for label, _ in groups]
    groups = [(f"{label} [{p.name}]" if labels.count(label) > 1 else label, runs)
              for p, gs, _ in loaded for label, runs in gs]
    tols = {t for *_, t in loaded if t is not None}
    tol = tols.pop() if metric == "lyapunov" and len(tols) == 1 else None
    n = max((len(runs) for _, runs in groups), default=1)
    lo, hi = (round(100 * q) for q in BAND)
    games = sorted({r.game for _, runs in groups for r in runs if r.game})
    title = ", ".join(games) + (": " if games else "") + f"{metric} of {len(groups)} curve(s)" + (
        f" — median over seeds, band {lo}–{hi} %" if n > 1 else "")
    out = Path(out) if out is not None else Path(f"plot-{metric}.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"--out: expected a file in a folder that can be created, got {str(out)!r} "
                          f"({e.strerror or e})") from None
    try:
        save_figure(compare_figure(groups, metric, title=title, tol=tol), out, dpi=dpi)
    except OSError as e:
        raise OptionError(f"--out: expected a writable file, got {str(out)!r} ({e.strerror or e})") from None
    return out, metric


def _image_formats() -> list[str]:
    """The file formats Matplotlib's default canvas writes (png, pdf, svg, …)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


# -- helpers ---------------------------------------------------------------------------------------


def _check_solvers(game: str, solvers: Sequence[str]) -> list[str]:
    GAMES[game]
    names = list(solvers)
    if not names:
        raise OptionError("solvers: expected at least one solver name (see `hcc list solvers`), got none")
    for name in names:
        check_solver_name(name)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise OptionError(f"solvers: expected each solver once, got {dup[0]!r} twice")
    return names


def _metric_of(results: Sequence[Result]) -> str:
    keys = {k for r in results for row in r.history for k in row}
    return "lyapunov" if "lyapunov" in keys else FALLBACK_METRIC


def _final(res: Result, metric: str) -> float:
    """The run's last value of ``metric``; ∞ for a diverged run (its ``final`` is its last sane row)."""
    if res.status == "diverged":
        return math.inf
    v = res.final.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def _score(results: Sequence[Result], metric: str) -> GridPoint:
    lr = float(results[0].solver_options["lr"])
    finals = [_final(r, metric) for r in results]
    has_tol = any(r.converged is not None for r in results)
    steps = [r.steps_to_tol if r.steps_to_tol is not None else math.inf for r in results]
    return GridPoint(
        lr=lr,
        median_steps_to_tol=_finite_or_none(statistics.median(steps)) if has_tol else None,
        final_median=_finite_or_none(statistics.median(finals)),
        converged_fraction=sum(r.converged is True for r in results) / len(results) if has_tol else None,
    )


def _summary(name: str, lr: float, default_lr: float, results: list[Result], metric: str,
             grid: list[float] | None, tuning: list[GridPoint] | None) -> SolverSummary:
    score = _score(results, metric)
    finals = [_final(r, metric) for r in results]
    per_step = [r.final.get("time_s", 0.0) / r.steps_run for r in results if r.steps_run > 0]
    return SolverSummary(
        solver=name, lr=lr, default_lr=default_lr, median_steps_to_tol=score.median_steps_to_tol,
        final_median=score.final_median, final_q25=_finite_or_none(_quantile(finals, BAND[0])),
        final_q75=_finite_or_none(_quantile(finals, BAND[1])),
        ms_per_step=1e3 * statistics.median(per_step) if per_step else math.nan,
        converged_fraction=score.converged_fraction, diverged=sum(r.status == "diverged" for r in results),
        runs=len(results), grid=grid, tuning=tuning, stalled=sum(r.status == "stalled" for r in results),
    )


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) that keeps ∞ (diverged runs) instead of NaN."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi or v[lo] == v[hi]:
        return v[lo]
    return math.inf if math.isinf(v[hi]) else v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _inf(x: float | None) -> float:
    return math.inf if x is None else x


def _label(s: SolverSummary) -> str:
    return f"{s.solver} (lr = {s.lr:g}{', tuned' if s.grid is not None else ''})"


def _seed_range(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}–{seeds[-1]}" if list(seeds) == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1 \
        else ", ".join(map(str, seeds))


def _e(x: float | None) -> str:
    return "∞" if x is None else f"{x:.2e}"


__all__ = [
    "BAND", "CSV_KEYS", "DEFAULT_GRID_FACTORS", "DEFAULT_MAX_STEPS", "Comparison", "GridPoint", "SolverSummary",
    "compare", "load_groups", "parse_grid", "pick_lr", "parse_solvers", "plot_saved", "read_histories", "run_dir_name",
]
