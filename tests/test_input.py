"""Bad input is bad input: one line, exit code 2, before any work; and the Python API's own checks.

The generated cases (Hypothesis) are in ``test_properties.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from conftest import hcc_cli as cli

import hcc
from hcc.registry import OptionError

# -- the cases found by hand -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (("solve", "rps", "-s", "eg", "-g", "activation=foo"), ("activation", "tanh", "'foo'")),
    (("solve", "matching-pennies", "-s", "eg", "-g", "activation=foo"), ("activation", "'foo'")),
    (("solve", "matrix", "-s", "eg", "-g", "activation=foo"), ("activation", "'foo'")),
    (("solve", "rps", "-s", "eg", "-g", "lam=nan"), ("lam", "finite", "nan")),
    (("solve", "rps", "-s", "eg", "-g", "out_scale=inf"), ("out_scale", "finite", "inf")),
    (("solve", "rps", "-s", "eg", "-S", "extra_lr=inf"), ("extra_lr", "finite")),
    (("solve", "rps", "-s", "consensus", "-S", "gamma=nan"), ("gamma", "finite")),
    (("solve", "rps", "-s", "adam", "-S", "eps=nan"), ("eps", "finite")),
    (("solve", "rps", "-s", "adam", "-S", "eps=-1"), ("eps", "positive", "-1")),
    (("solve", "rps", "-s", "adam", "-S", "eps=0"), ("eps", "positive", "0")),
    (("solve", "rps", "-s", "nsgda", "-S", "eps=-1"), ("eps", "≥ 0", "-1")),
    (("solve", "rps", "-s", "cg-natgrad", "-S", "tol=inf"), ("tol", "finite", "inf")),
    (("solve", "rps", "-s", "eg", "-g", "width=10000000000"), ("fit in memory", "width=10000000000")),
    (("solve", "rps", "-s", "eg", "--seed", "18446744073709551616"), ("--seed", "2^63")),
    (("solve", "rps", "-s", "eg", "--seed", "-1"), ("--seed", "-1")),
    (("solve", "rps", "-s", "eg", "--seeds", "3", "--seed", str(2**63 - 2)), ("--seed", "with 3 seeds")),
    (("solve", "rps", "-s", "eg", "--device", "mps"), ("device", "cuda:N", "'mps'")),
    (("solve", "rps", "-s", "eg", "--device", "meta"), ("device", "'meta'")),
    (("solve", "matrix", "-s", "eg", "--payoff", "1,,3;4,5"), ("empty cell", "row 1, column 2")),
    (("spectrum", "rps", "-s", "kfac-natgrad"), ("spectrum", "kfac-natgrad", "BackPACK")),
    (("spectrum", "rps", "-s", "diag-natgrad"), ("spectrum", "diag-natgrad", "BackPACK")),
    (("solve", "rps", "-s", "eg", "--checkpoint-every", "-1"), ("--checkpoint-every",)),
    (("compare", "rps", "--solvers", "eg", "--guard", "stall_rtol=inf"), ("stall_rtol", "finite")),
])
def test_bad_input_is_one_line_with_exit_2(args: tuple[str, ...], needles: tuple[str, ...], tmp_path: Path) -> None:
    out = tmp_path / "never"
    assert_one_line_error(cli(*args, "-o", out), *needles)
    assert not out.exists()


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "folder", "a folder"),
    (lambda d: (d / "empty.csv").write_text("") and None or d / "empty.csv", "non-empty matrix"),
    (lambda d: (d / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe") and None or d / "bin.csv", "binary"),
])
def test_bad_payoff_files(make, needle: str, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    assert_one_line_error(cli("solve", "matrix", "-s", "eg", "--payoff", make(tmp_path), "-o", tmp_path / "x"), needle)


def test_a_payoff_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff1,-1\n-1,1\n".encode())
    game = hcc.make_game("matrix", {"payoff": str(path)})
    assert game.describe()["payoff_matrix"] == [[1.0, -1.0], [-1.0, 1.0]]


def test_trailing_empty_cells_are_not_numbers_but_are_allowed() -> None:
    from hcc.games.matrix import parse_payoff

    assert parse_payoff("1,2,;3,4,") == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(OptionError, match="empty cell at row 2, column 1"):
        parse_payoff("1,2;,4")


# -- the Python API -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    (dict(lr="0.1"), "lr: expected a number, got str"),
    (dict(solver=None), "solver: expected a name (str), got NoneType"),
    (dict(game=3), "game: expected a name (str), got int"),
    (dict(game_options="lam=0.2"), "game_options: expected a dict"),
    (dict(solver_options=["beta"]), "solver_options: expected a dict"),
    (dict(steps="5"), "steps: expected a positive integer, got str"),
    (dict(steps=2.5), "steps: expected a positive integer, got float"),
    (dict(tol=None), "tol: expected a number"),
    (dict(seed=1.5), "seed: expected an integer"),
    (dict(dtype="float16"), "dtype"),
    (dict(device=0), "device"),
    (dict(guard={"stall_window": "x"}), "stall_window"),
])
def test_api_wrong_types_are_one_line_errors(kwargs: dict, needle: str) -> None:
    call = {"game": "rps", "solver": "eg", "steps": 2, **kwargs}
    with pytest.raises(OptionError) as err:
        hcc.run(call.pop("game"), call.pop("solver"), **call)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_solve_does_not_change_its_game_and_records_the_games_seed() -> None:
    game = hcc.make_game("rps", {"width": 8}, seed=7)
    start = [p.detach().clone() for p in game.parameters()]
    solver = hcc.make_solver("eg", game)
    first, second = hcc.solve(game, solver, steps=15), hcc.solve(game, solver, steps=15)
    assert first.history == [{**r, "time_s": s["time_s"]} for r, s in zip(second.history, first.history)]
    assert all(torch.equal(a, b) for a, b in zip(start, game.parameters()))
    assert first.seed == 7 and first.dtype == "float64"
    by_name = hcc.run("rps", "eg", steps=15, seed=7, game_options={"width": 8})
    assert [r["lyapunov"] for r in by_name.history] == [r["lyapunov"] for r in first.history]


def test_make_game_and_run_share_the_default_dtype() -> None:
    assert next(hcc.make_game("rps").parameters()).dtype == torch.float64
    assert hcc.run("rps", "eg", steps=1).dtype == "float64"
    assert next(hcc.make_game("rps", dtype="float32").parameters()).dtype == torch.float32
