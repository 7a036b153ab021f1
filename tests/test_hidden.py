"""The published hidden-game methods as preconditioners (surrogate losses, PHGD) and the Fisher geometry.

The Fisher direction is checked against a dense reference built without the output-factor
machinery: ``A = (1/n) Σ J_iᵀ S_i⁺ J_i`` from ``jacrev`` of the map itself and ``pinv`` of the softmax
Jacobian ``S_i``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

import hcc
from hcc.registry import OptionError
from hcc.solvers import RULES, compose_solver, make_solver
from hcc.solvers.natural import function_space_gradients

torch.set_num_threads(1)

RANDOM_4X6 = ("-1.65,-0.56,0.56,-0.22,0.89,-0.45;-0.72,-0.21,0.48,-0.56,1.19,0.49;"
              "1.23,0.71,-0.09,1.06,0.43,1.02;-2.01,-1.78,-0.45,-0.59,-0.89,0.16")


def _flat_jacobian(module, params, x):
    """``J`` of the whole map, ``(n, k, M)``, parameters flattened in order."""
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def f(flat):
        q, i = {}, 0
        for k, m in zip(names, sizes, strict=True):
            q[k] = flat[i:i + m].view_as(params[k])
            i += m
        return functional_call(module, q, (x,))

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return jacrev(f)(flat), names


@pytest.mark.parametrize("game,opts", [("rps", {"n_support": 3, "width": 6}),
                                       ("matrix", {"payoff": RANDOM_4X6, "n_support": 2, "width": 5}),
                                       ("matching-pennies", {"width": 4})])
@pytest.mark.parametrize("precond", ["exact", "cg"])
def test_fisher_direction_against_dense_pinv(game: str, opts: dict, precond: str) -> None:
    g = hcc.make_game(game, opts, seed=1).double()
    params, batch = g.init_params(), g.sample_batch()
    options = {"geometry": "fisher", "damping": 0.0}
    if precond == "cg":
        options.update(tol=1e-12, maxiter=400, warm_start=False)
    pre = compose_solver("eg", precond, g, options=options).precond
    d, _, _ = pre.direction(g, params, batch, pre.init(g, params), (0, 1))
    (xs, gs) = function_space_gradients(g, params, batch)
    for pl in (0, 1):
        module, x, grad = g.maps()[pl], xs[pl], gs[pl]
        J, names = _flat_jacobian(module, params[pl], x)
        n, k, M = J.shape
        F = functional_call(module, params[pl], (x,))
        if k > 1 and game != "matching-pennies":
            S = torch.diag_embed(F) - F[:, :, None] * F[:, None, :]
        else:  # sigmoid: the Bernoulli Fisher σ(1 − σ)
            S = torch.diag_embed(F * (1 - F))
        A = sum(J[i].T @ torch.linalg.pinv(S[i], hermitian=True) @ J[i] for i in range(n)) / n
        v = sum(J[i].T @ grad[i] for i in range(n))
        ref = torch.linalg.pinv(A, hermitian=True, rtol=1e-10) @ v
        got = torch.cat([d[pl][k_].reshape(-1) for k_ in names])
        tol = 1e-8 if precond == "exact" else 1e-5
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_fisher_geometry_with_every_rule(rule: str) -> None:
    """Every rule composes with the exact Fisher preconditioner and takes finite steps."""
    g = hcc.make_game("rps", {"width": 6}, seed=0).double()
    lr = 1.0 if rule == "prox" else 0.05
    res = hcc.solve(g, compose_solver(rule, "exact", g, lr=lr, options={"geometry": "fisher"}), steps=3,
                    stop_at_tol=False, log_every=1)
    assert res.status in ("max_steps", "converged") and all(r["lyapunov"] < 1 for r in res.history)


def test_fisher_extragradient_is_replicator_like_and_converges() -> None:
    """EG on the Fisher natural direction reaches the equilibrium of a boundary game (λ = 0.1)."""
    g = hcc.make_game("matrix", {"payoff": RANDOM_4X6, "lam": 0.1}, seed=0).double()
    res = hcc.solve(g, compose_solver("eg", "exact", g, lr=1.0, options={"geometry": "fisher", "damping": 0.05}),
                    steps=800, tol=1e-6, log_every=1000)
    assert res.converged, res.final


# -- surrogate losses -------------------------------------------------------------------------------


def test_surrogate_with_many_inner_steps_tends_to_the_natural_direction() -> None:
    """``K → ∞``, small ``τ``: the surrogate direction → the undamped natural gradient (l2)."""
    g = hcc.make_game("rps", {"width": 6, "n_support": 2}, seed=2).double()
    params, batch = g.init_params(), g.sample_batch()
    exact = compose_solver("eg", "exact", g, options={"damping": 0.0}).precond
    ref, _, _ = exact.direction(g, params, batch, exact.init(g, params), (0, 1))
    cos = []
    for steps in (1, 30):
        sur = compose_solver("eg", "surrogate", g, lr=1e-4, options={"inner_steps": steps}).precond
        d, _, _ = sur.direction(g, params, batch, sur.init(g, params), (0, 1))
        a = torch.cat([d[i][k].reshape(-1) for i in (0, 1) for k in d[i]])
        b = torch.cat([ref[i][k].reshape(-1) for i in (0, 1) for k in ref[i]])
        cos.append(float(a @ b / (a.norm() * b.norm())))
    assert cos[1] > 0.99 and cos[1] > cos[0], cos


def test_surrogate_apply_on_a_field_equals_its_direction() -> None:
    """A general vector is mapped to its least-squares function-space gradient: on the field itself the
    preconditioned vector equals the fused direction."""
    g = hcc.make_game("rps", {"width": 6}, seed=3).double()
    params, batch = g.init_params(), g.sample_batch()
    sur = make_solver("eg+surrogate", g).precond
    d1, _, _ = sur.direction(g, params, batch, sur.init(g, params), (0, 1))
    d2, _, _ = sur.apply(g, params, batch, hcc.solvers.vector_field(g, params, batch), sur.init(g, params), (0, 1))
    for i in (0, 1):
        for k in d1[i]:
            torch.testing.assert_close(d1[i][k], d2[i][k], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("solver,options,steps",
                         [("eg+surrogate", {}, 200), ("prox+surrogate", {"geometry": "logit"}, 10)])
def test_surrogate_reaches_the_equilibrium(solver: str, options: dict, steps: int, lam: float) -> None:
    """The named preset (Fisher targets) and the proximal rule's pull-back by surrogate steps (logit): a boundary
    equilibrium (a dominated action) for λ = 0 and λ > 0. The paper's values-space surrogate stalls here (V ≈ 0.25
    after 300 steps: targets F − τng leave the simplex; see the module docstring)."""
    g = hcc.make_game("matrix", {"payoff": "0,2,-1;-1,0,1;2,2,2", "lam": lam}, seed=0).double()
    s = make_solver(solver, g, options=options) if solver in hcc.SOLVERS else compose_solver(
        *solver.split("+"), g, options=options)
    batch = g.sample_batch()
    params, state = g.init_params(), s.init(g, g.init_params())
    for _ in range(steps):
        params, state, _ = s.step(g, params, state, batch)
    F, G = g.strategies(params, batch)
    Fs, Gs = g.equilibrium(batch)
    assert (F - Fs).abs().max() < 1e-3 and (G - Gs).abs().max() < 1e-3, (F, Fs, G, Gs)


# -- PHGD -------------------------------------------------------------------------------------------------


def test_phgd_is_the_undamped_minimum_norm_natural_gradient() -> None:
    g = hcc.make_game("rps", {"width": 6, "n_support": 2}, seed=0).double()
    params, batch = g.init_params(), g.sample_batch()
    phgd = make_solver("gda+phgd", g).precond
    d, _, _ = phgd.direction(g, params, batch, phgd.init(g, params), (0, 1))
    (xs, gs) = function_space_gradients(g, params, batch)
    J, names = _flat_jacobian(g.min_map, params[0], xs[0])
    Jm = J.reshape(-1, J.shape[-1])
    v = Jm.T @ gs[0].reshape(-1)
    n = xs[0].shape[0]  # the latent field is taken in V's mean-over-points metric: ∇_z L = n·∂L/∂F
    ref = n * torch.linalg.pinv(Jm) @ torch.linalg.pinv(Jm).T @ v  # n·J⁺J⁺ᵀ v
    got = torch.cat([d[0][k].reshape(-1) for k in names])
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))


def test_stochastic_phgd_minibatches_and_schedule() -> None:
    """Minibatch estimates average to the full direction over all draws; the step decays as (1 + t)^-decay."""
    g = hcc.make_game("rps", {"width": 6, "n_support": 4}, seed=0).double()
    params, batch = g.init_params(), g.sample_batch()
    full = compose_solver("gda", "phgd", g, options={"damping": 1.0}).precond
    dfull, _, _ = full.direction(g, params, batch, full.init(g, params), (0, 1))
    sto = compose_solver("gda", "phgd", g, options={"damping": 1.0, "batch_size": 2, "decay": 0.5}).precond
    state = sto.init(g, params)
    gammas = []
    for _ in range(3):
        _, state, info = sto.direction(g, params, batch, state, (0, 1))
        gammas.append(info["phgd_gamma"])
    assert gammas == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5])
    assert state["calls"] == 3 and all(torch.isfinite(t).all() for t in dfull[0].values())
    with pytest.raises(OptionError):
        compose_solver("gda", "phgd", g, options={"batch_size": 0})


@pytest.mark.parametrize("seed", [0, 1])
def test_phgd_converges_on_a_strongly_monotone_hidden_game(seed: int) -> None:
    """PHGD is plain (simultaneous) gradient descent on the latent game: it converges where that game is strongly
    monotone with an interior equilibrium (rps, λ = 0.5) at its default step; at λ = 0 simultaneous steps spiral
    out (as GDA), and at boundary equilibria the undamped l2 flow leaves the simplex (solvers module docs)."""
    res = hcc.run("rps", "gda+phgd", game_options={"lam": 0.5}, seed=seed, steps=600, tol=1e-6, log_every=1000)
    assert res.converged, res.final
