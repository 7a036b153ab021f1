r"""Curvature benchmark: how well K-FAC and the diagonal GGN approximate the metric, beyond MLPs.

For small maps (a softmax MLP like RPS's, a convolutional generator and discriminator, a
residual block with ``nn.LayerNorm``), ``n`` support points and seeds ``0..S-1`` (float64,
parameters doubled from PyTorch's default initialization, as in ``tests/test_curvature.py``):

- ``frob``: the relative Frobenius error ``‖Ã − A‖/‖A‖`` of K-FAC's ``G ⊗ Ā`` blocks (``kfac``),
  of the diagonal (``diag``) and of the exact block-diagonal of ``A`` (``blocks``: what dropping
  the cross-layer blocks alone costs);
- ``cos``: the cosine of each direction with the exact damped one, ``(A + λ̄I)⁻¹v`` with
  ``λ̄ = 10⁻²·mean diag A``, for ``v = Ĵᵀr`` and a random function-space gradient ``r`` (K-FAC and
  the diagonal with relative damping ``10⁻²``, the preconditioners' default; ``blocks`` the exact
  blocks with ``λ̄``), and ``cos⁺``: the same against the undamped ``A⁺v`` (what ``cos_exact``
  logs). Mean and [min] over the seeds.

A second table compares conventions for a convolution's output factor, as the relative
Frobenius error of one conv layer's ``G ⊗ Ā`` against its exact block: ``ours`` (the bias GGN
``Σ(Σ_t u)(Σ_t u)ᵀ/(n|T|)`` with KFC's spatial-sum ``Ā``: BackPACK's factors), ``expand``
(KFC's ``Γ = Σ_t u_t u_tᵀ/(n|T|)`` with the same ``Ā``) and ``reduce`` (both factors from spatial
sums, ``Ā = Σ(Σ_t ā)(Σ_t ā)ᵀ/(n|T|²)``, Eschenhagen et al., NeurIPS 2023).

Usage::

    python benchmarks/curvature.py                       # ~1 minute on 2 shared CPU cores
    python benchmarks/curvature.py --out docs/kfac-accuracy   # also writes table.md there
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from hcc.curvature.diag import diag_operator
from hcc.curvature.kfac import kfac_operator
from hcc.curvature.layers import analyze_map, layer_sensitivities
from hcc.curvature.operators import exact_operator
from hcc.curvature.pytree import flatten

DT = torch.float64
LAM = 1e-2


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(4, 16), nn.LayerNorm(16)
        self.mid, self.out = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.inp(x))
        return self.out(h + torch.tanh(self.mid(h)))


#: name → (map factory, support shape, support sizes)
MAPS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "mlp 4-32-32-3 softmax": (lambda: nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                                     nn.Linear(32, 3), nn.Softmax(-1)), (4,), (1, 8, 64)),
    "conv generator 4→1×4×4": (lambda: nn.Sequential(
        nn.Linear(4, 32), nn.Unflatten(1, (2, 4, 4)), nn.Tanh(), nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 1, 3, padding=1), nn.Flatten()), (4,), (1, 8)),
    "conv discriminator 1×4×4→1 sigmoid": (lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 1), nn.Sigmoid()), (1, 4, 4), (1, 8)),
    "residual + LayerNorm 4-16-16-3 softmax": (lambda: nn.Sequential(Residual(), nn.Softmax(-1)), (4,), (1, 8)),
}


def build(factory: Callable[[], nn.Module], shape: tuple[int, ...], n: int, seed: int):
    torch.manual_seed(seed)
    net = factory().to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    x = torch.randn(n, *shape, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    return net, {k: v.detach().clone() for k, v in net.named_parameters()}, x


def block_index(s, params: dict[str, Tensor]) -> list[Tensor]:
    off, where = 0, {}
    for k, t in params.items():
        where[k] = torch.arange(off, off + t.numel())
        off += t.numel()
    return [torch.cat([where[k] for k in names]) for names in s.blocks()]


def cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def frob(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(factory, shape, n: int, seed: int) -> dict[str, float]:
    net, params, x = build(factory, shape, n, seed)
    s = analyze_map(net)
    ex = exact_operator(net, params, x, method="dense")
    A = ex.dense()
    k = net(x[:1]).reshape(1, -1).shape[1]
    r = torch.randn(n, k, dtype=DT, generator=torch.Generator().manual_seed(100 + seed))
    v = flatten(ex.field(r))
    lam = LAM * float(A.diagonal().mean())
    d_star, d_plus = flatten(ex.solve(residual=r, damping=lam)), flatten(ex.solve(residual=r))
    B = torch.zeros_like(A)
    for ix in block_index(s, params):
        B[ix[:, None], ix[None, :]] = A[ix[:, None], ix[None, :]]
    kop, dop = kfac_operator(s, params, x), diag_operator(s, params, x)
    dirs = {
        "kfac": flatten(kop.solve(residual=r, damping=LAM, scale="relative", split="pi")),
        "diag": flatten(dop.solve(residual=r, damping=LAM, scale="relative")),
        "blocks": torch.linalg.solve(B + lam * torch.eye(A.shape[0], dtype=DT), v),
    }
    mats = {"kfac": kop.dense(), "diag": dop.dense(), "blocks": B}
    out = {"M": A.shape[0], "nk": n * k}
    for name in dirs:
        out[f"frob {name}"] = frob(mats[name], A)
        out[f"cos {name}"] = cos(dirs[name], d_star)
        out[f"cos+ {name}"] = cos(dirs[name], d_plus)
    return out


def conv_conventions(factory, shape, n: int, seed: int) -> dict[str, list[float]]:
    """Per conv layer: the relative Frobenius error of its ``G ⊗ Ā`` under three conventions."""
    net, params, x = build(factory, shape, n, seed)
    s = analyze_map(net)
    A = exact_operator(net, params, x, method="dense").dense()
    _, inputs, U = layer_sensitivities(s, params, x, "l2", None)
    off, where = 0, {}
    for k, t in params.items():
        where[k] = torch.arange(off, off + t.numel()).view(t.shape)
        off += t.numel()
    out: dict[str, list[float]] = {}
    for layer in s.layers:
        if layer.kind != "conv2d":
            continue
        w, b = layer.params
        ix = torch.cat([where[w].reshape(where[w].shape[0], -1), where[b][:, None]], 1).reshape(-1)
        Ab = A[ix[:, None], ix[None, :]]
        X = layer.unfold(inputs[layer.prefix])
        X = torch.cat([X, torch.ones_like(X[:, :1])], 1)
        T = X.shape[-1]
        u = U[layer.prefix].flatten(3)
        omega = torch.einsum("nit,njt->ij", X, X) / n
        bias_ggn = torch.einsum("cno,cnp->op", u.sum(-1), u.sum(-1))
        kron = {
            "ours": torch.kron(bias_ggn / (n * T), omega),
            "expand": torch.kron(torch.einsum("cnot,cnpt->op", u, u) / (n * T), omega),
            "reduce": torch.kron(bias_ggn / n, torch.einsum("ni,nj->ij", X.sum(-1), X.sum(-1)) / (n * T * T)),
        }
        for name, K in kron.items():
            out.setdefault(f"layer {layer.prefix} {name}", []).append(frob(K, Ab))
    return out


def fmt(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.2f} [{min(vals):.2f}]"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1  [5]")
    ap.add_argument("--out", type=Path, default=None, help="also write table.md into this folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    cols = ["frob kfac", "frob blocks", "frob diag", "cos kfac", "cos blocks", "cos diag", "cos+ kfac", "cos+ diag"]
    lines = [f"K-FAC, exact blocks and diagonal against the exact metric (seeds 0-{args.seeds - 1}, mean [min]; "
             f"damping {LAM} relative)", "",
             "| map | M | n·k | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for name, (factory, shape, sizes) in MAPS.items():
        for n in sizes:
            rows = [measure(factory, shape, n, seed) for seed in seeds]
            cells = [fmt([r[c] for r in rows]) for c in cols]
            lines.append(f"| {name} | {rows[0]['M']} | {rows[0]['nk']} | " + " | ".join(cells) + " |")
    lines += ["", "A convolution's output factor: relative Frobenius error of one layer's G ⊗ Ā against its exact "
              "block (mean [min])", "", "| map | n | layer | ours (BackPACK) | KFC expand | reduce |",
              "|---|---|---|---|---|---|"]
    for name in ("conv generator 4→1×4×4", "conv discriminator 1×4×4→1 sigmoid"):
        factory, shape, sizes = MAPS[name]
        for n in sizes:
            errs: dict[str, list[float]] = {}
            for seed in seeds:
                for k, v in conv_conventions(factory, shape, n, seed).items():
                    errs.setdefault(k, []).extend(v)
            for prefix in sorted({k.split()[1] for k in errs}):
                cells = [fmt(errs[f"layer {prefix} {c}"]) for c in ("ours", "expand", "reduce")]
                lines.append(f"| {name} | {n} | {prefix} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text)


if __name__ == "__main__":
    main()
