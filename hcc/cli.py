"""The ``hcc`` command line: ``hcc solve`` runs one game × solver, ``hcc list`` shows the registries.

Every choice the CLI offers is read from the registries (:data:`hcc.GAMES`,
:data:`hcc.SOLVERS`, :data:`hcc.RULES`, :data:`hcc.PRECONDITIONERS`), so a newly
registered game or solver appears here without touching this file.

Exit codes, the same for every command: 0 success (every run ended normally, or at least
one did), 2 bad input (a one-line ``Error: …`` naming what was expected, before any
work), 3 every run diverged or stalled (the files are still written), 130 interrupted by
SIGINT/SIGTERM (the state is saved; ``hcc resume DIR`` continues).

.. code-block:: console

    $ hcc solve rps --solver eg --out runs/rps-eg
    $ hcc solve matrix --solver eg --payoff "0,1;1,0" --game-opt lam=0.2
    $ hcc list solvers
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import shutil
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import torch

from . import __version__
from .checkpoint import DEFAULT_EVERY, EXIT_INTERRUPTED, Checkpoint, Interrupted
from .device import DTYPES
from .games import GAMES, Params, make_game
from .plots import gan_samples_figure, snapshot_steps
from .plugins import is_spec
from .records import folder_listing, jsonable, prepare_out, read_record, save_figure
from .registry import (
    OptionError,
    Registry,
    check_number,
    check_positive,
    check_seed,
    options_table,
    parse_key_values,
)
from .run import Result, guard_options, load_results, run
from .solvers import PRECONDITIONERS, RULES, SOLVERS, check_solver_name, make_solver

#: exit code when every run of a command diverged or stalled (its files are written all the same)
EXIT_DIVERGED = 3
#: metrics shown by the progress bar, first one present wins (the GAN has no V)
_PROGRESS_METRICS = (("lyapunov", "V"), ("mmd", "mmd"), ("exploitability", "gap"), ("field_norm", "|v|"))
#: summary labels, in order; other recorded metrics follow under their own names
_SUMMARY_LABELS = {
    "lyapunov": "V (Lyapunov)",
    "exploitability": "exploitability",
    "field_norm": "field norm |v|",
    "payoff": "payoff",
}


class InputError(click.ClickException):
    """Bad user input: printed as one line ``Error: <message>``, exit code 2 (like click's usage errors)."""

    exit_code = 2


class RegistryChoice(click.ParamType):
    """A name from a :class:`~hcc.registry.Registry`, read when parsing (so late registrations count)."""

    def __init__(self, registry: Registry[Any]) -> None:
        self.registry = registry
        self.name = registry.kind

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.registry) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            self.registry[value]
        except OptionError as e:
            raise InputError(str(e)) from None
        return value

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.registry if n.startswith(incomplete)]


class SolverChoice(RegistryChoice):
    """A solver name: registered (:data:`hcc.SOLVERS`) or a composite ``RULE+PRECOND``."""

    def __init__(self) -> None:
        super().__init__(SOLVERS)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "NAME|RULE+PRECOND"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        with _input_errors():
            return check_solver_name(value)


class _OneLineErrors(click.Group):
    """Every error of the command line is one line ``Error: …`` (click's usage errors included: the
    usage block becomes a short hint), with click's exit codes (2 for bad usage)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            hint = f" (see `{e.ctx.command_path} -h`)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"Error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="hcc")
def main() -> None:
    """Hidden convex-concave games and generalized natural-gradient flows."""


# -- runs: output folders, checkpoints, exit codes --------------------------------------------


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options every resumable command shares: where the run goes and how it is kept."""
    for option in reversed([
        click.option("--overwrite", is_flag=True,
                     help="Replace the run already in --out (clears the folder; only one written by hcc)."),
        click.option("--resume", is_flag=True,
                     help="Continue the interrupted run in --out (same command and options); start it if --out is "
                          "new or empty."),
        click.option("--checkpoint-every", type=float, default=DEFAULT_EVERY, show_default=True, metavar="SECONDS",
                     help="Save the run's full state this often (and on Ctrl-C / SIGTERM); 0: after every step."),
        click.option("--guard", multiple=True, metavar="KEY=VALUE",
                     help="Divergence/stall guard (repeatable): diverge_at=1e12, stall_window=20, stall_rtol=1e-10."),
    ]):
        f = option(f)
    return f


def _exit_code(records: Sequence[Result]) -> int:
    """The rule of every run command: 3 if every run diverged or stalled, else 0."""
    return EXIT_DIVERGED if records and all(r.failed for r in records) else 0


def _launch(command: str, args: dict[str, Any], out: str | None, *, stem: str, overwrite: bool, resume: bool,
            every: float, quiet: bool) -> None:
    """Check the output folder (before any work), open its checkpoint and run ``command``'s body.

    A folder that already holds this run: with ``--resume`` it continues from the checkpoint
    (or, finished, says so and exits by its status); a different run there is refused.
    """
    with _input_errors():
        if overwrite and resume:
            raise OptionError("expected --overwrite or --resume, got both")
        check_positive("--checkpoint-every", every, allow_zero=True)
        created = out is None or not Path(out).exists()
        path = prepare_out(out, default_root=Path("runs"), default_stem=stem, overwrite=overwrite, resume=resume)
        spec = Checkpoint.spec_of(path)
        if spec is not None:
            _same_run(path, spec.get("command"), spec.get("args"), command, args)
            rec = read_record(path)
            if rec.finished:
                records = load_results(path)
                click.echo(f"{path}: this run already finished ({', '.join(sorted({r.status for r in records}))}); "
                           "nothing to resume")
                _exit(_exit_code(records))
                return
        elif any(path.iterdir()):
            raise OptionError(f"--resume: expected a folder holding a resumable hcc run (.checkpoint/run.json), got "
                              f"{str(path)!r} holding {folder_listing(path)}")
        ckpt = Checkpoint.open(path, every)
        if spec is None:
            ckpt.write_spec(command, args)
    _execute(command, args, path, ckpt, quiet, created=created and spec is None)


def _same_run(path: Path, command: Any, stored: Any, new_command: str, args: Mapping[str, Any]) -> None:
    """A one-line error unless ``path`` holds the run ``new_command args`` asks for."""
    if command != new_command or not isinstance(stored, Mapping):
        raise OptionError(f"--resume: expected a folder holding an hcc {new_command} run, got {str(path)!r} holding "
                          f"an hcc {command} run; resume it with `hcc resume {path}`")
    for k in sorted(set(stored) | set(args)):
        if jsonable(stored.get(k)) != jsonable(args.get(k)):
            raise OptionError(f"--resume: expected the options of the run in {str(path)!r}, got {k} = "
                              f"{args.get(k)!r} instead of {stored.get(k)!r}; use `hcc resume {path}` to continue it")


def _execute(command: str, args: dict[str, Any], out: Path, ckpt: Checkpoint, quiet: bool, created: bool) -> None:
    """Run the body; on SIGINT/SIGTERM say where the state is and exit 130; clear the checkpoint when done."""
    try:
        with ckpt.signals(), _input_errors():
            try:
                code = _BODIES[command](args, out, ckpt, quiet)
            except OptionError:
                if created:  # bad input found only now: leave no folder behind
                    shutil.rmtree(out, ignore_errors=True)
                raise
    except Interrupted as e:
        click.echo(f"Interrupted at {e.where}; the run's state is saved in {out}. Continue it with: "
                   f"hcc resume {out}", err=True)
        _exit(EXIT_INTERRUPTED)
        return
    ckpt.clear()
    _exit(code)


def _exit(code: int) -> None:
    if code:
        click.get_current_context().exit(code)


@contextlib.contextmanager
def _out_folder(out: str | None, stem: str, overwrite: bool) -> Iterator[Path]:
    """``--out`` of a command without checkpoints (spectrum, field): checked first; removed again if
    it was created here and the command then fails on its input."""
    with _input_errors():
        created = out is None or not Path(out).exists()
        path = prepare_out(out, default_root=Path("runs"), default_stem=stem, overwrite=overwrite)
        try:
            yield path
        except OptionError:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise


def _guard(items: tuple[str, ...]) -> dict[str, Any]:
    """``--guard`` items → the resolved guard options (checked)."""
    return dataclasses.asdict(guard_options(parse_key_values(items)))


def _check_build(game: str, solver: str | None, game_options: Mapping[str, Any], *, seed: int = 0,
                 solver_options: Mapping[str, Any] | None = None, lr: float | None = None, device: str = "cpu",
                 dtype: str = "float64") -> None:
    """Build the game (and solver) once, so bad options fail before the output folder is touched."""
    g = make_game(game, dict(game_options), seed=seed, device=device, dtype=dtype)
    if solver is not None:
        make_solver(solver, g, lr=lr, options=dict(solver_options or {}))


# -- hcc solve --------------------------------------------------------------------------------


@main.command()
@click.argument("game", type=RegistryChoice(GAMES))
@click.option("--solver", "-s", type=SolverChoice(), default=None,
              help="Solver name (see `hcc list`); or give --rule [--precond].")
@click.option("--rule", type=RegistryChoice(RULES), default=None, help="Update rule, composed with --precond.")
@click.option("--precond", type=RegistryChoice(PRECONDITIONERS), default=None,
              help="Preconditioner for --rule  [default: identity]")
@click.option("--steps", type=int, default=None, help="Maximum steps  [default: the game's default_steps]")
@click.option("--lr", type=float, default=None, help="Step size h  [default: the solver's default for the game]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the maps' init and the sampling.")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Solve seeds SEED..SEED+K-1 as one batched (vmapped) program; writes seeds.csv and a summary.")
@click.option("--tol", type=float, default=1e-6, show_default=True,
              help="Stop when V <= tol (games without a unique equilibrium, e.g. openspiel: the duality gap).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default="float64", show_default=True, help=" or ".join(DTYPES) + ".")
@click.option("--out", "-o", default=None, metavar="DIR",
              help="Output folder, new or empty  [default: a new runs/<game>-<solver>-<timestamp>]")
@click.option("--game-opt", "-g", multiple=True, metavar="KEY=VALUE", help="Game option (repeatable).")
@click.option("--solver-opt", "-S", multiple=True, metavar="KEY=VALUE", help="Rule/preconditioner option (repeatable).")
@click.option("--payoff", default=None, metavar="FILE|ROWS",
              help="Payoff matrix (CSV file or inline 'a,b;c,d'); short for --game-opt payoff=...")
@click.option("--log-every", type=int, default=None,
              help="Record metrics every K steps  [default: the game's: 1, gan 20]")
@click.option("--no-stop-at-tol", is_flag=True, help="Keep running after V <= tol.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; a one-line summary.")
@_run_options
def solve(
    game: str, solver: str | None, rule: str | None, precond: str | None, steps: int | None, lr: float | None,
    seed: int, tol: float, device: str, dtype: str,
    out: str | None, game_opt: tuple[str, ...], solver_opt: tuple[str, ...], payoff: str | None,
    log_every: int | None, no_stop_at_tol: bool, quiet: bool, seeds: int = 1, overwrite: bool = False,
    resume: bool = False, checkpoint_every: float = DEFAULT_EVERY, guard: tuple[str, ...] = (),
) -> None:
    """Solve GAME with a solver; write result.json, history.csv (streamed), params.pt and lyapunov.png.

    Exits 0 when the run ends normally (converged or not: see the summary and
    result.json), 2 on bad input, 3 if it diverged or stalled, 130 if interrupted
    (Ctrl-C / SIGTERM: its state is saved; `hcc resume DIR` continues it).
    """
    solver = _solver_name(solver, rule, precond)
    with _input_errors():
        check_positive("--steps", steps)
        check_positive("--lr", lr)
        check_positive("--tol", tol)
        check_positive("--log-every", log_every)
        check_positive("--seeds", seeds)
        check_seed("--seed", seed, count=seeds)
        game_options = parse_key_values(game_opt)
        solver_options = parse_key_values(solver_opt)
        if payoff is not None:
            game_options["payoff"] = _payoff_option(game, payoff, game_options)
        args = dict(game=game, solver=solver, steps=steps, lr=lr, seed=seed, seeds=seeds, tol=tol, device=device,
                    dtype=dtype, game_options=game_options, solver_options=solver_options, log_every=log_every,
                    stop_at_tol=not no_stop_at_tol, guard=_guard(guard))
        _check_build(game, solver, game_options, seed=seed, solver_options=solver_options, lr=lr, device=device,
                     dtype=dtype)
    stem = f"{_stem(game)}-{solver}" + (f"-seeds{seeds}" if seeds != 1 else "") + f"-{time.strftime('%Y%m%d-%H%M%S')}"
    _launch("solve", args, out, stem=stem, overwrite=overwrite, resume=resume, every=checkpoint_every, quiet=quiet)


def _stem(game: str) -> str:
    """A folder-name part for ``game``: a spec ``dir/file.py:Class`` gives ``file-Class``."""
    if is_spec(game):
        where, _, attr = game.rpartition(":")
        game = f"{Path(where).stem if where.endswith('.py') else where}-{attr}"
    return re.sub(r"[^\w.+-]", "_", game)


def _solve_body(a: dict[str, Any], out: Path, ckpt: Checkpoint, quiet: bool) -> int:
    if a["seeds"] != 1:
        return _seeds_body(a, out, ckpt, quiet)
    game = a["game"]
    n_steps = a["steps"] if a["steps"] is not None else GAMES[game].default_steps
    snapshots = _Snapshots(n_steps) if callable(getattr(GAMES[game], "samples", None)) else None
    with _progress(n_steps, quiet) as progress:
        res = run(game, a["solver"], game_options=a["game_options"], solver_options=a["solver_options"], lr=a["lr"],
                  steps=a["steps"], tol=a["tol"], seed=a["seed"], device=a["device"], dtype=a["dtype"],
                  log_every=a["log_every"], stop_at_tol=a["stop_at_tol"], guard=a["guard"], checkpoint=ckpt,
                  history_csv=out / "history.csv", progress=progress, callback=snapshots)
    if snapshots is not None and snapshots.params:
        snapshots.save(make_game(game, a["game_options"], seed=a["seed"]), res, out / "samples.png")
    res.save(out)
    _summary(res, out, quiet)
    if res.failed:
        click.echo(f"Error: the run {res.message}; its record is in {out}", err=True)
    return _exit_code([res])


class _Snapshots:
    """A ``solve`` callback keeping the iterate at ~6 evenly spaced logged steps (GAN sample grids);
    checkpointed with the run (``state_dict``)."""

    def __init__(self, steps: int) -> None:
        self.targets = snapshot_steps(steps)
        self.params: dict[int, Params] = {}

    def __call__(self, step: int, params: Params) -> None:
        if self.targets and step >= self.targets[0]:
            while self.targets and step >= self.targets[0]:
                self.targets.pop(0)
            self.params[step] = tuple({k: v.detach().clone() for k, v in p.items()} for p in params)  # type: ignore

    def state_dict(self) -> dict[str, Any]:
        return {"targets": list(self.targets), "params": dict(self.params)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.targets, self.params = list(state["targets"]), dict(state["params"])

    def save(self, game: Any, res: Result, path: Path) -> None:
        """Draw the samples at the kept steps (and the run's last sane step) next to the data."""
        game = game.to(torch.float64)

        def f64(p: Params) -> Params:
            return tuple({k: v.to(torch.float64) for k, v in d.items()} for d in p)  # type: ignore[return-value]

        shots = [(t, game.samples(f64(p))[0]) for t, p in sorted(self.params.items())]
        real = game.samples(f64(next(iter(self.params.values()))))[1]
        fig = gan_samples_figure(real, shots, title=f"{res.game} · {res.solver}: generator samples over training")
        save_figure(fig, path, dpi=120)


def _solver_name(solver: str | None, rule: str | None, precond: str | None) -> str:
    """``--solver NAME`` or ``--rule R [--precond P]`` → a name :func:`~hcc.solvers.make_solver` takes."""
    if solver is not None and (rule or precond):
        raise InputError(f"expected --solver or --rule/--precond, got both (--solver {solver} and "
                         f"--{'rule ' + rule if rule else 'precond ' + str(precond)})")
    if solver is not None:
        return solver
    if rule is None:
        raise InputError("expected --solver NAME or --rule NAME [--precond NAME], got neither (see `hcc list`)")
    return f"{rule}+{precond or 'identity'}"


def _payoff_option(game: str, payoff: str, game_options: Mapping[str, str]) -> str:
    """Check that ``--payoff`` applies to ``game`` and is not given twice."""
    if "payoff" not in {f.name for f in dataclasses.fields(GAMES[game].Options)}:
        takes = [g for g in GAMES if "payoff" in {f.name for f in dataclasses.fields(GAMES[g].Options)}]
        raise OptionError(f"--payoff: expected a game with a payoff matrix ({', '.join(takes) or 'none'}), "
                          f"got {game!r}")
    if "payoff" in game_options:
        raise OptionError("--payoff: expected the payoff once, got both --payoff and --game-opt payoff=...")
    return payoff


@contextlib.contextmanager
def _input_errors() -> Iterator[None]:
    """Turn :class:`OptionError` into a one-line ``Error: …`` with exit code 2."""
    try:
        yield
    except OptionError as e:
        raise InputError(str(e)) from None


@contextlib.contextmanager
def _progress(steps: int, quiet: bool) -> Iterator[Callable[[int, dict[str, float]], None] | None]:
    """A progress bar on stderr fed by :func:`hcc.run.run`'s ``progress(step, row)`` callback.

    The bar opens at the first recorded step, so errors while building the game print alone.
    """
    if quiet:
        yield None
        return
    shown = [""]
    with contextlib.ExitStack() as stack:
        bars: list[Any] = []

        def update(step: int, row: dict[str, float]) -> None:
            if not bars:
                bars.append(stack.enter_context(click.progressbar(
                    length=steps, label="solving", file=sys.stderr, item_show_func=lambda _: shown[0],
                    show_eta=False, width=30)))
            for key, name in _PROGRESS_METRICS:
                if key in row:
                    shown[0] = f"step {step}  {name} = {row[key]:.3e}"
                    break
            bars[0].update(step - bars[0].pos)

        yield update


def _summary(res: Result, out: Path, quiet: bool) -> None:
    if quiet:
        click.echo(f"{res.status}: {res.message} [{res.wall_time_s:.2f} s] -> {out}")
        return
    lr = res.solver_options.get("lr")
    lines = [
        f"{res.game} x {res.solver} (lr = {lr:g}, seed {res.seed}, {res.device}/{res.dtype})",
        f"  status          {res.status}: {res.message}",
        f"  steps run       {res.steps_run}",
        f"  steps to tol    {res.steps_to_tol if res.steps_to_tol is not None else '-'}"
        + (f"  (tol {res.tol:g})" if res.converged is not None else "  (no V for this game)"),
    ]
    if res.diverged_at is not None:
        lines.append(f"  diverged at     step {res.diverged_at}")
    if res.stalled_at is not None:
        lines.append(f"  stalled at      step {res.stalled_at}")
    final = {k: v for k, v in res.final.items() if k not in ("step", "time_s")}
    keys = [k for k in _SUMMARY_LABELS if k in final] + [k for k in final if k not in _SUMMARY_LABELS]
    if keys:
        where = f" (step {res.final['step']:g})" if "step" in res.final else ""
        lines.append(f"  final{where}:")
        width = max(16, *(len(_SUMMARY_LABELS.get(k, k)) + 2 for k in keys))  # long metric names stay apart
        lines += [f"    {_SUMMARY_LABELS.get(k, k):<{width}}{_fmt(final[k])}" for k in keys]
    lines += [f"  wall time       {res.wall_time_s:.2f} s", f"  output          {out}"]
    click.echo("\n".join(lines))


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v) and v != int(v):
        return f"{v:.4g}"
    return str(int(v)) if isinstance(v, float) and math.isfinite(v) else str(v)


# -- hcc spectrum / hcc field -----------------------------------------------------------------


@main.command()
@click.argument("game", type=RegistryChoice(GAMES))
@click.option("--solver", "-s", type=SolverChoice(), default="gda", show_default=True,
              help="Solver whose update operator is analysed (see `hcc list`).")
@click.option("--lr", type=float, default=None, help="Step size h  [default: the solver's default for the game]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the maps' init.")
@click.option("--game-opt", "-g", multiple=True, metavar="KEY=VALUE", help="Game option (repeatable).")
@click.option("--solver-opt", "-S", multiple=True, metavar="KEY=VALUE", help="Rule/preconditioner option (repeatable).")
@click.option("--out", "-o", default=None, metavar="DIR",
              help="Output folder, new or empty  [default: a new runs/spectrum-<game>-<solver>]")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds (only a folder written by hcc).")
def spectrum(game: str, solver: str, lr: float | None, seed: int, game_opt: tuple[str, ...],
             solver_opt: tuple[str, ...], out: str | None, overwrite: bool) -> None:
    """Eigenvalues at the equilibrium: of ∇v and of the solver's update operator.

    Writes spectrum.json (eigenvalues as [re, im], spectral radius, the Lemma-4
    bound of The Numerics of GANs on simultaneous GDA's step) and spectrum.png.
    Games whose equilibrium is known only in function space are first solved to
    V <= 1e-26 with exact-natgrad (float64).
    """
    from .spectrum import run_spectrum

    with _input_errors():
        check_positive("--lr", lr)
        check_seed("--seed", seed)
        game_options, solver_options = parse_key_values(game_opt), parse_key_values(solver_opt)
        _check_build(game, solver, game_options, seed=seed, solver_options=solver_options, lr=lr)
    with _out_folder(out, f"spectrum-{_stem(game)}-{solver}", overwrite) as path:
        spec = run_spectrum(game, solver, lr=lr, game_options=game_options, solver_options=solver_options, seed=seed)
        spec.save(path)
    bound = spec.lemma4_step_bound
    click.echo("\n".join([
        f"{game} x {solver} (lr = {spec.lr:g}) at the equilibrium ({spec.equilibrium})",
        f"  spectral radius of the update operator  {spec.spectral_radius:.6f}"
        + (" (< 1: locally convergent)" if spec.spectral_radius < 1 else " (>= 1: not locally convergent)"),
        *([f"  off the {spec.neutral_dims} neutral directions     {spec.spectral_radius_transverse:.6f}"]
          if spec.neutral_dims else []),
        f"  Lemma 4: simultaneous GDA stable iff h < {bound:.6g}",
        f"  output  {path}",
    ]))


@main.command(name="field")
@click.argument("game", type=RegistryChoice(GAMES))
@click.option("--solvers", default="gda,alt-gda,negmom,eg", show_default=True,
              help="Comma-separated solvers whose trajectories are drawn.")
@click.option("--steps", type=int, default=None, help="Steps per solver  [default: per game, 150-300]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the maps' init.")
@click.option("--game-opt", "-g", multiple=True, metavar="KEY=VALUE", help="Game option (repeatable).")
@click.option("--out", "-o", default=None, metavar="DIR",
              help="Output folder, new or empty  [default: a new runs/field-<game>]")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds (only a folder written by hcc).")
def field_(game: str, solvers: str, steps: int | None, seed: int, game_opt: tuple[str, ...],
           out: str | None, overwrite: bool) -> None:
    """Phase portrait of a game with a 2-D state: field.png (function-space field + trajectories).

    For bilinear (dim=1) the state is (θ, φ); for matching-pennies it is (f, g),
    while the solvers run in parameter space (their iterates are drawn through the maps).
    """
    from .field import field_portrait
    from .plots_dynamics import plot_field

    names = [s.strip() for s in solvers.split(",") if s.strip()]
    with _input_errors():
        check_positive("--steps", steps)
        check_seed("--seed", seed)
        if not names:
            raise OptionError("--solvers: expected at least one solver name, got none")
        for n in names:
            SOLVERS[n]
        g = make_game(game, parse_key_values(game_opt), seed=seed)
    with _out_folder(out, f"field-{_stem(game)}", overwrite) as path:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            portrait = field_portrait(g, names, steps=steps)
        finally:
            torch.set_default_dtype(old)
        png = plot_field(portrait, path / "field.png")
    ends = ", ".join(f"{n} -> ({p[-1, 0]:.3g}, {p[-1, 1]:.3g})" for n, p in portrait.trajectories.items())
    click.echo(f"{game}: {len(names)} trajectories ({ends}) -> {png}")


# -- hcc compare / hcc plot -------------------------------------------------------------------


@main.command()
@click.argument("game", type=RegistryChoice(GAMES))
@click.option("--solvers", "-s", required=True, metavar="A,B,...",
              help="Comma-separated solvers (see `hcc list`; composites RULE+PRECOND too).")
@click.option("--seeds", type=int, default=5, show_default=True,
              help="Seeds 0..K-1: the same game instances and initial functions for every solver.")
@click.option("--steps", type=int, default=None, help="Maximum steps per run  [default: the game's, at most 500]")
@click.option("--tol", type=float, default=1e-6, show_default=True, help="A run stops when V <= tol.")
@click.option("--out", "-o", default=None, metavar="DIR",
              help="Output folder, new or empty  [default: a new runs/compare-<game>-<timestamp>]")
@click.option("--game-opt", "-g", multiple=True, metavar="KEY=VALUE", help="Game option (repeatable).")
@click.option("--tune", is_flag=True,
              help="Pick each solver's step size from a grid: fewest median steps to tol, then smallest final V.")
@click.option("--lr-grid", default=None, metavar="H,H,..|xF,xF,..",
              help="Tuning grid (implies --tune): step sizes, or factors of each solver's default  "
                   "[default: x0.25,x0.5,x1,x2,x4]")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default="float64", show_default=True, help=" or ".join(DTYPES) + ".")
@click.option("--log-every", type=int, default=None,
              help="Record metrics every K steps  [default: the game's: 1, gan 20]")
@click.option("--no-runs", is_flag=True, help="Do not write runs/<solver>-seed<k>/ (histories.csv keeps every row).")
@click.option("--no-pdf", is_flag=True, help="Write the plot as PNG only.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table; a one-line summary.")
@_run_options
def compare(
    game: str, solvers: str, seeds: int, steps: int | None, tol: float, out: str | None,
    game_opt: tuple[str, ...], tune: bool, lr_grid: str | None, device: str, dtype: str, log_every: int | None,
    no_runs: bool, no_pdf: bool, quiet: bool, overwrite: bool, resume: bool, checkpoint_every: float,
    guard: tuple[str, ...],
) -> None:
    """Run several solvers on GAME over the same seeds; plot, tabulate and save them.

    Writes compare.png/.pdf (V against iterations and against solver time, median
    over seeds with a 25-75 % band), histories.csv, table.md, compare.json and
    runs/<solver>-seed<k>/. Games without V (gan) are compared on mmd. Exit codes as
    `hcc solve` (3: every run diverged or stalled); an interrupted comparison resumes
    with its finished runs kept.
    """
    from .compare import _check_solvers, parse_grid, parse_solvers

    with _input_errors():
        names = parse_solvers(solvers)
        check_positive("--seeds", seeds)
        check_positive("--steps", steps)
        check_positive("--tol", tol)
        check_positive("--log-every", log_every)
        grid, factors = parse_grid(lr_grid) if lr_grid is not None else (None, None)
        _check_solvers(game, names)
        game_options = parse_key_values(game_opt)
        for name in names:
            _check_build(game, name, game_options, device=device, dtype=dtype)
        args = dict(game=game, solvers=names, seeds=seeds, steps=steps, tol=tol, game_options=game_options,
                    tune=tune or lr_grid is not None, grid=grid, factors=factors, device=device, dtype=dtype,
                    log_every=log_every, runs=not no_runs, pdf=not no_pdf, guard=_guard(guard))
    stem = f"compare-{_stem(game)}-{time.strftime('%Y%m%d-%H%M%S')}"
    _launch("compare", args, out, stem=stem, overwrite=overwrite, resume=resume, every=checkpoint_every, quiet=quiet)


def _compare_body(a: dict[str, Any], out: Path, ckpt: Checkpoint, quiet: bool) -> int:
    from .compare import DEFAULT_GRID_FACTORS
    from .compare import compare as run_compare

    names, seeds, factors = a["solvers"], a["seeds"], a["factors"]
    n_lrs = (len(a["grid"]) if a["grid"] else len(factors or DEFAULT_GRID_FACTORS)) if a["tune"] else 1
    total = len(names) * n_lrs * seeds
    with contextlib.ExitStack() as stack:
        bars: list[Any] = []

        def on_run(solver: str, lr: float, seed: int, res: Result) -> None:
            if quiet:
                return
            if not bars:  # opened at the first finished run, so input errors print alone
                bars.append(stack.enter_context(click.progressbar(
                    length=total, label="comparing", file=sys.stderr, show_eta=False, width=30,
                    item_show_func=lambda s: s)))
            bars[0].update(1, f"{solver} lr={lr:g} seed {seed}: {res.status}")

        result = run_compare(a["game"], names, seeds=seeds, steps=a["steps"], tol=a["tol"], tune=a["tune"],
                             grid=a["grid"], grid_factors=factors or DEFAULT_GRID_FACTORS,
                             game_options=a["game_options"], device=a["device"], dtype=a["dtype"],
                             log_every=a["log_every"], guard=a["guard"], checkpoint=ckpt, on_run=on_run)
    t0 = time.perf_counter()
    result.save(out, runs=a["runs"], pdf=a["pdf"])
    runs = [r for name in result.solvers for r in result.results[name]]
    if quiet:
        click.echo(f"{a['game']}: {len(names)} solvers x {seeds} seeds [{result.wall_time_s:.1f} s] -> {out}")
    else:
        click.echo(result.table())
        click.echo(f"runs: {result.wall_time_s:.1f} s; plots and files: {time.perf_counter() - t0:.1f} s; "
                   f"output {out}")
    code = _exit_code(runs)
    if code:
        click.echo(f"Error: every run diverged or stalled; the records are in {out}", err=True)
    return code


@main.command(name="plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image file; its suffix picks the format (.png, .pdf, .svg)  [default: ./plot-<metric>.png]")
@click.option("--metric", "-m", default=None, help="Metric to plot  [default: lyapunov, or mmd for runs without V]")
def plot(run_dirs: tuple[Path, ...], out: Path | None, metric: str | None) -> None:
    """Re-plot saved results together without re-running: the folders of `hcc solve` (also
    unfinished ones, from their streamed history), `hcc solve --seeds` and `hcc compare`."""
    from .compare import plot_saved

    with _input_errors():
        path, metric = plot_saved(run_dirs, out, metric)
    click.echo(f"{metric} of {len(run_dirs)} saved result(s) -> {path}")


# -- hcc solve --seeds / hcc sweep (batched instances) ----------------------------------------


def _seeds_body(a: dict[str, Any], out: Path, ckpt: Checkpoint, quiet: bool) -> int:
    """``hcc solve --seeds K``: seeds ``seed..seed+K-1`` batched (:func:`hcc.batch.run_batch`); writes
    seeds.csv, result.json (converged fraction, per-instance records), params.pt and lyapunov.png."""
    from .batch import run_batch
    from .sweep import format_table, save_batch, summary_rows

    seed, seeds, game, solver = a["seed"], a["seeds"], a["game"], a["solver"]
    t0 = time.perf_counter()
    records = run_batch(game, solver, seeds=range(seed, seed + seeds), lrs=a["lr"], game_options=a["game_options"],
                        solver_options=a["solver_options"], steps=a["steps"], tol=a["tol"], device=a["device"],
                        dtype=a["dtype"], log_every=a["log_every"], stop_at_tol=a["stop_at_tol"], guard=a["guard"],
                        threads=1, checkpoint=ckpt)
    wall = time.perf_counter() - t0
    save_batch(records, out, title=f"{game} · {solver}: seeds {seed}..{seed + seeds - 1}")
    n_conv = sum(bool(r.converged) for r in records)
    n_div = sum(r.status == "diverged" for r in records)
    n_stall = sum(r.status == "stalled" for r in records)
    stalled = f", {n_stall} stalled" if n_stall else ""
    if quiet:
        click.echo(f"{n_conv}/{seeds} converged, {n_div} diverged{stalled} [{wall:.2f} s] -> {out}")
    else:
        keys = ["lr", "instances", "converged_fraction", "diverged_fraction", "stalled_fraction",
                "steps_to_tol_median", "steps_to_tol_q25", "steps_to_tol_q75", "final_V_median"]
        if "mmd" in records[0].final:
            keys[-1] = "final_mmd_median"
        click.echo(f"{game} x {solver}: {seeds} seeds batched ({records[0].device}/{records[0].dtype}), "
                   f"{n_conv} converged, {n_div} diverged{stalled}, {wall:.2f} s\n"
                   + format_table(summary_rows(records), keys) + f"\n  output          {out}")
    code = _exit_code(records)
    if code:
        click.echo(f"Error: every instance diverged or stalled; the records are in {out}", err=True)
    return code


def _parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--lr: expected comma-separated step sizes like 0.02,0.04,0.1, got {text!r}") from None
    if not lrs:
        raise OptionError(f"--lr: expected at least one step size, got {text!r}")
    for h in lrs:
        check_positive("--lr", h)
    return sorted(set(lrs))


@main.command(name="sweep")
@click.argument("game", type=RegistryChoice(GAMES))
@click.option("--solver", "-s", type=SolverChoice(), required=True,
              help="A named solver (hcc list solvers) or RULE+PRECOND, e.g. gda+exact.")
@click.option("--lr", "lrs", required=True, metavar="A,B,C", help="Comma-separated step sizes.")
@click.option("--seeds", type=int, default=16, show_default=True, help="Seeds per step size (SEED..SEED+K-1).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--steps", type=int, default=None, help="Maximum steps  [default: the game's default_steps]")
@click.option("--tol", type=float, default=1e-6, show_default=True, help="An instance stops when V <= tol.")
@click.option("--out", "-o", default=None, metavar="DIR",
              help="Output folder, new or empty  [default: runs/sweep-<game>-<solver>-<time>]")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: chunks one after the other here; ray: one Ray task per chunk (pip install 'hcc[ray]'; "
                   "not checkpointed).")
@click.option("--chunk", type=int, default=None, help="Instances per vectorized program  [default: all in one]")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch threads per chunk process (small per-instance tensors: more threads mostly contend).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default="float64", show_default=True, help=" or ".join(DTYPES) + ".")
@click.option("--game-opt", "-g", multiple=True, metavar="KEY=VALUE", help="Game option (repeatable).")
@click.option("--solver-opt", "-S", multiple=True, metavar="KEY=VALUE", help="Rule/preconditioner option (repeatable).")
@click.option("--boundary", type=float, default=None, metavar="H",
              help="Draw a dashed line at step size H (e.g. a stability limit 2a/(a^2+b^2)).")
@click.option("--quiet", "-q", is_flag=True, help="One-line summary instead of the table.")
@_run_options
def sweep_(
    game: str, solver: str, lrs: str, seeds: int, seed: int, steps: int | None, tol: float, out: str | None,
    backend: str, chunk: int | None, threads: int, device: str, dtype: str, game_opt: tuple[str, ...],
    solver_opt: tuple[str, ...], boundary: float | None, quiet: bool, overwrite: bool, resume: bool,
    checkpoint_every: float, guard: tuple[str, ...],
) -> None:
    """Solve GAME for every step size in --lr x every seed, batched (one vmapped program per chunk).

    Writes sweep.csv (lr, seed, status, converged, steps_to_tol, final V per instance),
    summary.csv (converged fraction, quartiles of the steps to tol per lr), result.json and
    sweep.png (converged fraction vs lr, box plots of steps to tol and of final/initial V).
    Exit codes as `hcc solve` (3: every instance diverged or stalled).

    \b
    $ hcc sweep rps --solver gda+exact --lr 0.02,0.04,0.06,0.08,0.1 --seeds 256 --steps 300
    """
    with _input_errors():
        lr_list = _parse_lrs(lrs)
        check_positive("--seeds", seeds)
        check_seed("--seed", seed, count=seeds)
        check_positive("--steps", steps)
        check_positive("--tol", tol)
        check_positive("--chunk", chunk)
        check_positive("--threads", threads)
        check_number("--boundary", boundary)
        game_options, solver_options = parse_key_values(game_opt), parse_key_values(solver_opt)
        args = dict(game=game, solver=solver, lrs=lr_list, seeds=list(range(seed, seed + seeds)), steps=steps,
                    tol=tol, backend=backend, chunk=chunk, threads=threads, device=device, dtype=dtype,
                    game_options=game_options, solver_options=solver_options, boundary=boundary, guard=_guard(guard))
        _check_build(game, solver, game_options, seed=seed, solver_options=solver_options, lr=lr_list[0],
                     device=device, dtype=dtype)
    stem = f"sweep-{_stem(game)}-{solver}-{time.strftime('%Y%m%d-%H%M%S')}"
    _launch("sweep", args, out, stem=stem, overwrite=overwrite, resume=resume, every=checkpoint_every, quiet=quiet)


def _sweep_body(a: dict[str, Any], out: Path, ckpt: Checkpoint, quiet: bool) -> int:
    from .sweep import format_table, save_sweep, summary_rows
    from .sweep import sweep as run_sweep

    game, solver, lr_list, seed_list = a["game"], a["solver"], a["lrs"], a["seeds"]
    t0 = time.perf_counter()
    records = run_sweep(game, solver, lrs=lr_list, seeds=seed_list, game_options=a["game_options"],
                        solver_options=a["solver_options"], steps=a["steps"], tol=a["tol"], device=a["device"],
                        dtype=a["dtype"], chunk=a["chunk"], backend=a["backend"], threads=a["threads"],
                        guard=a["guard"], checkpoint=ckpt if a["backend"] == "local" else None)
    wall = time.perf_counter() - t0
    extra = {"game": game, "solver": solver, "lrs": lr_list, "seeds": seed_list, "steps": a["steps"],
             "tol": a["tol"], "backend": a["backend"], "chunk": a["chunk"], "device": records[0].device,
             "wall_time_s": wall, "guard": a["guard"]}
    save_sweep(records, out, boundary=a["boundary"], extra=extra)
    summ = summary_rows(records)
    n_conv = sum(bool(r.converged) for r in records)
    if quiet:
        click.echo(f"{len(records)} instances, {n_conv} converged [{wall:.2f} s] -> {out}")
    else:
        keys = ["lr", "instances", "converged_fraction", "diverged_fraction", "stalled_fraction",
                "steps_to_tol_median", "steps_to_tol_q25", "steps_to_tol_q75", "V_ratio_median", "V_late_ratio_median"]
        click.echo(f"{game} x {solver}: {len(lr_list)} step sizes x {len(seed_list)} seeds = {len(records)} "
                   f"instances, backend {a['backend']}, {records[0].device}/{records[0].dtype}, {wall:.2f} s\n"
                   + format_table(summ, keys) + f"\n  output          {out}")
    code = _exit_code(records)
    if code:
        click.echo(f"Error: every instance diverged or stalled; the records are in {out}", err=True)
    return code


# -- hcc resume -------------------------------------------------------------------------------


@main.command(name="resume")
@click.argument("run_dir", type=click.Path(path_type=Path), metavar="DIR")
@click.option("--checkpoint-every", type=float, default=DEFAULT_EVERY, show_default=True, metavar="SECONDS",
              help="Save the run's full state this often (and on Ctrl-C / SIGTERM); 0: after every step.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table; a one-line summary.")
def resume_(run_dir: Path, checkpoint_every: float, quiet: bool) -> None:
    """Continue the interrupted run in DIR (hcc solve, solve --seeds, compare or sweep) with the
    command and options it was started with. The result equals the uninterrupted run's (float64:
    bit for bit); compare and sweep skip the runs that had finished."""
    with _input_errors():
        check_positive("--checkpoint-every", checkpoint_every, allow_zero=True)
        spec = Checkpoint.spec_of(run_dir) if run_dir.is_dir() else None
        if spec is None:
            raise OptionError(f"{run_dir}: expected a folder holding a resumable hcc run (.checkpoint/run.json), "
                              f"got {'a path that does not exist' if not run_dir.exists() else 'none'}")
        command, args = spec.get("command"), spec.get("args")
        if command not in _BODIES or not isinstance(args, dict):
            raise OptionError(f"{run_dir}/.checkpoint/run.json: expected a run of {', '.join(_BODIES)}, got "
                              f"{command!r}")
        rec = read_record(run_dir)
        if rec.finished:
            raise OptionError(f"{run_dir}: expected an unfinished run, got an hcc {rec.kind} run that finished; "
                              "nothing to resume")
        prepare_out(run_dir, default_root=Path("runs"), default_stem="", resume=True)
        ckpt = Checkpoint.open(run_dir, checkpoint_every)
    _execute(command, args, run_dir, ckpt, quiet, created=False)


#: what each resumable command runs once its output folder is ready (``hcc resume`` dispatches here)
_BODIES: dict[str, Callable[[dict[str, Any], Path, Checkpoint, bool], int]] = {
    "solve": _solve_body, "compare": _compare_body, "sweep": _sweep_body,
}


# -- hcc suite --------------------------------------------------------------------------------


def _names(text: str, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names and what != "--baselines":
        raise OptionError(f"{what}: expected a comma-separated list of names, got {text!r}")
    return names


def _solver_options_by_name(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``NAME:KEY=VALUE`` items → ``{NAME: {KEY: VALUE}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise OptionError(f"--solver-opt: expected NAME:KEY=VALUE (e.g. cg-natgrad:maxiter=20), got {item!r}")
        out.setdefault(name.strip(), {}).update(parse_key_values([kv]))
    return out


@main.command(name="suite")
@click.option("--families", "-f", default=None, metavar="A,B,..",
              help="Families to run  [default: all; --list shows them]")
@click.option("--solvers", "-s", default=None, metavar="A,B,..",
              help="hcc solvers run at their defaults, named or RULE+PRECOND  [default: exact-natgrad,cg-natgrad,"
                   "kfac-natgrad]")
@click.option("--baselines", "-b", default="eg,consensus,acgd", show_default=True, metavar="A,B,..",
              help="Solvers whose step size is picked per family on tuning instances (acgd: CGDs' ACGD); '' for none.")
@click.option("--grid", "grids", multiple=True, metavar="NAME=GRID",
              help="A baseline's step-size grid: factors of its default (eg=x0.5,x1,x2) or absolute (acgd=0.01,0.1).")
@click.option("--solver-opt", "-S", multiple=True, metavar="NAME:KEY=VALUE", help="A solver's option (repeatable).")
@click.option("--instances", type=int, default=None,
              help="Instances per family  [default: each of the family's variants once, at least 3]")
@click.option("--tune-instances", type=int, default=2, show_default=True,
              help="Instances per family on which the baselines' step sizes are picked (never measured).")
@click.option("--dtypes", default="float64,float32", show_default=True, help="Comma-separated dtypes.")
@click.option("--budget", type=int, default=1000, show_default=True, help="Steps per run.")
@click.option("--tune-budget", type=int, default=300, show_default=True,
              help="Steps per tuning run (pick: fewest median steps to tol, else the smallest median final V).")
@click.option("--tol", type=float, default=1e-6, show_default=True, help="A run converged when V <= tol.")
@click.option("--jobs", "-j", type=int, default=1, show_default=True,
              help="Families run in this many processes (their wall-clocks then share the machine).")
@click.option("--quick", is_flag=True, help="Smoke run (about a minute): gauss-l0.1, rps, matching-pennies, "
                                             "1 instance each, two-point grids.")
@click.option("--list", "list_families", is_flag=True, help="List the families and exit.")
@click.option("--merge", "merge_dirs", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Instead of running: merge saved runs of different families (repeatable) into one table.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder  [default: runs/suite-<time>]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (only hcc's own files).")
@click.option("--quiet", "-q", is_flag=True, help="No per-run lines; the tables only.")
def suite_(
    families: str | None, solvers: str | None, baselines: str, grids: tuple[str, ...], solver_opt: tuple[str, ...],
    instances: int | None, tune_instances: int, dtypes: str, budget: int, tune_budget: int, tol: float, jobs: int,
    quick: bool,
    list_families: bool, merge_dirs: tuple[Path, ...], out: Path | None, overwrite: bool, quiet: bool,
) -> None:
    """Benchmark suite: hidden matrix-game families with certified equilibria, every solver.

    Per family x dtype x solver: the fraction of instances with V <= tol within --budget
    steps, median iterations and wall-clock to V <= tol, median final V; the best hcc
    solver at its defaults against ACGD (targets). Writes table.md, summary.csv,
    runs.csv (one row per run), runs.jsonl (streamed), suite.json and payoffs.json.

    \b
    $ hcc suite --quick
    $ hcc suite --families gauss-l0.1,rps --solvers exact-natgrad,eg+cg --baselines eg,acgd
    $ hcc suite --merge runs/suite-rps --merge runs/suite-gauss -o runs/suite-all
    """
    from .suite import DEFAULT_SOLVERS, FAMILIES, QUICK, SuiteResult, merge, parse_entries, run_suite

    if list_families:
        for name, fam in FAMILIES.items():
            click.echo(f"  {name:<18} {fam.game:<17} {fam.default_instances} instances  {fam.summary}")
        return
    if merge_dirs:
        with _input_errors():
            res = merge([SuiteResult.load(d) for d in merge_dirs])
        if out is not None:
            with _input_errors():
                out = prepare_out(out, default_root=Path("runs"), default_stem="suite", overwrite=overwrite)
            res.save(out)
        click.echo(res.markdown() + (f"\n\noutput  {out}" if out is not None else ""))
        return
    started = time.strftime("%Y%m%d-%H%M%S")
    with _input_errors():
        for name, val in (("--instances", instances), ("--tune-instances", tune_instances), ("--budget", budget),
                          ("--tune-budget", tune_budget), ("--tol", tol)):
            check_positive(name, val)
        fams = _names(families, "--families") if families else list(QUICK["families"] if quick else FAMILIES)
        for f in fams:
            FAMILIES[f]
        grid_map = dict(QUICK["grids"]) if quick else {}
        grid_map.update(parse_key_values(grids))
        kwargs: dict[str, Any] = {
            "solvers": _names(solvers, "--solvers") if solvers else list(DEFAULT_SOLVERS),
            "baselines": _names(baselines, "--baselines"), "grids": grid_map,
            "solver_options": _solver_options_by_name(solver_opt), "dtypes": _names(dtypes, "--dtypes"),
            "budget": budget, "tune_budget": tune_budget, "tol": tol, "jobs": jobs,
            "tune_instances": QUICK["tune_instances"] if quick else tune_instances,
            "instances": instances if instances is not None else QUICK["instances"] if quick else None,
        }
        parse_entries(kwargs["solvers"], kwargs["baselines"], grid_map, kwargs["solver_options"])  # before any output
        out = prepare_out(out, default_root=Path("runs"), default_stem=f"suite-{started}", overwrite=overwrite)
        res = run_suite(fams, progress=None if quiet else lambda line: click.echo(line, err=True),
                        stream=out / "runs.jsonl", **kwargs)
    res.save(out)
    click.echo(res.markdown() + f"\n\noutput  {out}")


# -- hcc list ---------------------------------------------------------------------------------

_SECTIONS = ("games", "solvers", "rules", "preconditioners")


@main.command(name="list")
@click.argument("what", type=click.Choice(_SECTIONS), required=False)
def list_(what: str | None) -> None:
    """List games, solvers, update rules and preconditioners with their options.

    WHAT restricts the listing to one section.
    """
    sections: dict[str, Callable[[], list[str]]] = {
        "games": _list_games, "solvers": _list_solvers, "rules": lambda: _list_parts(RULES),
        "preconditioners": lambda: _list_parts(PRECONDITIONERS),
    }
    blocks = [[f"{name.upper()}", *sections[name]()] for name in (_SECTIONS if what is None else (what,))]
    click.echo("\n\n".join("\n".join(b) for b in blocks))


def _list_games() -> list[str]:
    lines = []
    for name, cls in GAMES.items():
        lines.append(f"  {name}  (default steps {cls.default_steps}) - {_first_line(cls.__doc__)}")
        lines += _option_lines(cls.Options)
    return lines


def _list_solvers() -> list[str]:
    lines = []
    for name, spec in SOLVERS.items():
        rule, pre = RULES[spec.rule], PRECONDITIONERS[spec.precond]
        lrs = "  ".join(f"{g}={spec.default_lr(g):g}" for g in GAMES)
        lines += [
            f"  {name} - {spec.summary}",
            f"    rule {spec.rule}, preconditioner {spec.precond}",
            f"    default lr: {lrs}",
        ]
        lines += _option_lines(rule.Options, spec.rule_defaults) + _option_lines(pre.Options, spec.precond_defaults)
    return lines


def _list_parts(registry: Registry[Any]) -> list[str]:
    lines = []
    for name, cls in registry.items():
        lines.append(f"  {name} - {_first_line(cls.__doc__)}")
        lines += _option_lines(cls.Options)
    return lines


def _option_lines(options_cls: type, defaults: Mapping[str, Any] | None = None) -> list[str]:
    """``name: type = default  help`` rows, with ``defaults`` (a solver's presets) shown as the default."""
    hints = typing.get_type_hints(options_cls)
    rows = [(n, _type_name(hints[n], t), (defaults or {}).get(n, d), h) for n, t, d, h in options_table(options_cls)]
    if not rows:
        return []
    heads = [f"{n}: {t} = {d!r}" for n, t, d, _ in rows]
    width = max(map(len, heads))
    return [f"      {h:<{width}}  {help_}" for h, (*_, help_) in zip(heads, rows)]


def _type_name(tp: Any, name: str) -> str:
    """``a|b|c`` for a ``Literal``; otherwise the name :func:`options_table` gives."""
    return "|".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is typing.Literal else name


def _first_line(doc: str | None) -> str:
    """The docstring's summary line without reST markup."""
    return (doc or "").strip().split("\n")[0].rstrip(".").replace("``", "").replace(":math:", "")


__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "InputError", "RegistryChoice", "main"]
