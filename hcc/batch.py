r"""Batched runs: K independent instances of a game solved as one vectorized program.

An *instance* is a seed (the game's initialization and support points, and the
sampling stream) and a step size ``h``. :func:`solve_batch` stacks the K parameter
pytrees, solver states, support batches and the game buffers that differ between
seeds (support points, a seeded payoff matrix) along a leading axis and runs the
solver step under :func:`torch.func.vmap`:

.. math::

    (x^{(i)}_{t+1}, s^{(i)}_{t+1}) = \mathrm{step}(x^{(i)}_t, s^{(i)}_t; h^{(i)}, \text{game}^{(i)}),
    \qquad i = 1, …, K,

so one Python step drives all K instances (the win is the per-step Python and
dispatch overhead, paid once instead of K times). The bookkeeping of
:func:`hcc.run.solve` is done per instance with masks:

- an instance whose ``V ≤ tol`` is *frozen* (its parameters and state stop changing,
  with ``stop_at_tol``) while the others continue; the program stops when none is active;
- an instance whose iterate turns non-finite or whose ``V`` exceeds ``diverge_at`` is
  *diverged* at that step: its last sane iterate is kept as its final one, and from then
  on it is fed a copy of an active instance's iterate (so its NaNs never reach a
  linear-algebra kernel that would fail the whole batch) and its output is discarded;
- an instance whose monitored values froze (the stall test of :func:`hcc.run.solve`, on
  the same values at the same steps) is *stalled* at that step and stops;
- a step that raises inside a linear-algebra kernel (``eigh`` of a NaN matrix) is retried
  instance by instance; the instances that raise alone are marked diverged at that step
  (an unbatched :func:`~hcc.run.solve` would raise instead).

Each instance gets a :class:`~hcc.run.Result` whose ``steps_run``, ``steps_to_tol``,
``converged``, ``status``, ``diverged_at``, ``stalled_at`` and the ``V`` (``lyapunov``)
and ``payoff`` of every logged row equal those of running it alone with :func:`hcc.solve`
(float64: to round-off, tested to 1e-10). Rows hold ``step``, ``lyapunov``, ``payoff`` only
(not the field norm, exploitability or the step's own measurements; games without V also
get their own metrics, e.g. the GAN's MMD, in the first and last rows), and
``wall_time_s`` is the wall time of the whole batched program. ``params`` is each
instance's final iterate.

**What vectorizes.** Every update rule with the ``identity``, ``exact`` (``func``
backend) and ``cg`` preconditioners. CG's stop at its tolerance is data-dependent
control flow, which :func:`~torch.func.vmap` cannot trace; batched CG therefore runs
``early_stop=False``: exactly ``maxiter`` iterations, masked once an instance's residual
is below the tolerance (the records' ``solver_options`` say so). Masked iterations do not
move a converged solve, so the result equals the early-stopping run's, at the cost of
always paying ``maxiter`` iterations. ``kfac`` and ``diag`` (and ``exact`` with
``backend=backpack``) are **not** batched: BackPACK computes its factors with module
hooks on a stateful, extended module, which :mod:`torch.func` transforms cannot see
through; they raise an :class:`~hcc.registry.OptionError` saying to
run those instances one by one.

>>> from hcc.batch import run_batch
>>> records = run_batch("rps", "eg", seeds=range(8), lrs=0.1, steps=200)
>>> sum(r.converged for r in records)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from . import __version__
from .checkpoint import Checkpoint, global_rng_state, set_global_rng_state
from .curvature.pytree import sq_norm, stack, unstack
from .device import resolve_device, resolve_dtype
from .games import Game, Params, make_game
from .registry import OptionError, check_positive, check_seed
from .run import GuardOptions, Result, _Stall, frozen_status, guard_options, solve
from .solvers import Solver, make_solver
from .solvers.natural import CG, Exact
from .solvers.oracle import vector_field

Backend = Literal["local", "ray"]
BACKENDS: tuple[str, ...] = ("local", "ray")
#: preconditioners that cannot run under torch.func.vmap, and why
UNBATCHABLE: dict[str, str] = {
    "kfac": "BackPACK computes the K-FAC factors with module hooks on an extended module, which torch.func "
    "transforms (vmap, jacfwd) cannot trace",
    "diag": "BackPACK computes the diagonal GGN with module hooks on an extended module, which torch.func "
    "transforms (vmap, jacfwd) cannot trace",
}

__all__ = ["BACKENDS", "UNBATCHABLE", "batchable_solver", "untraceable", "run_batch", "solve_batch"]


# -- pytree stacking ------------------------------------------------------------------------------


def _where(mask: Tensor, new: Any, old: Any) -> Any:
    """Leaf-wise ``mask ? new : old`` with ``mask`` of shape ``(K,)`` over the leading axis."""

    def pick(n: Tensor, o: Tensor) -> Tensor:
        return torch.where(mask.view(-1, *([1] * (n.dim() - 1))), n, o)

    return pytree.tree_map(pick, new, old)


def _finite_rows(tree: Any) -> Tensor:
    """``(K,)``: True where every leaf of the instance is finite."""
    leaves = pytree.tree_leaves(tree)
    return torch.stack([torch.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in leaves]).all(0)


def _sq_norm_rows(tree: Any) -> Tensor:
    leaves = pytree.tree_leaves(tree)
    return torch.stack([x.reshape(x.shape[0], -1).pow(2).sum(1) for x in leaves]).sum(0)


# -- the solver under vmap -------------------------------------------------------------------------


def untraceable(solver: Solver) -> str | None:
    """Why :mod:`torch.func` transforms (``vmap``, ``jacfwd``) cannot trace ``solver``'s step, or ``None``.

    Every reason is given (the rule's and the preconditioner's), joined by ``"; "``.
    """
    pre = solver.precond
    why = [solver.rule.untraceable or None]
    if isinstance(pre, Exact) and pre.options.backend == "backpack":
        why.append("BackPACK's BatchGrad Jacobians are computed with module hooks, which torch.func transforms (vmap, "
                   "jacfwd) cannot trace")
    why.append(UNBATCHABLE.get(pre.name))
    return "; ".join(w for w in why if w) or None


def batchable_solver(solver: Solver) -> Solver:
    """The solver as it runs under :func:`torch.func.vmap`, or an error saying why it cannot.

    CG gets ``early_stop=False`` (a fixed count of masked iterations; module docstring);
    BackPACK-based preconditioners raise :class:`~hcc.registry.OptionError`.
    """
    pre = solver.precond
    why = untraceable(solver)
    if why is not None:
        raise OptionError(
            f"solver {solver.name!r} cannot be batched: {why}; run its instances one by one with hcc.solve "
            f"(batchable preconditioners: identity, exact (backend=func), cg)"
        )
    if isinstance(pre, CG) and pre.options.early_stop:
        new = copy.copy(solver)
        new.precond = CG(dataclasses.replace(pre.options, early_stop=False))
        return new
    return solver


class _Bound(nn.Module):
    """Holds the game as a submodule so :func:`functional_call` can swap its buffers per instance."""

    def __init__(self, game: Game, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.game = game
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.game, *args)


def _differing_buffers(games: Sequence[Game]) -> dict[str, Tensor]:
    """The game buffers that differ between instances, stacked (keys as seen from :class:`_Bound`)."""
    ref = dict(games[0].named_buffers())
    out: dict[str, Tensor] = {}
    for name, buf in ref.items():
        vals = [dict(g.named_buffers())[name] if g is not games[0] else buf for g in games]
        if any(v.shape != buf.shape or not torch.equal(v, buf) for v in vals):
            out[f"game.{name}"] = torch.stack(vals)
    return out


def _check_games(games: Sequence[Game]) -> None:
    g0 = games[0]
    for g in games:
        if type(g) is not type(g0) or g.options != g0.options:
            raise OptionError(
                f"solve_batch: expected instances of one game with one set of options, got "
                f"{type(g0).__name__}({g0.options}) and {type(g).__name__}({g.options})"
            )
        p, q = next(iter(g.parameters())), next(iter(g0.parameters()))
        if p.device != q.device or p.dtype != q.dtype:
            raise OptionError(f"solve_batch: expected all games on one device/dtype, got {p.device}/{p.dtype} "
                              f"and {q.device}/{q.dtype}")


def solve_batch(
    games: Sequence[Game],
    solver: Solver,
    *,
    lrs: Sequence[float] | Tensor | float | None = None,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
    tol: float = 1e-6,
    log_every: int | None = None,
    stop_at_tol: bool = True,
    guard: GuardOptions | Mapping[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Result]:
    """Solve K instances at once; one :class:`~hcc.run.Result` per instance (module docstring).

    ``games`` are K games of one kind and options (e.g. ``make_game(name, options, seed=s)``
    for K seeds; the same object may appear several times), already on their device and
    dtype; ``lrs`` per-instance step sizes (default: ``solver.lr`` for all); ``seeds`` the
    seeds of the sampling streams (default: each game's seed, as :func:`hcc.run.run` does).
    ``guard`` and ``checkpoint`` as in :func:`hcc.run.solve` (the batch's state is saved as a
    whole and resumes bitwise). ``progress(step, n_active)`` is called after every step.

    >>> import hcc
    >>> games = [hcc.make_game("rps", seed=s) for s in range(4)]
    >>> recs = solve_batch(games, hcc.make_solver("eg", "rps"), lrs=[0.05, 0.1, 0.2, 0.3], steps=100)
    """
    games = list(games)
    if not games:
        raise OptionError("solve_batch: expected at least one game instance, got none")
    K = len(games)
    _check_games(games)
    g0 = games[0]
    steps = g0.default_steps if steps is None else steps
    log_every = g0.default_log_every if log_every is None else log_every
    check_positive("steps", steps)
    check_positive("tol", tol)
    check_positive("log_every", log_every)
    gd = guard_options(guard)
    seeds = [g.seed for g in games] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != K:
        raise OptionError(f"seeds: expected {K} (one per instance), got {len(seeds)}")
    lr_list = _lr_list(lrs, solver.lr, K)
    run_solver = batchable_solver(solver)

    p0 = next(iter(g0.parameters()))
    dev, dt = p0.device, p0.dtype
    lr = torch.tensor(lr_list, dtype=dt, device=dev)
    bufs = _differing_buffers(games)
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    inits = [g.init_params() for g in games]
    params0 = stack(inits)
    first = [g.sample_batch(gen) for g, gen in zip(games, gens, strict=True)]
    batch = stack(first)
    state0 = stack([run_solver.init(g, p) for g, p in zip(games, inits, strict=True)])
    eval_batch = stack([g.eval_batch() for g in games]) if hasattr(g0, "eval_batch") else batch
    eb0 = unstack(eval_batch, 0)
    with torch.no_grad():
        has_V = g0.lyapunov(*g0.strategies(inits[0], eb0), eb0) is not None

    def step_fn(game: Game, params: Params, state: Any, b: Any, h: Tensor) -> tuple[Params, Any]:
        s = copy.copy(run_solver)
        s.lr = h  # a 0-d (batched) tensor: per-instance step sizes
        new, st, _ = s.step(game, params, state, b)
        return new, st

    def metric_fn(game: Game, params: Params, b: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        F, G = game.strategies(params, b)
        psi = game.payoff(F, G, b)
        V = game.lyapunov(F, G, b) if has_V else torch.zeros_like(psi)
        return V, psi, F, G

    stepper, metric = _Bound(g0, step_fn), _Bound(g0, metric_fn)
    v_step = vmap(lambda bu, p, s, b, h: functional_call(stepper, bu, (p, s, b, h)))
    v_metric = vmap(lambda bu, p, b: functional_call(metric, bu, (p, b)))

    def metrics(params: Params) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``V``, ``Ψ`` and the strategies ``F``, ``G`` of every instance."""
        with torch.no_grad():
            return v_metric(bufs, params, eval_batch)

    fingerprint = {"game": g0.name, "options": repr(g0.options), "info": repr(g0.describe()),
                   "solver": repr(sorted(run_solver.options().items())),
                   "lrs": lr_list, "seeds": seeds, "tol": tol, "log_every": log_every, "stop_at_tol": stop_at_tol,
                   "guard": dataclasses.asdict(gd), "dtype": str(dt), "device": str(dev)}
    t0 = time.perf_counter()
    nan = torch.full((K,), math.nan, dtype=dt, device=dev)
    none = torch.full((K,), -1, dtype=torch.long, device=dev)
    stall = _Stall(gd.stall_window, gd.stall_rtol, batched=True)
    saved = checkpoint.state if checkpoint is not None else None
    if saved is not None:
        if saved.get("fingerprint") != fingerprint:
            raise OptionError(f"checkpoint in {checkpoint.out}: expected a saved state of this batch, got one of "  # type: ignore
                              "another batch or settings")
        t, params, state = saved["t"], saved["params"], saved["state"]
        for gen, st in zip(gens, saved["gens"], strict=True):
            gen.set_state(st)
        set_global_rng_state(saved["torch_rng"])
        Vs, psis = list(saved["Vs"].unbind(0)), list(saved["psis"].unbind(0))
        to_tol, div_at, stall_at, stall_what, end, diverged, linalg_failed, bad_norm, active = (
            saved[k] for k in ("to_tol", "div_at", "stall_at", "stall_what", "end", "diverged", "linalg_failed",
                               "bad_norm", "active"))
        stall = _Stall(gd.stall_window, gd.stall_rtol, batched=True,
                       points=[tuple(p) for p in saved["stall"]])  # type: ignore[misc]
        wall_before = saved["wall_time_s"]
    else:
        t, params, state, wall_before = 0, params0, state0, 0.0
        V0, psi0, _, _ = metrics(params)
        Vs, psis = [V0], [psi0]
        to_tol = torch.where(V0 <= tol, 0, none) if has_V else none.clone()
        div_at, stall_at, stall_what = none.clone(), none.clone(), none.clone()
        end = torch.zeros(K, dtype=torch.long, device=dev)
        diverged = torch.zeros(K, dtype=torch.bool, device=dev)
        linalg_failed = torch.zeros(K, dtype=torch.bool, device=dev)
        bad_norm = nan.clone()
        active = ~((to_tol >= 0) & stop_at_tol)

    def snapshot() -> dict[str, Any]:
        return {"fingerprint": fingerprint, "t": t, "params": params, "state": state,
                "gens": [g.get_state() for g in gens], "torch_rng": global_rng_state(), "Vs": torch.stack(Vs),
                "psis": torch.stack(psis), "to_tol": to_tol, "div_at": div_at, "stall_at": stall_at,
                "stall_what": stall_what, "end": end,
                "diverged": diverged, "linalg_failed": linalg_failed, "bad_norm": bad_norm, "active": active,
                "stall": stall.state(), "wall_time_s": wall_before + time.perf_counter() - t0}

    with checkpoint.signals() if checkpoint is not None else contextlib.nullcontext():
        while t < steps and bool(active.any()):
            t += 1
            if g0.stochastic:
                batch = stack([g.sample_batch(gen) for g, gen in zip(games, gens, strict=True)])
            p_in, s_in = _fill(diverged, active, params, state)
            try:
                new, new_state = v_step(bufs, p_in, s_in, batch, lr)
                failed = torch.zeros_like(active)
            except (torch.linalg.LinAlgError, RuntimeError):
                failed = _failing(step_fn, g0, bufs, p_in, s_in, batch, lr, active)
                if not bool(failed.any()):
                    raise
                p_in, s_in = _fill(diverged | failed, active & ~failed, params, state)
                new, new_state = v_step(bufs, p_in, s_in, batch, lr)
            V, psi, F, G = metrics(new)
            run = active
            sane = _finite_rows(new) & ~failed
            if has_V:
                sane &= torch.isfinite(V) & (V <= gd.diverge_at)
            bad = run & ~sane
            ok = run & sane
            V = torch.where(failed, nan, V)
            params, state = _where(ok, new, params), _where(ok, new_state, state)
            Vs.append(torch.where(run, V, nan))
            psis.append(torch.where(run, psi, nan))
            div_at = torch.where(bad, t, div_at)
            bad_norm = torch.where(bad, _sq_norm_rows(new).sqrt(), bad_norm)
            diverged |= bad
            linalg_failed |= failed & run
            if has_V:
                to_tol = torch.where(ok & (V <= tol) & (to_tol < 0), t, to_tol)
            end = torch.where(run, t, end)
            logged = t % log_every == 0 or t == steps
            watched = {"V": Vs[-1]} if has_V else {"F": F, "G": G} if logged else None
            frozen = stall.add(t, watched) if watched is not None else None
            for code, name in reversed(list(enumerate(frozen or {}))):  # the first frozen one names the stall
                stuck = ok & frozen[name] & ((V > tol) if has_V else True) & (stall_at < 0)  # type: ignore[index]
                stall_what = torch.where(stuck, code, stall_what)
            stall_at = torch.where((stall_what >= 0) & (stall_at < 0), t, stall_at)
            active = ok & ~((to_tol >= 0) & stop_at_tol) & (stall_at < 0)
            if progress is not None:
                progress(t, int(active.sum()))
            if checkpoint is not None and t < steps and bool(active.any()):
                checkpoint.poll(snapshot, f"step {t} of {steps}")
    wall = wall_before + time.perf_counter() - t0

    # one transfer at the end; then the per-instance records
    V_hist, psi_hist = torch.stack(Vs).cpu().tolist(), torch.stack(psis).cpu().tolist()
    to_tol_l, div_l, stall_l, what_l, end_l, bad_norm_l, fail_l = (
        x.cpu().tolist() for x in (to_tol, div_at, stall_at, stall_what, end, bad_norm, linalg_failed))
    watched_names = ["V"] if has_V else ["F", "G"]
    common = dict(
        game=g0.name, game_options=asdict(g0.options), solver=solver.name, tol=tol, device=str(dev),
        dtype=str(dt).replace("torch.", ""),
        versions={"hcc": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
        wall_time_s=wall,
    )
    out = []
    for i in range(K):
        res = Result(seed=seeds[i], solver_options={**run_solver.options(), "lr": lr_list[i]},
                     game_info=games[i].describe(), params=unstack(params, i),
                     settings={"steps": steps, "log_every": log_every, "stop_at_tol": stop_at_tol,
                               "guard": dataclasses.asdict(gd)}, **common)  # type: ignore[arg-type]
        e, d, stop = end_l[i], div_l[i], stall_l[i]
        st = to_tol_l[i] if to_tol_l[i] >= 0 else None

        def row(t: int, i: int = i) -> dict[str, float]:
            r = {"step": t, "payoff": psi_hist[t][i]}
            if has_V:
                r["lyapunov"] = V_hist[t][i]
            return r

        res.history.append(row(0))
        last_ok = d - 1 if d >= 0 else e
        for t in range(1, last_ok + 1):
            if t % log_every == 0 or t == steps or t == stop or (stop_at_tol and st is not None and t == st):
                res.history.append(row(t))
        if not has_V:  # the game's own metrics (GAN: MMD, modes) at the first and last recorded rows
            for r, p in ((res.history[0], params0), (res.history[-1], params)):
                r.update(games[i].extra_metrics(unstack(p, i), unstack(eval_batch, i)))
        res.steps_run = e
        res.steps_to_tol = st
        res.converged = (st is not None) if has_V else None
        if d >= 0:
            res.status, res.diverged_at = "diverged", d
            V_d = V_hist[d][i]
            what = ("a linear solve failed (non-finite input)" if fail_l[i]
                    else "non-finite parameters" if not math.isfinite(bad_norm_l[i])
                    else f"V = {V_d:.3g} beyond {gd.diverge_at:.3g}")
            res.message = f"diverged at step {d}: {what}"
            res.history.append({"step": d, **({"lyapunov": V_d} if has_V else {}), "param_norm": bad_norm_l[i]})
            res.final = dict(res.history[-2]) if len(res.history) > 1 else {}
        elif stop >= 0:
            norm = math.sqrt(float(sq_norm(vector_field(games[i], unstack(params, i), unstack(eval_batch, i)))))
            res.status, res.message = frozen_status(stop, gd, watched_names[what_l[i]],
                                                    V_hist[stop][i] if has_V else None, norm, tol)
            res.stalled_at = stop if res.status == "stalled" else None
            res.final = dict(res.history[-1])
        else:
            res.status = "converged" if res.converged else "max_steps"
            res.message = (f"V ≤ {tol:g} after {st} steps" if res.converged
                           else f"ran {e} steps" + (f" without reaching V ≤ {tol:g}" if has_V else ""))
            res.final = dict(res.history[-1])
        out.append(res)
    return out


def _lr_list(lrs: Sequence[float] | Tensor | float | None, default: float, K: int) -> list[float]:
    if lrs is None:
        return [float(default)] * K
    if isinstance(lrs, (int, float)):
        vals = [float(lrs)] * K
    else:
        vals = [float(x) for x in (lrs.tolist() if isinstance(lrs, Tensor) else lrs)]
    if len(vals) != K:
        raise OptionError(f"lrs: expected one step size or {K} (one per instance), got {len(vals)}")
    for v in vals:
        check_positive("lr (step size)", v)
    return vals


def _fill(masked: Tensor, donors: Tensor, params: Params, state: Any) -> tuple[Params, Any]:
    """Feed the ``masked`` instances a copy of a donor's (an instance in ``donors``) iterate and
    state, so a diverged one's NaNs never reach a kernel that would fail the whole batch."""
    if not bool(masked.any()) or not bool(donors.any()):
        return params, state
    j = int(donors.nonzero()[0, 0])
    return _donate(masked, params, j), _donate(masked, state, j)


def _donate(mask: Tensor, tree: Any, j: int) -> Any:
    return pytree.tree_map(lambda x: torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x[j : j + 1], x), tree)


def _failing(step_fn: Callable[..., Any], game: Game, bufs: dict[str, Tensor], params: Params, state: Any,
             batch: Any, lr: Tensor, active: Tensor) -> Tensor:
    """``(K,)``: the active instances whose step raises when run alone (a NaN reaching ``eigh``)."""
    K = lr.shape[0]
    bound = _Bound(game, step_fn)
    failed = torch.zeros(K, dtype=torch.bool, device=lr.device)
    for i in range(K):
        if not bool(active[i]):
            continue
        try:
            functional_call(bound, unstack(bufs, i), (unstack(params, i), unstack(state, i), unstack(batch, i), lr[i]))
        except (torch.linalg.LinAlgError, RuntimeError):
            failed[i] = True
    return failed


# -- by names, chunked, on a backend ------------------------------------------------------------


def _run_chunk(spec: dict[str, Any], checkpoint: Checkpoint | None = None) -> list[Result]:
    """Build the chunk's games and solver by name and solve it (the unit a backend dispatches)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cache: dict[int, Game] = {}
    games = []
    for s in spec["seeds"]:
        if s not in cache:
            cache[s] = make_game(spec["game"], spec["game_options"], seed=s, device=spec["device"],
                                 dtype=spec["dtype"])
        games.append(cache[s])
    solver = make_solver(spec["solver"], games[0], lr=spec["lrs"][0], options=spec["solver_options"])
    if untraceable(solver) is not None:  # one by one (run_batch makes such chunks one instance long)
        return [solve(g, make_solver(spec["solver"], g, lr=h, options=spec["solver_options"]), steps=spec["steps"],
                      tol=spec["tol"], seed=s, log_every=spec["log_every"], stop_at_tol=spec["stop_at_tol"],
                      guard=spec["guard"], checkpoint=checkpoint)
                for g, h, s in zip(games, spec["lrs"], spec["seeds"], strict=True)]
    return solve_batch(games, solver, lrs=spec["lrs"], seeds=spec["seeds"], steps=spec["steps"], tol=spec["tol"],
                       log_every=spec["log_every"], stop_at_tol=spec["stop_at_tol"], guard=spec["guard"],
                       checkpoint=checkpoint)


def run_batch(
    game: str,
    solver: str,
    *,
    seeds: Sequence[int],
    lrs: Sequence[float] | float | None = None,
    game_options: dict[str, Any] | None = None,
    solver_options: dict[str, Any] | None = None,
    steps: int | None = None,
    tol: float = 1e-6,
    device: str = "cpu",
    dtype: str = "float64",
    log_every: int | None = None,
    stop_at_tol: bool = True,
    guard: GuardOptions | Mapping[str, Any] | None = None,
    chunk: int | None = None,
    backend: Backend = "local",
    threads: int | None = None,
    checkpoint: Checkpoint | None = None,
) -> list[Result]:
    """Build instances by name (seed ``s``: ``make_game(game, options, seed=s)``, sampling seed ``s``)
    and solve them batched, in chunks of at most ``chunk`` instances (default: all in one).

    ``lrs``: one step size for all, or one per seed (default: the solver's default for
    the game, as :func:`hcc.run.run` takes it). ``backend="local"`` solves the chunks one
    after the other here; ``backend="ray"`` sends each chunk to a Ray cluster as one task
    (``ray.init(address="auto")`` if a cluster is running, else a local Ray instance; needs
    ``pip install hcc[ray]``). Results are the same either way, in instance order.
    ``threads`` sets ``torch.set_num_threads`` in each chunk's process.

    ``checkpoint`` (local backend): the finished chunks and the running chunk's state are
    saved (:func:`solve_batch`); a resumed call skips the finished chunks.

    >>> recs = run_batch("rps", "gda+exact", seeds=[0, 1, 0, 1], lrs=[0.02, 0.02, 0.1, 0.1], steps=300)
    """
    seeds = [check_seed("seed", s) for s in seeds]
    if not seeds:
        raise OptionError("seeds: expected at least one seed, got none")
    if backend not in BACKENDS:
        raise OptionError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if chunk is not None:
        check_positive("chunk", chunk)
    if checkpoint is not None and backend != "local":
        raise OptionError(f"checkpoint: expected the local backend (Ray tasks are not checkpointed), got {backend!r}")
    K = len(seeds)
    # fail early (here, not in a remote worker) on bad names, options and unbatchable solvers
    resolve_device(device), resolve_dtype(dtype)
    first = make_game(game, game_options, seed=seeds[0])
    if lrs is None:
        lrs = make_solver(solver, first, options=solver_options).lr
    lr_list = _lr_list(lrs, 0.0, K)
    # a solver torch.func cannot trace runs its instances one by one with hcc.solve (chunks of one instance)
    sequential = untraceable(make_solver(solver, first, lr=lr_list[0], options=solver_options)) is not None
    guard = dataclasses.asdict(guard_options(guard))
    size = 1 if sequential else K if chunk is None else int(chunk)
    specs = [
        dict(game=game, solver=solver, seeds=seeds[a : a + size], lrs=lr_list[a : a + size],
             game_options=dict(game_options or {}), solver_options=dict(solver_options or {}), steps=steps, tol=tol,
             device=device, dtype=dtype, log_every=log_every, stop_at_tol=stop_at_tol, guard=guard, threads=threads)
        for a in range(0, K, size)
    ]
    if backend == "ray":
        return [r for c in _ray_map(specs) for r in c]
    saved = checkpoint.state if checkpoint is not None else None
    chunks = [[Result.from_state(r) for r in c] for c in saved["chunks"]] if saved is not None else []

    def wrap(current: Any) -> dict[str, Any]:
        return {"chunks": [[r.state_dict() for r in c] for c in chunks], "current": current}

    for i, spec in enumerate(specs[len(chunks):], start=len(chunks)):
        inner = None
        if checkpoint is not None:
            resume = saved["current"] if saved is not None and i == len(saved["chunks"]) else None
            inner = checkpoint.nested(wrap, resume, label=f"chunk {i + 1} of {len(specs)}" if len(specs) > 1 else "")
        chunks.append(_run_chunk(spec, inner))
        if checkpoint is not None and i + 1 < len(specs):
            checkpoint.save(wrap(None))
    return [r for c in chunks for r in c]


def _ray_map(specs: list[dict[str, Any]]) -> list[list[Result]]:
    """Run :func:`_run_chunk` on each spec as a Ray task; connect to a running cluster if there is one."""
    try:
        import ray
    except ImportError:
        raise OptionError(
            "backend 'ray': expected the ray package, which is not installed; pip install 'hcc[ray]' (or use "
            "backend=local)"
        ) from None
    if not ray.is_initialized():
        try:
            ray.init(address="auto", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError):
            ray.init(log_to_driver=False, include_dashboard=False)
    task = ray.remote(num_cpus=1)(_run_chunk)
    return ray.get([task.remote(s) for s in specs])
