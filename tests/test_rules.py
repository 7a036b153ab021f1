"""One-step equivalence of every update rule with hand-written math.

Tier 2 of the test plan: each rule's step equals an independent
computation — ``torch.optim`` on the modules (descent for the min player,
``maximize=True`` for the max player) or the closed-form field of the bilinear
game ``v(θ, φ) = (Aφ + λθ, −Aᵀθ + λφ)``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build

import hcc
from hcc.solvers import SOLVERS, make_solver

ATOL = 1e-12


def _step(game, solver, params, state):
    batch = game.sample_batch()
    return solver.step(game, params, state, batch)


def _run_steps(game, name, n, lr, **opts):
    solver = make_solver(name, game, lr=lr, options=opts)
    params = game.init_params()
    state = solver.init(game, params)
    out = [params]
    for _ in range(n):
        params, state, _ = _step(game, solver, params, state)
        out.append(params)
    return out


def _torch_optim_traj(game, opt_min, opt_max, n, alternating=False):
    """Trajectory of the modules under torch.optim (min: descent, max: maximize=True)."""
    batch = game.sample_batch()
    th_mod, ph_mod = game.min_map, game.max_map
    traj = [game.init_params()]

    def psi():
        F = th_mod(batch["x_min"])
        return game.payoff(F, ph_mod(batch["x_max"]), batch)

    for _ in range(n):
        if alternating:
            opt_min.zero_grad()
            psi().backward()
            opt_min.step()
            opt_max.zero_grad()
            psi().backward()
            opt_max.step()
        else:
            opt_min.zero_grad(), opt_max.zero_grad()
            psi().backward()
            opt_min.step(), opt_max.step()
        traj.append(game.init_params())
    return traj


def _assert_traj_close(a, b, atol=ATOL):
    for pa, pb in zip(a, b, strict=True):
        for da, db in zip(pa, pb, strict=True):
            for k in da:
                torch.testing.assert_close(da[k], db[k], atol=atol, rtol=0)


@pytest.mark.parametrize("alternating", [False, True])
def test_gda_equals_sgd_maximize(alternating):
    lr = 0.05
    name = "alt-gda" if alternating else "gda"
    ours = _run_steps(build("rps"), name, 3, lr)
    g = build("rps")
    ref = _torch_optim_traj(
        g,
        torch.optim.SGD(g.min_map.parameters(), lr=lr),
        torch.optim.SGD(g.max_map.parameters(), lr=lr, maximize=True),
        3,
        alternating,
    )
    _assert_traj_close(ours, ref)


def test_positive_momentum_equals_sgd_momentum():
    """Heavy ball ``x − h g + β(x − x_prev)`` is torch's SGD momentum (dampening 0)."""
    lr, beta = 0.05, 0.7
    ours = _run_steps(build("rps"), "gda", 4, lr, beta=beta)
    g = build("rps")
    ref = _torch_optim_traj(
        g,
        torch.optim.SGD(g.min_map.parameters(), lr=lr, momentum=beta),
        torch.optim.SGD(g.max_map.parameters(), lr=lr, momentum=beta, maximize=True),
        4,
    )
    _assert_traj_close(ours, ref)


def test_adam_equals_torch_adam():
    lr = 0.01
    ours = _run_steps(build("rps"), "adam", 4, lr)
    g = build("rps")
    ref = _torch_optim_traj(
        g,
        torch.optim.Adam(g.min_map.parameters(), lr=lr),
        torch.optim.Adam(g.max_map.parameters(), lr=lr, maximize=True),
        4,
    )
    _assert_traj_close(ours, ref)


# -- bilinear closed form ---------------------------------------------------------------


def _bilinear(lam=0.3, dim=3):
    game = build("bilinear", dim=dim, matrix="random", lam=lam, seed=1)
    th, ph = game.init_params()
    return game, game.A, th["theta"], ph["theta"]


def _v(A, lam, th, ph):
    return A @ ph + lam * th, -A.T @ th + lam * ph


def _grad_H(A, lam, th, ph):
    """∇(½‖v‖²) = (∇v)ᵀ v with ∇v = [[λI, A], [−Aᵀ, λI]]."""
    vt, vp = _v(A, lam, th, ph)
    return lam * vt - A @ vp, A.T @ vt + lam * vp


def _ours(game, name, n, lr, **opts):
    return [(p[0]["theta"], p[1]["theta"]) for p in _run_steps(game, name, n, lr, **opts)]


def test_negative_momentum_alternating_by_hand():
    lam, lr, beta = 0.3, 0.1, -0.4
    game, A, th, ph = _bilinear(lam)
    traj = _ours(game, "gda", 3, lr, beta=beta, alternating=True)
    prev = (th, ph)
    for t in range(3):
        th_new = th - lr * _v(A, lam, th, ph)[0] + beta * (th - prev[0])
        ph_new = ph - lr * _v(A, lam, th_new, ph)[1] + beta * (ph - prev[1])
        prev, (th, ph) = (th, ph), (th_new, ph_new)
        torch.testing.assert_close(traj[t + 1][0], th, atol=ATOL, rtol=0)
        torch.testing.assert_close(traj[t + 1][1], ph, atol=ATOL, rtol=0)


def test_extragradient_by_hand():
    lam, lr, extra = 0.3, 0.2, 0.1
    game, A, th, ph = _bilinear(lam)
    traj = _ours(game, "eg", 2, lr, extra_lr=extra)
    for t in range(2):
        vt, vp = _v(A, lam, th, ph)
        th_h, ph_h = th - extra * vt, ph - extra * vp
        vt, vp = _v(A, lam, th_h, ph_h)
        th, ph = th - lr * vt, ph - lr * vp
        torch.testing.assert_close(traj[t + 1][0], th, atol=ATOL, rtol=0)
        torch.testing.assert_close(traj[t + 1][1], ph, atol=ATOL, rtol=0)


def test_optimistic_by_hand():
    lam, lr = 0.3, 0.1
    game, A, th, ph = _bilinear(lam)
    traj = _ours(game, "ogda", 3, lr)
    prev = _v(A, lam, th, ph)  # first step is plain GDA
    for t in range(3):
        v = _v(A, lam, th, ph)
        th, ph = th - lr * (2 * v[0] - prev[0]), ph - lr * (2 * v[1] - prev[1])
        prev = v
        torch.testing.assert_close(traj[t + 1][0], th, atol=ATOL, rtol=0)
        torch.testing.assert_close(traj[t + 1][1], ph, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,gamma", [("consensus", 0.7), ("hamiltonian", None)])
def test_consensus_and_hamiltonian_by_hand(name, gamma):
    lam, lr = 0.3, 0.1
    game, A, th, ph = _bilinear(lam)
    traj = _ours(game, name, 2, lr, **({"gamma": gamma} if gamma is not None else {}))
    for t in range(2):
        vt, vp = _v(A, lam, th, ph)
        ht, hp = _grad_H(A, lam, th, ph)
        if name == "consensus":
            dt, dp = vt + gamma * ht, vp + gamma * hp
        else:
            dt, dp = ht, hp
        th, ph = th - lr * dt, ph - lr * dp
        torch.testing.assert_close(traj[t + 1][0], th, atol=ATOL, rtol=0)
        torch.testing.assert_close(traj[t + 1][1], ph, atol=ATOL, rtol=0)


def test_nsgda_per_player_by_hand():
    lam, lr = 0.3, 0.05
    game, A, th, ph = _bilinear(lam)
    traj = _ours(game, "nsgda", 2, lr, eps=0.0)
    for t in range(2):
        vt, vp = _v(A, lam, th, ph)
        th, ph = th - lr * vt / vt.norm(), ph - lr * vp / vp.norm()
        torch.testing.assert_close(traj[t + 1][0], th, atol=ATOL, rtol=0)
        torch.testing.assert_close(traj[t + 1][1], ph, atol=ATOL, rtol=0)


def test_nsgda_per_layer_normalizes_each_tensor():
    lr = 0.01
    game = build("rps")
    p0 = game.init_params()
    p1 = _run_steps(game, "nsgda", 1, lr, normalize="layer", eps=0.0)[1]
    for a, b in zip(p0, p1, strict=True):
        for k in a:  # every tensor moved by exactly lr
            assert abs((a[k] - b[k]).norm().item() - lr) < 1e-12


def test_every_registered_solver_steps_and_reports():
    """Each named solver builds, takes a finite step and reports field evaluations."""
    for name in SOLVERS:
        game = build("rps")
        solver = make_solver(name, game)
        params = game.init_params()
        state = solver.init(game, params)
        new, _, info = solver.step(game, params, state, game.sample_batch())
        assert hcc.curvature.pytree.all_finite(new), name
        assert info["field_evals"] >= 1, name
        moved = sum((a[k] - b[k]).abs().sum().item() for a, b in zip(new, params) for k in a)
        assert moved > 0, name
