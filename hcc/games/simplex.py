"""Function-space tools for regularized matrix games on probability simplices.

The game is ``L(F, G) = Fᵀ M G + λ/2 (‖F − c_F‖² − ‖G − c_G‖²)`` with ``F ∈ Δ_m``,
``G ∈ Δ_k`` and ``c`` the uniform distributions. For ``λ > 0`` it is strongly
convex-concave with a unique saddle point; best responses are Euclidean
projections onto the simplex (Duchi et al., 2008).
"""

from __future__ import annotations

import torch
from torch import Tensor


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex.

    Sort-based algorithm of Duchi, Shalev-Shwartz, Singer & Chandra (ICML 2008).
    """
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / idx) > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    tau = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return torch.clamp(v - tau, min=0)


def best_response_value(c: Tensor, lam: float, sign: float) -> Tensor:
    """``max_{G ∈ Δ} sign·(cᵀG) − λ/2 ‖G − u‖²`` per row of ``c`` (``u`` uniform).

    For ``λ = 0`` it is ``max_j sign·c_j``; otherwise the maximizer is
    ``Π_Δ(u + sign·c/λ)``.
    """
    k = c.shape[-1]
    s = sign * c
    if lam == 0:
        return s.max(-1).values
    u = torch.full_like(c, 1.0 / k)
    G = project_simplex(u + s / lam)
    return (s * G).sum(-1) - 0.5 * lam * (G - u).pow(2).sum(-1)


def matrix_game_gap(F: Tensor, G: Tensor, M: Tensor, lam: float) -> Tensor:
    """Duality gap ``max_G' L(F, G') − min_F' L(F', G)`` of the regularized matrix game.

    ``F: (n, m)``, ``G: (n, k)`` are one mixed strategy per support point; the gap is
    averaged over points. Non-negative, zero exactly at the equilibrium.
    """
    m, k = M.shape
    uF = 1.0 / m
    reg_F = 0.5 * lam * (F - uF).pow(2).sum(-1)
    reg_G = 0.5 * lam * (G - 1.0 / k).pow(2).sum(-1)
    # max over G' of FᵀMG' − λ/2‖G' − u‖² (the F-regularizer is a constant)
    best_max = best_response_value(F @ M, lam, +1.0) + reg_F
    # min over F' of F'ᵀMG + λ/2‖F' − u‖² = −max_F' (−MG)ᵀF' − λ/2‖F' − u‖²
    best_min = -best_response_value(G @ M.T, lam, -1.0) - reg_G
    return (best_max - best_min).mean()


def solve_matrix_game(M: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """The function-space equilibrium ``(F*, G*)`` of the regularized matrix game, in float64.

    Exact to round-off and certified (:func:`~hcc.games.equilibrium.certified_equilibrium`:
    Lemke's method and a KKT solve on the support for ``λ > 0``, linear programs refined on
    the support for ``λ = 0``, where the returned point is *an* equilibrium if the set is
    not a singleton).
    """
    from .equilibrium import certified_equilibrium  # it projects with project_simplex from here

    eq = certified_equilibrium(M.detach().to(torch.float64).cpu().numpy(), lam)
    return torch.from_numpy(eq.F), torch.from_numpy(eq.G)
