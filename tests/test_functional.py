"""The functional parametrization (``param=functional``): the parameters are the function values.

Tiers: the map reproduces the function values and stays on its domain;
one step equals projected GDA / extragradient on ``L(F, G)`` written by hand; extragradient
converges to the equilibrium; and the natural-gradient dynamics of the network
parametrization track the functional dynamics at the same step size.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build

import hcc
from hcc.curvature.operators import exact_natural_direction
from hcc.games.maps import Tabular, tabulate
from hcc.games.simplex import project_simplex
from hcc.registry import OptionError
from hcc.run import solve
from hcc.solvers import make_solver

torch.set_num_threads(1)

# (id, game, options): the cases are data
CASES = [
    ("rps", "rps", {}),
    ("rps-n3", "rps", {"n_support": 3}),
    ("matrix-2x3", "matrix", {"payoff": "1,-2,0.5;-1,3,0", "lam": 0.3}),
    ("matching-pennies", "matching-pennies", {}),
]
CASE_IDS = [c[0] for c in CASES]


def _pair(name: str, options: dict, seed: int = 0) -> tuple[hcc.Game, hcc.Game]:
    return build(name, seed, **options), build(name, seed, **options, param="functional")


def _function_space_params(net: hcc.Game, params) -> tuple[dict, dict]:
    """The functional parameters of the network iterate ``params``: its values on the support."""
    with torch.no_grad():
        F, G = net.strategies(params, net.sample_batch())
    return {"values": F.clone()}, {"values": G.clone()}


# -- the map -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [c[1:] for c in CASES], ids=CASE_IDS)
def test_functional_params_reproduce_the_function_values(name, options):
    """``F_θ = θ`` on the support, the table starts at the network's values, on its domain."""
    net, fun = _pair(name, options)
    batch = fun.sample_batch()
    params = fun.init_params()
    assert set(params[0]) == {"values"} and set(params[1]) == {"values"}
    F, G = fun.strategies(params, batch)
    torch.testing.assert_close(F, params[0]["values"], rtol=0, atol=0)
    torch.testing.assert_close(G, params[1]["values"], rtol=0, atol=0)
    # same seed, same start: the table was filled from the float32 network (hence the atol)
    Fn, Gn = net.strategies(net.init_params(), batch)
    torch.testing.assert_close(F, Fn, rtol=0, atol=1e-6)
    torch.testing.assert_close(G, Gn, rtol=0, atol=1e-6)
    # per-point lookup: each support point alone gets its own row (what per-sample Jacobians see)
    for i in range(batch["x_min"].shape[0]):
        torch.testing.assert_close(fun.min_map(batch["x_min"][i : i + 1]), F[i : i + 1], rtol=0, atol=0)
    # on the domain: Π_D is the identity there; V and every metric are the network's at the same F
    # (the float32 table is on D up to float32 round-off; once projected in float64, up to 1e-15)
    once = fun.project(params)
    torch.testing.assert_close(once[0]["values"], params[0]["values"], rtol=0, atol=1e-7)
    torch.testing.assert_close(fun.project(once)[0]["values"], once[0]["values"], rtol=0, atol=1e-15)
    metrics_f = hcc.evaluate(fun, params, batch, field=False)
    metrics_n = hcc.evaluate(net, net.init_params(), batch, field=False)
    assert metrics_f.keys() == metrics_n.keys() and {"lyapunov", "exploitability"} <= metrics_f.keys()
    for k in metrics_f:
        assert abs(metrics_f[k] - metrics_n[k]) < 1e-6, k


def test_tabular_projection_and_bad_input():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(4, 2, generator=gen)
    v = 2 * torch.randn(4, 3, generator=gen)
    simplex = Tabular(v, pts, "simplex")
    torch.testing.assert_close(simplex.project({"values": v})["values"], project_simplex(v))
    interval = tabulate(torch.nn.Identity(), 3 * torch.randn(5, 1, generator=gen), "interval")
    assert ((interval.values >= 0) & (interval.values <= 1)).all()
    with pytest.raises(ValueError, match="domain"):
        Tabular(v, pts, "box")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same n"):
        Tabular(v, pts[:3], "simplex")
    with pytest.raises(OptionError, match="param"):
        hcc.make_game("rps", {"param": "table"})


def test_network_parametrization_is_unchanged_by_the_projection_hook():
    game = build("rps")
    params = game.init_params()
    assert game.project(params) is params


# -- one step by hand ------------------------------------------------------------------------------


def _field_F(game: hcc.Game, F: torch.Tensor, G: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂F, −∂L/∂G)``: the function-space field of the zero-sum game."""
    F, G = F.clone().requires_grad_(), G.clone().requires_grad_()
    gF, gG = torch.autograd.grad(game.payoff(F, G, batch), (F, G))
    return gF, -gG


def _project(game: hcc.Game, X: torch.Tensor) -> torch.Tensor:
    return project_simplex(X) if game.name in ("rps", "matrix") else X.clamp(0, 1)


@pytest.mark.parametrize(("name", "options"), [c[1:] for c in CASES], ids=CASE_IDS)
@pytest.mark.parametrize("lr", [0.1, 3.0])  # 3.0: the projection is active (iterates hit the boundary)
def test_one_step_is_projected_gda_and_projected_extragradient_in_function_space(name, options, lr):
    r"""GDA: ``F⁺ = Π(F − h ∂L/∂F)``; EG: the extrapolation point is projected too,
    ``F_½ = Π(F − h v(F))``, ``F⁺ = Π(F − h v(F_½))`` (likewise for ``G``)."""
    _, game = _pair(name, options)
    batch = game.sample_batch()
    params = game.project(game.init_params())  # on D in float64 (the float32 table is, up to 1e-8)
    F, G = params[0]["values"], params[1]["values"]

    def step(solver_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        solver = make_solver(solver_name, game, lr=lr)
        new, _, _ = solver.step(game, params, solver.init(game, params), batch)
        return new[0]["values"], new[1]["values"]

    vF, vG = _field_F(game, F, G, batch)
    gda = step("gda")
    torch.testing.assert_close(gda[0], _project(game, F - lr * vF), rtol=0, atol=1e-14)
    torch.testing.assert_close(gda[1], _project(game, G - lr * vG), rtol=0, atol=1e-14)
    Fh, Gh = _project(game, F - lr * vF), _project(game, G - lr * vG)
    wF, wG = _field_F(game, Fh, Gh, batch)
    eg = step("eg")
    torch.testing.assert_close(eg[0], _project(game, F - lr * wF), rtol=0, atol=1e-14)
    torch.testing.assert_close(eg[1], _project(game, G - lr * wG), rtol=0, atol=1e-14)
    if lr == 3.0 and name != "matching-pennies":
        assert (gda[0] == 0).any() or (gda[1] == 0).any(), "case meant to exercise the boundary"


def test_natural_direction_of_the_table_is_the_function_space_gradient():
    """``J = I`` for the table, so ``A = I/n`` and the exact natural direction is ``n·∂L/∂F``."""
    _, game = _pair("rps", {"n_support": 3})
    batch = game.sample_batch()
    params = game.init_params()
    F, G = game.strategies(params, batch)
    vF, _ = _field_F(game, F, G, batch)
    d = exact_natural_direction(game.min_map, params[0], batch["x_min"], residual=vF)
    torch.testing.assert_close(d["values"], 3 * vF, rtol=1e-12, atol=1e-14)


# -- convergence and tracking -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rps", "matching-pennies"])
def test_functional_extragradient_converges_to_the_equilibrium(name):
    game = build(name, param="functional")
    res = solve(game, make_solver("eg", game, lr=0.4 if name == "rps" else 0.2), steps=500, tol=1e-10,
                log_every=1000)
    assert res.converged, res.message
    F, G = game.strategies(res.params, game.sample_batch())  # the final iterate (solve leaves the game as it was)
    target = 1 / 3 if name == "rps" else 0.5
    torch.testing.assert_close(F, torch.full_like(F, target), rtol=0, atol=2e-5)
    torch.testing.assert_close(G, torch.full_like(G, target), rtol=0, atol=2e-5)


def _trajectory(game: hcc.Game, solver, params, steps: int) -> torch.Tensor:
    """``(F_t, G_t)`` flattened, one row per step."""
    batch = game.sample_batch()
    state = solver.init(game, params)
    rows = []
    for _ in range(steps):
        params, state, _ = solver.step(game, params, state, batch)
        with torch.no_grad():
            F, G = game.strategies(params, batch)
        rows.append(torch.cat([F.reshape(-1), G.reshape(-1)]))
    return torch.stack(rows)


@pytest.mark.parametrize(("name", "tol"), [("rps", 1e-2), ("matching-pennies", 1e-2)])
def test_natural_extragradient_on_networks_tracks_extragradient_in_function_space(name, tol):
    r"""``eg+exact`` (undamped) on the network vs ``eg`` on the table, same step ``h``, same start.

    The natural direction moves ``F`` by ``J d = Π_T (n g)`` to first order (softmax rows of
    ``J`` sum to 0: ``Π_T`` projects onto the simplex's tangent), which is what the projected
    step on the table does in the interior; the two differ by the curvature of ``F_θ``,
    ``O(h²)`` a step, so by ``O(h)`` over a fixed horizon. Measured (seed 0, ``h = 0.05``, 40
    steps, horizon 2; largest entry of ``|F_net − F_fun|`` and ``|G_net − G_fun|``): rps
    3.2e-3, matching pennies 3.8e-3, while the strategies move by 0.33 and 0.32; halving
    ``h`` (80 steps, same horizon) gives 1.7e-3 and 3.0e-3. The tolerance 1e-2 is ~3× the
    measurement; plain ``eg`` on the network at the same step is ≥ 10× farther away.
    """
    net, fun = _pair(name, {})
    p_net = net.init_params()
    p_fun = _function_space_params(net, p_net)  # start at the network's float64 values exactly
    h = 0.05

    def gap(steps: int, lr: float, solver: str = "eg+exact") -> float:
        opts = {"damping": 0.0} if solver == "eg+exact" else None
        a = _trajectory(net, make_solver(solver, net, lr=lr, options=opts), p_net, steps)
        b = _trajectory(fun, make_solver("eg", fun, lr=lr), p_fun, steps)
        return float((a - b).abs().max())

    err = gap(40, h)
    assert err < tol, f"natural EG on the network left the function-space EG trajectory by {err:.3g}"
    # first order in h over a fixed horizon (the discretizations differ only in F's curvature)
    assert gap(80, h / 2) < 0.85 * err
    # the geometry is what makes it track: the plain gradient on the network does not
    assert gap(40, h, solver="eg") > 10 * err
