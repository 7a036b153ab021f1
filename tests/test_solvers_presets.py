"""The named solvers as data (``hcc/solvers/presets.toml``), and one default step on every path.

The registry is what the file says, in its order; a malformed entry fails with the file, the
entry and the key. ``hcc solve --seeds K`` and ``hcc compare`` take the same default step as a
single ``hcc solve``: the registry's, times the game instance's ``lr_scale`` (a matrix game's
depends on its payoff).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
from conftest import hcc_cli as hcc
from conftest import load

import hcc as api
from hcc.solvers import PRESETS_FILE, SOLVERS, PresetError, SolverSpec, load_presets

#: a payoff whose lr_scale is not 1 (≈ 0.495), so a default step taken from the game's name differs
PAYOFF = "payoff=3,-1;-2,1"
STEPS = "3"


def _scaled_default() -> float:
    game = api.make_game("matrix", {"payoff": PAYOFF.removeprefix("payoff=")})
    assert abs(game.lr_scale - 1.0) > 0.1
    lr = SOLVERS["eg"].default_lr("matrix") * game.lr_scale
    assert lr != pytest.approx(SOLVERS["eg"].default_lr("matrix"))  # the unscaled registry default
    return lr


# -- one default step on every path -------------------------------------------------------------


def test_solve_seeds_takes_the_single_runs_scaled_default(tmp_path: Path) -> None:
    one, many = tmp_path / "one", tmp_path / "many"
    res = hcc("solve", "matrix", "-g", PAYOFF, "-s", "eg", "--steps", STEPS, "-q", "--out", one)
    assert res.exit_code == 0, res.output
    res = hcc("solve", "matrix", "-g", PAYOFF, "-s", "eg", "--steps", STEPS, "--seeds", "8", "-q", "--out", many)
    assert res.exit_code == 0, res.output
    single = load(one)["solver_options"]["lr"]
    batched = [r["solver_options"]["lr"] for r in load(many)["records"]]
    assert len(batched) == 8
    assert single == pytest.approx(_scaled_default())
    assert batched == pytest.approx([single] * 8)


def test_compare_takes_the_single_runs_scaled_default(tmp_path: Path) -> None:
    one, cmp = tmp_path / "one", tmp_path / "cmp"
    res = hcc("solve", "matrix", "-g", PAYOFF, "-s", "eg", "--steps", STEPS, "-q", "--out", one)
    assert res.exit_code == 0, res.output
    res = hcc("compare", "matrix", "-g", PAYOFF, "--solvers", "eg", "--seeds", "2", "--steps", STEPS, "--out", cmp)
    assert res.exit_code == 0, res.output
    single = load(one)["solver_options"]["lr"]
    (summary,) = json.loads((cmp / "compare.json").read_text())["summaries"]
    assert single == pytest.approx(_scaled_default())
    assert summary["default_lr"] == pytest.approx(single) and summary["lr"] == pytest.approx(single)


# -- the registry is the file ---------------------------------------------------------------------


def test_registry_round_trips_the_presets_file() -> None:
    with PRESETS_FILE.open("rb") as f:
        entries = tomllib.load(f)["solver"]
    assert list(SOLVERS) == list(entries)  # the file's order is the registry's (`hcc list`)
    for name, entry in entries.items():
        spec = SOLVERS[name]
        assert spec == SolverSpec(
            entry["rule"], entry.get("precond", "identity"), rule_defaults=entry.get("rule_defaults", {}),
            precond_defaults=entry.get("precond_defaults", {}), lr=entry["lr"], summary=entry["summary"]), name
        assert list(spec.lr) == list(entry["lr"]) and spec.lr["*"] > 0, name
    assert load_presets() == dict(SOLVERS)


def test_presets_file_is_package_data() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert PRESETS_FILE.name in pyproject["tool"]["setuptools"]["package-data"]["hcc.solvers"]
    assert PRESETS_FILE.parent == Path(api.solvers.__file__).parent


GOOD = '[solver."fine"]\nrule = "eg"\nsummary = "ok"\nlr = { "*" = 0.1, rps = 0.2 }\n'


@pytest.mark.parametrize(("entry", "key", "needle"), [
    ('rule = "egg"\nlr = { "*" = 0.1 }', "rule", "unknown update rule 'egg'"),
    ('rule = "eg"\nprecond = "nope"\nlr = { "*" = 0.1 }', "precond", "unknown preconditioner 'nope'"),
    ('rule = "eg"\nlr = { rps = 0.1 }', "lr", "'*' fallback"),
    ('rule = "eg"', "lr", "missing key"),
    ('lr = { "*" = 0.1 }', "rule", "missing key"),
    ('rule = "eg"\nsumary = "typo"\nlr = { "*" = 0.1 }', "sumary", "unknown key"),
    ('rule = "gda"\nrule_defaults = { alternate = true }\nlr = { "*" = 0.1 }', "rule_defaults", "'alternate'"),
    ('rule = "eg"\nprecond = "exact"\nprecond_defaults = { geometri = "logit" }\nlr = { "*" = 0.1 }',
     "precond_defaults", "'geometri'"),
    ('rule = "eg"\nlr = { "*" = -0.1 }', "lr", "positive step size"),
    ('rule = "eg"\nlr = { "*" = "0.1" }', "lr", "positive step size"),
])
def test_malformed_entry_names_file_entry_and_key(tmp_path: Path, entry: str, key: str, needle: str) -> None:
    path = tmp_path / "presets.toml"
    path.write_text(GOOD + '\n[solver."broken"]\n' + entry + "\n")
    with pytest.raises(PresetError) as info:
        load_presets(path)
    msg = str(info.value)
    assert str(path) in msg and "'broken'" in msg and repr(key) in msg and needle in msg, msg


def test_good_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "presets.toml"
    path.write_text(GOOD)
    (spec,) = load_presets(path).values()
    assert spec == SolverSpec("eg", lr={"*": 0.1, "rps": 0.2}, summary="ok")
    assert dataclasses.asdict(spec)["precond"] == "identity"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "presets.toml"
    path.write_text('[solver."x"\nrule = ')
    with pytest.raises(PresetError, match="not valid TOML") as info:
        load_presets(path)
    assert str(path) in str(info.value)
