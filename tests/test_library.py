"""hcc as a library: games defined outside the package, GameOptimizer in hand-written loops,
strategy-network factories, and a convolutional GAN with K-FAC on its conv layers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from conftest import hcc_cli as hcc
from torch import nn

import hcc as H
from hcc.curvature import analyze_map, exact_operator, kfac_operator
from hcc.curvature.pytree import flatten
from hcc.games import GAMES, Game, register_game, seeded
from hcc.optim import GameOptimizer, ModuleGame
from hcc.registry import OptionError
from hcc.solvers import RULES, make_solver, vector_field

DT = torch.float64

# A game a user writes in a file of their own: its own payoff (a 4 × 3 regularized matrix game
# whose equilibrium has a zero entry: F* = (0.369, 0.283, 0.349, 0)) and its own two networks
# (ELU/tanh policies), not registered in hcc.
DUEL = '''
from dataclasses import dataclass

import torch
from torch import nn

import hcc
from hcc.games.base import seeded
from hcc.games.equilibrium import certified_equilibrium


@dataclass
class DuelOptions:
    lam: float = 0.1
    width: int = 12


def policy(width, k):
    return nn.Sequential(nn.Linear(3, width), nn.ELU(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, k), nn.Softmax(-1))


class Duel(hcc.Game):
    Options = DuelOptions
    M = [[0.0, 2.0, -1.0], [-1.0, 0.0, 1.5], [1.0, -2.0, 0.0], [0.5, 0.5, -0.5]]

    def __init__(self, options, seed=0):
        super().__init__(options, seed)
        with seeded(seed):
            self.min_map, self.max_map = policy(options.width, 4), policy(options.width, 3)
            self.register_buffer("x_min", torch.randn(2, 3))
            self.register_buffer("x_max", torch.randn(2, 3))
        eq = certified_equilibrium(torch.tensor(self.M).numpy(), options.lam)
        self.register_buffer("A", torch.tensor(self.M))
        self.register_buffer("F_star", torch.from_numpy(eq.F).float().expand(2, -1).clone())
        self.register_buffer("G_star", torch.from_numpy(eq.G).float().expand(2, -1).clone())

    def payoff(self, F, G, batch):
        lam = self.options.lam
        return (F @ self.A * G).sum(-1).mean() + lam / 2 * (F.pow(2).sum(-1).mean() - G.pow(2).sum(-1).mean())

    def equilibrium(self, batch):
        return self.F_star, self.G_star
'''

NETS = '''
from torch import nn


def make(n_in, n_out):
    return nn.Sequential(nn.Linear(n_in, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, n_out))


def not_a_module(n_in, n_out):
    return 3
'''


@pytest.fixture()
def duel(tmp_path: Path) -> str:
    path = tmp_path / "duel.py"
    path.write_text(DUEL)
    return f"{path}:Duel"


def _column(path: Path, name: str) -> list[float]:
    with path.open() as f:
        return [float(r[name]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("solver", ["exact-natgrad", "eg+exact"])
def test_game_outside_the_package_three_ways(duel: str, tmp_path: Path, solver: str) -> None:
    """The same float64 trajectory through GameOptimizer in a hand-written loop, ``hcc.solve`` and
    ``hcc solve file.py:Duel``; with the default named solver it reaches the certified equilibrium."""
    steps = 12
    game = H.make_game(duel)
    opt = GameOptimizer(game, solver)
    batch = game.sample_batch()
    loop = [float(game.lyapunov(*game.strategies(opt.params(), batch), batch))]
    for _ in range(steps):
        opt.step()
        loop.append(float(game.lyapunov(*game.strategies(opt.params(), batch), batch)))

    res = H.solve(H.make_game(duel), make_solver(solver, H.make_game(duel)), steps=steps, stop_at_tol=False)
    api = [row["lyapunov"] for row in res.history]

    out = tmp_path / "cli"
    r = hcc("solve", duel, "--solver", solver, "--steps", str(steps), "--no-stop-at-tol", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    cli = _column(out / "history.csv", "lyapunov")

    assert len(loop) == len(api) == len(cli) == steps + 1
    assert loop == api  # bitwise: the optimizer runs the very solver step hcc.solve runs
    assert cli == pytest.approx(api, rel=1e-12, abs=0)  # through the CSV's decimal digits
    if solver == "exact-natgrad":  # a named solver's defaults on a game it has never seen
        assert api[-1] < 1e-12
        F, _ = game.strategies(opt.params(), batch)
        assert float((F - game.F_star).abs().max()) < 1e-6
        assert float(F[:, 3].max()) < 1e-6  # the boundary entry


def test_module_closure_route_matches_the_game_route(duel: str) -> None:
    """The user's own modules + a closure (no hcc.Game) follow the game's trajectory: same field,
    the preconditioner's generic path instead of the fused one (equal to round-off)."""
    game = H.make_game(duel)
    f, g = game.min_map, game.max_map
    ref = H.solve(H.make_game(duel), make_solver("eg+exact", H.make_game(duel)), steps=10, stop_at_tol=False)
    x_min, x_max = game.x_min, game.x_max
    opt = GameOptimizer((f, g), "eg+exact", lr=make_solver("eg+exact", game).lr)
    vs = []
    for _ in range(10):
        opt.step(lambda: game.payoff(f(x_min), g(x_max), {}))
        with torch.no_grad():
            vs.append(float(game.lyapunov(f(x_min), g(x_max), {})))
    assert vs == pytest.approx([row["lyapunov"] for row in ref.history[1:]], rel=1e-9)
    assert opt.last_info["field_evals"] == 2


def test_register_game_decorator_and_cli_errors(tmp_path: Path, duel: str) -> None:
    @register_game
    class Tiny(Game):
        name = "tiny-test-game"

        def __init__(self, options, seed=0):
            super().__init__(options, seed)
            with seeded(seed):
                self.min_map = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
                self.max_map = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
            self.register_buffer("x_min", torch.ones(1, 1))
            self.register_buffer("x_max", torch.ones(1, 1))

        def payoff(self, F, G, batch):
            return ((F - 0.5) * (G - 0.5)).sum() + 0.05 * ((F - 0.5).pow(2) - (G - 0.5).pow(2)).sum()

    try:
        assert GAMES["tiny-test-game"] is Tiny
        res = H.run("tiny-test-game", "gda", steps=5)
        assert res.steps_run == 5
        with pytest.raises(OptionError, match="own `name`"):
            register_game(type("Anon", (Game,), {}))
    finally:
        GAMES._entries.pop("tiny-test-game")
    for spec, msg in [(f"{tmp_path}/nope.py:Duel", "expected an existing Python file"),
                      (duel.replace(":Duel", ":Nope"), "defines no 'Nope'"),
                      (duel.replace(":Duel", ":policy"), "expected a subclass of hcc.Game"),
                      ("no_such_module_xyz:Game", "expected an importable module")]:
        assert_one_line_error(hcc("solve", spec, "--steps", "1", "--out", tmp_path / "x"), msg)


def test_network_factory_option(tmp_path: Path) -> None:
    nets = tmp_path / "nets.py"
    nets.write_text(NETS)
    game = H.make_game("rps", {"network": f"{nets}:make", "n_support": 4})
    assert isinstance(game.min_map[0][1], nn.LayerNorm) and isinstance(game.min_map[-1], nn.Softmax)
    for solver, most in (("exact-natgrad", 10), ("kfac-natgrad", 20)):
        res = H.run("rps", solver, game_options={"network": f"{nets}:make", "n_support": 4}, steps=60)
        assert res.converged and res.steps_to_tol <= most, (solver, res.steps_to_tol)
    res = H.run("matching-pennies", "exact-natgrad", game_options={"network": f"{nets}:make"}, steps=60)
    assert res.converged
    with pytest.raises(OptionError, match="expected make\\(\\) to return an nn.Module"):
        H.make_game("rps", {"network": f"{nets}:not_a_module"})
    with pytest.raises(OptionError, match="network: expected 'mlp' or a factory"):
        H.make_game("matrix", {"network": "resnet"})


def test_every_rule_and_preconditioner_reachable_on_modules() -> None:
    """Every rule × preconditioner hcc solve offers runs through GameOptimizer on plain modules
    (the proximal rule needs a Game: a clear error), and keeps a bilinear-plus-regularizer game
    finite; the field rules' first step moves the parameters."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, dtype=DT)
    for rule in RULES:
        for precond in ("identity", "exact", "cg", "kfac", "diag", "phgd"):
            f = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
            g = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
            solver = f"{rule}+{precond}"
            if rule == "prox":
                with pytest.raises(OptionError, match="function space"):
                    GameOptimizer((f, g), solver, lr=0.05)
                continue
            opt = GameOptimizer((f, g), solver, lr=0.05)
            before = torch.cat([p.detach().flatten().clone() for p in f.parameters()])
            for _ in range(3):
                opt.step(lambda f=f, g=g: (f(x) * g(x)).mean() + 0.05 * (f(x).square().mean() - g(x).square().mean()))
            after = torch.cat([p.detach().flatten() for p in f.parameters()])
            assert torch.isfinite(after).all(), solver
            assert not torch.equal(before, after), solver


def test_closure_and_argument_errors() -> None:
    f, g = nn.Linear(2, 1), nn.Linear(2, 1)
    opt = GameOptimizer((f, g))
    with pytest.raises(OptionError, match="expected a closure"):
        opt.step()
    with pytest.raises(OptionError, match="expected the payoff"):
        opt.step(lambda: torch.ones(3))
    with pytest.raises(OptionError, match="never called the max_module"):
        opt.step(lambda: f(torch.ones(1, 2)).sum())
    with pytest.raises(OptionError, match="two different modules"):
        GameOptimizer((f, f))
    with pytest.raises(OptionError, match="expected an hcc.Game or"):
        GameOptimizer(f)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="unknown option"):
        GameOptimizer((f, g), "eg+exact", options={"nope": 1})


def test_a_non_finite_step_raises_and_keeps_the_last_parameters() -> None:
    f, g = nn.Linear(2, 1).to(DT), nn.Linear(2, 1).to(DT)
    x = torch.ones(4, 2, dtype=DT)
    opt = GameOptimizer((f, g), "gda", lr=1e308)
    before = [p.detach().clone() for p in f.parameters()]
    with pytest.raises(FloatingPointError, match="step 1 of gda produced non-finite parameters"):
        opt.step(lambda: (f(x) * g(x)).mean() * 1e10)
    assert all(torch.equal(a, b) for a, b in zip(before, f.parameters(), strict=True))
    assert opt.steps == 0


def test_state_dict_resumes_bitwise(duel: str) -> None:
    a = GameOptimizer(H.make_game(duel), "eg+cg")
    for _ in range(3):
        a.step()
    b_game = H.make_game(duel)
    b = GameOptimizer(b_game, "eg+cg")
    b_game.load_params(a.params())
    b.load_state_dict(a.state_dict())
    a.step()
    b.step()
    for pa, pb in zip(a.params(), b.params(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


# -- a convolutional GAN in an ordinary training loop -------------------------------------------------


def conv_gan(seed: int) -> tuple[nn.Module, nn.Module]:
    """Generator: latent 4 → 2×4×4 → upsample → two 3×3 convolutions → a 1×8×8 image (273 parameters);
    discriminator: two strided 3×3 convolutions → linear → sigmoid (205 parameters)."""
    with seeded(seed):  # built in float32 whatever the default dtype, then cast
        G = nn.Sequential(nn.Linear(4, 32), nn.Unflatten(1, (2, 4, 4)), nn.Tanh(), nn.Upsample(scale_factor=2),
                          nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1))
        D = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(16, 1), nn.Sigmoid())
    return G.to(DT), D.to(DT)


def bars(n: int, gen: torch.Generator) -> torch.Tensor:
    """8×8 images of a horizontal or a vertical bar, plus noise: two modes."""
    img = torch.zeros(n, 1, 8, 8, dtype=DT)
    k = torch.randint(0, 2, (n,), generator=gen)
    img[k == 0, 0, 3:5, :] = 1.0
    img[k == 1, 0, :, 3:5] = 1.0
    return img + 0.05 * torch.randn(img.shape, generator=gen, dtype=DT)


def mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1), b.flatten(1)

    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(x, y).square() / 16).mean()

    return float(k(a, a) + k(b, b) - 2 * k(a, b))


def gan_losses(G: nn.Module, D: nn.Module, z: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-saturating GAN: ``ℓ_G = −E log D(G(z))``, ``ℓ_D = −E log D(x) − E log(1 − D(G(z)))``."""
    d_real, d_fake = D(real), D(G(z))
    return -torch.log(d_fake).mean(), -(torch.log(d_real).mean() + torch.log1p(-d_fake).mean())


def test_conv_gan_training_loop_with_kfac() -> None:
    """K-FAC natural extragradient (``eg+kfac`` at lr 0.1) in a plain PyTorch GAN loop on conv nets:
    120 steps of 32 + 32 samples take MMD² to the data from 1.19 to 0.44 (measured; plain ``eg`` at
    the same step: 0.26, ``gda`` 0.48 — on this tiny problem K-FAC does not beat the plain field, and
    GAN training is not monotone: at 300 steps eg+kfac is at 0.82, eg 0.65, gda 0.41). What this pins:
    the optimizer drops into the loop, K-FAC runs on every conv layer, the losses stay finite."""
    G, D = conv_gan(0)
    gen = torch.Generator().manual_seed(1)
    z_eval, real_eval = torch.randn(256, 4, dtype=DT, generator=gen), bars(256, gen)
    with torch.no_grad():
        start = mmd2(G(z_eval), real_eval)
    opt = GameOptimizer((G, D), "eg+kfac", lr=0.1)
    for _ in range(120):
        z, real = torch.randn(32, 4, dtype=DT, generator=gen), bars(32, gen)
        l_g, l_d = opt.step(lambda z=z, real=real: gan_losses(G, D, z, real))
        assert math.isfinite(float(l_g)) and math.isfinite(float(l_d))
    with torch.no_grad():
        end = mmd2(G(z_eval), real_eval)
    assert start > 1.0 and end < 0.5 * start, (start, end)
    assert opt.last_info["kfac_refreshes_total"] > 0 and opt.last_info["field_evals"] == 2
    convs = [ly for ly in analyze_map(G).layers if ly.kind == "conv2d"]
    assert len(convs) == 2 and not analyze_map(G).rest  # every parameter in a Kronecker block


def test_conv_gan_kfac_direction_against_the_dense_exact_one() -> None:
    """The K-FAC natural direction of the GAN's actual field against the dense exact one, both
    damped alike (relative 1e-2 of the mean diagonal), 16 latent draws and 16 + 16 images.

    Measured on seeds 0-2 (cosine with the exact direction): generator K-FAC 0.66, 0.31, 0.49
    against the plain gradient's 0.23, 0.17, 0.21, so K-FAC recovers much of the natural direction;
    discriminator K-FAC 0.17, 0.33, 0.13 against the gradient's 0.82, 0.85, 0.82: its field lies in
    the 32-dimensional row space of J (32 points, one output), where the metric is already well
    conditioned (the gradient is that close to the exact direction), and the Kronecker approximation
    of its convolutions (exact only for one layer with independent locations; the factors themselves
    are pinned against ones built by hand from the unfolded inputs in test_curvature) distorts more
    than it corrects.
    """
    cos_k, cos_g = {0: [], 1: []}, {0: [], 1: []}
    for seed in range(3):
        G, D = conv_gan(seed)
        gen = torch.Generator().manual_seed(seed + 10)
        z, real = torch.randn(16, 4, dtype=DT, generator=gen), bars(16, gen)
        game = ModuleGame(G, D, lambda G=G, D=D, z=z, real=real: gan_losses(G, D, z, real))
        assert not game.zero_sum
        params = game.init_params()
        v, xs = vector_field(game, params, {}), game.supports(params, {})
        assert xs[0].shape == (16, 4) and xs[1].shape == (32, 1, 8, 8)  # D's support: real ∪ fake
        for pl, net in enumerate((G, D)):
            A = exact_operator(net, params[pl], xs[pl], method="dense")
            exact = flatten(A.solve(rhs=v[pl], damping=1e-2 * float(A.dense().diagonal().mean())))
            approx = flatten(kfac_operator(analyze_map(net), params[pl], xs[pl]).solve(
                rhs=v[pl], damping=1e-2, scale="relative", split="pi"))
            grad = flatten(v[pl])
            cos_k[pl].append(float(approx @ exact / (approx.norm() * exact.norm())))
            cos_g[pl].append(float(grad @ exact / (grad.norm() * exact.norm())))
    mean = {k: sum(v) / 3 for k, v in cos_k.items()}
    assert mean[0] > 0.35 and mean[0] > 2 * sum(cos_g[0]) / 3, (cos_k, cos_g)
    assert mean[1] > 0.1 and sum(cos_g[1]) / 3 > 0.7, (cos_k, cos_g)


def test_the_readme_game_runs_from_the_cli(tmp_path: Path) -> None:
    """The README's ``duel.py`` (no equilibrium given) solved by ``hcc solve duel.py:Duel``: without
    ``V`` the run ends ``stationary`` (frozen strategies, field norm ≤ tol), exit 0."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("# duel.py\n")
    (tmp_path / "duel.py").write_text(readme[start:readme.index("```", start)])
    out = tmp_path / "run"
    r = hcc("solve", f"{tmp_path / 'duel.py'}:Duel", "--solver", "exact-natgrad", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    res = H.load_results(out)[0]
    assert res.status == "stationary" and res.converged is None, res.message
    assert res.final["field_norm"] <= 1e-6 and res.steps_run < 100
