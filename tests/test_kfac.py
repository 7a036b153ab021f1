"""K-FAC / KFLR and diagonal-GGN preconditioners (hcc/solvers/kfac.py on hcc/curvature) against dense references.

Tiers: exactness of the curvature against ``A = (1/n) Σ J_iᵀJ_i`` built
with :func:`torch.func.jacrev` here (independently of the module's own helpers),
BackPACK against the autograd implementation, the state machinery (running averages,
refresh period), the function-space rescaling ``α``, and convergence on the games.
All float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import hcc
from hcc.curvature.diag import ggn_diagonal
from hcc.curvature.heads import output_factor as output_sqrt_factor
from hcc.curvature.kfac import kronecker_factors
from hcc.curvature.layers import analyze_map, dense_metric
from hcc.games.base import Batch, Game
from hcc.registry import OptionError
from hcc.solvers import PRECONDITIONERS, SOLVERS, make_solver
from hcc.solvers.kfac import KFAC, DiagGGN

DT = torch.float64
TOL = 1e-10


# -- dense references, built here from jacrev --------------------------------------------------


def per_sample_jacobian(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``(n, k, M)``: row ``i`` of the batched output depends on ``x_i`` only, so this is per-sample."""
    jac = jacrev(lambda p: functional_call(module, p, (x,)))(params)
    n = x.shape[0]
    k = jac[next(iter(params))].shape[1]
    return torch.cat([jac[name].reshape(n, k, -1) for name in params], -1)


def reference_metric(module: nn.Sequential, params: dict[str, Tensor], x: Tensor, geometry: str) -> Tensor:
    """``A``: l2 → ``JᵀJ/n`` of the map's output (head included); fisher → ``J_zᵀ S J_z / n`` (softmax)
    or ``J_zᵀ σ(1−σ) J_z / n`` (sigmoid), ``z`` the logits."""
    n = x.shape[0]
    if geometry == "l2":
        J = per_sample_jacobian(module, params, x)
        return torch.einsum("nkm,nke->me", J, J) / n
    body = nn.Sequential(*list(module)[:-1])
    Jz = per_sample_jacobian(body, params, x)
    z = functional_call(body, params, (x,))
    if isinstance(module[-1], nn.Softmax):
        p = torch.softmax(z, -1)
        S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        s = torch.sigmoid(z)
        S = torch.diag_embed(s * (1 - s))
    return torch.einsum("nkm,nkl,nle->me", Jz, S, Jz) / n


def wbar_index(params: dict[str, Tensor], prefix: str) -> Tensor:
    """Flat indices of layer ``prefix``'s ``W̄ = [W | b]`` in row-major order (K-FAC's block order)."""
    off, where = 0, {}
    for name, t in params.items():
        where[name] = torch.arange(off, off + t.numel()).view(t.shape)
        off += t.numel()
    return torch.cat([where[f"{prefix}.weight"], where[f"{prefix}.bias"][:, None]], 1).reshape(-1)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def make_mlp(sizes: list[int], head: str, seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    if head == "softmax":
        layers.append(nn.Softmax(-1))
    elif head == "sigmoid":
        layers.append(nn.Sigmoid())
    with torch.no_grad():
        layers[-1 if head == "none" else -2].weight.mul_(2.0)  # away from the uniform point
    return nn.Sequential(*layers).to(DT)


def params_of(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class ToyGame(Game):
    """Two given maps on fixed supports; payoff ``mean_i ⟨F_i, G_i⟩`` (only its field is used)."""

    name = "toy"

    def __init__(self, min_map: nn.Module, max_map: nn.Module, x_min: Tensor, x_max: Tensor) -> None:
        super().__init__(None)
        self.min_map, self.max_map = min_map, max_map
        self.register_buffer("x_min", x_min)
        self.register_buffer("x_max", x_max)

    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        return (F * G).sum(-1).mean()


def random_vec(params: dict[str, Tensor], seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}


def flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


# -- Kronecker factors: where K-FAC is exact ------------------------------------------------------


@pytest.mark.parametrize("backend", ["backpack", "torch"])
def test_kfac_exact_for_one_linear_layer(backend: str) -> None:
    """One linear layer, linear output, weight and bias as ONE block: ``J_i = I ⊗ ā_iᵀ`` so
    ``A = I ⊗ Ā = G ⊗ Ā`` exactly (any ``n``). BackPACK's separate weight/bias blocks would
    drop the weight-bias cross terms; treating ``W̄ = [W | b]`` as one block keeps them."""
    lin = make_mlp([4, 3], "none")
    p = params_of(lin)
    x = torch.randn(9, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    s = analyze_map(lin)
    (G, A), = kronecker_factors(s, p, x, "l2", "kflr", backend).values()
    A_ref = reference_metric(nn.Sequential(*lin, nn.Identity()), p, x, "l2")  # Identity: no head
    idx = wbar_index(p, "0")
    assert torch.allclose(torch.kron(G, A), A_ref[idx][:, idx], atol=TOL, rtol=0)


@pytest.mark.parametrize("geometry", ["l2", "fisher"])
@pytest.mark.parametrize("backend", ["backpack", "torch"])
def test_kfac_softmax_one_layer_exact_only_for_one_point(geometry: str, backend: str) -> None:
    """One linear layer + softmax: the exact block is ``(1/n) Σ_i Q_iQ_iᵀ ⊗ ā_iā_iᵀ`` with
    ``Q_iQ_iᵀ = S_i²`` (l2) or ``S_i`` (fisher). K-FAC's ``E[QQᵀ] ⊗ E[āāᵀ]`` is exact for ONE
    support point; for ``n > 1`` with ``S_i`` varying across points it is NOT (asserted)."""
    net = make_mlp([4, 3], "softmax")
    p = params_of(net)
    s = analyze_map(net)
    idx = wbar_index(p, "0")
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(1, 4, dtype=DT, generator=gen)
    (G, A), = kronecker_factors(s, p, x1, geometry, "kflr", backend).values()
    ref = reference_metric(net, p, x1, geometry)[idx][:, idx]
    assert torch.allclose(torch.kron(G, A), ref, atol=TOL, rtol=0)
    x5 = torch.randn(5, 4, dtype=DT, generator=gen)
    (G, A), = kronecker_factors(s, p, x5, geometry, "kflr", backend).values()
    ref = reference_metric(net, p, x5, geometry)[idx][:, idx]
    assert rel_err(torch.kron(G, A), ref) > 1e-3


@pytest.mark.parametrize("head,geometry", [("softmax", "l2"), ("softmax", "fisher"), ("sigmoid", "l2"),
                                           ("sigmoid", "fisher"), ("none", "l2")])
def test_kfac_layer_blocks_exact_for_one_point(head: str, geometry: str) -> None:
    """An MLP at ONE support point: every layer's diagonal block of ``A`` is exactly ``G ⊗ Ā``
    (the cross-layer blocks are what K-FAC drops)."""
    k = 1 if head == "sigmoid" else 3
    net = make_mlp([4, 6, 5, k], head)
    p = params_of(net)
    x = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(4))
    s = analyze_map(net)
    fac = kronecker_factors(s, p, x, geometry, "kflr", "torch")
    ref_net = net if head != "none" else nn.Sequential(*net, nn.Identity())
    A_ref = reference_metric(ref_net, p, x, geometry)
    for prefix, (G, A) in fac.items():
        idx = wbar_index(p, prefix)
        assert torch.allclose(torch.kron(G, A), A_ref[idx][:, idx], atol=TOL, rtol=0), prefix


def test_dense_metric_matches_reference() -> None:
    """The module's ``Q``-weighted metric equals the independent references (checks ``Q``)."""
    gen = torch.Generator().manual_seed(5)
    for head, geometry in [("softmax", "l2"), ("softmax", "fisher"), ("sigmoid", "l2"), ("sigmoid", "fisher")]:
        net = make_mlp([3, 5, 1 if head == "sigmoid" else 4], head, seed=1)
        p = params_of(net)
        x = torch.randn(6, 3, dtype=DT, generator=gen)
        A = dense_metric(analyze_map(net), p, x, geometry)
        assert torch.allclose(A, reference_metric(net, p, x, geometry), atol=TOL, rtol=0), (head, geometry)


def test_fisher_factor_squares_to_softmax_jacobian() -> None:
    z = torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(6))
    p = torch.softmax(z, -1)
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    Q = output_sqrt_factor(z, "softmax", "fisher")
    assert torch.allclose(Q @ Q.transpose(1, 2), S, atol=1e-14, rtol=0)
    assert torch.allclose(output_sqrt_factor(z, "softmax", "l2"), S, atol=1e-14, rtol=0)


# -- BackPACK against autograd --------------------------------------------------------------------


@pytest.mark.parametrize("head,geometry", [("softmax", "l2"), ("softmax", "fisher"), ("sigmoid", "l2"),
                                           ("none", "l2")])
@pytest.mark.parametrize("factors", ["kflr", "kfac"])
def test_backpack_factors_match_autograd(head: str, geometry: str, factors: str) -> None:
    """BackPACK's KFLR (exact) and KFAC (Monte-Carlo, same draws) factors on the extended twin
    with the ``Q`` loss equal the autograd-hook factors."""
    net = make_mlp([4, 7, 6, 1 if head == "sigmoid" else 3], head, seed=2)
    p = params_of(net)
    x = torch.randn(8, 4, dtype=DT, generator=torch.Generator().manual_seed(7))
    s = analyze_map(net)
    fa = kronecker_factors(s, p, x, geometry, factors, "backpack", 3, torch.Generator().manual_seed(0))
    fb = kronecker_factors(s, p, x, geometry, factors, "torch", 3, torch.Generator().manual_seed(0))
    assert fa.keys() == fb.keys() == {"0", "2", "4"}
    for key in fa:
        for a, b in zip(fa[key], fb[key]):
            assert torch.allclose(a, b, atol=1e-12, rtol=0), key


def test_backpack_diag_mc_matches_autograd() -> None:
    """BackPACK's DiagGGNMC with the ``Q`` loss equals the autograd estimate on the same draws."""
    net = make_mlp([4, 7, 3], "softmax", seed=5)
    p = params_of(net)
    x = torch.randn(6, 4, dtype=DT, generator=torch.Generator().manual_seed(12))
    s = analyze_map(net)
    da = ggn_diagonal(s, p, x, "l2", "mc", "backpack", 4, torch.Generator().manual_seed(0))
    db = ggn_diagonal(s, p, x, "l2", "mc", "torch", 4, torch.Generator().manual_seed(0))
    assert torch.allclose(flat(da), flat(db), atol=1e-12, rtol=0)


def test_monte_carlo_draws_advance_and_reproduce() -> None:
    """``factors="kfac"``: each call draws afresh from the state's generator; same seed, same run."""
    game = hcc.make_game("rps", {"width": 5, "n_support": 4}).to(DT)
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)

    def two_calls(seed: int):
        pre = KFAC(KFAC.Options(factors="kfac", seed=seed))
        state = pre.init(game, params)
        out = []
        for _ in range(2):
            _, state, _ = pre.apply(game, params, batch, vec, state, (0,))
            out.append(state["players"][0]["stats"]["factors"]["2"][0])
        return out

    a, b = two_calls(0), two_calls(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(two_calls(1)[0], a[0])


@pytest.mark.parametrize("bad", [{"damping": 0.0}, {"decay": 1.0}, {"refresh": 0}, {"geometry": "kl"},
                                 {"damping_split": "x"}, {"factors": "exact"}, {"backend": "jax"},
                                 {"rescale": "layer"}, {"logit_damping": -1.0}])
def test_options_are_validated(bad: dict) -> None:
    with pytest.raises(OptionError, match=next(iter(bad))):
        make_solver("eg+kfac", "rps", options=bad)


def test_kfac_monte_carlo_is_unbiased() -> None:
    """The Monte-Carlo ``G`` averages to the KFLR ``G`` (many draws; loose statistical tolerance)."""
    net = make_mlp([3, 5, 3], "softmax", seed=3)
    p = params_of(net)
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(8))
    s = analyze_map(net)
    exact = kronecker_factors(s, p, x, "l2", "kflr", "torch")
    mc = kronecker_factors(s, p, x, "l2", "kfac", "torch", 20000, torch.Generator().manual_seed(1))
    for key in exact:
        assert rel_err(mc[key][0], exact[key][0]) < 0.05
        assert torch.allclose(mc[key][1], exact[key][1], atol=1e-14, rtol=0)  # Ā is not sampled


# -- the diagonal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head,geometry", [("softmax", "l2"), ("softmax", "fisher"), ("sigmoid", "l2"),
                                           ("sigmoid", "fisher"), ("none", "l2")])
@pytest.mark.parametrize("backend", ["backpack", "torch"])
def test_diag_is_exact(head: str, geometry: str, backend: str) -> None:
    """``ggn_diagonal`` (BackPACK DiagGGNExact with the ``Q`` loss, or autograd) is the exact
    diagonal of ``A`` in every geometry."""
    net = make_mlp([4, 6, 5, 1 if head == "sigmoid" else 3], head, seed=4)
    p = params_of(net)
    x = torch.randn(7, 4, dtype=DT, generator=torch.Generator().manual_seed(9))
    diag = ggn_diagonal(analyze_map(net), p, x, geometry, "exact", backend)
    ref_net = net if head != "none" else nn.Sequential(*net, nn.Identity())
    ref = reference_metric(ref_net, p, x, geometry).diagonal()
    assert torch.allclose(flat(diag), ref, atol=TOL, rtol=0)


def test_diag_elu_uses_backpack_and_kflr_falls_back() -> None:
    """ELU: BackPACK's DiagGGN supports it, its KFLR does not (``auto`` falls back to autograd;
    ``backend=backpack`` says why it cannot)."""
    net = make_mlp([3, 5, 3], "softmax", act=nn.ELU)
    p = params_of(net)
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(10))
    s = analyze_map(net)
    d = ggn_diagonal(s, p, x, "l2", "exact", "backpack")
    assert torch.allclose(flat(d), reference_metric(net, p, x, "l2").diagonal(), atol=TOL, rtol=0)
    assert kronecker_factors(s, p, x, "l2", "kflr", "auto").keys() == {"0", "2"}
    with pytest.raises(OptionError, match="backend"):
        kronecker_factors(s, p, x, "l2", "kflr", "backpack")


# -- the preconditioners: directions, α, damping -----------------------------------------------------


def toy(min_map: nn.Module, max_map: nn.Module, n: int, d: int) -> ToyGame:
    gen = torch.Generator().manual_seed(11)
    return ToyGame(min_map, max_map, torch.randn(n, d, dtype=DT, generator=gen),
                   torch.randn(n, d, dtype=DT, generator=gen)).to(DT)


@pytest.mark.parametrize("split", ["eigen", "pi", "plain"])
def test_kfac_direction_exact_for_linear_maps(split: str) -> None:
    """Linear maps (K-FAC exact): ``d = (A + λI)⁻¹ v`` with ``damping_split=eigen``; the
    factored splits damp ``G ⊗ Ā`` by ``(G + λ/π) ⊗ (Ā + πλ)`` instead (checked against that)."""
    game = toy(make_mlp([4, 3], "none", 0), make_mlp([4, 3], "none", 1), 6, 4)
    params = game.init_params()
    vec = (random_vec(params[0], 1), random_vec(params[1], 2))
    lam = 1e-2
    pre = KFAC(KFAC.Options(damping=lam, damping_scale="absolute", damping_split=split, rescale="none"))
    d, _, info = pre.apply(game, params, game.sample_batch(), vec, pre.init(game, params), (0, 1))
    for i in (0, 1):
        x = game.supports(params, game.sample_batch())[i]
        A = reference_metric(nn.Sequential(*game.maps()[i], nn.Identity()), params[i], x, "l2")
        idx = wbar_index(params[i], "0")
        Ab = A[idx][:, idx]
        if split == "eigen":
            M = Ab + lam * torch.eye(len(idx), dtype=DT)
        else:
            (G, Af), = kronecker_factors(analyze_map(game.maps()[i]), params[i], x).values()
            pi = math.sqrt(float(Af.diagonal().mean() / G.diagonal().mean())) if split == "pi" else 1.0
            M = torch.kron(G + math.sqrt(lam) / pi * torch.eye(3, dtype=DT),
                           Af + pi * math.sqrt(lam) * torch.eye(5, dtype=DT))
        want = torch.linalg.solve(M, flat(vec[i])[idx])
        assert torch.allclose(flat(d[i])[idx], want, atol=TOL, rtol=0)
    assert info["damping_theta"] == pytest.approx(lam)


def test_alpha_is_the_function_space_fit() -> None:
    r"""``α = ⟨d, v⟩ / dᵀ(A + λI)d`` minimizes ``‖αd − d_*‖_{A+λI}`` with ``d_* = (A+λI)⁻¹v``
    (for ``λ → 0``: ``‖J(αd) − J d_*‖``, the function-space step); it is 1 when ``d`` is exact."""
    game = hcc.make_game("rps", {"width": 6, "n_support": 3}).to(DT)
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    lam = 1e-3
    common = dict(damping=lam, damping_scale="absolute", log_cosine=False, logit_damping=0.0)
    raw = KFAC(KFAC.Options(rescale="none", **common))
    sc = KFAC(KFAC.Options(rescale="player", **common))
    d0, _, _ = raw.apply(game, params, batch, vec, raw.init(game, params), (0, 1))
    d1, _, info = sc.apply(game, params, batch, vec, sc.init(game, params), (0, 1))
    for i, tag in enumerate(("theta", "phi")):
        x = game.supports(params, batch)[i]
        A = reference_metric(game.maps()[i], params[i], x, "l2") + lam * torch.eye(flat(params[i]).numel(), dtype=DT)
        v, u = flat(vec[i]), flat(d0[i])
        d_star = torch.linalg.solve(A, v)
        alpha = (u @ A @ d_star) / (u @ A @ u)  # the minimizer, computed with d_* itself
        assert info[f"alpha_{tag}"] == pytest.approx(float(alpha), rel=1e-9)
        assert torch.allclose(flat(d1[i]), alpha * u, atol=1e-12, rtol=1e-9)


def test_block_alpha_is_the_subspace_fit() -> None:
    r"""``rescale="block"``: ``α ∈ R^B`` minimizes ``‖Σ_b α_b d_b − d_*‖_{A+λI}``, i.e.
    ``(Dᵀ(A+λI)D) α = Dᵀv`` with ``D = [d_1, …, d_B]`` (block directions, zero-padded)."""
    game = hcc.make_game("rps", {"width": 6, "n_support": 3}).to(DT)
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    lam = 1e-3
    common = dict(damping=lam, damping_scale="absolute", log_cosine=False, logit_damping=0.0)
    for cls in (KFAC, DiagGGN):
        raw = cls(cls.Options(rescale="none", **common))
        blk = cls(cls.Options(rescale="block", **common))
        d0, _, _ = raw.apply(game, params, batch, vec, raw.init(game, params), (0,))
        d1, _, info = blk.apply(game, params, batch, vec, blk.init(game, params), (0,))
        x = game.supports(params, batch)[0]
        M = flat(params[0]).numel()
        A = reference_metric(game.min_map, params[0], x, "l2") + lam * torch.eye(M, dtype=DT)
        cols = [flat({k: (t if k.split(".")[0] == layer else torch.zeros_like(t)) for k, t in d0[0].items()})
                for layer in ("0", "2", "4")]
        D = torch.stack(cols, 1)
        alpha = torch.linalg.solve(D.T @ A @ D, D.T @ flat(vec[0]))
        assert torch.allclose(flat(d1[0]), D @ alpha, atol=1e-12, rtol=1e-9), cls.name
        assert info["alpha_min_theta"] == pytest.approx(float(alpha.min()), rel=1e-9)


def logit_metric(module: nn.Sequential, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``A_z = (1/n) Σ J_zᵀ P J_z`` with ``P = I − 11ᵀ/k`` (softmax: logit shifts along 1 do not count)."""
    body = nn.Sequential(*list(module)[:-1])
    Jz = per_sample_jacobian(body, params, x)
    Jz = Jz - Jz.mean(1, keepdim=True)
    return torch.einsum("nkm,nke->me", Jz, Jz) / x.shape[0]


@pytest.mark.parametrize("rescale", ["player", "block"])
def test_logit_damping_fits_in_the_damped_output_metric(rescale: str) -> None:
    r"""``logit_damping = μ``: the fit's metric is ``A + λI + μ A_z`` (``Q Qᵀ`` damped to ``QQᵀ + μP``)."""
    game = hcc.make_game("rps", {"width": 6, "n_support": 3}).to(DT)
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    lam, mu = 1e-3, 0.05
    common = dict(damping=lam, damping_scale="absolute", log_cosine=False)
    raw = KFAC(KFAC.Options(rescale="none", logit_damping=mu, **common))
    sc = KFAC(KFAC.Options(rescale=rescale, logit_damping=mu, **common))
    d0, _, _ = raw.apply(game, params, batch, vec, raw.init(game, params), (0,))
    d1, _, _ = sc.apply(game, params, batch, vec, sc.init(game, params), (0,))
    x = game.supports(params, batch)[0]
    M = flat(params[0]).numel()
    A = (reference_metric(game.min_map, params[0], x, "l2") + lam * torch.eye(M, dtype=DT)
         + mu * logit_metric(game.min_map, params[0], x))
    if rescale == "player":
        D = flat(d0[0])[:, None]
    else:
        D = torch.stack([flat({k: (t if k.split(".")[0] == layer else torch.zeros_like(t)) for k, t in d0[0].items()})
                         for layer in ("0", "2", "4")], 1)
    alpha = torch.linalg.solve(D.T @ A @ D, D.T @ flat(vec[0]))
    assert torch.allclose(flat(d1[0]), D @ alpha, atol=1e-12, rtol=1e-9)


def test_logit_damping_bounds_the_step_at_a_saturated_head() -> None:
    """At a saturated softmax (``F₀ ≈ 1e-9``) the scale-free K-FAC inverse asks for a huge step
    in θ; the logit trust region bounds the fitted logit move by ``‖S‖‖r‖/μ``."""
    game = hcc.make_game("matrix", {"payoff": "3,-1;-2,1"}).to(DT)
    params = game.init_params()
    with torch.no_grad():
        params[0]["4.weight"].mul_(12.0)
        params[0]["4.bias"].mul_(12.0)
    batch = game.sample_batch()
    F, _ = game.strategies(params, batch)
    assert float(F.min()) < 1e-6  # saturated
    vec = hcc.solvers.vector_field(game, params, batch)
    steps = {}
    for mu in (0.0, 3e-3):
        pre = KFAC(KFAC.Options(logit_damping=mu, log_cosine=False))
        d, _, _ = pre.apply(game, params, batch, vec, pre.init(game, params), (0,))
        steps[mu] = float(flat(d[0]).norm())
    assert steps[0.0] > 1e3 * steps[3e-3]
    assert steps[3e-3] < 1.0


def test_converges_on_saturating_two_by_two_game() -> None:
    """Regression: on ``3,-1;-2,1`` (seed 0) the extragradient extrapolation saturated the min
    player's softmax (``F₀ = 9e-10``) and the scale-free inverse threw it into a corner with
    ``J = 0`` (``V`` stuck at 0.26); the logit trust region keeps seeds 0-3 converging."""
    for seed in range(4):
        res = hcc.run("matrix", "eg+kfac", game_options={"payoff": "3,-1;-2,1"}, seed=seed, steps=100,
                      log_every=100, dtype="float64")
        assert res.converged and res.steps_to_tol <= 60, (seed, res.message)  # measured 49, 43, 41, 43


def test_direct_map_uses_exact_identity_block() -> None:
    """``Direct`` (bilinear): no linear layers; its exact block is ``A = I`` so
    ``d = v/(1 + λ)`` and ``α = 1`` (the natural gradient is the plain gradient)."""
    game = hcc.make_game("bilinear", {"dim": 3, "matrix": "random"}).to(DT)
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    for cls in (KFAC, DiagGGN):
        pre = cls(cls.Options(damping=1e-2, damping_scale="absolute"))
        d, _, info = pre.apply(game, params, batch, vec, pre.init(game, params), (0, 1))
        for i in (0, 1):
            assert torch.allclose(d[i]["theta"], vec[i]["theta"] / 1.01, atol=1e-14, rtol=0)
        assert info["alpha_theta"] == pytest.approx(1.0, abs=1e-12)
        assert info["cos_exact_phi"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("cls,opts", [(KFAC, {}), (KFAC, {"damping_split": "eigen"}), (DiagGGN, {}),
                                      (KFAC, {"rescale": "block"})])
def test_dead_blocks_get_zero_direction(cls, opts) -> None:
    """A zero last layer makes the earlier layers' factors 0 (``J_b = 0``): their direction is
    0, not 0/0, and everything stays finite."""
    game = hcc.make_game("rps", {"width": 5}).to(DT)
    params = game.init_params()
    for p in params:
        p["4.weight"].zero_()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    pre = cls(cls.Options(**opts))
    d, _, info = pre.apply(game, params, batch, vec, pre.init(game, params), (0, 1))
    for i in (0, 1):
        assert all(bool(torch.isfinite(t).all()) for t in d[i].values())
        assert float(d[i]["0.weight"].abs().max()) == 0.0
    assert all(math.isfinite(v) for v in info.values())


def test_players_not_preconditioned_are_untouched() -> None:
    game = hcc.make_game("rps", {"width": 5}).to(DT)
    params = game.init_params()
    vec = (random_vec(params[0]), random_vec(params[1]))
    pre = KFAC(KFAC.Options())
    d, state, info = pre.apply(game, params, game.sample_batch(), vec, pre.init(game, params), (1,))
    assert d[0] is vec[0]
    assert state["players"][0]["calls"] == 0 and state["players"][1]["calls"] == 1
    assert "alpha_phi" in info and "alpha_theta" not in info


def test_fisher_on_linear_output_is_an_error() -> None:
    """No silent swap of geometries: ``fisher`` needs a probability head."""
    game = hcc.make_game("bilinear").to(DT)
    with pytest.raises(OptionError, match="fisher"):
        make_solver("eg+kfac", game, options={"geometry": "fisher"}).init(game, game.init_params())


def test_cosine_to_exact_natural_direction() -> None:
    """The logged cosine equals the one to a dense ``A⁺v`` (pseudo-inverse) computed here."""
    game = hcc.make_game("rps", {"width": 6, "n_support": 2}).to(DT)
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    for geometry in ("l2", "fisher"):
        pre = DiagGGN(DiagGGN.Options(geometry=geometry, log_cosine=True))
        d, _, info = pre.apply(game, params, batch, vec, pre.init(game, params), (0,))
        x = game.supports(params, batch)[0]
        A = reference_metric(game.min_map, params[0], x, geometry)
        exact = torch.linalg.pinv(A, rtol=1e-10, hermitian=True) @ flat(vec[0])
        u = flat(d[0])
        cos = float(u @ exact / (u.norm() * exact.norm()))
        assert info["cos_exact_theta"] == pytest.approx(cos, abs=1e-7)


# -- state: refresh period and running averages ------------------------------------------------------


def _drift(params, t: int):
    return tuple({k: v + 1e-2 * t * torch.ones_like(v) for k, v in p.items()} for p in params)


def test_refresh_period_and_running_average() -> None:
    """Statistics and inverses change only on calls ``0, T, 2T, …`` (``refresh=T``, ``decay=0``);
    with ``decay=β`` the statistics are ``β·old + (1 − β)·new`` at every call."""
    game = hcc.make_game("rps", {"width": 5}).to(DT)
    p0 = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, p0, batch)
    T = 3
    pre = KFAC(KFAC.Options(refresh=T))
    state = pre.init(game, p0)
    invs = []
    for t in range(7):
        _, state, info = pre.apply(game, _drift(p0, t), batch, vec, state, (0,))
        invs.append(state["players"][0]["inv"])
        assert info["kfac_refreshes_total"] == (1 if t % T == 0 else 0)
    for t in range(1, 7):
        assert (invs[t] is invs[t - 1]) == (t % T != 0)
    # the refresh saw the new parameters
    assert any(not torch.allclose(a, b) for a, b in zip(invs[3]["2"][1:], invs[0]["2"][1:]))

    beta = 0.5
    avg = KFAC(KFAC.Options(decay=beta, refresh=2))
    state = avg.init(game, p0)
    s = analyze_map(game.min_map)
    x = game.supports(p0, batch)[0]
    want = None
    for t in range(3):
        pt = _drift(p0, t)
        _, state, _ = avg.apply(game, pt, batch, vec, state, (0,))
        new = kronecker_factors(s, pt[0], x)
        want = new if want is None else {k: tuple(beta * w + (1 - beta) * n for w, n in zip(want[k], new[k]))
                                         for k in new}
        for k in want:
            for a, b in zip(state["players"][0]["stats"]["factors"][k], want[k]):
                assert torch.allclose(a, b, atol=1e-13, rtol=0)


def test_refresh_and_decay_change_the_trajectory() -> None:
    """The options matter: stale or averaged curvature gives a different run."""
    base = hcc.run("rps", "eg+kfac", steps=8, stop_at_tol=False, log_every=8).final["lyapunov"]
    for opts in ({"refresh": 4}, {"decay": 0.9}):
        other = hcc.run("rps", "eg+kfac", steps=8, stop_at_tol=False, log_every=8, solver_options=opts)
        assert other.final["lyapunov"] != pytest.approx(base, rel=1e-6), opts


# -- registry and convergence --------------------------------------------------------------------------


def test_registered() -> None:
    assert PRECONDITIONERS["kfac"] is KFAC and PRECONDITIONERS["diag"] is DiagGGN
    for name in ("eg+kfac", "eg+diag"):
        assert SOLVERS[name].rule == "eg"


@pytest.mark.parametrize("solver", ["eg+kfac", "eg+diag"])
@pytest.mark.parametrize("game,options", [("rps", {}), ("matching-pennies", {"lam": 0.1}), ("bilinear", {})])
def test_converges_with_defaults(solver: str, game: str, options: dict) -> None:
    """Default options and step sizes reach ``V ≤ 1e-6`` (iteration counts: module report)."""
    res = hcc.run(game, solver, game_options=options, steps=100, log_every=100)
    assert res.converged, res.message
    assert res.steps_to_tol <= 60  # measured: rps 24, matching pennies 27–29, bilinear 49


def test_kfac_logs_numbers() -> None:
    res = hcc.run("rps", "eg+kfac", steps=2, stop_at_tol=False)
    row = res.history[-1]
    for key in ("damping_theta", "damping_phi", "alpha_theta", "cos_exact_theta", "kfac_refreshes_total"):
        assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert 0 < row["cos_exact_theta"] <= 1 + 1e-12


def test_gan_step_is_finite() -> None:
    """A GAN (linear generator output over the latent batch, discriminator logit over real ∪ fake)."""
    if "gan" not in hcc.GAMES:
        pytest.skip("no gan game")
    res = hcc.run("gan", "eg+kfac", steps=3, stop_at_tol=False, log_every=1,
                  game_options={"width": 16, "batch_size": 32, "n_eval": 64})
    assert res.status != "diverged", res.message
    assert math.isfinite(res.history[-1]["alpha_theta"])


@pytest.mark.slow
def test_large_network_step() -> None:
    """≥ 100k parameters per player (rps, width 320): a step runs; no cosine by default."""
    game = hcc.make_game("rps", {"width": 320}).to(DT)
    assert sum(p.numel() for p in game.min_map.parameters()) >= 100_000
    solver = make_solver("eg+kfac", game)
    params = game.init_params()
    state = solver.init(game, params)
    params, state, info = solver.step(game, params, state, game.sample_batch())
    assert "cos_exact_theta" not in info and math.isfinite(info["alpha_theta"])


@pytest.mark.slow
def test_diag_multi_point_rps_needs_block_rescaling() -> None:
    """With 8 support points one scalar α cannot fit the diagonal direction to the
    function-space step (V ≈ 2e-4 after 300 steps); one α per block converges (258 steps)."""
    opts = {"n_support": 8}
    plain = hcc.run("rps", "eg+diag", game_options=opts, steps=300, log_every=300)
    assert not plain.converged
    block = hcc.run("rps", "eg+diag", game_options=opts, steps=400, log_every=400,
                    solver_options={"rescale": "block"})
    assert block.converged, block.message
    kfac = hcc.run("rps", "eg+kfac", game_options=opts, steps=300, log_every=300)
    assert kfac.converged and kfac.steps_to_tol <= 40  # measured 30


@pytest.mark.slow
def test_wide_network_converges_with_stale_inverses() -> None:
    """Width 320 (≥ 100k parameters per player), inverses refreshed every other call: the
    default damping keeps the stale rank-deficient factors from over-stepping."""
    res = hcc.run("rps", "eg+kfac", game_options={"width": 320}, steps=100, log_every=100,
                  solver_options={"refresh": 2})
    assert res.converged and res.steps_to_tol <= 40, res.message


# -- beyond MLPs; checkpointed state --------------------------------------------------------------------


class _Residual(nn.Module):
    """LayerNorm inside a residual block: K-FAC blocks for its linear layers, a dense block for the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.inp(x))
        return self.out(h + torch.tanh(h))


def conv_game() -> ToyGame:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(8, 3), nn.Softmax(-1))
    res = nn.Sequential(_Residual(), nn.Softmax(-1))
    gen = torch.Generator().manual_seed(13)
    return ToyGame(conv, res, torch.randn(4, 1, 5, 5, generator=gen), torch.randn(4, 4, generator=gen)).to(DT)


@pytest.mark.parametrize("cls", [KFAC, DiagGGN])
def test_conv_and_layernorm_maps_in_a_step(cls) -> None:
    """A conv map (BackPACK where ``auto`` allows) and a LayerNorm residual map (autograd hooks):
    the direction is the same with either backend and finite, and the logged cosine is the one to
    the exact ``A⁺v``."""
    game = conv_game()
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    out = {}
    for backend in ("auto", "torch"):
        pre = cls(cls.Options(backend=backend))
        out[backend], _, info = pre.apply(game, params, batch, vec, pre.init(game, params), (0, 1))
    for i in (0, 1):
        assert torch.allclose(flat(out["auto"][i]), flat(out["torch"][i]), atol=1e-12, rtol=1e-10)
        assert all(bool(torch.isfinite(t).all()) for t in out["auto"][i].values())
    xs = game.supports(params, batch)
    for i, tag in enumerate(("theta", "phi")):  # the logged cosine: against a dense A⁺v built here
        A = reference_metric(game.maps()[i], params[i], xs[i], "l2")
        exact = torch.linalg.pinv(A, rtol=1e-10, hermitian=True) @ flat(vec[i])
        u = flat(out["torch"][i])
        assert info[f"cos_exact_{tag}"] == pytest.approx(float(u @ exact / (u.norm() * exact.norm())), abs=1e-7)


@pytest.mark.parametrize("cls,opts", [(KFAC, {}), (KFAC, {"damping_split": "eigen"}), (DiagGGN, {})])
def test_state_survives_a_checkpoint(cls, opts, tmp_path) -> None:
    """The state is a plain pytree: saved as a checkpoint does it (``torch.load(weights_only=True)``,
    named tuples back as tuples) and resumed, the next directions are the same."""
    from hcc.checkpoint import _plain

    game = conv_game()
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    pre = cls(cls.Options(decay=0.5, refresh=2, **opts))
    _, state, _ = pre.apply(game, params, batch, vec, pre.init(game, params), (0, 1))
    torch.save(_plain(state), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    for t in (1, 2):  # a stale inverse, then a refresh averaging the restored statistics
        moved = _drift(params, t)
        d_a, state, _ = pre.apply(game, moved, batch, vec, state, (0, 1))
        d_b, loaded, _ = pre.apply(game, moved, batch, vec, loaded, (0, 1))
        for i in (0, 1):
            assert torch.equal(flat(d_a[i]), flat(d_b[i])), (t, i)


@pytest.mark.parametrize("name", ["exact", "cg"])
def test_exact_and_cg_preconditioners_on_conv_and_layernorm_maps(name) -> None:
    """The exact and CG preconditioners on the same maps (generic kernel: not MLPs): the fused
    direction and ``apply`` on the field both equal ``(A + λ/n·I)⁻¹v`` from the dense reference."""
    game = conv_game()
    params = game.init_params()
    batch = game.sample_batch()
    vec = hcc.solvers.vector_field(game, params, batch)
    cls = PRECONDITIONERS[name]
    pre = cls(cls.Options(damping=0.3, **({"tol": 1e-12, "maxiter": 500} if name == "cg" else {})))
    fused, _, _ = pre.direction(game, params, batch, pre.init(game, params), (0, 1))
    applied, _, _ = pre.apply(game, params, batch, vec, pre.init(game, params), (0, 1))
    xs = game.supports(params, batch)
    for i in (0, 1):
        n = xs[i].shape[0]
        A = reference_metric(game.maps()[i], params[i], xs[i], "l2")
        want = torch.linalg.solve(A + 0.3 / n * torch.eye(A.shape[0], dtype=DT), flat(vec[i]))
        assert rel_err(flat(fused[i]), want) < 1e-8, i
        assert rel_err(flat(applied[i]), want) < 1e-8, i
