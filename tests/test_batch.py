"""Batched runs (hcc.batch) against one-by-one hcc.solve, sweeps, and their CLI commands."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from click.testing import CliRunner

import hcc
from hcc.batch import batchable_solver, run_batch, solve_batch
from hcc.cli import main
from hcc.curvature.pytree import stack, unstack
from hcc.registry import OptionError
from hcc.sweep import instance_rows, summary_rows, sweep

ATOL = 1e-10

# (game, solver, game options, solver options, step sizes, steps, log_every): the key equivalence cases
CASES = [
    ("rps", "gda", {}, {}, (0.03, 0.05, 0.2), 12, 1),
    ("rps", "eg", {}, {}, (0.05, 0.1, 0.3), 12, 5),
    ("rps", "ogda", {}, {}, (0.05, 0.1, 0.3), 12, 1),
    ("rps", "negmom", {}, {}, (0.05, 0.1, 0.3), 12, 4),
    ("rps", "adam", {}, {}, (0.005, 0.01, 0.05), 12, 1),
    ("rps", "consensus", {}, {}, (0.01, 0.03, 0.1), 10, 3),
    ("rps", "hamiltonian", {}, {}, (0.01, 0.03, 0.1), 8, 1),
    ("rps", "nsgda", {"width": 8}, {"normalize": "layer"}, (0.01, 0.02, 0.05), 8, 1),
    ("rps", "gda+exact", {}, {}, (0.02, 0.06, 0.1), 12, 1),
    ("rps", "eg+exact", {"n_support": 2}, {}, (0.2, 0.4, 0.5), 10, 3),
    ("rps", "ogda+exact", {}, {"damping": 0.0}, (0.1, 0.2, 0.3), 10, 1),
    ("rps", "eg+cg", {"width": 8, "n_support": 3}, {"maxiter": 15, "early_stop": False}, (0.2, 0.4, 0.5), 6, 1),
    ("rps", "consensus+cg", {"width": 8}, {"maxiter": 10}, (0.01, 0.05, 0.1), 5, 1),
    ("bilinear", "gda", {"dim": 2}, {}, (0.05, 0.1, 0.3), 15, 1),
    ("bilinear", "eg", {"dim": 3, "matrix": "random"}, {}, (0.1, 0.5, 0.9), 15, 2),
    ("bilinear", "negmom", {"dim": 2, "matrix": "rotation"}, {}, (0.1, 0.3, 0.5), 15, 1),
    ("bilinear", "adam", {"dim": 2, "lam": 0.1}, {}, (0.01, 0.1, 0.3), 12, 1),
    ("bilinear", "eg+exact", {"dim": 2, "lam": 0.1}, {}, (0.1, 0.3, 0.6), 12, 1),
    ("bilinear", "gda+cg", {"dim": 2, "lam": 0.1}, {"maxiter": 5}, (0.1, 0.3, 0.6), 12, 1),
]
IDS = [f"{c[0]}-{c[1]}" for c in CASES]


def _games(name: str, options: dict, seeds: list[int]) -> list[hcc.Game]:
    return [hcc.make_game(name, options, seed=s).double() for s in seeds]


def _solo(name, solver, options, solver_options, seed, lr, **kw) -> hcc.Result:
    g = hcc.make_game(name, options, seed=seed).double()
    return hcc.solve(g, hcc.make_solver(solver, g, lr=lr, options=solver_options), seed=seed, **kw)


def assert_same_record(batched: hcc.Result, solo: hcc.Result, atol: float = ATOL) -> None:
    """Steps, stop, divergence and V / payoff of every logged row as in the one-by-one run."""
    where = f"seed {solo.seed}, lr {solo.solver_options['lr']}"
    for key in ("steps_run", "steps_to_tol", "converged", "status", "diverged_at", "message"):
        assert getattr(batched, key) == getattr(solo, key), (where, key, getattr(batched, key), getattr(solo, key))
    assert [r["step"] for r in batched.history] == [r["step"] for r in solo.history], where
    for rb, rs in zip(batched.history, solo.history, strict=True):
        for k in ("lyapunov", "payoff"):
            if k in rs:
                a, b = rb[k], rs[k]
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol * max(1.0, abs(b)), (
                    f"{where}, step {rs['step']}, {k}: batched {a!r} vs alone {b!r}")
    for k in ("lyapunov", "payoff"):
        if k in solo.final:
            assert abs(batched.final[k] - solo.final[k]) <= atol * max(1.0, abs(solo.final[k])), (where, k)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batched_run_equals_runs_one_by_one(case):
    name, solver, options, solver_options, lrs, steps, log_every = case
    seeds = [0, 1, 2]
    games = _games(name, options, seeds)
    records = solve_batch(games, hcc.make_solver(solver, games[0], options=solver_options), lrs=lrs, steps=steps,
                          log_every=log_every)
    assert [r.seed for r in records] == seeds
    for s, lr, rec in zip(seeds, lrs, records, strict=True):
        assert rec.solver_options["lr"] == lr
        assert_same_record(rec, _solo(name, solver, options, solver_options, s, lr, steps=steps,
                                      log_every=log_every))


def test_converged_instances_freeze_while_others_continue():
    """Per-instance stopping: each stops at its own step, its final V is its own."""
    lrs, seeds = (0.3, 0.4, 0.5, 0.45), [0, 1, 2, 3]
    games = _games("rps", {}, seeds)
    records = solve_batch(games, hcc.make_solver("eg+exact", games[0]), lrs=lrs, steps=60, log_every=7)
    solos = [_solo("rps", "eg+exact", {}, {}, s, h, steps=60, log_every=7) for s, h in zip(seeds, lrs)]
    assert all(r.converged for r in solos) and len({r.steps_to_tol for r in solos}) > 1
    for rec, solo in zip(records, solos, strict=True):
        assert_same_record(rec, solo)
        assert rec.final["step"] == rec.steps_to_tol == rec.steps_run


def test_no_stop_at_tol_and_tolerance_reached_at_the_start():
    games = _games("rps", {}, [0, 1])
    kw = dict(steps=40, tol=2e-3, stop_at_tol=False, log_every=9)
    records = solve_batch(games, hcc.make_solver("eg+exact", games[0]), lrs=[0.4, 0.3], **kw)
    for s, h, rec in zip([0, 1], [0.4, 0.3], records):
        assert_same_record(rec, _solo("rps", "eg+exact", {}, {}, s, h, **kw))
    # V0 ≤ tol: zero steps, as alone
    rec = solve_batch(games[:1], hcc.make_solver("eg", games[0]), steps=5, tol=10.0)[0]
    assert_same_record(rec, _solo("rps", "eg", {}, {}, 0, None, steps=5, tol=10.0))
    assert rec.steps_run == 0 and rec.steps_to_tol == 0


def test_divergence_is_detected_per_instance():
    """Simultaneous GDA on a bilinear game diverges, faster for larger steps: each is masked at its own step."""
    lrs, seeds = (0.1, 0.8, 1.5), [0, 1, 2]
    games = _games("bilinear", {"dim": 2}, seeds)
    kw = dict(steps=60, guard={"diverge_at": 1e3})
    records = solve_batch(games, hcc.make_solver("gda", games[0]), lrs=lrs, **kw)
    solos = [_solo("bilinear", "gda", {"dim": 2}, {}, s, h, **kw) for s, h in zip(seeds, lrs)]
    assert [r.status for r in solos] == ["max_steps", "diverged", "diverged"]
    assert solos[1].diverged_at != solos[2].diverged_at
    for rec, solo in zip(records, solos, strict=True):
        assert_same_record(rec, solo)
        if solo.status == "diverged":
            assert rec.history[-1]["param_norm"] == pytest.approx(solo.history[-1]["param_norm"], rel=1e-10)


def test_an_instance_whose_linear_solve_fails_is_diverged_alone():
    """A NaN reaching eigh raises for the whole vmapped batch: that instance is singled out and masked."""
    games = _games("rps", {"width": 8}, [0, 1, 2])
    with torch.no_grad():
        next(iter(games[1].min_map.parameters())).fill_(float("nan"))
    records = solve_batch(games, hcc.make_solver("eg+exact", games[0]), steps=6)
    assert records[1].status == "diverged" and records[1].diverged_at == 1
    assert "linear solve failed" in records[1].message
    for i in (0, 2):
        assert_same_record(records[i], _solo("rps", "eg+exact", {"width": 8}, {}, i, None, steps=6))


def test_stochastic_game_draws_each_instance_its_own_batches():
    opts = {"width": 8, "batch_size": 16, "n_eval": 32}
    seeds, lrs = [3, 4, 3], [0.05, 0.05, 0.1]
    games = _games("gan", opts, seeds)
    records = solve_batch(games, hcc.make_solver("eg", games[0]), lrs=lrs, seeds=seeds, steps=4)
    for s, h, rec in zip(seeds, lrs, records):
        solo = _solo("gan", "eg", opts, {}, s, h, steps=4)
        assert rec.converged is None and solo.converged is None
        assert_same_record(rec, solo)


def test_cg_runs_masked_fixed_iterations_and_matches_early_stopping():
    games = _games("rps", {"width": 8, "n_support": 2}, [0, 1])
    solver = hcc.make_solver("eg+cg", games[0], options={"maxiter": 30})
    assert batchable_solver(solver).precond.options.early_stop is False
    assert solver.precond.options.early_stop is True  # the caller's solver is untouched
    records = solve_batch(games, solver, steps=6)
    assert records[0].solver_options["early_stop"] is False
    for s, rec in zip([0, 1], records):
        for early in (True, False):
            solo = _solo("rps", "eg+cg", {"width": 8, "n_support": 2}, {"maxiter": 30, "early_stop": early},
                         s, None, steps=6)
            assert_same_record(rec, solo, atol=1e-9)


@pytest.mark.parametrize("solver,options", [("eg+kfac", {}), ("eg+diag", {}),
                                            ("eg+exact", {"backend": "backpack"})])
def test_backpack_preconditioners_refuse_to_batch_with_a_reason(solver, options):
    games = _games("rps", {"width": 8}, [0, 1])
    with pytest.raises(OptionError, match="cannot be batched: BackPACK"):
        solve_batch(games, hcc.make_solver(solver, games[0], options=options), steps=2)


@pytest.mark.parametrize("solver", ["exact-natgrad", "eg+kfac"])
def test_untraceable_solvers_run_one_by_one(solver):
    """The proximal rule (data-dependent Newton solve) and BackPACK preconditioners cannot be vmapped: run_batch
    solves their instances one by one, with the same records as hcc.solve."""
    recs = run_batch("rps", solver, seeds=[0, 1], game_options={"width": 8}, steps=4, tol=1e-12)
    for s, rec in zip([0, 1], recs):
        g = hcc.make_game("rps", {"width": 8}, seed=s)
        solo = hcc.solve(g, hcc.make_solver(solver, g), steps=4, tol=1e-12, seed=s)
        assert rec.steps_run == solo.steps_run and rec.seed == s
        assert [r["lyapunov"] for r in rec.history] == pytest.approx([r["lyapunov"] for r in solo.history], rel=1e-12)


def test_bad_inputs_say_what_was_expected():
    games = _games("rps", {"width": 8}, [0, 1])
    solver = hcc.make_solver("eg", games[0])
    with pytest.raises(OptionError, match="expected one step size or 2"):
        solve_batch(games, solver, lrs=[0.1, 0.2, 0.3], steps=2)
    with pytest.raises(OptionError, match="lr"):
        solve_batch(games, solver, lrs=[0.1, -1.0], steps=2)
    with pytest.raises(OptionError, match="one set of options"):
        solve_batch([games[0], hcc.make_game("rps", {"width": 4}).double()], solver, steps=2)
    with pytest.raises(OptionError, match="backend"):
        run_batch("rps", "eg", seeds=[0], backend="spark")  # type: ignore[arg-type]


def test_stack_and_unstack_round_trip():
    ps = [hcc.make_game("rps", {"width": 4}, seed=s).init_params() for s in range(3)]
    st = stack(ps)
    assert st[0]["0.weight"].shape[0] == 3
    for i in range(3):
        assert all(torch.equal(unstack(st, i)[p][k], ps[i][p][k]) for p in (0, 1) for k in ps[i][p])


def test_run_batch_by_name_in_chunks_and_sweep_order():
    kw = dict(game_options={"width": 8}, steps=8, dtype="float64", device="auto")
    whole = run_batch("rps", "eg", seeds=[0, 1, 2, 0], lrs=[0.1, 0.1, 0.1, 0.3], **kw)
    chunked = run_batch("rps", "eg", seeds=[0, 1, 2, 0], lrs=[0.1, 0.1, 0.1, 0.3], chunk=3, **kw)
    for a, b in zip(whole, chunked, strict=True):
        assert_same_record(a, b, atol=0.0)
    recs = sweep("rps", "eg", lrs=[0.1, 0.3], seeds=[0, 1, 2], **kw)
    assert [(r.solver_options["lr"], r.seed) for r in recs] == [(h, s) for h in (0.1, 0.3) for s in (0, 1, 2)]
    assert_same_record(recs[3], whole[3], atol=0.0)
    summ = summary_rows(recs)
    assert [s["lr"] for s in summ] == [0.1, 0.3] and all(s["instances"] == 3 for s in summ)
    rows = instance_rows(recs)
    assert rows[0]["final_V"] == recs[0].final["lyapunov"]


def test_float32_batch_runs():
    games = [hcc.make_game("rps", {"width": 8}, seed=s).float() for s in range(3)]
    recs = solve_batch(games, hcc.make_solver("eg+exact", games[0]), steps=40, tol=1e-5)
    assert all(r.dtype == "float32" for r in recs)
    assert all(r.final["lyapunov"] < 1e-3 * r.history[0]["lyapunov"] for r in recs), [r.final for r in recs]


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_solve_seeds_writes_a_batch_summary(tmp_path):
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["solve", "rps", "-s", "eg+exact", "--seeds", "3", "--seed", "5",
                                    "--steps", "60", "-g", "width=8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["instances"] == 3
    assert doc["converged_fraction"] == sum(r["converged"] for r in doc["records"]) / 3 > 0
    assert [r["seed"] for r in doc["records"]] == [5, 6, 7]
    rows = list(csv.DictReader(open(out / "seeds.csv")))
    assert [int(r["seed"]) for r in rows] == [5, 6, 7] and {"steps_to_tol", "final_V", "converged"} <= set(rows[0])
    assert (out / "lyapunov.png").read_bytes()[:4] == b"\x89PNG"
    solo = _solo("rps", "eg+exact", {"width": 8}, {}, 6, None, steps=60)
    assert rows[1]["steps_to_tol"] == ("" if solo.steps_to_tol is None else str(solo.steps_to_tol))
    assert float(rows[1]["final_V"]) == pytest.approx(solo.final["lyapunov"], rel=1e-5)


def test_cli_sweep_writes_csv_summary_and_figure(tmp_path):
    out = tmp_path / "s"
    res = CliRunner().invoke(main, ["sweep", "rps", "-s", "gda+exact", "--lr", "0.1,0.02", "--seeds", "3",
                                    "--steps", "20", "-g", "width=8", "--boundary", "0.066", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 6 and {"lr", "seed", "converged", "steps_to_tol", "final_V"} <= set(rows[0])
    summ = list(csv.DictReader(open(out / "summary.csv")))
    assert [float(r["lr"]) for r in summ] == [0.02, 0.1] and "converged_fraction" in summ[0]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "converged_fraction" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--lr", "0.1,x"], "--lr: expected comma-separated"),
    (["--lr", "0.1", "--solver", "nope+exact"], "unknown update rule 'nope'"),
    (["--lr", "0.1", "--chunk", "0"], "chunk"),
])
def test_cli_sweep_bad_input_is_one_line(args, needle):
    base = ["sweep", "rps", "--seeds", "2", "--steps", "2"]
    if "--solver" not in args:
        base += ["--solver", "eg"]
    res = CliRunner().invoke(main, base + args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and res.stderr.count("\n") == 1, res.stderr


# -- Ray ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_backend_gives_the_local_results():
    ray = pytest.importorskip("ray")
    kw = dict(game_options={"width": 8}, steps=10, chunk=2)
    try:
        remote = run_batch("rps", "eg", seeds=[0, 1, 2], lrs=[0.1, 0.2, 0.3], backend="ray", **kw)
    finally:
        ray.shutdown()
    local = run_batch("rps", "eg", seeds=[0, 1, 2], lrs=[0.1, 0.2, 0.3], **kw)
    for a, b in zip(remote, local, strict=True):
        assert_same_record(a, b, atol=0.0)
