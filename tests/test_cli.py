"""The ``hcc`` command line (click's CliRunner) and the run plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_image, assert_one_line_error, load
from conftest import hcc_cli as hcc

from hcc import GAMES, PRECONDITIONERS, RULES, SOLVERS
from hcc.cli import EXIT_DIVERGED
from hcc.plots import plot_run
from hcc.run import Result as RunResult

REQUIRED_KEYS = {
    "game", "game_options", "solver", "solver_options", "seed", "steps_run", "converged", "steps_to_tol",
    "final", "history", "wall_time_s", "device", "versions",
}










# -- hcc solve: runs that work -----------------------------------------------------------------


def test_solve_rps_eg_defaults_converge(tmp_path: Path) -> None:
    out = tmp_path / "rps-eg"
    res = hcc("solve", "rps", "--solver", "eg", "--out", out)  # with the progress callback (not --quiet)
    assert res.exit_code == 0, res.output
    data = load(out)
    assert REQUIRED_KEYS <= set(data)
    assert {"hcc", "torch"} <= set(data["versions"])
    assert data["game"] == "rps" and data["solver"] == "eg" and data["status"] == "converged"
    assert data["converged"] is True and data["steps_to_tol"] is not None
    assert data["steps_run"] == data["steps_to_tol"] <= GAMES["rps"].default_steps
    assert data["final"]["lyapunov"] <= 1e-6 and data["tol"] == 1e-6
    assert data["solver_options"]["lr"] == SOLVERS["eg"].default_lr("rps")
    assert data["device"] == "cpu" and data["dtype"] == "float64"
    with open(out / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"step", "lyapunov", "exploitability", "field_norm"} <= set(rows[0])
    assert len(rows) == data["steps_run"] + 1
    assert_image(out / "lyapunov.png")
    for word in ("converged", "steps to tol", "V (Lyapunov)", "exploitability", "wall time", str(out)):
        assert word in res.stdout


def test_solve_not_converged_is_recorded_honestly(tmp_path: Path) -> None:
    out = tmp_path / "gda"
    res = hcc("solve", "rps", "--solver", "gda", "--steps", "200", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    data = load(out)
    assert data["status"] == "max_steps" and data["converged"] is False and data["steps_to_tol"] is None
    assert data["steps_run"] == 200 and data["final"]["lyapunov"] > 1e-6
    assert "max_steps" in res.stdout


def test_solve_records_game_and_solver_options(tmp_path: Path) -> None:
    res = hcc("solve", "rps", "--solver", "eg", "--steps", "3", "-g", "lam=0.2", "--out", tmp_path / "a", "-q")
    assert res.exit_code == 0, res.output
    assert load(tmp_path / "a")["game_options"]["lam"] == 0.2
    res = hcc("solve", "bilinear", "--solver", "negmom", "--steps", "3", "--solver-opt", "beta=-0.3",
              "--lr", "0.2", "--seed", "7", "--out", tmp_path / "b", "-q")
    assert res.exit_code == 0, res.output
    data = load(tmp_path / "b")
    assert data["solver_options"]["beta"] == -0.3 and data["solver_options"]["alternating"] is True
    assert data["solver_options"]["lr"] == 0.2 and data["seed"] == 7 and data["steps_run"] == 3


def test_solve_payoff_file(tmp_path: Path) -> None:
    path = tmp_path / "pennies.csv"
    path.write_text("1,-1\n-1,1\n")
    out = tmp_path / "m"
    res = hcc("solve", "matrix", "--solver", "eg", "--payoff", path, "--steps", "20", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    data = load(out)
    assert data["game_options"]["payoff"] == str(path) and data["steps_run"] >= 1
    assert_image(out / "lyapunov.png")


def test_solve_default_out_dirs_are_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert hcc("solve", "bilinear", "--solver", "eg", "--steps", "2", "-q").exit_code == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("bilinear-eg-") for r in runs)
    assert all((r / "result.json").is_file() for r in runs)


def test_solve_divergence(tmp_path: Path) -> None:
    # simultaneous GDA on θφ: |1 + ih| = √(1 + h²) > 1, V grows ×3.25 a step at h = 1.5
    out = tmp_path / "div"
    res = hcc("solve", "bilinear", "--solver", "gda", "--lr", "1.5", "--steps", "5000", "--out", out, "-q")
    assert res.exit_code == EXIT_DIVERGED == 3, res.output
    data = load(out)
    assert data["status"] == "diverged" and data["converged"] is False
    step = data["diverged_at"]
    assert 1 <= step < 5000 and data["steps_run"] == step
    last = data["history"][-1]
    assert last["step"] == step and (last["lyapunov"] is None or last["lyapunov"] > 1e12)
    assert f"diverged at step {step}" in res.stderr
    assert (out / "history.csv").is_file()
    assert_image(out / "lyapunov.png")


# -- hcc solve: bad input --------------------------------------------------------------------------


def test_unknown_game_lists_choices(tmp_path: Path) -> None:
    msg = assert_one_line_error(hcc("solve", "nope", "--solver", "eg", "--out", tmp_path), "'nope'")
    assert all(name in msg for name in GAMES)


def test_unknown_solver_lists_choices(tmp_path: Path) -> None:
    msg = assert_one_line_error(hcc("solve", "rps", "--solver", "nope", "--out", tmp_path), "'nope'")
    assert all(name in msg for name in SOLVERS)


def test_unknown_options_list_choices(tmp_path: Path) -> None:
    assert_one_line_error(hcc("solve", "rps", "--solver", "eg", "-g", "bogus=1", "--out", tmp_path),
                          "'bogus'", "lam", "width")
    assert_one_line_error(hcc("solve", "rps", "--solver", "negmom", "-S", "bogus=1", "--out", tmp_path),
                          "'bogus'", "beta", "alternating")
    assert_one_line_error(hcc("solve", "rps", "--solver", "eg", "-g", "lam=abc", "--out", tmp_path), "abc")
    assert_one_line_error(hcc("solve", "rps", "--solver", "eg", "-g", "lam", "--out", tmp_path), "key=value")


@pytest.mark.parametrize(
    "flag, value", [("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--steps", "0"), ("--tol", "0"),
                    ("--log-every", "0")],
)
def test_non_positive_numbers_rejected_before_running(tmp_path: Path, flag: str, value: str) -> None:
    out = tmp_path / "never"
    assert_one_line_error(hcc("solve", "rps", "--solver", "eg", flag, value, "--out", out), "expected", flag, value)
    assert not out.exists()


def test_malformed_payoff(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3\n")
    assert_one_line_error(hcc("solve", "matrix", "--solver", "eg", "--payoff", ragged, "--out", tmp_path / "a"),
                          "equal length")
    assert_one_line_error(hcc("solve", "matrix", "--solver", "eg", "--payoff", "1,x;2,3", "--out", tmp_path / "b"),
                          "expected numbers", "'x'")
    assert_one_line_error(hcc("solve", "rps", "--solver", "eg", "--payoff", "1,2;3,4", "--out", tmp_path / "c"),
                          "--payoff", "matrix")
    assert not any(tmp_path.glob("*/result.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_gpu(tmp_path: Path) -> None:
    assert_one_line_error(hcc("solve", "rps", "--solver", "eg", "--device", "cuda", "--out", tmp_path), "cuda")


def test_bad_dtype(tmp_path: Path) -> None:
    assert_one_line_error(hcc("solve", "rps", "--solver", "eg", "--dtype", "float16", "--out", tmp_path),
                          "float16", "float64")


# -- hcc list ------------------------------------------------------------------------------------------


def test_list_reads_the_registries() -> None:
    res = hcc("list")
    assert res.exit_code == 0, res.output
    for registry in (GAMES, SOLVERS, RULES, PRECONDITIONERS):
        for name in registry:
            assert f"  {name} " in res.stdout, name
    for name, cls in GAMES.items():
        assert f"{name}  (default steps {cls.default_steps})" in res.stdout
    assert "beta: float = -0.5" in res.stdout  # negmom's rule default shown as the default
    assert f"rps={SOLVERS['eg'].default_lr('rps'):g}" in res.stdout
    only = hcc("list", "solvers")
    assert only.exit_code == 0 and "GAMES" not in only.stdout and "SOLVERS" in only.stdout


# -- plots -------------------------------------------------------------------------------------------------


def _fake(history: list[dict], **kw) -> RunResult:
    return RunResult(game="fake", game_options={}, solver="eg", solver_options={"lr": 0.1}, seed=0,
                     history=history, **kw)


def test_plot_masks_non_positive_and_missing(tmp_path: Path) -> None:
    hist = [{"step": t, "lyapunov": v, "field_norm": 1.0 / (t + 1)}
            for t, v in enumerate([1.0, 0.0, -1.0, None, math.nan, math.inf, 1e-3])]
    hist.append({"step": 7, "lyapunov": 1e13})
    res = _fake(hist, tol=1e-6, status="diverged", diverged_at=7, steps_run=7)
    assert_image(plot_run(res, tmp_path / "v.png"))
    empty = _fake([{"step": 0, "lyapunov": 0.0}], tol=1e-6, status="converged", steps_to_tol=0)
    assert_image(plot_run(empty, tmp_path / "empty.png"))


def test_plot_gan_panels(tmp_path: Path) -> None:
    hist = [{"step": t, "mmd": 1.0 / (t + 1) if t else 0.0, "modes_covered": min(t, 8), "high_quality": t / 10,
             "d_distance": 0.1, "payoff": 0.5} for t in range(10)]
    res = _fake(hist, status="max_steps", steps_run=9)
    assert_image(plot_run(res, tmp_path / "gan.png"))


# -- hcc solve --rule × --precond ----------------------------------------------------------------


@pytest.mark.parametrize("solver", ["kfac-natgrad", "cg-natgrad", "exact-natgrad"])
def test_solve_rps_natural_solvers_converge_with_defaults(tmp_path: Path, solver: str) -> None:
    res = hcc("solve", "rps", "--solver", solver, "-q", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    data = load(tmp_path)
    assert data["converged"] is True and data["final"]["lyapunov"] <= 1e-6


def test_solve_rule_times_precond(tmp_path: Path) -> None:
    res = hcc("solve", "rps", "--rule", "ogda", "--precond", "exact", "--lr", "0.3", "-q", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    data = load(tmp_path)
    assert data["solver"] == "ogda+exact" and data["solver_options"]["lr"] == 0.3
    assert data["converged"] is True


def test_rule_alone_uses_the_identity(tmp_path: Path) -> None:
    res = hcc("solve", "bilinear", "--rule", "eg", "--steps", "5", "-q", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert load(tmp_path)["solver"] == "eg+identity"


@pytest.mark.parametrize("args, needle", [
    ((), "got neither"),
    (("--solver", "eg", "--rule", "eg"), "got both"),
    (("--precond", "exact"), "got neither"),
    (("--rule", "eg", "--precond", "nope"), "expected one of: identity"),
])
def test_solver_choice_errors(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(hcc("solve", "rps", *args, "--out", tmp_path), needle)


def test_solve_gan_writes_a_sample_grid(tmp_path: Path) -> None:
    res = hcc("solve", "gan", "--solver", "adam", "--steps", "20", "--log-every", "5", "-g", "width=16",
              "-g", "batch_size=32", "-g", "n_eval=64", "-q", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert_image(tmp_path / "samples.png")


def test_snapshots_keep_evenly_spaced_logged_steps() -> None:
    from hcc.cli import _Snapshots

    snap = _Snapshots(100)
    p = ({"w": torch.zeros(1)}, {"w": torch.ones(1)})
    for t in [*range(0, 100, 7), 100]:  # log_every = 7 (and the last step): the first logged step ≥ each target
        snap(t, p)
    assert sorted(snap.params) == [0, 21, 42, 63, 84, 100]
