"""Certified equilibria of regularized matrix games against independent references.

References: brute-force enumeration of every support pair with the KKT system solved on it
(exact, no Lemke, no LP), cvxpy on a different convex formulation (λ > 0), and nashpy's vertex
enumeration (λ = 0); the optional ones skip when their package is missing.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import build, hcc_cli

from hcc.games.equilibrium import CertificationError, certified_equilibrium, lemke
from hcc.games.matrix import parse_payoff
from hcc.suite import payoff_text

#: a 3x3 game whose third row is dominated (entrywise above the first): F*_3 = 0
DOMINATED_3x3 = np.array([[3.0, -1.0, 0.0], [-2.0, 1.0, 0.5], [4.0, 2.0, 3.0]])
LAMS = (0.0, 0.05, 0.1)


def _games() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [("4x6", rng.standard_normal((4, 6))), ("3x3-zero-entry", DOMINATED_3x3),
            ("5x4", rng.standard_normal((5, 4))), ("3x3", rng.standard_normal((3, 3)))]


def enumerate_supports(M: np.ndarray, lam: float, tol: float = 1e-12) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every KKT point, by trying each support pair ``(S, T)``: ``F`` on ``S`` and ``G`` on ``T``
    solving the stationarity equalities, kept when ``F, G ≥ 0`` and no pure deviation gains."""
    m, k = M.shape
    found = []
    for S in (s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)):
        for T in (t for r in range(1, k + 1) for t in itertools.combinations(range(k), r)):
            s, t = len(S), len(T)
            # unknowns (F_S, G_T, a, b): (M G)_i + λ F_i − a = λ/m on S, (Mᵀ F)_j − λ G_j − b = −λ/k on T
            A = np.zeros((s + t + 2, s + t + 2))
            A[:s, s:s + t] = M[np.ix_(S, T)]
            A[s:s + t, :s] = M[np.ix_(S, T)].T
            A[:s, :s] += lam * np.eye(s)
            A[s:s + t, s:s + t] -= lam * np.eye(t)
            A[:s, -2], A[s:s + t, -1], A[-2, :s], A[-1, s:s + t] = -1, -1, 1, 1
            rhs = np.r_[np.full(s, lam / m), np.full(t, -lam / k), 1, 1]
            try:
                x = np.linalg.solve(A, rhs)
            except np.linalg.LinAlgError:
                continue
            if np.linalg.cond(A) > 1e12:
                continue
            F, G = np.zeros(m), np.zeros(k)
            F[list(S)], G[list(T)] = x[:s], x[s:s + t]
            a, b = x[-2], x[-1]
            ok = (F.min() >= -tol and G.min() >= -tol and (M @ G + lam * (F - 1 / m) - a).min() >= -tol
                  and (b - M.T @ F + lam * (G - 1 / k)).min() >= -tol)
            if ok and not any(np.abs(F - F2).max() < 1e-9 and np.abs(G - G2).max() < 1e-9 for F2, G2 in found):
                found.append((F, G))
    return found


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("name,M", _games(), ids=[g[0] for g in _games()])
def test_certified_equilibrium_matches_support_enumeration(name, M, lam):
    eq = certified_equilibrium(M, lam)
    ref = enumerate_supports(M, lam)
    assert len(ref) == 1, f"{name}: expected one equilibrium, enumeration found {len(ref)}"
    F, G = ref[0]
    assert np.abs(eq.F - F).max() <= 1e-10 and np.abs(eq.G - G).max() <= 1e-10, (eq.F - F, eq.G - G)
    c = eq.certificate
    assert c.unique and c.residual <= 1e-12 and c.margin > 0, c
    assert c.support == (int((F > 0).sum()), int((G > 0).sum()))
    if lam > 0:
        assert c.distance_bound is not None and c.distance_bound <= 1e-12
    if name == "3x3-zero-entry":
        assert eq.F[2] == 0.0 and c.support[0] == 2  # the dominated row is off the support, exactly


@pytest.mark.parametrize("lam", LAMS)
def test_matrix_game_equilibrium_matches_reference(lam):
    """The game's own F*, G* (float64 buffers) are the enumerated equilibrium to 1e-10 (the issue's 2x2
    game, whose old gap-stopped solve was 2e-8 off at λ = 0.05, and a 4x6 game)."""
    rng = np.random.default_rng(11)
    for M in (np.array([[3.0, -1.0], [-2.0, 1.0]]), rng.standard_normal((4, 6))):
        (F, G), = enumerate_supports(M, lam)
        game = build("matrix", payoff=payoff_text(M), lam=lam)
        assert np.abs(game.F_star.numpy() - F).max() <= 1e-10
        assert np.abs(game.G_star.numpy() - G).max() <= 1e-10
        assert game.certificate.unique and game.certificate.residual <= 1e-12


@pytest.mark.parametrize("lam", (0.05, 0.1))
def test_regularized_equilibrium_matches_cvxpy(lam):
    """A different formulation: min over F ∈ Δ of λ/2‖F − u‖² + max_G (…), the inner max by its dual
    (β, ν ≥ 0), solved by Clarabel; then G* = u + (MᵀF + ν − β)/λ."""
    cp = pytest.importorskip("cvxpy", reason="cvxpy not installed (the QP reference)")
    M = np.random.default_rng(5).standard_normal((4, 6))
    m, k = M.shape
    F, beta, nu = cp.Variable(m), cp.Variable(), cp.Variable(k)
    y = M.T @ F + nu - beta
    obj = lam / 2 * cp.sum_squares(F - 1 / m) + beta + cp.sum(y) / k + cp.sum_squares(y) / (2 * lam)
    cp.Problem(cp.Minimize(obj), [F >= 0, cp.sum(F) == 1, nu >= 0]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-14)
    G = 1 / k + (M.T @ F.value + nu.value - beta.value) / lam
    eq = certified_equilibrium(M, lam)
    assert np.abs(eq.F - F.value).max() <= 1e-10 and np.abs(eq.G - G).max() <= 1e-10


def test_zero_sum_equilibrium_matches_nashpy():
    nashpy = pytest.importorskip("nashpy", reason="nashpy not installed (the λ = 0 reference)")
    for M in (DOMINATED_3x3, np.random.default_rng(2).standard_normal((4, 6))):
        (x, y), = list(nashpy.Game(-M).vertex_enumeration())  # nashpy's row player maximizes −M
        eq = certified_equilibrium(M, 0.0)
        assert np.abs(eq.F - x).max() <= 1e-10 and np.abs(eq.G - y).max() <= 1e-10


def test_rps_is_uniform_through_the_generic_solver():
    """Rock-paper-scissors is degenerate for Lemke's ratio test (ties); the lexicographic rule gets through."""
    M = np.array([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    for lam in (0.0, 0.1, 1.0):
        eq = certified_equilibrium(M, lam)
        np.testing.assert_allclose(eq.F, 1 / 3, atol=1e-14, rtol=0)
        np.testing.assert_allclose(eq.G, 1 / 3, atol=1e-14, rtol=0)


def test_non_unique_zero_sum_equilibrium_is_reported():
    """Every pair of strategies is an equilibrium of a constant game; a weakly dominated column leaves
    the max player's optimal set an interval."""
    for M in (np.ones((2, 3)), np.array([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]])):
        eq = certified_equilibrium(M, 0.0)
        assert not eq.certificate.unique, eq.certificate
        assert eq.certificate.residual <= 1e-9  # still an equilibrium
    eq = certified_equilibrium(np.array([[1.0, 0.0], [0.0, 1.0]]), 0.0)
    assert eq.certificate.unique and eq.certificate.uniqueness.startswith("strictly complementary")


def test_lemke_solves_small_lcps():
    z = lemke(np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([-5.0, -6.0]))
    np.testing.assert_allclose(z, [4 / 3, 7 / 3], atol=1e-14)
    z = lemke(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([-1.0, 2.0]))  # one active, one slack
    np.testing.assert_allclose(z, [1.0, 0.0], atol=1e-14)
    with pytest.raises(CertificationError, match="ray"):
        lemke(np.array([[-1.0]]), np.array([-1.0]))  # w = −z − 1 ≥ 0 has no solution with z ≥ 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="expected λ ≥ 0"):
        certified_equilibrium(np.eye(2), -0.1)
    with pytest.raises(ValueError, match="finite non-empty 2-d"):
        certified_equilibrium(np.array([[1.0, math.nan]]), 0.1)


def test_long_inline_payoff_parses_exactly():
    """A 50x50 inline payoff is text, not a file name (it used to raise 'File name too long'); the
    repr of each float round-trips to the same float64."""
    M = np.random.default_rng(3).standard_normal((50, 50))
    assert np.array_equal(np.array(parse_payoff(payoff_text(M))), M)
    game = build("matrix", payoff=payoff_text(M), lam=0.1)
    assert torch.equal(game._exact[0], torch.from_numpy(M))


def test_spectrum_of_the_issue_game_runs(tmp_path):
    """`hcc spectrum matrix -g payoff='3,-1;-2,1' -g width=4 -g depth=1 --solver eg` needs V ≤ 1e-26 against
    F*: with the old, 2e-8-off equilibrium V stalled at 8e-16."""
    res = hcc_cli("spectrum", "matrix", "-g", "payoff=3,-1;-2,1", "-g", "width=4", "-g", "depth=1", "--solver", "eg",
                  "-o", tmp_path / "spec")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "spec" / "spectrum.json").is_file()
