"""The ``openspiel`` game family: sequence form, LP, exploitability, maps, and runs.

References are OpenSpiel's own: ``expected_game_score.policy_value`` for the payoff,
``exploitability.nash_conv`` / ``exploitability`` for the duality gap, its policy
classes for the conversion, its matrix games' utilities and its (cvxpy) sequence-form LP.
Skipped, with the reason, when open-spiel is not installed (``pip install 'hcc[openspiel]'``); the
parts that do not need it are in ``test_sequence_form.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_image, assert_one_line_error, hcc_cli, load
from torch.func import vmap

import hcc
from hcc.games.simplex import matrix_game_gap
from hcc.plots import stop_metric

pyspiel = pytest.importorskip(
    "pyspiel", reason="open-spiel is not installed (pip install 'hcc[openspiel]'): OpenSpiel game tests skipped")
from open_spiel.python.algorithms import expected_game_score, exploitability  # noqa: E402
from open_spiel.python.algorithms import sequence_form_utils as sfu  # noqa: E402

GAMES = ["kuhn_poker", "leduc_poker", "matrix_rps", "matrix_mp"]


def game_of(name: str, seed: int = 0, **options) -> hcc.Game:
    """The OpenSpiel game ``name`` in float64."""
    return hcc.make_game("openspiel", {"name": name, **options}, seed=seed).to(torch.float64)


def random_behaviours(game: hcc.Game, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dirichlet behaviours on the legal actions of every information set."""
    out = []
    for tp in game.sf.treeplexes:
        b = rng.gamma(0.7, size=tp.mask.shape) * tp.mask
        out.append(torch.as_tensor(b / b.sum(1, keepdims=True)))
    return out[0], out[1]


@pytest.mark.parametrize("name", GAMES)
def test_payoff_is_openspiel_expected_value(name):
    """``Ψ = −xᵀAy`` from OpenSpiel's sequence-form utilities equals OpenSpiel's expected return of
    player 1 under the same (random) behaviours, to 1e-12."""
    game = game_of(name=name)
    batch = game.sample_batch()
    rng = np.random.default_rng(0)
    for _ in range(3):
        b0, b1 = random_behaviours(game, rng)
        pol = game.sf.tabular_policy((b0.numpy(), b1.numpy()))
        ref = expected_game_score.policy_value(game.sf.game.new_initial_state(), [pol, pol])
        assert abs(ref[0] + ref[1]) < 1e-12
        assert abs(float(game.payoff(b0, b1, batch)) - ref[1]) < 1e-12


@pytest.mark.parametrize("name", GAMES)
def test_realization_matches_openspiel_policy_to_sequence(name):
    """Behaviours → plans (:meth:`TreeplexIndex.realize`) as OpenSpiel's ``policy_to_sequence`` does it."""
    game = game_of(name=name)
    _, isa_to_seq, *_ = sfu.construct_vars(game.sf.game)
    b = random_behaviours(game, np.random.default_rng(1))
    pol = game.sf.tabular_policy((b[0].numpy(), b[1].numpy()))
    ref = sfu.policy_to_sequence(game.sf.game, pol, isa_to_seq)
    for p in range(2):
        np.testing.assert_allclose(game.plan(b[p], p).numpy(), ref[p], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", GAMES)
@pytest.mark.parametrize("strategy", ["behaviour", "realization"])
def test_duality_gap_is_openspiel_nash_conv(name, strategy):
    """hcc's gap (``exploitability``) equals OpenSpiel's ``nash_conv`` (= 2 × its ``exploitability``)
    for the networks' policies, converted with OpenSpiel's ``TabularPolicy``; so does the referee."""
    for seed in (0, 1):
        game = game_of(seed=seed, name=name, strategy=strategy, out_scale=3.0)
        params, batch = game.init_params(), game.sample_batch()
        pol = game.tabular_policy(params)
        nash_conv = exploitability.nash_conv(game.sf.game, pol)
        gap = float(game.duality_gap(*game.strategies(params, batch), batch))
        assert abs(gap - nash_conv) < 1e-12
        assert abs(gap / 2 - exploitability.exploitability(game.sf.game, pol)) < 1e-12
        ref = game.extra_metrics(params, batch)
        assert abs(2 * ref["openspiel_exploitability"] - gap) < 1e-12 and gap > 1e-3


def test_duality_gap_of_random_behaviours_is_nash_conv():
    game = game_of(name="leduc_poker")
    b = random_behaviours(game, np.random.default_rng(2))
    pol = game.sf.tabular_policy((b[0].numpy(), b[1].numpy()))
    gap = float(game.duality_gap(b[0], b[1], game.sample_batch()))
    assert abs(gap - exploitability.nash_conv(game.sf.game, pol)) < 1e-12


def test_kuhn_lp_value_and_equilibrium():
    """The sequence-form LP: Kuhn poker's value is −1/18 for the first player (Kuhn 1950), and its
    solution has zero exploitability by OpenSpiel's count."""
    game = game_of(name="kuhn_poker")
    value, x, y = game.lp()
    assert abs(value - 1 / 18) < 1e-9  # Ψ is player 1's return
    infosets, isa_to_seq, isa_maps, *_ = sfu.construct_vars(game.sf.game)
    pol = sfu.sequence_to_policy([x, y], game.sf.game, isa_to_seq, isa_maps)
    assert exploitability.nash_conv(game.sf.game, pol) < 1e-9
    # and hcc's gap at the LP plans, through the realization rows
    rows = [torch.as_tensor(np.where(tp.mask, xp[np.maximum(tp.seq, 0)], 0.0))
            for xp, tp in zip((x, y), game.sf.treeplexes, strict=True)]
    assert float(game.duality_gap(*rows, {})) > -1e-12
    plan_game = game_of(name="kuhn_poker", strategy="realization")
    assert abs(float(plan_game.duality_gap(*rows, {}))) < 1e-9


def test_lp_value_matches_openspiel_sequence_form_lp():
    """Our scipy LP against OpenSpiel's cvxpy one (``sequence_form_lp``, which runs on ECOS only)."""
    cp = pytest.importorskip("cvxpy", reason="cvxpy is not installed: OpenSpiel's sequence_form_lp needs it")
    if "ECOS" not in cp.installed_solvers():
        pytest.skip("cvxpy's ECOS solver is not installed (pip install ecos): OpenSpiel's sequence_form_lp needs it")
    from open_spiel.python.algorithms import sequence_form_lp

    for name in ("kuhn_poker", "matrix_rps"):
        game = game_of(name=name)
        v0, *_ = sequence_form_lp.solve_zero_sum_game(game.sf.game)
        assert abs(game.lp()[0] + v0) < 1e-7


@pytest.mark.parametrize("name", ["matrix_rps", "matrix_mp"])
def test_normal_form_game_is_its_payoff_matrix(name):
    """A one-shot simultaneous game: one information set per player, ``Ψ = FᵀMG`` with ``M`` player 1's
    utilities from OpenSpiel's matrix game, and the gap is the matrix game's (:func:`matrix_game_gap`)."""
    game = game_of(name=name, out_scale=2.0)
    mg = pyspiel.load_matrix_game(name)
    M = torch.as_tensor(np.asarray(mg.col_utilities()))
    params, batch = game.init_params(), game.sample_batch()
    F, G = game.strategies(params, batch)
    assert F.shape == (1, M.shape[0]) and G.shape == (1, M.shape[1])
    assert abs(float(game.payoff(F, G, batch) - F[0] @ M @ G[0])) < 1e-14
    assert abs(float(game.duality_gap(F, G, batch) - matrix_game_gap(F, G, M, 0.0))) < 1e-14


@pytest.mark.parametrize("name", ["kuhn_poker", "leduc_poker"])
def test_realization_map_is_per_point_and_equals_the_plan(name):
    """Each realization row is a function of its own input row (batched = row by row = vmapped) and
    equals the plan of the network's behaviours."""
    game = game_of(name=name, strategy="realization", width=16, out_scale=2.0)
    params, batch = game.init_params(), game.sample_batch()
    F, G = game.strategies(params, batch)
    b0, b1 = game.behaviours(params)
    for p, (rows, b) in enumerate(((F, b0), (G, b1))):
        torch.testing.assert_close(game.plans[p].plan(rows), game.plans[p].realize(b), rtol=0, atol=1e-15)
    x = batch["x_min"]
    single = vmap(lambda xi: game.min_map(xi[None])[0])(x)
    torch.testing.assert_close(single, F, rtol=0, atol=1e-15)


def test_best_response_by_backward_induction_against_lp():
    """``max_{x∈X} uᵀx`` by backward induction equals the LP over the treeplex for random ``u``."""
    from scipy.optimize import linprog

    game = game_of(name="leduc_poker")
    rng = np.random.default_rng(3)
    for p, tp in enumerate(game.sf.treeplexes):
        E, e = tp.constraints()
        u = rng.normal(size=tp.n_sequences)
        lp = linprog(-u, A_eq=E, b_eq=e, bounds=(0, None), method="highs")
        assert abs(float(game.plans[p].best_response(torch.as_tensor(u))) + lp.fun) < 1e-9


@pytest.mark.parametrize("strategy", ["behaviour", "realization"])
def test_every_rule_and_preconditioner_steps(strategy):
    """Each rule × preconditioner takes finite steps on Kuhn poker through the public API."""
    game = game_of(name="kuhn_poker", strategy=strategy, width=8, depth=1)
    batch = game.sample_batch()
    for rule in hcc.RULES:
        for precond in hcc.PRECONDITIONERS:
            solver = hcc.solvers.compose_solver(rule, precond, game, lr=0.05)
            params = game.init_params()
            state = solver.init(game, params)
            for _ in range(2):
                params, state, _ = solver.step(game, params, state, batch)
            moved = any(not torch.equal(a, b) for a, b in zip(params[0].values(), game.init_params()[0].values()))
            assert moved and all(torch.isfinite(v).all() for p in params for v in p.values()), (rule, precond)


def test_run_stops_on_exploitability_and_records_the_referee():
    """The run's progress metric is the gap: it stops at the first step with gap ≤ tol; OpenSpiel's
    exploitability is recorded at every ``referee_every``-th logged step."""
    res = hcc.run("openspiel", "kfac-natgrad", game_options={"name": "kuhn_poker", "referee_every": 2},
                  steps=200, tol=0.05, log_every=1)
    gaps = [r["exploitability"] for r in res.history]
    assert res.converged and gaps[-1] <= 0.05 < min(gaps[:-1]) and res.steps_to_tol == len(gaps) - 1
    assert "exploitability ≤ 0.05" in res.message
    refereed = [r for r in res.history if "openspiel_exploitability" in r]
    assert [r["step"] for r in refereed] == [r["step"] for r in res.history[::2]]
    for r in refereed:
        assert abs(2 * r["openspiel_exploitability"] - r["exploitability"]) < 1e-12
    assert res.game_info["infosets"] == [6, 6] and abs(res.game_info["lp_value"] - 1 / 18) < 1e-9


def test_cli_solves_an_openspiel_game_by_name(tmp_path):
    out = tmp_path / "run"
    res = hcc_cli("solve", "openspiel", "-g", "name=kuhn_poker", "--solver", "eg", "--steps", "3",
                  "--log-every", "1", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    data = load(out)
    assert data["game_options"]["name"] == "kuhn_poker" and len(data["history"]) == 4
    assert "openspiel_exploitability" in data["history"][-1]
    assert_image(out / "lyapunov.png")
    assert stop_metric(hcc.Result.load(out)) == "exploitability"


@pytest.mark.parametrize("name,needle", [
    ("no_such_game", "expected a two-player zero-sum OpenSpiel game"),
    ("kuhn_poker(players=3)", "expected a two-player game"),
    ("matrix_pd", "expected a zero-sum game"),
    ("kuhn_poker(foo=1)", "Unknown parameter 'foo'"),
])
def test_cli_bad_game_names_are_one_line_errors(tmp_path, name, needle):
    res = hcc_cli("solve", "openspiel", "-g", f"name={name}", "--solver", "eg", "--steps", "1", "-o", tmp_path / "x")
    assert_one_line_error(res, needle)


@pytest.mark.parametrize("solver", ["exact-natgrad", "kfac-natgrad"])
def test_proximal_natural_solvers_reach_kuhn_target(solver):
    """The README's claim: the proximal natural solvers at their defaults bring Kuhn poker's
    exploitability, as OpenSpiel computes it, below 1e-5 within 30 steps (measured, with the
    dilated proximal step: exact-natgrad 11 steps to NashConv ≤ 1e-5, kfac-natgrad 6)."""
    res = hcc.run("openspiel", solver, game_options={"name": "kuhn_poker"}, tol=1e-5, steps=30)
    assert res.converged and res.steps_to_tol <= 30, res.message
    assert res.final["openspiel_exploitability"] <= 1e-5


def test_dilated_proximal_target_layout_and_convergence():
    """``OpenSpielGame.proximal_target`` (behaviour strategies): the target is in the masked head's
    coordinates ``[logits | mask]`` with the mask unchanged, its behaviours are on the legal actions, and
    the proximal point method in function space (each target the next centre) takes Kuhn poker's NashConv
    from 0.92 to ≤ 1e-5 in 4 steps (measured 1.4e-5, 1.1e-6 at steps 2, 3; the 1e-3 uniform mix of the
    centre keeps it at ≈ 1.2e-6 after that)."""
    game = game_of("kuhn_poker")
    batch = game.sample_batch()
    from hcc.solvers.function_space import FunctionSpace

    fs = FunctionSpace(game, batch)
    z = fs.coords(game.init_params())
    gaps = []
    for _ in range(4):
        (tx, ty), iters, residual = game.proximal_target(z, 1e3)
        for t, zp in zip((tx, ty), z, strict=True):
            assert t.shape == zp.shape and torch.equal(t.chunk(2, -1)[1], zp.chunk(2, -1)[1])
        F, G = fs.values((tx, ty))
        assert torch.allclose(F.sum(-1), torch.ones(F.shape[0], dtype=F.dtype))
        gaps.append(float(game.duality_gap(F, G, batch)))
        assert iters >= 1 and residual <= 1e-7
        z = (tx, ty)
    assert gaps[-1] <= 1e-5 and gaps[1] < gaps[0], gaps
    assert game_of("kuhn_poker", strategy="realization").proximal_target(z, 1e3) is None


def test_pullback_iters_is_checked():
    with pytest.raises(hcc.registry.OptionError, match="pullback_iters"):
        hcc.make_solver("exact-natgrad", "openspiel", options={"pullback_iters": 0})


@pytest.mark.slow
def test_leduc_reaches_the_exploitability_target():
    """Leduc poker with the proximal natural solver and the dilated proximal step (README command):
    OpenSpiel's exploitability ≤ 1e-2 within 12 steps (measured: 0.0089 at step 8, about 2.5 minutes)."""
    res = hcc.run("openspiel", "exact-natgrad", game_options={"name": "leduc_poker"},
                  solver_options={"pullback_iters": 10, "logit_range": 8}, tol=0.02, steps=12)
    assert res.converged, res.message
    assert res.final["openspiel_exploitability"] <= 1e-2
