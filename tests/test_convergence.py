"""Convergence to known equilibria (tier 3): defaults reach V ≤ 1e-6."""

from __future__ import annotations

import pytest

import hcc


def test_rps_extragradient_converges_with_defaults():
    r = hcc.run("rps", "eg")
    assert r.converged and r.final["lyapunov"] <= 1e-6 and r.final["exploitability"] < 1e-3


def test_rps_gda_records_honestly():
    """Simultaneous GDA on regularized RPS: Euler on a rotation-dominated field; it does not converge."""
    r = hcc.run("rps", "gda", steps=300)
    assert r.status == "max_steps" and r.converged is False and r.steps_to_tol is None
    assert r.final["lyapunov"] > 1e-6


@pytest.mark.parametrize("solver", ["eg", "ogda", "negmom"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matching_pennies_converges_to_half(solver, seed):
    r = hcc.run("matching-pennies", solver, seed=seed, steps=2000, game_options={"lam": 0.1})
    assert r.converged, (solver, seed, r.final)


@pytest.mark.parametrize("solver", ["eg", "ogda", "negmom"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rps_converges_to_uniform(solver, seed):
    r = hcc.run("rps", solver, seed=seed, steps=1500)
    assert r.converged, (solver, seed, r.final)
    assert abs(r.final["payoff"]) < 1e-3  # value of the symmetric game is 0


def test_bilinear_regularized_converges_to_origin():
    r = hcc.run("bilinear", "eg", game_options={"dim": 5, "matrix": "random", "lam": 0.1})
    assert r.converged


def test_stop_at_tol_off_keeps_running():
    r = hcc.run("bilinear", "eg", steps=300, stop_at_tol=False, log_every=10)
    assert r.steps_to_tol is not None and r.steps_run == 300 and r.history[-1]["step"] == 300
    assert r.final["lyapunov"] < 1e-6
