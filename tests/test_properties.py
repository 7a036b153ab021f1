"""Property-based tests (Hypothesis) over generated CLI option values and payoff texts.

Every generated bad input gives exit code 2 with a one-line message and never a traceback;
every generated valid random payoff gives a record whose equilibrium and V are finite.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from conftest import hcc_cli as cli

import hcc
from hcc.games import GAMES
from hcc.solvers import PRECONDITIONERS, RULES

pytest.importorskip("hypothesis", reason="the property-based tests need hypothesis (the dev extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- property-based: generated option values ---------------------------------------------------------------


def _float_options() -> list[tuple[str, str, str]]:
    """(command flag, owner, option) for every float option of every game, rule and preconditioner."""
    out = []
    for flag, table in (("-g", GAMES), ("-S", RULES), ("-S", PRECONDITIONERS)):
        for name, cls in table.items():
            hints = typing.get_type_hints(cls.Options)
            for f in dataclasses.fields(cls.Options):
                if hints[f.name] in (float, float | None):
                    out.append((flag, name, f.name))
    return out


FLOAT_OPTIONS = _float_options()
#: a game and a solver that carry each owner's options
_CARRIER = {"rule": lambda r: ("rps", f"{r}+identity"), "precond": lambda p: ("rps", f"eg+{p}")}


def _not_a_finite_number(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except (ValueError, OverflowError):
        return True


bad_numbers = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "+Infinity", "1e999", "-1e400", "0x10", "1,5", "one"]),
    st.text(alphabet="0123456789.eE+-xna ", min_size=1, max_size=8).filter(
        lambda s: s.strip() != "" and _not_a_finite_number(s)),  # (an empty value means None where allowed)
)


@PROPERTY
@given(which=st.sampled_from(FLOAT_OPTIONS), value=bad_numbers)
def test_generated_bad_float_options_are_one_line_errors(which: tuple[str, str, str], value: str,
                                                         tmp_path: Path) -> None:
    flag, owner, option = which
    if flag == "-g":
        game, solver = owner, "eg"
    else:
        game, solver = _CARRIER["rule" if owner in RULES else "precond"](owner)
    res = cli("solve", game, "-s", solver, flag, f"{option}={value}", "--steps", "1", "-o", tmp_path / "never")
    assert_one_line_error(res, option)


INT_OPTIONS = [("-g", g, f.name) for g, cls in GAMES.items() for f in dataclasses.fields(cls.Options)
               if typing.get_type_hints(cls.Options)[f.name] is int]


@PROPERTY
@given(which=st.sampled_from(INT_OPTIONS),
       value=st.one_of(st.sampled_from(["1.5", "1e3", "", "nan", "two", str(2**64), str(-(2**70))]),
                       st.integers(max_value=0).map(str)))
def test_generated_bad_int_options_are_one_line_errors(which: tuple[str, str, str], value: str,
                                                       tmp_path: Path) -> None:
    _, game, option = which
    res = cli("solve", game, "-s", "eg", "-g", f"{option}={value}", "--steps", "1", "-o", tmp_path / "never")
    if option == "depth" and value == "0":  # no hidden layer: a valid network
        return
    assert_one_line_error(res, option)


@PROPERTY
@given(flag=st.sampled_from(["--lr", "--tol", "--steps", "--log-every", "--seeds", "--checkpoint-every"]),
       value=st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "-inf"]),
                       st.floats(max_value=0, exclude_min=False).map(repr)))
def test_generated_bad_numeric_flags_are_one_line_errors(flag: str, value: str, tmp_path: Path) -> None:
    if flag == "--checkpoint-every" and value in ("0", "0.0", "-0.0"):
        return  # 0: after every step
    assert_one_line_error(cli("solve", "rps", "-s", "eg", flag, value, "-o", tmp_path / "never"), flag)


# -- property-based: generated payoffs -----------------------------------------------------------------------

cells = st.floats(min_value=-10, max_value=10, allow_nan=False).map(lambda x: f"{x:.3g}")
matrices = st.integers(1, 4).flatmap(lambda m: st.integers(1, 4).flatmap(
    lambda k: st.lists(st.lists(cells, min_size=k, max_size=k), min_size=m, max_size=m)))


def _inline(rows: list[list[str]]) -> str:
    return ";".join(",".join(r) for r in rows)


@st.composite
def broken_payoffs(draw: st.DrawFn) -> tuple[str, str]:
    """A valid matrix, then one defect: a ragged row, an empty cell, a word, a NaN/inf cell."""
    rows = [list(r) for r in draw(matrices)]
    i, j = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, len(rows[0]) - 1))

    defect = draw(st.sampled_from(["ragged", "blank", "word", "nonfinite"]))
    if defect == "ragged":
        if len(rows) == 1:
            rows.append(rows[0] + ["1"])
        else:
            rows[i] = rows[i] + ["1"]
        return _inline(rows), "equal length"
    if defect == "blank":  # between numbers (a trailing empty cell, as in "1,2,", is allowed)
        if len(rows[0]) == 1:
            rows = [r + ["1"] for r in rows]
        rows[i][draw(st.integers(0, len(rows[0]) - 2))] = " "
        return _inline(rows), "empty cell"
    if defect == "word":
        rows[i][j] = draw(st.sampled_from(["x", "1..2", "e", "--1", "one"]))
        return _inline(rows), "expected numbers"
    rows[i][j] = draw(st.sampled_from(["nan", "inf", "-inf", "1e999"]))
    return _inline(rows), "finite"


@PROPERTY
@given(case=broken_payoffs())
def test_generated_bad_payoffs_are_one_line_errors(case: tuple[str, str], tmp_path: Path) -> None:
    text, needle = case
    assert_one_line_error(cli("solve", "matrix", "-s", "eg", "--payoff", text, "-o", tmp_path / "never"), needle)


@settings(max_examples=12, deadline=None)
@given(rows=matrices, lam=st.sampled_from([0.0, 0.05, 0.1, 1.0]))
def test_generated_payoffs_give_finite_records(rows: list[list[str]], lam: float) -> None:
    game = hcc.make_game("matrix", {"payoff": _inline(rows), "lam": lam, "width": 4})
    res = hcc.solve(game, hcc.make_solver("eg", game), steps=3)
    F, G = game.equilibrium(game.sample_batch())
    assert torch.isfinite(F).all() and torch.isfinite(G).all()
    assert all(math.isfinite(h["lyapunov"]) for h in res.history) and math.isfinite(res.final["lyapunov"])
    assert res.game_info["payoff_matrix"] == [[float(c) for c in r] for r in rows]
