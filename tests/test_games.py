"""Games: payoffs, computed equilibria, duality gaps, options and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import build

import hcc
from hcc.games import GAMES
from hcc.games.matrix import parse_payoff
from hcc.games.simplex import matrix_game_gap, project_simplex, solve_matrix_game
from hcc.registry import OptionError


def test_project_simplex_matches_brute_force_qp():
    """Π_Δ(v) minimizes ‖x − v‖ over the simplex: check KKT (x ≥ 0, Σx = 1, v − x = τ on the support)."""
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 7):
        v = 3 * torch.randn(50, k, generator=gen, dtype=torch.float64)
        x = project_simplex(v)
        assert (x >= 0).all() and torch.allclose(x.sum(-1), torch.ones(50, dtype=torch.float64))
        resid = v - x  # equals τ on the support, ≤ τ off it
        for r, xi in zip(resid, x, strict=True):
            tau = r[xi > 0]
            assert torch.allclose(tau, tau[0].expand_as(tau), atol=1e-12)
            assert (r[xi == 0] <= tau[0] + 1e-12).all()


def test_matrix_game_rps_equilibrium_is_uniform():
    """The generic solver (no closed form) finds the uniform equilibrium of RPS, λ = 0 and λ > 0."""
    game = build("matrix")  # default payoff is rock-paper-scissors
    u = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(game.F_star, u, atol=1e-10, rtol=0)
    torch.testing.assert_close(game.G_star, u, atol=1e-10, rtol=0)
    for lam in (0.0, 0.1, 1.0):
        M = torch.tensor(hcc.games.matrix.RPS_MATRIX, dtype=torch.float64)
        F, G = solve_matrix_game(M, lam)
        torch.testing.assert_close(F, u, atol=1e-8, rtol=0)
        torch.testing.assert_close(G, u, atol=1e-8, rtol=0)


@pytest.mark.parametrize("M", [[[3.0, -1.0], [-2.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]], [[2.0, 0.0], [-1.0, 3.0]]])
def test_matrix_game_2x2_closed_form(M):
    """No saddle in pure strategies: p = (d − c)/(a − b − c + d), q = (d − b)/(a − b − c + d)."""
    (a, b), (c, d) = M
    den = a - b - c + d
    p, q = (d - c) / den, (d - b) / den
    game = build("matrix", payoff=";".join(",".join(map(str, r)) for r in M), lam=0.0)
    torch.testing.assert_close(game.F_star, torch.tensor([p, 1 - p]), atol=1e-9, rtol=0)
    torch.testing.assert_close(game.G_star, torch.tensor([q, 1 - q]), atol=1e-9, rtol=0)
    n = game.x_min.shape[0]
    assert matrix_game_gap(game.F_star.expand(n, -1), game.G_star.expand(n, -1), game.M, 0.0) < 1e-9


def test_regularized_matrix_game_equilibrium_has_zero_gap_and_is_unique():
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    F, G = solve_matrix_game(M, 0.3)
    assert matrix_game_gap(F[None], G[None], M, 0.3) < 1e-12
    # any other point has a positive gap
    for _ in range(20):
        F2 = project_simplex(F + 0.05 * torch.randn(4, generator=gen, dtype=torch.float64))
        assert matrix_game_gap(F2[None], G[None], M, 0.3) > 0


def test_duality_gap_nonnegative_everywhere_and_zero_at_equilibrium():
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    for lam in (0.0, 0.5):
        F, G = solve_matrix_game(M, lam)
        assert abs(float(matrix_game_gap(F[None], G[None], M, lam))) < 1e-8
        X = torch.softmax(3 * torch.randn(100, 3, generator=gen, dtype=torch.float64), -1)
        Y = torch.softmax(3 * torch.randn(100, 3, generator=gen, dtype=torch.float64), -1)
        gaps = torch.stack([matrix_game_gap(x[None], y[None], M, lam) for x, y in zip(X, Y, strict=True)])
        assert (gaps >= -1e-12).all()


def test_matching_pennies_payoff_and_gap_by_hand():
    game = build("matching-pennies", lam=0.2)
    batch = game.sample_batch()
    f, g = torch.tensor([[0.8]]), torch.tensor([[0.3]])
    psi = (1 - 2 * 0.8) * (1 - 2 * 0.3) + 0.1 * ((0.8 - 0.5) ** 2 - (0.3 - 0.5) ** 2)
    assert abs(float(game.payoff(f, g, batch)) - psi) < 1e-14
    # brute-force gap over a fine grid of [0, 1]
    xs = torch.linspace(0, 1, 200001, dtype=torch.float64)[:, None]
    best_g = max(float(game.payoff(f, x[None], batch)) for x in xs[::1000])
    best_f = min(float(game.payoff(x[None], g, batch)) for x in xs[::1000])
    gap = float(game.duality_gap(f, g, batch))
    assert gap >= best_g - best_f - 1e-12 and gap - (best_g - best_f) < 1e-4
    half = torch.tensor([[0.5]])
    assert abs(float(game.duality_gap(half, half, batch))) < 1e-15


def test_rps_payoff_matches_formula_and_gap_vanishes_at_uniform():
    game = build("rps", lam=0.1)
    batch = game.sample_batch()
    F, G = game.strategies(game.init_params(), batch)
    M = torch.tensor(hcc.games.matrix.RPS_MATRIX, dtype=torch.float64)
    psi = F[0] @ M @ G[0] + 0.05 * ((F[0] - 1 / 3).pow(2).sum() - (G[0] - 1 / 3).pow(2).sum())
    torch.testing.assert_close(game.payoff(F, G, batch), psi, atol=1e-14, rtol=0)
    u = torch.full((1, 3), 1 / 3)
    assert abs(float(game.duality_gap(u, u, batch))) < 1e-14
    assert float(game.duality_gap(F, G, batch)) > 0


def test_lyapunov_definition():
    """V = ½ mean_i ‖F_i − F*‖² + ½ mean_i ‖G_i − G*‖² over support points."""
    game = build("rps", n_support=4)
    batch = game.sample_batch()
    F, G = game.strategies(game.init_params(), batch)
    u = 1 / 3
    V = 0.5 * (F - u).pow(2).sum(-1).mean() + 0.5 * (G - u).pow(2).sum(-1).mean()
    torch.testing.assert_close(game.lyapunov(F, G, batch), V, atol=1e-15, rtol=0)


def test_bilinear_lyapunov_is_distance_to_equilibrium_set_when_singular():
    game = build("bilinear", dim=2, matrix="identity")
    game.A.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # θ₂, φ₂ are free at equilibrium
    batch = game.sample_batch()
    F, G = torch.tensor([[0.0, 5.0]]), torch.tensor([[0.0, -2.0]])
    assert float(game.lyapunov(F, G, batch)) < 1e-15
    F = torch.tensor([[2.0, 5.0]])
    assert abs(float(game.lyapunov(F, G, batch)) - 2.0) < 1e-14


@pytest.mark.parametrize("name", list(GAMES))
def test_every_game_builds_moves_and_seeds_reproducibly(name):
    if name == "openspiel":
        pytest.importorskip("pyspiel", reason="open-spiel is not installed (pip install 'hcc[openspiel]')")
    small = {"gan": {"batch_size": 16, "n_eval": 64, "width": 8}}.get(name, {})
    a, b = build(name, seed=3, **small), build(name, seed=3, **small)
    c = build(name, seed=4, **small)
    pa, pb, pc = a.init_params(), b.init_params(), c.init_params()
    for k in pa[0]:
        assert torch.equal(pa[0][k], pb[0][k])
    assert any(not torch.equal(pa[0][k], pc[0][k]) for k in pa[0])
    f32 = a.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in f32.parameters())


def test_parse_payoff_errors(tmp_path):
    assert parse_payoff("1,2;3,4") == [[1, 2], [3, 4]]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3\n")
    with pytest.raises(OptionError, match="equal length"):
        parse_payoff(str(ragged))
    with pytest.raises(OptionError, match="expected numbers"):
        parse_payoff("1,x;3,4")
    with pytest.raises(OptionError, match="missing file"):
        parse_payoff(str(tmp_path / "nope.csv"))
    with pytest.raises(OptionError, match="non-empty"):
        parse_payoff(";")
    ok = tmp_path / "ok.csv"
    ok.write_text("0,1\n1,0\n")
    assert parse_payoff(str(ok)) == [[0, 1], [1, 0]]


def test_option_errors_name_what_was_expected():
    with pytest.raises(OptionError, match="unknown game 'nope'; expected one of: .*rps"):
        hcc.make_game("nope")
    with pytest.raises(OptionError, match="unknown option 'widht'.*width"):
        hcc.make_game("rps", {"widht": "3"})
    with pytest.raises(OptionError, match="expected int, got 'three'"):
        hcc.make_game("rps", {"width": "three"})
    with pytest.raises(OptionError, match="expected λ ≥ 0, got -1"):
        hcc.make_game("rps", {"lam": "-1"})
    with pytest.raises(OptionError, match="expected one of identity, random, rotation"):
        hcc.make_game("bilinear", {"matrix": "weird"})
    with pytest.raises(OptionError, match="unknown solver 'sgd'; expected one of: .*eg"):
        hcc.make_solver("sgd", "rps")
    with pytest.raises(OptionError, match="unknown option 'gama'.*gamma"):
        hcc.make_solver("consensus", "rps", options={"gama": 1})
    with pytest.raises(OptionError, match="expected a positive finite number, got 0"):
        hcc.make_solver("eg", "rps", lr=0)
    with pytest.raises(OptionError, match="expected -1 < β < 1"):
        hcc.make_solver("negmom", "rps", options={"beta": "1.5"})
    for bad in ({"steps": 0}, {"tol": -1.0}):
        with pytest.raises(OptionError, match="expected a positive"):
            hcc.run("bilinear", "eg", **bad)


def test_divergence_stops_at_once_and_keeps_history():
    r = hcc.run("bilinear", "gda", lr=1.5, steps=10_000, game_options={"dim": 2})
    assert r.status == "diverged" and r.converged is False
    assert r.diverged_at == r.steps_run == r.history[-1]["step"] < 100
    assert f"step {r.diverged_at}" in r.message
    assert [h["step"] for h in r.history] == list(range(r.diverged_at + 1))
    assert all(h["lyapunov"] < 1e12 for h in r.history[:-1])
    assert r.final["step"] < r.diverged_at  # the last finite, sane record
    r.save  # noqa: B018 (the CLI test checks the files)


def test_nan_iterate_is_caught(monkeypatch):
    """A non-finite iterate (here: an injected NaN) stops the run at that step."""
    game = build("rps")
    solver = hcc.make_solver("eg", game)
    orig = solver.step
    calls = itertools.count()

    def poisoned(*a, **k):
        new, state, info = orig(*a, **k)
        if next(calls) == 4:
            new[0]["0.weight"] = new[0]["0.weight"] * float("nan")
        return new, state, info

    monkeypatch.setattr(solver, "step", poisoned)
    r = hcc.solve(game, solver, steps=50)
    assert r.status == "diverged" and r.diverged_at == 5
    assert "non-finite" in r.message and len(r.history) == 6


def test_matrix_default_steps_scale_with_the_payoff():
    """``lr_scale = √3 / ‖P M P‖₂``: 1 on RPS, ½ on 2·RPS, so ``h·b`` (and stability) stays put."""
    from hcc.solvers import make_solver

    rps = "0,1,-1;-1,0,1;1,-1,0"
    assert hcc.make_game("rps").lr_scale == 1.0
    assert abs(hcc.make_game("matrix", {"payoff": rps}).lr_scale - 1.0) < 1e-12
    double = hcc.make_game("matrix", {"payoff": "0,2,-2;-2,0,2;2,-2,0"})
    assert abs(double.lr_scale - 0.5) < 1e-12
    assert abs(make_solver("eg", double).lr - 0.5 * make_solver("eg", "matrix").lr) < 1e-12
    # a 2×2 game: P M P = 3.5 u uᵀ (u = (1, −1)/√2), so the scale is √3/3.5
    g = hcc.make_game("matrix", {"payoff": "3,-1;-2,1"})
    assert abs(g.lr_scale - 3**0.5 / 3.5) < 1e-12


def test_matrix_game_with_a_larger_payoff_converges_with_defaults():
    res = hcc.run("matrix", "exact-natgrad", game_options={"payoff": "3,-1;-2,1"}, steps=300, log_every=100)
    assert res.converged, res.message
