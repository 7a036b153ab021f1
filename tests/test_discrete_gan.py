"""The hidden convex-concave GAN (a softmax generator over a finite support): its exact
equilibrium and gap, and the natural solvers reaching it."""

from __future__ import annotations

import pytest
import torch

import hcc
from hcc.games.discrete_gan import DiscreteGAN

DT = torch.float64


def _game(**opts) -> DiscreteGAN:
    return hcc.make_game("discrete-gan", opts, seed=0)  # type: ignore[return-value]


def test_equilibrium_is_the_saddle_point_and_the_gap_is_exact() -> None:
    """At (q, ½) the gap is 0; elsewhere it equals the best responses found by brute force."""
    g = _game(n_points=5)
    b = g.sample_batch()
    Fs, Gs = g.equilibrium(b)
    assert float(g.duality_gap(Fs, Gs, b)) == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        p = torch.distributions.Dirichlet(torch.ones(5, dtype=DT)).sample()[None]
        D = torch.rand(5, 1, dtype=DT, generator=gen) * 0.9 + 0.05
        # max over D: per point argmax q log D + p log(1 − D) = q/(q+p); min over p: a vertex
        D_best = (g.q / (g.q + p[0]))[:, None]
        max_D = g.payoff(p, D_best, b)
        min_p = min(g.payoff(torch.eye(5, dtype=DT)[k][None], D, b) for k in range(5))
        assert float(g.duality_gap(p, D, b)) == pytest.approx(float(max_D - min_p), abs=1e-12)
        for eps in (1e-3, -1e-3):  # D_best is a maximum
            assert float(g.payoff(p, (D_best + eps).clamp(1e-6, 1 - 1e-6), b)) <= float(max_D) + 1e-15


@pytest.mark.parametrize("solver", ["exact-natgrad", "cg-natgrad", "kfac-natgrad"])
def test_natural_solvers_reach_the_data_distribution(solver: str) -> None:
    """V ≤ 1e-6 at the defaults, and the generator's distribution equals q to 1e-3 (measured: 2
    iterations each, ‖p − q‖∞ ≈ 1e-4 for exact/cg, 1e-6 for kfac)."""
    g = _game()
    res = hcc.solve(g, hcc.make_solver(solver, g), steps=50, tol=1e-6)
    assert res.converged and res.steps_to_tol <= 5, (res.status, res.steps_to_tol)
    F, G = g.strategies(res.params, g.sample_batch())
    assert float((F[0] - g.q).abs().max()) < 1e-3
    assert float((G - 0.5).abs().max()) < 1e-2


def test_a_failed_linear_solve_is_a_divergence_that_keeps_the_record() -> None:
    """eg+exact at its generic default step saturates the discriminator (log D → −∞): the run ends
    'diverged' at the step whose solve failed, with the history up to there, no traceback."""
    res = hcc.run("discrete-gan", "eg+exact", steps=200)
    assert res.status == "diverged", res.message
    assert res.history[-2]["step"] == res.diverged_at - 1
    assert torch.isfinite(torch.tensor(res.final["lyapunov"]))
