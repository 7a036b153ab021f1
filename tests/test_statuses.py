"""Honest statuses: divergence and stalls on bounded games, sane default steps, one exit-code rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import assert_one_line_error, load
from conftest import hcc_cli as cli

import hcc
from hcc.batch import solve_batch
from hcc.cli import EXIT_DIVERGED
from hcc.curvature.pytree import sq_norm
from hcc.run import GuardOptions, guard_options
from hcc.solvers import SOLVERS

TINY = {"rps": {"width": 8}, "matching-pennies": {}, "matrix": {"payoff": "3,-1;-2,1", "width": 8},
        "gan": {"batch_size": 16, "n_eval": 64}}


# -- a huge step on a bounded game ---------------------------------------------------------------------


@pytest.mark.parametrize("game", list(TINY))
@pytest.mark.parametrize("solver", ["gda", "eg"])
def test_a_huge_step_on_a_bounded_game_is_a_stall(game: str, solver: str) -> None:
    """The strategies saturate at the first step, the field through the softmax dies, nothing moves again."""
    res = hcc.run(game, solver, lr=1e3, steps=100, game_options=TINY[game], log_every=5 if game == "gan" else 1)
    assert res.status == "stalled" and res.failed and res.converged is not True, res.message
    assert res.stalled_at is not None and res.steps_run == res.stalled_at < 100
    assert "stalled at step" in res.message and "field |v|" in res.message


def test_cli_huge_step_exits_3_with_the_reason(tmp_path: Path) -> None:
    res = cli("solve", "rps", "-s", "gda", "--lr", "1e3", "--steps", "60", "-q", "-o", tmp_path)
    assert res.exit_code == EXIT_DIVERGED, res.output
    assert "stalled at step 21" in res.stderr and "dead" in res.stderr
    data = load(tmp_path)
    assert data["status"] == "stalled" and data["stalled_at"] == 21 and data["final"]["field_norm"] < 1e-30


def test_the_guard_thresholds_are_options(tmp_path: Path) -> None:
    kw = dict(lr=1e3, steps=40, game_options=TINY["rps"])
    assert hcc.run("rps", "gda", guard={"stall_window": 0}, **kw).status == "max_steps"
    assert hcc.run("rps", "gda", guard={"stall_window": 5}, **kw).stalled_at == 6
    assert guard_options(None) == GuardOptions()
    for bad in ("stall_window=-1", "stall_rtol=nan", "diverge_at=0", "bogus=1"):
        assert_one_line_error(cli("solve", "rps", "-s", "eg", "--guard", bad, "-o", tmp_path / "x"), bad.split("=")[0])


# -- no false alarms ------------------------------------------------------------------------------------


def test_a_fast_solver_running_past_tol_is_not_a_stall() -> None:
    """exact-natgrad reaches V ≤ 1e-8 within a few dozen steps, then sits at its round-off floor."""
    res = hcc.run("rps", "exact-natgrad", steps=60, stop_at_tol=False)
    assert res.status == "converged" and min(h["lyapunov"] for h in res.history) < 1e-10, res.message


def test_logits_running_off_at_a_boundary_equilibrium_are_not_a_failure() -> None:
    """λ = 0, a pure equilibrium: the parameters grow while V keeps falling (far below tol here)."""
    opts = {"payoff": "1,2;3,4", "lam": 0.0, "width": 8}
    start = hcc.make_game("matrix", opts).init_params()
    res = hcc.run("matrix", "gda", lr=1.0, steps=300, tol=1e-300, game_options=opts, log_every=50)
    V = [h["lyapunov"] for h in res.history]
    assert res.status == "max_steps" and all(b < a for a, b in zip(V, V[1:])) and V[-1] < 1e-7, V
    assert float(sq_norm(res.params)) > float(sq_norm(start))


def test_the_batched_guard_gives_the_statuses_of_runs_one_by_one() -> None:
    games = [hcc.make_game("rps", TINY["rps"], seed=s) for s in (0, 1)]
    lrs = [0.05, 1e3]
    recs = solve_batch(games, hcc.make_solver("gda", games[0]), lrs=lrs, steps=40)
    for g, h, rec in zip(games, lrs, recs, strict=True):
        solo = hcc.solve(g, hcc.make_solver("gda", g, lr=h), steps=40)
        assert (rec.status, rec.stalled_at, rec.steps_run, rec.message) == (
            solo.status, solo.stalled_at, solo.steps_run, solo.message)
    assert [r.status for r in recs] == ["max_steps", "stalled"]


# -- default steps on payoffs without an interaction term ---------------------------------------------


@pytest.mark.parametrize("payoff", ["1,2;3,4", "0,0;0,0", "1,2,3", "1;2;3", "0.001,-0.001;-0.001,0.001"])
def test_payoffs_without_interaction_keep_the_rps_steps(payoff: str) -> None:
    """No (or a weak) interaction term: the default step is never scaled above the one tuned on rps."""
    game = hcc.make_game("matrix", {"payoff": payoff, "width": 4})
    assert game.lr_scale == 1.0
    for solver in ("eg", "exact-natgrad"):
        assert hcc.make_solver(solver, game).lr == SOLVERS[solver].default_lr("matrix")


@pytest.mark.parametrize("solver, steps", [("eg", 260), ("exact-natgrad", 60)])
def test_a_payoff_without_interaction_converges_at_the_default_step(solver: str, steps: int) -> None:
    """Measured before: ``1,2;3,4`` got a step of 1.7e11 and never moved (status max_steps, exit 0)."""
    res = hcc.run("matrix", solver, steps=steps, game_options={"payoff": "1,2;3,4"})
    assert res.status == "converged", res.message


# -- one exit-code rule ------------------------------------------------------------------------------------


SOLVE = ("solve", "bilinear", "-s", "gda", "--seeds", "2", "--steps", "60")
SWEEP = ("sweep", "bilinear", "-s", "gda", "--seeds", "2", "--steps", "60")
COMPARE = ("compare", "bilinear", "--seeds", "1", "--steps", "60", "--no-pdf", "--no-runs")


@pytest.mark.parametrize("every_run_failed, not_all_failed", [
    ((*SOLVE, "--lr", "1.5"), (*SOLVE, "--lr", "0.1")),
    ((*SWEEP, "--lr", "1.5,2"), (*SWEEP, "--lr", "0.1,1.5")),  # 0.1 runs its steps, 1.5 diverges
    ((*COMPARE, "--solvers", "gda", "--lr-grid", "1.5"), (*COMPARE, "--solvers", "gda,eg", "--lr-grid", "1.5,0.1")),
])
def test_exit_3_only_when_every_run_diverged_or_stalled(every_run_failed: tuple[str, ...],
                                                         not_all_failed: tuple[str, ...], tmp_path: Path) -> None:
    res = cli(*every_run_failed, "-q", "-o", tmp_path / "all")
    assert res.exit_code == EXIT_DIVERGED and "Error: every" in res.stderr, res.output
    res = cli(*not_all_failed, "-q", "-o", tmp_path / "some")
    assert res.exit_code == 0, res.output


def test_batched_gan_records_carry_the_gan_metrics(tmp_path: Path) -> None:
    res = cli("solve", "gan", "-s", "gda", "--seeds", "2", "--steps", "20", "--log-every", "10", "-q", "-o", tmp_path,
              *[f"-g{k}={v}" for k, v in TINY["gan"].items()])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "result.json").read_text())
    for rec in doc["records"]:
        first, last = rec["history"][0], rec["final"]
        assert all(math.isfinite(r[k]) for r in (first, last) for k in ("mmd", "modes_covered", "payoff"))
    header = (tmp_path / "seeds.csv").read_text().splitlines()[0]
    assert "final_mmd" in header and "mmd0" in header and "final_V" not in header
    assert (tmp_path / "payoff.png").read_bytes()[:4] == b"\x89PNG"
