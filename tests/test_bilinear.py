"""The negative-momentum table on bilinear games (Gidel et al., AISTATS 2019, Table 1).

    Method        β      Bounded  Converges
    Simultaneous  any    ✗        ✗
    Alternated    > 0    ✗        ✗
                  0      ✓        ✗
                  < 0    ✓        ✓

and, from The Numerics of GANs and Korpelevich: extragradient and consensus
optimization converge on the unregularized bilinear game where simultaneous GDA
does not. Each claim is checked on a 1-D and a 4-D (random A) game.
"""

from __future__ import annotations

import pytest

import hcc

GAMES = [{"dim": 1, "matrix": "identity"}, {"dim": 4, "matrix": "random"}]
STEPS = 1200


def _run(solver, game_options, lr=0.5, **opts):
    r = hcc.run("bilinear", solver, lr=lr, steps=STEPS, game_options=game_options, solver_options=opts, log_every=10)
    Vs = [h["lyapunov"] for h in r.history if h.get("lyapunov") is not None]
    return r, Vs


@pytest.mark.parametrize("gopts", GAMES)
@pytest.mark.parametrize("beta", [-0.5, 0.0, 0.5])
def test_simultaneous_diverges_for_every_beta(gopts, beta):
    r, Vs = _run("gda", gopts, beta=beta)
    assert not r.converged
    assert r.status == "diverged" or Vs[-1] > 100 * Vs[0], (r.status, Vs[0], Vs[-1])


@pytest.mark.parametrize("gopts", GAMES)
def test_alternating_positive_momentum_diverges(gopts):
    r, Vs = _run("alt-gda", gopts, beta=0.5)
    assert r.status == "diverged" or Vs[-1] > 100 * Vs[0]


@pytest.mark.parametrize("gopts", GAMES)
def test_alternating_zero_momentum_bounded_not_converging(gopts):
    r, Vs = _run("alt-gda", gopts, beta=0.0)
    assert r.status == "max_steps" and not r.converged
    assert max(Vs) < 2 * Vs[0]  # bounded: alternating GDA conserves a modified energy
    assert min(Vs) > 0.2 * Vs[0]  # ... and does not converge


@pytest.mark.parametrize("gopts", GAMES)
def test_alternating_negative_momentum_converges(gopts):
    r, Vs = _run("negmom", gopts, beta=-0.5)
    assert r.converged and max(Vs) <= Vs[0] * 1.0001


@pytest.mark.parametrize("gopts", GAMES)
@pytest.mark.parametrize("solver,lr", [("eg", 0.5), ("consensus", 0.5), ("ogda", 0.3), ("hamiltonian", 0.5)])
def test_extragradient_and_consensus_converge(gopts, solver, lr):
    r, _ = _run(solver, gopts, lr=lr)
    assert r.converged, (solver, r.final)


def test_duality_gap_regularized_bilinear():
    """With λ > 0 the gap is (‖Aᵀθ‖² + ‖Aφ‖²)/(2λ): ≥ 0, and → 0 along extragradient."""
    r = hcc.run("bilinear", "eg", lr=0.3, steps=400, game_options={"dim": 3, "matrix": "random", "lam": 0.2})
    gaps = [h["exploitability"] for h in r.history]
    assert min(gaps) >= 0 and gaps[0] > 0.1 and gaps[-1] < 1e-5
