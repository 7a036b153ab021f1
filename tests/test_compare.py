"""``hcc compare`` / ``hcc plot`` and :mod:`hcc.compare`: same starts, consistent files, tuning, re-plots.

Small settings (rps, 2 seeds, ≤ 40 steps) so the file runs in seconds on one core.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import assert_image, assert_one_line_error
from conftest import hcc_cli as hcc

from hcc.compare import Comparison, GridPoint, compare, load_groups, pick_lr, plot_saved
from hcc.run import Result as RunResult

PDF_MAGIC = b"%PDF"
SOLVERS = ("gda", "eg+exact")
STEPS = 40








@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``hcc compare`` on rps: gda (never converges) and exact-natgrad (converges in ~30 steps)."""
    out = tmp_path_factory.mktemp("cmp") / "rps"
    res = hcc("compare", "rps", "--solvers", ",".join(SOLVERS), "--seeds", "2", "--steps", STEPS, "--out", out)
    assert res.exit_code == 0, res.output
    assert "| solver | lr |" in res.stdout and str(out) in res.stdout
    return out


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "rps"
    res = hcc("compare", "rps", "-s", ",".join(SOLVERS), "--seeds", "2", "--steps", STEPS, "--tune",
              "--lr-grid", "x0.5,x1", "--out", out, "--no-runs", "--no-pdf", "-q")
    assert res.exit_code == 0, res.output
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- same game instances -------------------------------------------------------------------------


def test_same_seed_same_initial_V_across_solvers(compare_dir: Path) -> None:
    rows = [r for r in read_csv(compare_dir / "histories.csv") if r["step"] == "0"]
    assert {r["solver"] for r in rows} == set(SOLVERS) and len(rows) == 2 * len(SOLVERS)
    v0 = {(r["solver"], r["seed"]): float(r["lyapunov"]) for r in rows}
    for seed in ("0", "1"):
        assert v0["gda", seed] == v0["eg+exact", seed]
    assert v0["gda", "0"] != v0["gda", "1"]  # different seeds: different instances


# -- the files agree with each other and with the runs ---------------------------------------------


def test_files_written_and_consistent(compare_dir: Path) -> None:
    assert_image(compare_dir / "compare.png")
    assert_image(compare_dir / "compare.pdf", PDF_MAGIC)
    data = json.loads((compare_dir / "compare.json").read_text())
    assert data["game"] == "rps" and data["metric"] == "lyapunov" and data["seeds"] == [0, 1]
    assert data["solvers"] == list(SOLVERS) and data["steps"] == STEPS and data["tuned"] is False
    csv_rows = read_csv(compare_dir / "histories.csv")
    assert list(csv_rows[0])[:5] == ["solver", "lr", "seed", "step", "time_s"]
    table = (compare_dir / "table.md").read_text()
    for s in data["summaries"]:
        runs = [RunResult.load(compare_dir / "runs" / f"{s['solver']}-seed{k}") for k in (0, 1)]
        assert all(r.solver == s["solver"] and r.solver_options["lr"] == s["lr"] for r in runs)
        steps = [r.steps_to_tol if r.steps_to_tol is not None else math.inf for r in runs]
        finals = sorted(r.final["lyapunov"] for r in runs)
        median_steps = (steps[0] + steps[1]) / 2
        assert s["median_steps_to_tol"] == (median_steps if math.isfinite(median_steps) else None)
        assert s["final_median"] == pytest.approx((finals[0] + finals[1]) / 2, rel=1e-12)
        assert s["converged_fraction"] == sum(r.converged for r in runs) / 2
        assert s["ms_per_step"] == pytest.approx(1e3 * sum(r.final["time_s"] / r.steps_run for r in runs) / 2)
        # the CSV holds exactly each run's history
        for r in runs:
            mine = [row for row in csv_rows if row["solver"] == r.solver and int(row["seed"]) == r.seed]
            assert [int(row["step"]) for row in mine] == [h["step"] for h in r.history]
            assert [float(row["lyapunov"]) for row in mine] == pytest.approx([h["lyapunov"] for h in r.history])
        # the table's row shows the same numbers
        row = next(line for line in table.splitlines() if line.startswith(f"| {s['solver']} |"))
        assert f"{s['final_median']:.2e}" in row and f"{s['lr']:g}" in row
        assert (f"> {STEPS}" if s["median_steps_to_tol"] is None else f"{s['median_steps_to_tol']:g}") in row
    natgrad = next(s for s in data["summaries"] if s["solver"] == "eg+exact")
    gda = next(s for s in data["summaries"] if s["solver"] == "gda")
    assert natgrad["converged_fraction"] == 1.0 and natgrad["median_steps_to_tol"] <= STEPS
    assert gda["converged_fraction"] == 0.0 and gda["final_median"] > 1e3 * natgrad["final_median"]


def test_load_round_trip(compare_dir: Path) -> None:
    cmp = Comparison.load(compare_dir)
    assert cmp.solvers == list(SOLVERS) and [s.solver for s in cmp.summaries] == list(SOLVERS)
    assert cmp.table() == (compare_dir / "table.md").read_text()
    assert all(len(runs) == 2 and runs[0].history for _, runs in cmp.groups())


# -- tuning ----------------------------------------------------------------------------------------


def test_tune_records_grid_and_picks_by_the_rule(tuned_dir: Path) -> None:
    data = json.loads((tuned_dir / "compare.json").read_text())
    assert data["tuned"] is True and not (tuned_dir / "runs").exists() and not (tuned_dir / "compare.pdf").exists()
    table = (tuned_dir / "table.md").read_text()
    assert "## Step-size tuning" in table
    for s in data["summaries"]:
        assert s["grid"] == pytest.approx([0.5 * s["default_lr"], s["default_lr"]])
        points = [GridPoint(**g) for g in s["tuning"]]
        assert [g.lr for g in points] == s["grid"]
        assert s["lr"] == pick_lr(points) and s["lr"] in s["grid"]
        assert sum(line.startswith(f"| {s['solver']} | ") for line in table.splitlines()) == 1 + len(points)
    natgrad = next(s for s in data["summaries"] if s["solver"] == "eg+exact")
    assert natgrad["lr"] == natgrad["default_lr"]  # 0.2 does not reach 1e-6 in 40 steps, 0.4 does
    assert natgrad["tuning"][0]["median_steps_to_tol"] is None and natgrad["tuning"][1]["converged_fraction"] == 1
    gda = next(s for s in data["summaries"] if s["solver"] == "gda")  # never converges: smallest final V wins
    finals = {g["lr"]: g["final_median"] for g in gda["tuning"]}
    assert gda["lr"] == min(finals, key=finals.get)


def test_pick_lr_rule() -> None:
    assert pick_lr([GridPoint(0.1, 30, 5e-7, 1.0), GridPoint(0.2, 30, 2e-7, 1.0)]) == 0.2  # tie: smaller V
    assert pick_lr([GridPoint(0.1, None, 1e-2, 0.0), GridPoint(0.2, None, 1e-3, 0.0)]) == 0.2  # never: smaller V
    assert pick_lr([GridPoint(0.1, 90, 9e-7, 1.0), GridPoint(0.4, None, None, 0.0)]) == 0.1  # diverged loses
    assert pick_lr([GridPoint(0.1, 90, 9e-7, 1.0), GridPoint(0.2, 20, 9e-7, 1.0)]) == 0.2


def test_explicit_grid_and_gan_metric() -> None:
    cmp = compare("rps", ["eg+exact"], seeds=[3], steps=5, tune=True, grid=[0.4, 0.2])
    assert cmp.summaries[0].grid == [0.2, 0.4] and cmp.seeds == [3] and cmp.results["eg+exact"][0].seed == 3
    gan = compare("gan", ["gda"], seeds=1, steps=2, log_every=2)
    assert gan.metric == "mmd" and gan.summaries[0].converged_fraction is None
    assert gan.summaries[0].median_steps_to_tol is None and gan.summaries[0].final_median is not None
    assert "final mmd median" in gan.table()


# -- hcc plot ------------------------------------------------------------------------------------


def test_plot_accepts_solve_and_compare_dirs(compare_dir: Path, tuned_dir: Path, tmp_path: Path) -> None:
    solve_dir = tmp_path / "solve"
    assert hcc("solve", "rps", "-s", "eg", "--steps", "10", "--out", solve_dir, "-q").exit_code == 0
    csv_only = tmp_path / "csv-only"
    csv_only.mkdir()
    shutil.copy(compare_dir / "histories.csv", csv_only)
    out = tmp_path / "all.png"
    res = hcc("plot", compare_dir, tuned_dir, solve_dir, csv_only, compare_dir / "runs" / "gda-seed0", "--out", out)
    assert res.exit_code == 0, res.output
    assert_image(out)
    groups = [g for d in (compare_dir, solve_dir, csv_only) for g in load_groups(d)[0]]
    assert [len(runs) for _, runs in groups] == [2, 2, 1, 2, 2]
    pdf, metric = plot_saved([solve_dir], tmp_path / "v.pdf", metric="field_norm")
    assert metric == "field_norm"
    assert_image(pdf, PDF_MAGIC)


def test_plot_default_out_is_named_by_metric(
    compare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    res = hcc("plot", compare_dir)
    assert res.exit_code == 0, res.output
    assert_image(tmp_path / "plot-lyapunov.png")


def test_plot_bad_inputs(compare_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(hcc("plot", tmp_path, "-o", tmp_path / "x.png"), "result.json", "compare.json")
    assert_one_line_error(hcc("plot", compare_dir, "-m", "nope", "-o", tmp_path / "x.png"), "--metric", "nope",
                          "lyapunov")


# -- bad inputs: one line, exit code 2, before any run ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--solvers", "gda,nosuch"), ("nosuch", "expected one of", "eg+exact")),
        (("--solvers", "gda,nope+exact"), ("nope", "rule")),
        (("--solvers", ","), ("--solvers", "expected")),
        (("--solvers", ""), ("--solvers", "expected")),
        (("--solvers", "gda,gda"), ("gda", "once")),
        (("--solvers", "gda", "--seeds", "0"), ("--seeds", "positive", "0")),
        (("--solvers", "gda", "--seeds", "-2"), ("--seeds", "positive", "-2")),
        (("--solvers", "gda", "--steps", "0"), ("--steps", "positive")),
        (("--solvers", "gda", "--lr-grid", "x0.5,0.1"), ("--lr-grid", "factors")),
        (("--solvers", "gda", "--lr-grid", "0.1,-1"), ("--lr-grid", "positive")),
        (("--solvers", "gda", "-g", "nosuch=1"), ("nosuch",)),
    ],
)
def test_compare_bad_inputs(args: tuple[str, ...], needles: tuple[str, ...], tmp_path: Path) -> None:
    out = tmp_path / "never"
    assert_one_line_error(hcc("compare", "rps", *args, "--out", out), *needles)
    assert not out.exists()


def test_compare_unknown_game() -> None:
    assert_one_line_error(hcc("compare", "nosuch", "--solvers", "gda"), "nosuch", "rps")
