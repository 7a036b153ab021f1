"""The natural proximal-point rule: its proximal solve, its pull-back, and convergence to certified equilibria.

Tiers (as for the other solvers): the Newton solve of the implicit step against an independent
fixed-point iteration and a closed form; the pull-back against a dense least-squares reference;
convergence *in distance* to the game's equilibrium on small games with boundary equilibria, for
λ = 0 and λ > 0, at the solvers' defaults.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

import hcc
from hcc.curvature.heads import center, link, split_head
from hcc.registry import OptionError
from hcc.solvers import make_solver
from hcc.solvers.function_space import FunctionSpace
from hcc.solvers.prox import proximal_target

torch.set_num_threads(1)

# min player's rows; row 3 is strictly dominated (equilibrium F* = (¼, ¾, 0), G* = (0, ½, ½) at λ = 0)
DOMINATED_3X3 = "0,2,-1;-1,0,1;2,2,2"
# a 4×6 game (N(0,1) entries, seed 4 rounded to 2 digits): half of each player's actions vanish at
# equilibrium, and at λ = 0.1 one entry is 0.0078 — small but positive
RANDOM_4X6 = ("-1.65,-0.56,0.56,-0.22,0.89,-0.45;-0.72,-0.21,0.48,-0.56,1.19,0.49;"
              "1.23,0.71,-0.09,1.06,0.43,1.02;-2.01,-1.78,-0.45,-0.59,-0.89,0.16")


def _game(payoff: str, lam: float, seed: int = 0, **opts) -> hcc.Game:
    return hcc.make_game("matrix", {"payoff": payoff, "lam": lam, **opts}, seed=seed).double()


@pytest.mark.parametrize("payoff", [DOMINATED_3X3, RANDOM_4X6], ids=["3x3-dominated", "4x6-random"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("solver", ["exact-natgrad", "cg-natgrad"])
def test_reaches_the_equilibrium_in_distance(payoff: str, lam: float, solver: str) -> None:
    """Boundary equilibria (vanishing actions) for λ = 0 and λ > 0, defaults, no step size given."""
    game = _game(payoff, lam)
    batch = game.sample_batch()
    params, steps = _solve(game, make_solver(solver, game), batch, tol=1e-10, max_steps=60)
    F, G = game.strategies(params, batch)
    Fs, Gs = game.equilibrium(batch)
    assert (F - Fs).abs().max() < 1e-4 and (G - Gs).abs().max() < 1e-4, (steps, F, Fs, G, Gs)
    assert (Fs == 0).any() or (Gs == 0).any()  # the instances do have vanishing actions


def _solve(game: hcc.Game, solver: hcc.Solver, batch, tol: float, max_steps: int):
    """Step until ``V ≤ tol``; the end point and the steps taken."""
    params = game.init_params()
    state = solver.init(game, params)
    for t in range(1, max_steps + 1):
        params, state, _ = solver.step(game, params, state, batch)
        if game.lyapunov(*game.strategies(params, batch), batch) <= tol:
            return params, t
    raise AssertionError(f"V > {tol} after {max_steps} steps")


def test_rps_to_1e8_within_ten_iterations() -> None:
    for seed in range(3):
        res = hcc.run("rps", "exact-natgrad", seed=seed, tol=1e-8, steps=10, log_every=100)
        assert res.converged and res.steps_to_tol <= 10, res.final


@pytest.mark.parametrize("game,opts", [("matching-pennies", {"lam": 0.1}), ("bilinear", {"dim": 3, "matrix": "random"}),
                                       ("rps", {"n_support": 8})])
def test_other_heads_converge(game: str, opts: dict) -> None:
    """Sigmoid head (matching pennies), no head (bilinear: the Euclidean proximal point), many contexts."""
    res = hcc.run(game, "exact-natgrad", game_options=opts, tol=1e-8, steps=30, log_every=100)
    assert res.converged, res.final


def test_refuses_a_game_without_a_fixed_support() -> None:
    game = hcc.make_game("gan", {"width": 8}).double()
    solver = make_solver("exact-natgrad", game)
    with pytest.raises(OptionError, match="fixed function-space support"):
        solver.init(game, game.init_params())


def test_default_step_does_not_scale_with_the_payoff() -> None:
    """The proximal rule's lr is a Gauss-Newton fraction: no per-game rescaling."""
    game = _game("30,-10;-20,10", 0.0)
    assert game.lr_scale != 1.0 and make_solver("exact-natgrad", game).lr == 1.0


# -- the proximal solve -----------------------------------------------------------------------------


def _fixed_point(fs: FunctionSpace, z, eta: float, iters: int = 4000):
    """``z⁺ ← z − ηCv(h(z⁺))`` by plain iteration: a contraction for small η (independent of Newton)."""
    zp = [t.clone() for t in z]
    for _ in range(iters):
        F = [link(t, h) for t, h in zip(zp, fs.heads, strict=True)]
        v = fs.field(*F)
        zp = [zi - eta * center(vi, h) for zi, vi, h in zip(z, v, fs.heads, strict=True)]
    return zp


@pytest.mark.parametrize("payoff,n_support", [(RANDOM_4X6, 1), (DOMINATED_3X3, 3)])
def test_newton_solves_the_implicit_step(payoff: str, n_support: int) -> None:
    game = _game(payoff, 0.1, n_support=n_support)
    params, batch = game.init_params(), game.sample_batch()
    fs = FunctionSpace(game, batch)
    z = fs.coords(params)
    eta = 0.05  # small enough for the fixed-point iteration to contract
    sol = proximal_target(fs, z, eta)
    ref = _fixed_point(fs, z, eta)
    for a, b in zip(sol.target, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert sol.residual <= 1e4 * torch.finfo(torch.float64).eps  # the default tolerance


def test_newton_is_the_euclidean_proximal_point_without_a_head() -> None:
    """Bilinear (identity maps): ``(x⁺, y⁺)`` solves the linear system ``(I + ηH)Δ = −ηv`` exactly."""
    game = hcc.make_game("bilinear", {"dim": 3, "matrix": "random", "lam": 0.1}).double()
    params, batch = game.init_params(), game.sample_batch()
    fs = FunctionSpace(game, batch)
    z = fs.coords(params)
    eta = 100.0
    sol = proximal_target(fs, z, eta)
    w = torch.cat([t.reshape(-1) for t in z])
    H = fs.field_jacobian(*z)
    v = torch.cat([t.reshape(-1) for t in fs.field(*z)])
    step = torch.linalg.solve(torch.eye(w.numel(), dtype=w.dtype) + eta * H, -eta * v)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in sol.target]), w + step, rtol=1e-12, atol=1e-12)


# -- the pull-back --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precond", ["exact", "cg"])
@pytest.mark.parametrize("geometry", ["logit", "fisher", "l2"])
def test_pullback_is_the_levenberg_marquardt_step(precond: str, geometry: str) -> None:
    """``d = argmin ‖Ĵd − r̂‖² + μ‖d‖²`` against a dense reference (jacrev of the centred logits / values)."""
    game = _game(RANDOM_4X6, 0.1, width=6, n_support=3)
    params, batch = game.init_params(), game.sample_batch()
    x = batch["x_min"]
    z_target = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mu = 0.3
    opts = {"geometry": geometry} if precond == "exact" else {"geometry": geometry, "tol": 1e-12, "maxiter": 500}
    solver = hcc.solvers.compose_solver("prox", precond, game, options=opts)
    state = solver.precond.init(game, params)
    targets = (z_target, torch.zeros(3, 6, dtype=torch.float64))
    d, _, _ = solver.precond.pullback(game, params, batch, targets, state, (mu, mu))
    body, _ = split_head(game.min_map)
    p = params[0]
    z = functional_call(body, p, (x,))
    names = list(p)

    def out(flat):
        q, i = {}, 0
        for k in names:
            q[k] = flat[i:i + p[k].numel()].view_as(p[k])
            i += p[k].numel()
        if geometry == "l2":
            return functional_call(game.min_map, q, (x,)).reshape(-1)
        zq = functional_call(body, q, (x,))
        if geometry == "logit":
            return (zq - zq.mean(-1, keepdim=True)).reshape(-1)
        pz = torch.softmax(z, -1).detach()  # fisher: Qᵀ z with Q at the current point
        Q = torch.diag_embed(pz.sqrt()) - pz[:, :, None] * pz.sqrt()[:, None, :]
        return torch.einsum("nkc,nk->nc", Q, zq).reshape(-1)

    flat = torch.cat([p[k].reshape(-1) for k in names])
    J = jacrev(out)(flat)
    if geometry == "l2":
        r = (torch.softmax(z_target, -1) - torch.softmax(z, -1)).reshape(-1)
    elif geometry == "logit":
        dz = z_target - z
        r = (dz - dz.mean(-1, keepdim=True)).reshape(-1)
    else:
        pz = torch.softmax(z, -1)
        Q = torch.diag_embed(pz.sqrt()) - pz[:, :, None] * pz.sqrt()[:, None, :]
        r = torch.einsum("nkc,nk->nc", Q, z_target - z).reshape(-1)
    ref = torch.linalg.solve(J.T @ J + mu * torch.eye(J.shape[1], dtype=J.dtype), J.T @ r)
    got = torch.cat([d[0][k].reshape(-1) for k in names])
    tol = 1e-9 if precond == "exact" else 1e-6
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_generic_pullback_approaches_the_exact_step() -> None:
    """K-FAC through the generic pull-back: more inner steps, closer to the exact Levenberg-Marquardt step."""
    game = _game(RANDOM_4X6, 0.1, width=6, n_support=3)
    params, batch = game.init_params(), game.sample_batch()
    targets = tuple(torch.randn(3, k, dtype=torch.float64, generator=torch.Generator().manual_seed(2 + k))
                    for k in (4, 6))
    exact = hcc.solvers.compose_solver("prox", "exact", game, options={"geometry": "logit"}).precond
    ref, _, _ = exact.pullback(game, params, batch, targets, exact.init(game, params), (0.1, 0.1))
    errs = []
    for steps in (1, 4, 16):
        kfac = hcc.solvers.compose_solver("prox", "kfac", game, options={"geometry": "logit", "log_cosine": False,
                                                                          "pullback_steps": steps}).precond
        d, _, _ = kfac.pullback(game, params, batch, targets, kfac.init(game, params), (0.1, 0.1))
        errs.append(sum(float((d[i][k] - ref[i][k]).pow(2).sum()) for i in (0, 1) for k in ref[i]) ** 0.5)
    assert errs[0] > errs[1] > errs[2], errs


def test_rejects_bad_options() -> None:
    for bad in ({"eta": 0}, {"mu": -1}, {"mu": 1e7}, {"newton_iters": 0}, {"logit_range": float("inf")}):
        with pytest.raises(OptionError):
            make_solver("exact-natgrad", "rps", options=bad)


def test_module_without_head_has_no_fisher() -> None:
    game = hcc.make_game("bilinear").double()
    with pytest.raises(OptionError, match="fisher"):
        s = make_solver("exact-natgrad", game, options={"geometry": "fisher"})
        s.step(game, game.init_params(), s.init(game, game.init_params()), game.sample_batch())


def test_logit_range_keeps_vanishing_logits_finite() -> None:
    """40 steps past convergence: the vanishing action's logit settles within ζ of the others, not at −∞."""
    game = _game(DOMINATED_3X3, 0.0)
    solver, batch = make_solver("exact-natgrad", game), game.sample_batch()
    params = game.init_params()
    state = solver.init(game, params)
    for _ in range(40):
        params, state, _ = solver.step(game, params, state, batch)
    body, _ = split_head(game.min_map)
    z = functional_call(body, params[0], (batch["x_min"],))
    zeta = hcc.curvature.heads.default_logit_range(torch.float64)
    assert float(z.max() - z.min()) <= 1.1 * zeta
    assert game.lyapunov(*game.strategies(params, batch), batch) < 1e-12


@pytest.mark.parametrize("solver", ["exact-natgrad", "cg-natgrad"])
def test_float32_many_contexts_converges_like_float64(solver: str) -> None:
    """rps with 64 contexts in float32: the Gram system is accumulated in float64 (``solve_dtype``).

    Formed in float32, ``ĴĴᵀ`` loses every eigenvalue below ``≈ size·eps₃₂·σ_max``: the exact pull-back
    then stalled at ``V ≈ 6e-6`` on this instance (seed 3) while float64 converged in 8 steps.
    """
    steps = {}
    for dtype in ("float32", "float64"):
        game = hcc.make_game("rps", {"lam": 0.1, "n_support": 64}, seed=3, dtype=dtype)
        res = hcc.solve(game, make_solver(solver, game), steps=30, tol=1e-10, log_every=100)
        assert res.converged, (dtype, res.status, res.final)
        steps[dtype] = res.steps_to_tol
    if solver == "exact-natgrad":  # CG's own tolerance makes its float32 path longer (29 against 20 steps)
        assert steps["float32"] <= steps["float64"] + 2, steps
