"""The curvature layer (:mod:`hcc.curvature`) against dense float64 references built here.

Every operator — exact (kernel, structured, dense), CG, K-FAC, diagonal — is checked against
``A = (1/n) Σ_i Ĵ_iᵀĴ_i`` formed from :func:`torch.func.jacrev` on the whole batch and the
output factors written out by hand (l2: the map's own Jacobian; fisher: ``Q = diag(√p) − p√pᵀ``
or ``√(σ(1−σ))``; logit: ``P = I − 11ᵀ/k``), with ``pinv`` for the pseudo-inverse. Maps beyond
MLPs: ``nn.LayerNorm`` inside a residual block, convolutional discriminators and generators.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from hcc.curvature.diag import DiagOperator, diag_operator, ggn_diagonal
from hcc.curvature.jacobians import check_per_sample, per_sample_jacobian
from hcc.curvature.kfac import KFACOperator, kfac_operator, kronecker_factors
from hcc.curvature.layers import analyze_map, layer_sensitivities, use_backpack
from hcc.curvature.operators import (
    CGOperator,
    DenseOperator,
    KernelOperator,
    StructuredOperator,
    exact_operator,
)
from hcc.curvature.pytree import flatten, unflatten
from hcc.registry import OptionError

torch.set_num_threads(1)
DT = torch.float64
EXACT_RTOL = 1e-10


# -- maps -------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``x ↦ W₃(h + tanh(W₂ h))``, ``h = LayerNorm(W₁x)``: normalization and a skip connection."""

    def __init__(self, d_in: int, width: int, k: int) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(d_in, width), nn.LayerNorm(width)
        self.mid, self.out = nn.Linear(width, width), nn.Linear(width, k)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.inp(x))
        return self.out(h + torch.tanh(self.mid(h)))


def mlp(head: str) -> nn.Module:
    k = 1 if head == "sigmoid" else 3
    layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, k)]
    layers += {"softmax": [nn.Softmax(-1)], "sigmoid": [nn.Sigmoid()], "none": []}[head]
    return nn.Sequential(*layers)


def residual(head: str) -> nn.Module:
    block = ResidualBlock(4, 6, 3)
    return nn.Sequential(block, nn.Softmax(-1)) if head == "softmax" else block


def conv_discriminator(head: str = "sigmoid") -> nn.Module:
    layers = [nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),
              nn.Flatten(), nn.Linear(16, 1)]
    return nn.Sequential(*layers, *([nn.Sigmoid()] if head == "sigmoid" else []))


def conv_generator() -> nn.Module:
    """Latent ``(4,)`` ↦ a ``4 × 4`` image, linear output (a GAN generator)."""
    return nn.Sequential(nn.Linear(4, 32), nn.Unflatten(1, (2, 4, 4)), nn.Tanh(), nn.Conv2d(2, 3, 3, padding=1),
                         nn.Tanh(), nn.Conv2d(3, 1, 3, padding=1), nn.Flatten())


# (id, map factory, head, support shape, n): the cases are data
CASES = [
    ("mlp-softmax", lambda: mlp("softmax"), "softmax", (4,), 3),
    ("mlp-sigmoid", lambda: mlp("sigmoid"), "sigmoid", (4,), 4),
    ("mlp-linear", lambda: mlp("none"), "none", (4,), 2),
    ("residual-layernorm-softmax", lambda: residual("softmax"), "softmax", (4,), 3),
    ("conv-discriminator-sigmoid", conv_discriminator, "sigmoid", (1, 4, 4), 4),
    # nk = 48 > M = 15: the dense regime, J of rank 12 (the softmax symmetries)
    ("mlp-softmax-overdetermined", lambda: nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 3), nn.Softmax(-1)),
     "softmax", (2,), 16),
]
GEOMETRIES = {"softmax": ("l2", "fisher", "logit"), "sigmoid": ("l2", "fisher", "logit"), "none": ("l2",)}
GEO_CASES = [(c, g) for c in CASES for g in GEOMETRIES[c[2]]]
GEO_IDS = [f"{c[0]}-{g}" for c, g in GEO_CASES]


def build(factory, shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    torch.manual_seed(seed)
    net = factory().to(DT)
    with torch.no_grad():  # away from the uniform point of a head
        for p in net.parameters():
            p.mul_(2.0)
    x = torch.randn(n, *shape, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    return net, {k: v.detach().clone() for k, v in net.named_parameters()}, x


# -- dense references, built here -------------------------------------------------------------------


def batch_jacobian(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(out (n, k), J (n, k, M))`` by ``jacrev`` on the whole batch (row ``i`` depends on ``x_i`` only)."""
    def f(p):
        return functional_call(module, p, (x,)).reshape(x.shape[0], -1)

    out, jac = f(params), jacrev(f)(params)
    n, k = out.shape
    return out.detach(), torch.cat([jac[name].reshape(n, k, -1) for name in params], -1)


def reference_metric_jacobian(module: nn.Module, head: str, params: dict[str, Tensor], x: Tensor,
                              geometry: str) -> Tensor:
    """``Ĵ`` ``(n, c, M)``: l2 → the map's ``J``; fisher/logit → ``Q_iᵀ J_{z,i}`` with ``Q`` written out."""
    if geometry == "l2":
        return batch_jacobian(module, params, x)[1]
    body = nn.Sequential(*list(module)[:-1])
    z, Jz = batch_jacobian(body, params, x)
    k = z.shape[1]
    if head == "softmax":
        p = torch.softmax(z, -1)
        if geometry == "fisher":
            Q = torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]
        else:
            Q = (torch.eye(k, dtype=DT) - 1.0 / k).expand(z.shape[0], k, k)
    else:
        s = torch.sigmoid(z)
        Q = torch.diag_embed((s * (1 - s)).sqrt()) if geometry == "fisher" else torch.eye(k, dtype=DT).expand(
            z.shape[0], k, k)
    return torch.einsum("nkc,nkm->ncm", Q, Jz)


def reference_solve(A: Tensor, v: Tensor, damping: float) -> Tensor:
    """``(A + λI)⁻¹ Π_A v`` (λ = 0: ``A⁺v``)."""
    A_pinv = torch.linalg.pinv(A, hermitian=True, rtol=1e-12)
    if damping == 0:
        return A_pinv @ v
    return torch.linalg.solve(A + damping * torch.eye(A.shape[0], dtype=DT), A @ (A_pinv @ v))


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def setup(case, geometry: str, seed: int = 0):
    _, factory, head, shape, n = case
    net, params, x = build(factory, shape, n, seed)
    Jh = reference_metric_jacobian(net, head, params, x, geometry)
    A = torch.einsum("ncm,nce->me", Jh, Jh) / n
    gen = torch.Generator().manual_seed(seed + 7)
    r = torch.randn(n, Jh.shape[1], dtype=DT, generator=gen)
    v = torch.randn(A.shape[0], dtype=DT, generator=gen)  # a general vector, not in row(Ĵ)
    return net, params, x, Jh, A, r, v


# -- exact operators ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,geometry", GEO_CASES, ids=GEO_IDS)
def test_exact_operators_match_dense_reference(case, geometry):
    """Kernel, structured (where it applies) and dense: ``A``, ``Av``, ``Ĵᵀr``, ``P_λv`` and the
    residual form ``P_λĴᵀr`` to 1e-10 relative, λ ∈ {0 (pseudo-inverse), 1e-3}."""
    net, params, x, Jh, A, r, v = setup(case, geometry)
    field = Jh.reshape(-1, A.shape[0]).T @ r.reshape(-1)
    methods = ["kernel", "dense"] + (["structured"] if isinstance(
        exact_operator(net, params, x, geometry, method="auto"), StructuredOperator) else [])
    for method in methods:
        op = exact_operator(net, params, x, geometry, method=method)
        assert rel(op.dense(), A) < EXACT_RTOL, method
        assert rel(flatten(op.matvec(unflatten(v, params))), A @ v) < EXACT_RTOL, method
        assert rel(flatten(op.field(r)), field) < EXACT_RTOL, method
        for lam in (0.0, 1e-3):
            d = flatten(op.solve(unflatten(v, params), damping=lam))
            assert rel(d, reference_solve(A, v, lam)) < EXACT_RTOL, (method, lam, "rhs")
            d = flatten(op.solve(residual=r, damping=lam))
            assert rel(d, reference_solve(A, field, lam)) < EXACT_RTOL, (method, lam, "residual")
            d = flatten(op.inverse(lam).matvec(unflatten(v, params)))
            assert rel(d, reference_solve(A, v, lam)) < EXACT_RTOL, (method, lam, "inverse")


def test_auto_picks_structured_for_mlps_and_the_generic_kernel_otherwise():
    """``choose_method``: the structured kernel for an ``nn.Sequential`` MLP (func backend), the
    generic kernel for any other map (LayerNorm + residual, convolutions) or the BackPACK
    backend, the dense solve when ``nk > M``."""
    kinds = {}
    for case in CASES:
        net, params, x = build(case[1], case[3], case[4])
        kinds[case[0]] = type(exact_operator(net, params, x))
    assert kinds == {
        "mlp-softmax": StructuredOperator, "mlp-sigmoid": StructuredOperator, "mlp-linear": StructuredOperator,
        "residual-layernorm-softmax": KernelOperator, "conv-discriminator-sigmoid": KernelOperator,
        "mlp-softmax-overdetermined": DenseOperator,
    }
    net, params, x = build(CASES[0][1], (4,), 3)
    assert isinstance(exact_operator(net, params, x, backend="backpack"), KernelOperator)
    with pytest.raises(OptionError, match="structured"):
        net, params, x = build(CASES[3][1], (4,), 3)
        exact_operator(net, params, x, method="structured")


@pytest.mark.parametrize("case,geometry", [g for g in GEO_CASES if g[0][4] < 10],
                         ids=[i for g, i in zip(GEO_CASES, GEO_IDS) if g[0][4] < 10])
def test_cg_operator_matches_reference_to_its_tolerance(case, geometry):
    """CG on ``(A + λI)d = v`` from 0: ``Av`` exactly, the solution to ``cond·tol`` (tol 1e-12 here)."""
    net, params, x, Jh, A, r, v = setup(case, geometry)
    op = CGOperator(net, params, x, geometry, tol=1e-12, maxiter=2000)
    assert rel(flatten(op.matvec(unflatten(v, params))), A @ v) < EXACT_RTOL
    for lam in (1e-2, 1e-1):
        res = op.solve_result(unflatten(v, params), damping=lam)
        assert float(res.residual) <= 1e-12
        assert rel(res.solution, reference_solve(A, v, lam)) < 1e-7, (lam, res.iterations)


def test_per_sample_jacobians_of_layernorm_residual_and_conv_maps():
    """``vmap(jacrev)`` per sample equals the batch Jacobian's diagonal blocks, and the
    off-diagonal blocks vanish: LayerNorm normalizes each row on its own, so per-sample
    Jacobians are valid for these maps."""
    for factory, shape in ((lambda: residual("softmax"), (4,)), (conv_discriminator, (1, 4, 4))):
        net, params, x = build(factory, shape, 3)
        _, J = batch_jacobian(net, params, x)
        jac = per_sample_jacobian(net, params, x)
        Jps = torch.cat([jac[k].reshape(3, jac[k].shape[1], -1) for k in params], -1)
        assert rel(Jps, J) < 1e-12
        cross = jacrev(lambda xx, net=net, params=params: functional_call(net, params, (xx,)))(x)  # (n, k, n, ...)
        for i in range(3):
            for j in range(3):
                if i != j:
                    assert float(cross[i, :, j].abs().max()) == 0.0


def test_batch_statistics_are_rejected():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(OptionError, match="BatchNorm1d"):
        check_per_sample(net)
    check_per_sample(net.eval())  # running statistics: per sample


# -- K-FAC and the diagonal ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_kfac_exact_for_one_layer(kind):
    """One layer, linear output: ``Ĵ_i = I ⊗ ā_iᵀ`` (a convolution: ``Σ_t e_{o,t}ā_{i,t}ᵀ``), so
    ``G = I`` and ``G ⊗ Ā = A`` for any ``n``; ``solve`` with ``split="eigen"`` is ``(A + λI)⁻¹v``."""
    layer, shape = (lambda: nn.Linear(4, 3), (4,)) if kind == "linear" else (
        lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), (2, 5, 5))
    net, params, x = build(lambda: nn.Sequential(layer()), shape, 6)
    _, J = batch_jacobian(net, params, x)
    A = torch.einsum("nkm,nke->me", J, J) / 6
    s = analyze_map(net)
    assert s.layers[0].kind == kind and not s.rest
    op = kfac_operator(s, params, x)
    assert rel(op.dense(), A) < EXACT_RTOL
    v = torch.randn(A.shape[0], dtype=DT, generator=torch.Generator().manual_seed(3))
    lam = 1e-2
    want = torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=DT), v)
    assert rel(flatten(op.solve(unflatten(v, params), damping=lam)), want) < EXACT_RTOL
    with pytest.raises(OptionError, match="λ > 0"):
        op.inverse(0.0)


@pytest.mark.parametrize("case,geometry", [g for g in GEO_CASES if g[0][0] != "mlp-softmax-overdetermined"],
                         ids=[i for g, i in zip(GEO_CASES, GEO_IDS) if g[0][0] != "mlp-softmax-overdetermined"])
def test_diag_operator_is_the_exact_diagonal(case, geometry):
    """``DiagOperator``: the diagonal of ``A`` (layers: BackPACK or autograd; LayerNorm's
    parameters: their dense block's diagonal) to 1e-12, and its inverse ``v ⊘ (diag A + λ)``."""
    net, params, x, Jh, A, r, v = setup(case, geometry)
    s = analyze_map(net)
    op = diag_operator(s, params, x, geometry)
    assert torch.allclose(op.dense().diagonal(), A.diagonal(), atol=1e-12, rtol=0)
    lam = 1e-2
    d = flatten(op.solve(unflatten(v, params), damping=lam))
    assert torch.allclose(d, v / (A.diagonal() + lam), atol=1e-10, rtol=1e-10)
    assert rel(flatten(op.solve(residual=r, damping=lam)),
               (Jh.reshape(-1, A.shape[0]).T @ r.reshape(-1)) / (A.diagonal() + lam)) < EXACT_RTOL


def test_kfac_blocks_of_a_residual_layernorm_map():
    """A custom module: its ``nn.Linear`` layers are K-FAC blocks (autograd hooks: BackPACK needs a
    ``Sequential``); LayerNorm's parameters form one exact dense block; at one support point
    every layer block is exact (``G ⊗ Ā`` is the per-layer block of ``A``)."""
    net, params, x, Jh, A, r, v = setup(CASES[3], "l2")
    x1 = x[:1]
    Jh1 = reference_metric_jacobian(net, "softmax", params, x1, "l2")
    A1 = torch.einsum("ncm,nce->me", Jh1, Jh1)
    s = analyze_map(net)
    assert s.prefixes == ("0.inp", "0.mid", "0.out") and s.rest == ("0.norm.weight", "0.norm.bias")
    assert not use_backpack(s, "auto", ())
    op = kfac_operator(s, params, x1)
    K = op.dense()
    off, where = 0, {}
    for name, t in params.items():
        where[name] = torch.arange(off, off + t.numel())
        off += t.numel()
    for names in s.blocks():
        ix = torch.cat([where[k] for k in names])
        assert rel(K[ix][:, ix], A1[ix][:, ix]) < EXACT_RTOL, names


def hand_conv_factors(net: nn.Sequential, params: dict[str, Tensor], x: Tensor, index: int,
                      Q: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """Layer ``net[index]`` (a ``Conv2d``): ``(Σ_{c,i} s sᵀ, Σ_i Σ_t ā āᵀ, |T|)`` built by hand —
    ``ā`` from ``unfold`` of the layer input (then 1), ``s = Σ_t u_t`` with ``u = B_iᵀ q_{c,i}``, ``B_i``
    the per-sample Jacobian of the rest of the body at the layer output (``Q = None``: ``q = e_c``)."""
    conv = net[index]
    with torch.no_grad():
        a = x
        for m in net[:index]:
            a = m(a)
        out = conv(a)
    rest = nn.Sequential(*net[index + 1:])
    rest_params = {f"{int(k.split('.')[0]) - index - 1}.{k.split('.', 1)[1]}": v for k, v in params.items()
                   if int(k.split(".")[0]) > index}
    B = torch.stack([jacrev(lambda o: functional_call(rest, rest_params, (o[None],)).reshape(-1))(out[i])
                     for i in range(x.shape[0])])  # (n, k, c_out, H, W)
    n, k = B.shape[:2]
    cols = torch.eye(k, dtype=DT).expand(n, k, k) if Q is None else Q
    u = torch.einsum("nkc,nkohw->cnohw", cols, B)
    s = u.sum((-2, -1))
    X = torch.nn.functional.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    Xb = torch.cat([X, torch.ones_like(X[:, :1])], 1)
    return torch.einsum("cni,cnj->ij", s, s), torch.einsum("nit,njt->ij", Xb, Xb), X.shape[-1]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backpack_kflr_conv_factors_equal_factors_by_hand():
    """BackPACK's own ``KFLR`` on a conv net with ``MSELoss(reduction="sum")`` (Hessian ``2I``):
    the input factor is ``Σ_i Σ_t a aᵀ / n`` of the unfolded inputs (KFC's spatial sum), the
    output factor ``2 Σ_{c,i} (Σ_t u)(Σ_t u)ᵀ`` — the bias GGN, ``|T|`` times KFC's ``Γ`` when
    derivatives are spatially uncorrelated. ``kronecker_factors`` divides it by ``n|T|``."""
    from backpack import backpack, extend
    from backpack.extensions import KFLR

    net, params, x = build(lambda: conv_discriminator("none"), (1, 4, 4), 5)
    bp = extend(copy.deepcopy(net))
    loss = extend(nn.MSELoss(reduction="sum"))
    with backpack(KFLR()):
        loss(bp(x), torch.zeros(5, 1, dtype=DT)).backward()
    for index in (0, 2):
        G_bp, A_bp = bp[index].weight.kflr
        GG, AA, T = hand_conv_factors(net, params, x, index, None)
        assert torch.allclose(A_bp, AA[:-1, :-1] / 5, atol=1e-12, rtol=0), index
        assert torch.allclose(G_bp, 2 * GG, atol=1e-12, rtol=0), index
        assert T == (16 if index == 0 else 4)


@pytest.mark.parametrize("geometry", ["l2", "fisher"])
@pytest.mark.parametrize("backend", ["backpack", "torch"])
def test_conv_kronecker_factors_equal_factors_by_hand(backend, geometry):
    """``kronecker_factors`` on a conv net with a softmax head (the ``Q`` columns backpropagated):
    ``G = Σ_{c,i} s sᵀ/(n|T|)`` and ``Ā = Σ_i Σ_t ā āᵀ/n`` (with the bias row and ``|T|`` corner)."""
    factory = lambda: nn.Sequential(*list(conv_discriminator("none"))[:-1], nn.Linear(16, 3), nn.Softmax(-1))  # noqa: E731
    net, params, x = build(factory, (1, 4, 4), 4)
    z = functional_call(nn.Sequential(*list(net)[:-1]), params, (x,))
    p = torch.softmax(z, -1)
    Q = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) if geometry == "l2" else (
        torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :])
    fac = kronecker_factors(analyze_map(net), params, x, geometry, "kflr", backend)
    for index in (0, 2):
        GG, AA, T = hand_conv_factors(nn.Sequential(*list(net)[:-1]), params, x, index, Q)
        G, A = fac[str(index)]
        assert torch.allclose(G, GG / (4 * T), atol=1e-13, rtol=0), index
        assert torch.allclose(A, AA / 4, atol=1e-12, rtol=0), index


@pytest.mark.parametrize("backend", ["backpack", "torch"])
def test_conv_diag_ggn_matches_the_dense_diagonal(backend):
    net, params, x, Jh, A, r, v = setup(CASES[4], "l2")
    d = ggn_diagonal(analyze_map(net), params, x, "l2", "exact", backend)
    assert torch.allclose(flatten(d), A.diagonal(), atol=1e-12, rtol=0)


def test_conv_backends_agree_with_monte_carlo_draws():
    """``factors="kfac"``: BackPACK and autograd see the same draws and give the same factors."""
    net, params, x = build(conv_discriminator, (1, 4, 4), 4)
    s = analyze_map(net)
    fa = kronecker_factors(s, params, x, "l2", "kfac", "backpack", 3, torch.Generator().manual_seed(0))
    fb = kronecker_factors(s, params, x, "l2", "kfac", "torch", 3, torch.Generator().manual_seed(0))
    for k in fa:
        for a, b in zip(fa[k], fb[k], strict=True):
            assert torch.allclose(a, b, atol=1e-13, rtol=0)


def test_kfac_direction_on_conv_generator_and_discriminator():
    """The K-FAC direction's cosine with the dense exact one, ``v = Ĵᵀr`` for a random function-space
    gradient ``r``, n = 8 support points, relative damping 1e-2 (π split, the preconditioner's
    defaults), against the exact direction damped alike, ``(A + 10⁻²·mean diag A)⁻¹v``.

    Measured (``python benchmarks/curvature.py`` has the five-seed table): generator (latent 4 →
    Linear → 2×4×4 → two 3×3 convolutions, 245 parameters, linear output) 0.41, 0.27, 0.39 on
    seeds 0-2, mean 0.36; discriminator (two convolutions → Linear → sigmoid, 159 parameters)
    0.36, 0.44, 0.30, mean 0.36. Against the *undamped* ``A⁺v`` (what ``cos_exact`` logs) the
    generator's mean is 0.25, the discriminator's unchanged; the diagonal GGN gets 0.32 and 0.44.
    The floor asserted is the loose 0.2 on the mean.
    """
    for factory, shape, k in ((conv_generator, (4,), 16), (conv_discriminator, (1, 4, 4), 1)):
        cos = []
        for seed in range(3):
            net, params, x = build(factory, shape, 8, seed)
            A = exact_operator(net, params, x, method="dense")
            r = torch.randn(8, k, dtype=DT, generator=torch.Generator().manual_seed(100 + seed))
            lam = 1e-2
            exact = flatten(A.solve(residual=r, damping=lam * float(A.dense().diagonal().mean())))
            approx = flatten(kfac_operator(analyze_map(net), params, x).solve(
                residual=r, damping=lam, scale="relative", split="pi"))
            cos.append(cosine(approx, exact))
        assert sum(cos) / 3 > 0.2, cos


def test_kfac_operator_matvec_is_its_dense_form():
    """``KFACOperator.matvec`` and the block inverse are consistent: ``Ã (Ã + λI)⁻¹ v + λ(Ã + λI)⁻¹v = v``."""
    net, params, x = build(conv_generator, (4,), 3)
    s = analyze_map(net)
    assert not use_backpack(s, "auto", (nn.Linear, nn.Conv2d))  # nn.Unflatten: the autograd way
    op = kfac_operator(s, params, x)
    v = unflatten(torch.randn(op.size, dtype=DT, generator=torch.Generator().manual_seed(0)), params)
    d = op.solve(v, damping=1e-2)
    back = flatten(op.matvec(d)) + 1e-2 * flatten(d)
    assert rel(back, flatten(v)) < 1e-10
    assert isinstance(op, KFACOperator) and rel(op.dense() @ flatten(d), flatten(op.matvec(d))) < 1e-12


def test_diag_inverse_damps_per_block_relative_to_the_mean_diagonal():
    net, params, x = build(conv_discriminator, (1, 4, 4), 4)
    s = analyze_map(net)
    op = diag_operator(s, params, x)
    inv = op.inverse(1e-2, "relative")
    for names, lam in zip(s.blocks(), inv.block_damping(), strict=True):
        mean = torch.cat([op.diagonal[k].reshape(-1) for k in names]).mean()
        assert float(lam) == pytest.approx(1e-2 * float(mean), rel=1e-12)
    assert isinstance(op, DiagOperator)


def test_layer_sensitivities_are_the_backpropagated_columns():
    """The hooks' ``u`` equals ``B_iᵀ q_c`` computed with ``jacrev`` (the conv discriminator, l2)."""
    net, params, x = build(lambda: conv_discriminator("none"), (1, 4, 4), 3)
    s = analyze_map(net)
    _, inputs, U = layer_sensitivities(s, params, x, "l2", None)
    GG, AA, T = hand_conv_factors(net, params, x, 2, None)
    s2 = U["2"].flatten(3).sum(-1)
    assert torch.allclose(torch.einsum("cni,cnj->ij", s2, s2), GG, atol=1e-13, rtol=0)


def test_the_curvature_layer_imports_no_game_and_no_solver():
    """One-way data flow (game → curvature → preconditioner → rule → solver → run): no module of
    ``hcc.curvature`` imports (even lazily) from ``hcc.games``, ``hcc.solvers`` or the run layer."""
    import ast
    from pathlib import Path

    import hcc.curvature

    allowed = {"hcc.curvature", "hcc.registry"}
    for path in Path(hcc.curvature.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = "hcc.curvature" if node.level == 1 else "hcc"
                name = f"{base}.{node.module}" if node.module else base
            elif isinstance(node, ast.ImportFrom):
                name = node.module or ""
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
                assert not any(n.startswith("hcc") for n in names), (path.name, names)
                continue
            else:
                continue
            if name.startswith("hcc"):
                assert any(name == a or name.startswith(a + ".") for a in allowed), (path.name, name)
