"""Spectra at equilibria (hcc.spectrum), phase portraits (hcc.field) and their CLI commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PNG_MAGIC, build
from conftest import hcc_cli as hcc

from hcc import make_solver
from hcc.field import field_portrait
from hcc.spectrum import (
    equilibrium_params,
    field_jacobian,
    lemma4_step_bound,
    run_spectrum,
    spectrum,
    update_operator,
)


def radius(M: torch.Tensor, transverse: bool = False) -> float:
    """Spectral radius; ``transverse`` skips the eigenvalues at exactly 1 (equilibrium-manifold directions)."""
    mu = torch.linalg.eigvals(M).numpy()
    if transverse:
        mu = mu[np.abs(mu - 1) > 1e-6]
    return float(np.abs(mu).max())


# -- Lemma 4 -----------------------------------------------------------------------------------


def test_lemma4_bound_edge_cases() -> None:
    assert lemma4_step_bound(np.array([1j, -1j])) == 0.0  # purely imaginary: no stable step
    assert lemma4_step_bound(np.array([0.1 + 1j, 0.1 - 1j])) == 0.0  # unstable field
    assert math.isinf(lemma4_step_bound(np.zeros(3)))  # only neutral directions
    # λ = −a ± ib: 2a / (a² + b²); zero eigenvalues are skipped
    got = lemma4_step_bound(np.array([-0.1 + np.sqrt(3) * 1j, -0.1 - np.sqrt(3) * 1j, 0, -2.0]))
    assert got == pytest.approx(min(0.2 / (0.01 + 3), 1.0), rel=1e-12)


CASES = {
    # Ψ = θᵀAφ + λ/2(‖θ‖² − ‖φ‖²), A random with singular values in [0.5, 1.5]: λ(∇v) = −0.5 ± iσ, h* = 0.4
    "bilinear-random-lam": ("bilinear", {"dim": 3, "matrix": "random", "lam": 0.5}, 0.4),
    # the identity: λ = −0.3 ± i, h* = 0.6 / 1.09
    "bilinear-identity-lam": ("bilinear", {"dim": 2, "lam": 0.3}, 0.6 / 1.09),
    # matching pennies (λ = 0.1) in parameter space: two eigenvalues −a ± ib, the rest neutral (0)
    "matching-pennies": ("matching-pennies", {"lam": 0.1, "width": 4}, None),
}


@pytest.fixture(scope="module")
def equilibria() -> dict[str, tuple]:
    torch.set_default_dtype(torch.float64)
    out = {}
    for key, (name, opts, _) in CASES.items():
        game = build(name, **opts)
        batch = game.sample_batch()
        params, how = equilibrium_params(game, batch)
        out[key] = (game, batch, params, how)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_lemma4_bound_matches_gda_update_operator(case: str, equilibria: dict) -> None:
    """ρ(T'_GDA) < 1 at 0.9·h* and > 1 at 1.1·h*, with T' from autodiff through Solver.step."""
    game, batch, params, how = equilibria[case]
    expected = CASES[case][2]
    lam = torch.linalg.eigvals(field_jacobian(game, params, batch)).numpy()
    bound = lemma4_step_bound(lam)
    if expected is not None:
        assert bound == pytest.approx(expected, rel=1e-5)
    assert 0 < bound < math.inf
    neutral = game.name != "bilinear"  # overparametrized: an equilibrium manifold, eigenvalues exactly 1
    for factor, stable in ((0.9, True), (1.1, False)):
        T, info = update_operator(game, make_solver("gda", game, lr=factor * bound), params, batch)
        assert info["fixed_point_residual"] < 1e-10
        rho = radius(T, transverse=neutral)
        assert (rho < 1) == stable, (case, factor, rho, bound)
        # and the update operator is I + h∇v (Lemma 6 with A = I)
        Jv = field_jacobian(game, params, batch)
        torch.testing.assert_close(T, torch.eye(len(T), dtype=T.dtype) + factor * bound * Jv, rtol=1e-9, atol=1e-9)
    if neutral:
        assert how.startswith("solved")
        spec = spectrum(game, make_solver("gda", game, lr=0.9 * bound), params, batch)
        assert spec.neutral_dims == spec.param_dim - 2
        assert spec.spectral_radius_transverse < 1 <= spec.spectral_radius + 1e-9


# -- bilinear: GDA diverges, extragradient converges ---------------------------------------------


def test_bilinear_gda_radius_above_one_eg_below() -> None:
    gda = run_spectrum("bilinear", "gda")
    eg = run_spectrum("bilinear", "eg")
    h = gda.lr
    assert gda.spectral_radius == pytest.approx(math.sqrt(1 + h**2), rel=1e-12)  # |1 ± ih|
    assert gda.lemma4_step_bound == 0.0
    h = eg.lr  # x − h·v(x − h·v(x)) with eigenvalues 1 − h² ∓ ih
    assert eg.spectral_radius == pytest.approx(math.sqrt((1 - h**2) ** 2 + h**2), rel=1e-12)
    assert gda.spectral_radius > 1 > eg.spectral_radius
    for lr in (0.01, 0.1, 0.9):  # EG contracts for every h ∈ (0, 1), GDA for none
        assert run_spectrum("bilinear", "eg", lr=lr, game_options={"dim": 2}).spectral_radius < 1
        assert run_spectrum("bilinear", "gda", lr=lr, game_options={"dim": 2}).spectral_radius > 1


def test_augmented_state_operators_match_hand_math() -> None:
    """Momentum and OGDA differentiate through their state: compare with the dense block matrices."""
    game = build("bilinear", dim=2, matrix="random")
    batch = game.sample_batch()
    params, _ = equilibrium_params(game, batch)
    J = field_jacobian(game, params, batch)  # ∇v, v = −(descent field)
    eye, zero = torch.eye(4), torch.zeros(4, 4)
    h, beta = 0.2, -0.4
    T, info = update_operator(game, make_solver("gda", game, lr=h, options={"beta": beta}), params, batch)
    assert info["layout"] == ["params", "['prev']"]
    # x⁺ = x + h v(x) + β(x − x₋), x₋⁺ = x
    ref = torch.cat([torch.cat([(1 + beta) * eye + h * J, -beta * eye], 1), torch.cat([eye, zero], 1)])
    torch.testing.assert_close(T, ref, rtol=1e-12, atol=1e-12)
    T, _ = update_operator(game, make_solver("ogda", game, lr=h), params, batch)
    # x⁺ = x − 2h d(x) + h d₋ with d = −v; d₋⁺ = d(x)
    ref = torch.cat([torch.cat([eye + 2 * h * J, h * eye], 1), torch.cat([-J, zero], 1)])
    torch.testing.assert_close(T, ref, rtol=1e-12, atol=1e-12)


def test_nonsmooth_rules_and_unknown_equilibria_raise() -> None:
    from hcc.registry import OptionError

    with pytest.raises(OptionError, match="not differentiable"):
        run_spectrum("bilinear", "adam")
    with pytest.raises(OptionError, match="known equilibrium"):
        run_spectrum("gan", "gda")


# -- the field portrait ------------------------------------------------------------------------


def test_field_portrait_bilinear() -> None:
    p = field_portrait(build("bilinear"), ["gda", "eg"], steps=30, grid=5)
    assert p.trajectories["gda"].shape == (31, 2) and p.U.shape == (5, 5)
    # the field is v = (−φ, θ) at λ = 0 and A = I
    np.testing.assert_allclose(p.U, -p.Y, atol=1e-12)
    np.testing.assert_allclose(p.V, p.X, atol=1e-12)
    r = np.linalg.norm(p.trajectories["gda"], axis=1)
    assert r[-1] > r[0] and np.linalg.norm(p.trajectories["eg"][-1]) < r[0]


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_spectrum_writes_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "sp"
    res = hcc("spectrum", "bilinear", "--solver", "gda", "--lr", "0.2", "-g", "lam=0.1", "--out", out)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "spectrum.json").read_text())
    assert {"field_eigs", "update_eigs", "spectral_radius", "lemma4_step_bound", "lr", "solver", "game",
            "game_options", "solver_options", "equilibrium"} <= set(data)
    assert data["lr"] == 0.2 and data["solver"] == "gda" and data["game_options"]["lam"] == 0.1
    np.testing.assert_allclose(sorted(map(tuple, data["field_eigs"])), [(-0.1, -1.0), (-0.1, 1.0)], atol=1e-12)
    assert data["lemma4_step_bound"] == pytest.approx(0.2 / 1.01)
    assert data["spectral_radius"] == pytest.approx(abs(1 + 0.2 * (-0.1 + 1j)))
    png = out / "spectrum.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_cli_field_writes_png_and_rejects_games_without_2d_state(tmp_path: Path) -> None:
    out = tmp_path / "field"
    res = hcc("field", "bilinear", "--solvers", "gda,eg", "--steps", "20", "--out", out)
    assert res.exit_code == 0, res.output
    assert (out / "field.png").read_bytes()[:8] == PNG_MAGIC
    for args in (("rps",), ("bilinear", "-g", "dim=2")):
        res = hcc("field", *args, "--out", tmp_path / "bad")
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "2-D state" in lines[0], res.stderr
        assert not (tmp_path / "bad").exists()
    res = hcc("spectrum", "bilinear", "--solver", "adam", "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "not differentiable" in res.stderr
