"""The benchmark suite: families give valid certified instances; the runner's records, tables and targets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, hcc_cli

import hcc
from hcc.games.equilibrium import certified_equilibrium
from hcc.games.matrix import parse_payoff
from hcc.registry import OptionError
from hcc.suite import (
    FAMILIES,
    MIN_MARGIN,
    TUNE_OFFSET,
    Run,
    SuiteResult,
    cgds_available,
    cyclic,
    merge,
    parse_entries,
    run_suite,
    with_dominated,
    with_pure_saddle,
)

needs_cgds = pytest.mark.skipif(not cgds_available(), reason="CGDs not installed (pip install 'hcc[peers]')")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_instances_are_valid_and_reproducible(name):
    fam = FAMILIES[name]
    inst, tune = fam.instance(0), fam.tuning_instances(1)[0]
    assert fam.instance(0) == inst  # deterministic
    assert tune.index >= TUNE_OFFSET and tune.seed != inst.seed
    for dtype, torch_dtype in (("float64", torch.float64), ("float32", torch.float32)):
        game = inst.build(dtype)
        assert all(p.dtype == torch_dtype for p in game.parameters())
    c = inst.certificate
    assert c["unique"]
    if "payoff" in inst.options:
        M = np.array(parse_payoff(inst.options["payoff"]))
        game = inst.build("float64")
        assert torch.equal(game._exact[0], torch.from_numpy(M))  # inline payoff: exact float64
        assert game.certificate.to_dict().items() <= c.items()  # the game certifies what the family did
        assert c["residual"] <= 1e-12 and tuple(c["shape"]) == M.shape
        if inst.options["lam"] == 0:
            assert c["margin"] >= MIN_MARGIN
        else:
            assert c["distance_bound"] <= 1e-11


def test_family_structures():
    """Dominated strategies are off the support, pure saddles are pure, cyclic games skew-symmetric."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        M = with_dominated(rng, 4, 4)
        eq = certified_equilibrium(M, 0.0)
        dominated = [i for i in range(M.shape[0]) if any((M[i] > M[j]).all() for j in range(M.shape[0]) if j != i)]
        assert len(dominated) >= 2 and all(eq.F[i] == 0.0 for i in dominated)
        eq = certified_equilibrium(with_pure_saddle(rng, 5, 4), 0.0)
        assert eq.certificate.support == (1, 1) and eq.certificate.unique
        C = cyclic(rng, 5)
        np.testing.assert_array_equal(C, -C.T)


def test_tuning_instances_are_other_instances_spread_over_variants():
    fam = FAMILIES["gauss-l0.1"]  # variants 3x3, 10x10, 50x50
    assert [tuple(i.certificate["shape"]) for i in fam.instances()] == [(3, 3), (10, 10), (50, 50)]
    assert [tuple(i.certificate["shape"]) for i in fam.tuning_instances(2)] == [(3, 3), (50, 50)]
    measured = {i.options["payoff"] for i in fam.instances()}
    assert not measured & {i.options["payoff"] for i in fam.tuning_instances(2)}


def _run(solver: str, index: int, it: int | None, wall: float, status: str | None = None) -> Run:
    return Run("a", index, "", "float64", solver, 0.1, status or ("converged" if it else "max_steps"), it, wall, 1.0,
               1e-7 if it else 1e-3, it or 100)


def test_summary_counts_failures_as_infinite_and_targets_say_by_how_much():
    runs = [_run("nat", 0, 10, 1.0), _run("nat", 1, None, 9.0), _run("nat", 2, None, 9.0),
            _run("acgd (tuned)", 0, 5, 0.5), _run("acgd (tuned)", 1, 6, 0.6), _run("acgd (tuned)", 2, 7, 0.7),
            _run("other", 0, 8, 0.1), _run("other", 1, 8, 0.1), _run("other", 2, None, 0.1, "diverged")]
    res = SuiteResult({"budget": 100, "tol": 1e-6}, [], {}, runs)
    rows = {(r["family"], r["solver"]): r for r in res.summary()}
    nat = rows[("a", "nat")]
    assert nat["converged_fraction"] == pytest.approx(1 / 3) and math.isinf(nat["median_iterations"])
    assert math.isinf(nat["median_wall_s"])  # a run that did not converge has no time to tol
    assert rows[("a", "other")]["diverged"] == 1 and rows[("a", "other")]["median_iterations"] == 8
    assert rows[("all", "acgd (tuned)")]["median_wall_s"] == 0.6
    assert res.best() == "other"  # 2/3 converged beats 1/3; the tuned peer is not a candidate
    t = res.targets()
    assert t[1].startswith("[not met]") and "66.7%" in t[1] and "short by 28.3 points" in t[1]
    assert t[2].startswith("[not met]") and "8 vs 6 (1.33x)" in t[2]
    assert t[3].startswith("[met]")  # wall-clock 0.1 <= 0.6


@needs_cgds
def test_runner_on_a_tiny_configuration(tmp_path):
    res = run_suite(["matching-pennies"], ["exact-natgrad"], baselines=["eg", "acgd"], instances=1, tune_instances=1,
                    dtypes=["float64", "float32"], grids={"eg": "x1,x2", "acgd": "0.1"}, budget=150,
                    stream=tmp_path / "runs.jsonl")
    assert [(r.dtype, r.solver) for r in res.runs] == [
        (d, s) for d in ("float64", "float32") for s in ("exact-natgrad", "eg (tuned)", "acgd (tuned)")]
    by = {(r.dtype, r.solver): r for r in res.runs}
    # one instance, the same initial networks: every solver starts from the same V
    assert max(r.V0 for r in res.runs) - min(r.V0 for r in res.runs) < 1e-6
    # the hcc row is hcc.run with the same settings
    direct = hcc.run("matching-pennies", "exact-natgrad", game_options={"lam": 0.1}, seed=0, steps=150, tol=1e-6)
    assert by[("float64", "exact-natgrad")].iterations == direct.steps_to_tol
    eg_pick = res.tuning["matching-pennies"]["eg (tuned)"]["pick"]
    game = FAMILIES["matching-pennies"].instance(0).build()
    assert eg_pick in (1.0, 2.0)
    assert by[("float64", "eg (tuned)")].lr == pytest.approx(eg_pick * hcc.make_solver("eg", game).lr)
    assert by[("float64", "acgd (tuned)")].lr == 0.1 and by[("float64", "acgd (tuned)")].status == "converged"
    md = res.markdown()
    assert "| matching-pennies | float64 | 1 |" in md and "acgd (tuned)" in md and "### targets" in md
    assert sum(line.startswith("- [") for line in md.splitlines()) >= 3
    out = res.save(tmp_path / "out")
    data = json.loads((out / "suite.json").read_text())
    assert data["schema_version"] == 1 and len(data["runs"]) == 6
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 6
    # a saved run reloads to the same tables; merging needs distinct families
    loaded = SuiteResult.load(out)
    assert loaded.markdown() == md and loaded.instances[0].options == res.instances[0].options
    assert merge([loaded]).markdown() == md
    with pytest.raises(OptionError, match=r"\['matching-pennies'\] twice"):
        merge([loaded, loaded])


def test_entries_check_names_and_grids():
    e = parse_entries(["exact-natgrad", "eg+cg"], ["eg"], options={"eg+cg": {"maxiter": "5"}})
    assert [x.label for x in e] == ["exact-natgrad", "eg+cg[maxiter=5]", "eg (tuned)"]
    with pytest.raises(OptionError, match="unknown solver 'nope'"):
        parse_entries(["nope"], [])
    with pytest.raises(OptionError, match="acgd: expected it among the baselines"):
        parse_entries(["acgd"], [])
    with pytest.raises(OptionError, match="expected a step-size grid"):
        parse_entries([], ["ogda"])
    with pytest.raises(OptionError, match="grid of 'eg': expected positive step sizes"):
        parse_entries([], ["eg"], grids={"eg": "x0"})
    with pytest.raises(OptionError, match="grid of 'acgd': expected absolute step sizes"):
        parse_entries([], ["acgd"], grids={"acgd": "x1"})


def test_cli_suite(tmp_path):
    out = tmp_path / "s"
    res = hcc_cli("suite", "-f", "matching-pennies", "-s", "exact-natgrad", "-b", "eg", "--grid", "eg=x1",
                  "--instances", "1", "--tune-instances", "1", "--dtypes", "float64", "--budget", "100", "-q",
                  "-o", out)
    assert res.exit_code == 0, res.output
    assert "### converged fraction within 100 steps" in res.stdout
    for f in ("table.md", "summary.csv", "runs.csv", "runs.jsonl", "suite.json"):
        assert (out / f).is_file(), f
    merged = hcc_cli("suite", "--merge", out, "-o", tmp_path / "m")
    assert merged.exit_code == 0 and (tmp_path / "m" / "table.md").read_text() == (out / "table.md").read_text()
    assert_one_line_error(hcc_cli("suite", "--merge", tmp_path / "nothing"), "expected a suite.json")
    listing = hcc_cli("suite", "--list")
    assert listing.exit_code == 0 and all(name in listing.stdout for name in FAMILIES)
    assert_one_line_error(hcc_cli("suite", "-f", "nope", "-o", tmp_path / "x"), "unknown family 'nope'")
    assert_one_line_error(hcc_cli("suite", "-f", "rps", "-S", "oops", "-o", tmp_path / "x"), "NAME:KEY=VALUE")
    assert_one_line_error(hcc_cli("suite", "-f", "rps", "--grid", "eg=x0", "-o", tmp_path / "x"), "grid of 'eg'")
