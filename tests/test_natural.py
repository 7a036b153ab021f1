"""The exact and CG natural-gradient preconditioners against dense references.

Three tiers: operators against a dense float64 reference built
independently (``jacrev`` on the whole batch, ``A = JᵀJ/n``, ``pinv``); one-step
and invariance properties; convergence of the named solvers with their defaults.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call, jacrev

import hcc
from hcc.curvature.jacobians import jacobian_matrix, per_sample_jacobian, supports_structured
from hcc.curvature.operators import cg_natural_direction, choose_method, exact_natural_direction
from hcc.curvature.pytree import all_finite, flatten, unflatten
from hcc.registry import OptionError
from hcc.run import solve
from hcc.solvers import PRECONDITIONERS, RULES, compose_solver, make_solver, vector_field
from hcc.solvers.natural import CG, CGOptions, Exact, ExactOptions, function_space_gradients

torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared 2-core box

RTOL = 1e-10

# (id, game, options, seed): the cases are data
CASES = [
    ("rps-softmax", "rps", {"width": 8, "depth": 2}, 0),
    ("mp-sigmoid", "matching-pennies", {"width": 8, "depth": 2, "lam": 0.1}, 0),
    ("rps-deep-relu-n3", "rps", {"width": 16, "depth": 3, "activation": "relu", "n_support": 3}, 0),
    ("rps-elu-n5", "rps", {"width": 8, "depth": 2, "activation": "elu", "n_support": 5}, 1),
    # nk = 48 > M = 15: the dense regime, rank 12 (softmax symmetries), cond(J) ≈ 60
    ("rps-overdetermined", "rps", {"width": 2, "depth": 1, "n_support": 16, "input_dim": 2}, 3),
    ("bilinear-direct", "bilinear", {"dim": 3, "matrix": "random"}, 0),
]
CASE_IDS = [c[0] for c in CASES]


def _setup(game_name: str, options: dict, seed: int, player: int = 0):
    game = hcc.make_game(game_name, options, seed=seed).double()
    params = game.init_params()
    batch = game.sample_batch(torch.Generator().manual_seed(seed))
    x = game.supports(params, batch)[player]
    return game, game.maps()[player], params[player], x


def _reference(module, params, x, v: torch.Tensor, damping: float) -> torch.Tensor:
    """``(A + λI)⁻¹ Π_A v`` from a dense float64 ``A = JᵀJ/n``, ``J`` by ``jacrev`` on the batch."""
    names = list(params)

    def f(*ts):
        return functional_call(module, dict(zip(names, ts, strict=True)), (x,)).reshape(-1)

    jac = jacrev(f, argnums=tuple(range(len(names))))(*params.values())
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    A = J.T @ J / x.shape[0]
    A_pinv = torch.linalg.pinv(A, hermitian=True)
    if damping == 0:
        return A_pinv @ v
    return torch.linalg.solve(A + damping * torch.eye(A.shape[0], dtype=A.dtype), A @ (A_pinv @ v))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _methods(module) -> list[str]:
    return ["kernel", "structured", "dense"] if supports_structured(module) else ["kernel", "dense"]


def _vectors(module, params, x, seed: int = 0):
    """A function-space gradient ``g``, the field ``Jᵀg`` and a random vector (not in ``row J``)."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    k = functional_call(module, params, (x,)).reshape(n, -1).shape[1]
    g = torch.randn(n, k, generator=gen, dtype=torch.float64)
    J = jacobian_matrix(module, params, x)
    v_field = J.T @ g.reshape(-1)
    v_rand = torch.randn(J.shape[1], generator=gen, dtype=torch.float64)
    return g, v_field, v_rand


# -- tier 1: operators against the dense reference -------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_exact_matches_dense_reference(case, damping):
    _, name, options, seed = case
    _, module, params, x = _setup(name, options, seed)
    g, v_field, v_rand = _vectors(module, params, x)
    ref_field = _reference(module, params, x, v_field, damping)
    ref_rand = _reference(module, params, x, v_rand, damping)
    for method in _methods(module):
        kw = {"damping": damping, "method": method}
        d_res = flatten(exact_natural_direction(module, params, x, residual=g, **kw))
        d_field = flatten(exact_natural_direction(module, params, x, unflatten(v_field, params), **kw))
        d_rand = flatten(exact_natural_direction(module, params, x, unflatten(v_rand, params), **kw))
        assert _rel(d_res, ref_field) < RTOL, f"{method}: residual form off by {_rel(d_res, ref_field):.2e}"
        assert _rel(d_field, ref_field) < RTOL, f"{method}: field vector off by {_rel(d_field, ref_field):.2e}"
        assert _rel(d_rand, ref_rand) < RTOL, f"{method}: general vector off by {_rel(d_rand, ref_rand):.2e}"


def test_exact_max_player_and_multi_support_gan_style():
    """The max player's map on its own support (here RPS's φ over 4 support points)."""
    _, module, params, x = _setup("rps", {"width": 8, "n_support": 4}, 2, player=1)
    g, v_field, _ = _vectors(module, params, x, seed=3)
    ref = _reference(module, params, x, v_field, 0.0)
    for method in _methods(module):
        d = flatten(exact_natural_direction(module, params, x, residual=g, method=method))
        assert _rel(d, ref) < RTOL, method


def test_exact_is_minimum_norm_and_moves_function_by_projected_gradient():
    """Undamped: ``d ∈ row(J)`` and ``J d = Π (n g)``, the function-space gradient step."""
    _, module, params, x = _setup("rps", {"width": 8, "n_support": 2}, 0)
    g, _, _ = _vectors(module, params, x)
    J = jacobian_matrix(module, params, x)
    d = flatten(exact_natural_direction(module, params, x, residual=g, damping=0.0))
    n = x.shape[0]
    # softmax: J's rows for one sample sum to 0, so only the per-sample centred g is reachable
    g_c = g - g.mean(1, keepdim=True)
    assert _rel(J @ d, n * g_c.reshape(-1)) < RTOL
    P_row = torch.linalg.pinv(J) @ J
    assert _rel(P_row @ d, d) < RTOL


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("case", CASES[:5], ids=CASE_IDS[:5])
def test_cg_matches_reference_to_its_tolerance(case, damping):
    _, name, options, seed = case
    _, module, params, x = _setup(name, options, seed)
    g, v_field, v_rand = _vectors(module, params, x)
    for vec, resid, v in ((None, g, v_field), (unflatten(v_rand, params), None, v_rand)):
        ref = _reference(module, params, x, v, damping)
        res = cg_natural_direction(module, params, x, vec, residual=resid, damping=damping, tol=1e-12, maxiter=500)
        assert float(res.residual) <= 1e-12 or res.iterations == 500
        # error ≤ cond(A + λ)·tol; these cases have cond ≤ 1e4
        assert _rel(res.solution, ref) < 1e-7, f"CG off by {_rel(res.solution, ref):.2e} ({res.iterations} its)"


def test_cg_reports_and_warm_start_saves_iterations():
    game, module, params, x = _setup("rps", {"width": 16, "depth": 2, "n_support": 16}, 0)
    g, _, _ = _vectors(module, params, x)
    kw = {"damping": 1e-3, "tol": 1e-10, "maxiter": 1000}
    cold = cg_natural_direction(module, params, x, residual=g, **kw)
    assert cold.iterations > 5 and float(cold.residual) <= 1e-10
    # a nearby point (one small step later): the previous solution is a good start
    gen = torch.Generator().manual_seed(7)
    nearby = {k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    cold2 = cg_natural_direction(module, nearby, x, residual=g, **kw)
    warm2 = cg_natural_direction(module, nearby, x, residual=g, x0=cold.solution, **kw)
    assert warm2.iterations < cold2.iterations, (warm2.iterations, cold2.iterations)
    assert _rel(warm2.solution, cold2.solution) < 1e-6
    # fixed-iteration (masked, vmappable) mode gives the same answer
    fixed = cg_natural_direction(module, params, x, residual=g, early_stop=False, **{**kw, "maxiter": 200})
    assert fixed.iterations == 200 and _rel(fixed.solution, cold.solution) < 1e-8


def test_cg_preconditioner_state_warm_starts():
    game = hcc.make_game("rps", {"width": 16, "n_support": 16}).double()
    params, batch = game.init_params(), game.sample_batch()
    iters = {}
    for warm in (False, True):
        solver = compose_solver("gda", "cg", game, lr=1e-3, options={"warm_start": warm, "damping": 1e-3})
        state, p, total = solver.init(game, params), params, 0
        for _ in range(4):
            p, state, info = solver.step(game, p, state, batch)
            total += info["cg_iters_total"]
        iters[warm] = total
    assert iters[True] < iters[False], iters


# -- Jacobian backends -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES[:5], ids=CASE_IDS[:5])
def test_backpack_and_func_jacobians_agree(case):
    _, name, options, seed = case
    _, module, params, x = _setup(name, options, seed)
    a = per_sample_jacobian(module, params, x, backend="func")
    b = per_sample_jacobian(module, params, x, backend="backpack")
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape
        assert _rel(b[k], a[k]) < RTOL, k
    g, v_field, _ = _vectors(module, params, x)
    d_func = flatten(exact_natural_direction(module, params, x, residual=g, method="kernel"))
    d_bp = flatten(exact_natural_direction(module, params, x, residual=g, method="kernel", backend="backpack"))
    assert _rel(d_bp, d_func) < RTOL
    # torch.func still works on the original module afterwards (BackPACK extends a copy)
    per_sample_jacobian(module, params, x, backend="func")


def test_backpack_backend_in_a_solver_step():
    game = hcc.make_game("rps", {"width": 8}).double()
    params, batch = game.init_params(), game.sample_batch()
    steps = []
    for backend in ("func", "backpack"):
        solver = compose_solver("eg", "exact", game, lr=0.4, options={"backend": backend, "method": "kernel"})
        steps.append(solver.step(game, params, solver.init(game, params), batch)[0])
    assert _rel(flatten(steps[1][0]), flatten(steps[0][0])) < RTOL


# -- the preconditioner interface ---------------------------------------------------------------------


def _small_gan():
    pytest.importorskip("hcc.games.gan")
    return hcc.make_game("gan", {"batch_size": 16, "width": 8, "n_eval": 64}).double()


FUSED_GAMES = [
    ("rps", {"width": 8, "n_support": 3}),
    ("matching-pennies", {"lam": 0.1}),
    ("bilinear", {"dim": 3}),
    ("gan", None),
]


@pytest.mark.parametrize("pre", ["exact", "cg"])
@pytest.mark.parametrize("game_case", FUSED_GAMES, ids=[g[0] for g in FUSED_GAMES])
def test_fused_direction_equals_apply_on_the_field(game_case, pre):
    """The fast path (from ∂ℓ/∂F) equals ``apply(vector_field)``, player by player."""
    name, options = game_case
    game = _small_gan() if name == "gan" else hcc.make_game(name, options).double()
    params = game.init_params()
    batch = game.sample_batch(torch.Generator().manual_seed(0))
    opts = {"damping": 0.1} if pre == "exact" else {"damping": 0.1, "tol": 1e-13, "maxiter": 500}
    P = PRECONDITIONERS[pre](PRECONDITIONERS[pre].Options(**opts))
    v = vector_field(game, params, batch)
    for players in ((0, 1), (0,), (1,)):
        d_fast, _, _ = P.direction(game, params, batch, P.init(game, params), players)
        d_gen, _, _ = P.apply(game, params, batch, v, P.init(game, params), players)
        for pl in (0, 1):
            # the general path projects v onto row(J) first (cond² accuracy): 1e-8
            assert _rel(flatten(d_fast[pl]), flatten(d_gen[pl])) < 1e-8, (players, pl)
            if pl not in players:  # unpreconditioned players get the plain field
                assert _rel(flatten(d_fast[pl]), flatten(v[pl])) < 1e-12


def test_function_space_gradients_reproduce_the_field():
    game = hcc.make_game("rps", {"width": 8, "n_support": 2}).double()
    params, batch = game.init_params(), game.sample_batch()
    (x_min, x_max), (g_min, g_max) = function_space_gradients(game, params, batch)
    v = vector_field(game, params, batch)
    for pl, (x, g) in enumerate(((x_min, g_min), (x_max, g_max))):
        J = jacobian_matrix(game.maps()[pl], params[pl], x)
        assert _rel(J.T @ g.reshape(-1), flatten(v[pl])) < 1e-12


@pytest.mark.parametrize("pre", ["exact", "cg"])
@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_runs_with_natural_preconditioners(rule, pre):
    game = hcc.make_game("rps", {"width": 8}).double()
    params, batch = game.init_params(), game.sample_batch()
    solver = compose_solver(rule, pre, game, lr=0.05)
    state = solver.init(game, params)
    for _ in range(2):
        params, state, info = solver.step(game, params, state, batch)
    assert all_finite(params)
    assert math.isfinite(float(info["damping"]))
    if pre == "cg":
        assert info["cg_iters"] >= 0 and math.isfinite(float(info["cg_residual"]))


@pytest.mark.parametrize("pre", ["exact", "cg"])
def test_alternating_preconditions_one_player_at_a_time(pre):
    game = hcc.make_game("matching-pennies", {"lam": 0.1}).double()
    params, batch = game.init_params(), game.sample_batch()
    solver = compose_solver("gda", pre, game, lr=0.1, options={"alternating": True})
    new, _, info = solver.step(game, params, solver.init(game, params), batch)
    assert all_finite(new) and info["field_evals"] == 2
    # the same step by hand: θ first with φ fixed, then φ at the new θ
    P = solver.precond
    d_th = P.direction(game, params, batch, P.init(game, params), (0,))[0][0]
    th = {k: params[0][k] - 0.1 * d_th[k] for k in params[0]}
    d_ph = P.direction(game, (th, params[1]), batch, P.init(game, params), (1,))[0][1]
    ph = {k: params[1][k] - 0.1 * d_ph[k] for k in params[1]}
    assert _rel(flatten(new[0]), flatten(th)) < 1e-12 and _rel(flatten(new[1]), flatten(ph)) < 1e-12


def test_apply_leaves_other_players_entries_unchanged():
    game = hcc.make_game("rps", {"width": 8}).double()
    params, batch = game.init_params(), game.sample_batch()
    vec = tuple({k: torch.randn_like(t) for k, t in p.items()} for p in params)
    P = Exact(ExactOptions())
    d, _, _ = P.apply(game, params, batch, vec, {}, (1,))
    assert all(d[0][k] is vec[0][k] for k in vec[0])
    assert _rel(flatten(d[1]), flatten(vec[1])) > 1e-3


# -- parametrization invariance ---------------------------------------------------------------------


def _reparametrized_pair(options: dict, seed: int = 0):
    """Game B sees the supports through ``x' = Tx + c`` and starts at ``W₁' = W₁T⁻¹``,
    ``b₁' = b₁ − W₁T⁻¹c``: the same functions, a linearly reparametrized first layer."""
    game_a = hcc.make_game("rps", options, seed=seed).double()
    game_b = copy.deepcopy(game_a)
    gen = torch.Generator().manual_seed(1)
    d = game_a.x_min.shape[1]
    T = 3.0 * torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=gen, dtype=torch.float64)
    c = torch.randn(d, generator=gen, dtype=torch.float64)
    game_b.x_min = game_a.x_min @ T.T + c
    game_b.x_max = game_a.x_max @ T.T + c
    params_a = game_a.init_params()
    params_b = tuple(dict(p) for p in params_a)
    T_inv = torch.linalg.inv(T)
    for p in params_b:
        W, b = p["0.weight"], p["0.bias"]
        p["0.weight"], p["0.bias"] = W @ T_inv, b - W @ T_inv @ c
    return (game_a, params_a), (game_b, params_b)


def _trajectory(game, params, precond: str, options: dict, steps: int = 50, lr: float = 1e-3) -> torch.Tensor:
    solver = compose_solver("gda", precond, game, lr=lr, options=options)
    batch, state, out = game.sample_batch(), solver.init(game, params), []
    for _ in range(steps):
        params, state, _ = solver.step(game, params, state, batch)
        F, G = game.strategies(params, batch)
        out.append(torch.cat([F.reshape(-1), G.reshape(-1)]).detach())
    return torch.stack(out)


def test_parametrization_invariance_exact_for_linear_logits():
    """Softmax regression (depth 0): logits are linear in θ and ``J_z`` has full row rank, so
    the function-space trajectory of natural GDA is *exactly* that of function-space
    gradient flow's Euler steps (shifts along the softmax null direction change nothing),
    whatever the parametrization. Plain GDA's differs at first order."""
    opts = {"depth": 0, "n_support": 3, "input_dim": 4}
    (ga, pa), (gb, pb) = _reparametrized_pair(opts)
    F_a, F_b = (torch.cat(g.strategies(p, g.sample_batch())) for g, p in ((ga, pa), (gb, pb)))
    assert _rel(F_b, F_a) < 1e-14  # the same functions at the start
    nat = _trajectory(ga, pa, "exact", {"damping": 0.0}) - _trajectory(gb, pb, "exact", {"damping": 0.0})
    gda = _trajectory(ga, pa, "identity", {}) - _trajectory(gb, pb, "identity", {})
    assert float(nat.abs().max()) < 1e-10, float(nat.abs().max())
    assert float(gda.abs().max()) > 1e-3, float(gda.abs().max())


def test_parametrization_invariance_deep_net_first_order():
    """A tanh MLP (M > nk): the minimum-norm step is invariant to first order, so the
    natural trajectories agree to O(h) over a fixed time (here 1e-3 · 50 steps) — a
    thousand times closer than plain GDA's, which differ at first order."""
    (ga, pa), (gb, pb) = _reparametrized_pair({"depth": 2, "width": 8, "n_support": 1})
    nat = _trajectory(ga, pa, "exact", {"damping": 0.0}) - _trajectory(gb, pb, "exact", {"damping": 0.0})
    gda = _trajectory(ga, pa, "identity", {}) - _trajectory(gb, pb, "identity", {})
    nat_err, gda_err = float(nat.abs().max()), float(gda.abs().max())
    assert nat_err < 1e-4 and gda_err > 1e-2 and nat_err < 1e-3 * gda_err, (nat_err, gda_err)


def test_parametrization_invariance_exact_in_the_overdetermined_regime():
    """nk > M with J's null space exactly the softmax symmetries of the last layer, which
    the first-layer reparametrization preserves: the minimum-norm step is covariant,
    so natural GDA's trajectories coincide to round-off even for a tanh network."""
    opts = {"depth": 1, "width": 2, "input_dim": 2, "n_support": 16, "out_scale": 1.0}
    (ga, pa), (gb, pb) = _reparametrized_pair(opts)
    nat = _trajectory(ga, pa, "exact", {"damping": 0.0}) - _trajectory(gb, pb, "exact", {"damping": 0.0})
    gda = _trajectory(ga, pa, "identity", {}) - _trajectory(gb, pb, "identity", {})
    assert float(nat.abs().max()) < 1e-10, float(nat.abs().max())
    assert float(gda.abs().max()) > 1e-3


# -- options, registry, method choice ---------------------------------------------------------------


def test_auto_method_rule():
    game = hcc.make_game("rps", {"width": 8}).double()
    assert choose_method(game.min_map, 1, 3, 100, "func") == "structured"
    assert choose_method(game.min_map, 1, 3, 100, "backpack") == "kernel"
    assert choose_method(game.min_map, 50, 3, 100, "func") == "dense"
    bil = hcc.make_game("bilinear", {"dim": 3})
    assert not supports_structured(bil.min_map)
    assert choose_method(bil.min_map, 1, 3, 3, "func") == "kernel"


def test_options_are_validated():
    with pytest.raises(OptionError, match="method"):
        make_solver("eg+exact", "rps", options={"method": "svd"})
    with pytest.raises(OptionError, match="backend"):
        make_solver("eg+exact", "rps", options={"backend": "jax"})
    with pytest.raises(OptionError, match="damping"):
        make_solver("eg+cg", "rps", options={"damping": -1})
    with pytest.raises(OptionError, match="maxiter"):
        make_solver("eg+cg", "rps", options={"maxiter": 0})
    with pytest.raises(OptionError, match="unknown option"):
        make_solver("eg+exact", "rps", options={"tol": 1e-3})
    bil = hcc.make_game("bilinear").double()
    with pytest.raises(OptionError, match="structured"):
        exact_natural_direction(bil.min_map, bil.init_params()[0], bil.x_min, residual=torch.ones(1, 1),
                                method="structured")
    s = make_solver("eg+cg", "rps", options={"tol": "1e-4", "warm_start": "false", "damping": "0.1"})
    assert (s.precond.options.tol, s.precond.options.warm_start, s.precond.options.damping) == (1e-4, False, 0.1)


def test_registry_and_compose_solver():
    assert {"exact", "cg"} <= set(PRECONDITIONERS)
    for name, pre in (("eg+exact", Exact), ("eg+cg", CG)):
        s = make_solver(name, "rps")
        assert isinstance(s.precond, pre) and s.rule.name == "eg"
    s = compose_solver("ogda", "exact", "rps", options={"damping": 0.0, "method": "kernel"})
    assert s.name == "ogda+exact" and s.precond.options.method == "kernel"
    assert compose_solver("eg", "cg", "rps").lr == make_solver("eg+cg", "rps").lr
    assert compose_solver("gda", "identity", "bilinear").lr == make_solver("gda", "bilinear").lr
    with pytest.raises(OptionError, match="precond"):
        compose_solver("eg", "nope", "rps")
    with pytest.raises(OptionError, match="update rule"):
        compose_solver("nope", "exact", "rps")
    assert isinstance(CGOptions().damping, float)


def test_history_logs_damping_and_cg_numbers():
    res = hcc.run("rps", "eg+cg", steps=3, stop_at_tol=False, game_options={"width": 8, "n_support": 2})
    row = res.history[-1]
    for key in ("damping", "cg_iters", "cg_iters_total", "cg_residual"):
        assert isinstance(row[key], float) and math.isfinite(row[key]), key
    # Levenberg-Marquardt λ on JᵀJ = nA: λ/n is what was added to A
    assert row["damping"] == pytest.approx(CGOptions().damping / 2)
    assert row["cg_iters_total"] >= row["cg_iters"] > 0


def test_damping_is_levenberg_marquardt_on_the_summed_gram():
    """``damping=λ`` in the preconditioner means ``(A + λ/n I)⁻¹ v``: argmin ‖Jd − ng‖² + λ‖d‖²."""
    game = hcc.make_game("rps", {"width": 8, "n_support": 4}).double()
    params, batch = game.init_params(), game.sample_batch()
    (x, _), (g, _) = function_space_gradients(game, params, batch)
    J = jacobian_matrix(game.min_map, params[0], x)
    lam, n = 0.3, x.shape[0]
    ref = torch.linalg.solve(J.T @ J + lam * torch.eye(J.shape[1], dtype=J.dtype), J.T @ (n * g.reshape(-1)))
    d, _, info = Exact(ExactOptions(damping=lam)).direction(game, params, batch, {}, (0,))
    assert _rel(flatten(d[0]), ref) < RTOL and float(info["damping"]) == pytest.approx(lam / n)


@pytest.mark.parametrize("method", ["kernel", "structured", "dense", "cg"])
def test_natural_direction_vmaps_over_stacked_parameters(method):
    """Pure in the parameters, no data-dependent branching: ``torch.vmap`` over a batch of games."""
    games = [hcc.make_game("rps", {"width": 8, "n_support": 2}, seed=s).double() for s in range(3)]
    module, x = games[0].min_map, games[0].x_min
    ps = [g.init_params()[0] for g in games]
    stacked = {k: torch.stack([p[k] for p in ps]) for k in ps[0]}
    g = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def one(p, r):
        if method == "cg":
            return cg_natural_direction(module, p, x, residual=r, damping=0.1, early_stop=False, maxiter=30).direction
        return exact_natural_direction(module, p, x, residual=r, damping=0.1, method=method)

    out = torch.vmap(one)(stacked, g)
    for i in range(3):
        ref = flatten(exact_natural_direction(module, ps[i], x, residual=g[i], damping=0.1, method="kernel"))
        assert _rel(flatten({k: v[i] for k, v in out.items()}), ref) < 1e-10


def test_float32_softmax_null_direction_is_harmless():
    """float32 with an undamped, rank-deficient softmax J: the pseudo-inverse cutoff keeps
    round-off along the null direction from blowing up the step."""
    game = hcc.make_game("rps", {"width": 16}).double()
    _, module, params, x = game, game.min_map, game.init_params()[0], game.x_min
    g = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d64 = flatten(exact_natural_direction(module, params, x, residual=g, damping=0.0))
    p32 = {k: v.float() for k, v in params.items()}
    for method in ("kernel", "structured"):
        d32 = flatten(exact_natural_direction(module, p32, x.float(), residual=g.float(), damping=0.0, method=method))
        assert _rel(d32.double(), d64) < 1e-4, method


def test_cg_on_a_network_with_100k_parameters():
    game = hcc.make_game("rps", {"width": 320, "n_support": 4}).double()
    assert game.describe()["params_min"] >= 100_000
    params, batch = game.init_params(), game.sample_batch()
    solver = make_solver("eg+cg", game)
    new, _, info = solver.step(game, params, solver.init(game, params), batch)
    assert all_finite(new) and float(info["cg_residual"]) <= solver.precond.options.tol


def test_gan_steps_with_natural_solvers():
    game = _small_gan()
    params = game.init_params()
    batch = game.sample_batch(torch.Generator().manual_seed(0))
    for name in ("eg+exact", "eg+cg"):
        solver = make_solver(name, game)
        state, p = solver.init(game, params), params
        for _ in range(2):
            p, state, info = solver.step(game, p, state, batch)
        assert all_finite(p), name


# -- convergence with the defaults --------------------------------------------------------------------


NATURAL_GAMES = [("rps", {}), ("matching-pennies", {"lam": 0.1})]


@pytest.mark.parametrize("solver", ["eg+exact", "eg+cg"])
@pytest.mark.parametrize("game_case", NATURAL_GAMES, ids=[g[0] for g in NATURAL_GAMES])
def test_natural_solvers_converge_with_defaults(game_case, solver):
    name, options = game_case
    res = hcc.run(name, solver, game_options=options, steps=200, tol=1e-6, log_every=1000)
    assert res.converged, res.message
    assert res.steps_to_tol <= 60, res.steps_to_tol


def test_natural_extragradient_needs_far_fewer_iterations_than_plain():
    """Contextual RPS (4 support points): J Jᵀ is ill-conditioned (eigenvalues spread
    over ~3 decades), so plain EG crawls along the weak directions at every stable
    step, while the natural direction moves every point at the function-space rate."""
    options = {"n_support": 4}
    nat = hcc.run("rps", "eg+exact", game_options=options, steps=200, tol=1e-6, log_every=1000)
    assert nat.converged and nat.steps_to_tol <= 100, nat.message
    for lr in (None, 0.2):  # the registered step, and the best plain step on other RPS variants
        plain = hcc.run("rps", "eg", game_options=options, lr=lr, steps=5 * nat.steps_to_tol, log_every=1000)
        assert not plain.converged, (lr, plain.steps_to_tol)


@pytest.mark.slow
def test_natural_extragradient_vs_plain_on_the_default_game():
    """On the default RPS (one support point, J Jᵀ well conditioned) the gap is modest."""
    nat = hcc.run("rps", "eg+exact", steps=200, tol=1e-6, log_every=1000)
    plain = hcc.run("rps", "eg", steps=3000, tol=1e-6, log_every=1000)
    assert nat.converged and plain.converged and nat.steps_to_tol < plain.steps_to_tol


@pytest.mark.slow
@pytest.mark.parametrize("out_scale", [8.0, 15.0])
@pytest.mark.parametrize("seed", range(5))
def test_default_damping_is_robust_from_saturated_starts(seed, out_scale):
    game = hcc.make_game("rps", {"out_scale": out_scale}, seed=seed).double()
    res = solve(game, make_solver("eg+exact", game), steps=300, tol=1e-6, seed=seed, log_every=1000)
    assert res.converged, res.message
