"""Function-space tools for regularized matrix games on probability simplices.

The game is ``L(F, G) = Fᵀ M G + λ/2 (‖F − c_F‖² − ‖G − c_G‖²)`` with ``F ∈ Δ_m``,
``G ∈ Δ_k`` and ``c`` the uniform distributions. For ``λ > 0`` it is strongly
convex-concave with a unique saddle point; best responses are Euclidean
projections onto the simplex (Duchi et al., 2008).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog
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


def solve_matrix_game(M: Tensor, lam: float, tol: float = 1e-13, max_iter: int = 200_000) -> tuple[Tensor, Tensor]:
    """The function-space equilibrium ``(F*, G*)`` of the regularized matrix game.

    ``λ = 0``: the two linear programs of a zero-sum matrix game (scipy HiGHS); the
    returned point is *an* equilibrium (the set may not be a singleton).
    ``λ > 0``: projected extragradient in float64 (Korpelevich 1976) with step
    ``1/(2(‖M‖₂ + λ))``, which converges linearly for the strongly monotone
    operator, run until the duality gap is below ``tol``.
    """
    Md = M.detach().to(torch.float64).cpu()
    m, k = Md.shape
    if lam == 0:
        F, G = _lp_equilibrium(Md.numpy())
        return torch.from_numpy(F), torch.from_numpy(G)
    F = torch.full((1, m), 1.0 / m, dtype=torch.float64)
    G = torch.full((1, k), 1.0 / k, dtype=torch.float64)
    uF, uG = F.clone(), G.clone()
    h = 1.0 / (2 * (torch.linalg.matrix_norm(Md, 2).item() + lam))

    def field(F: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        return G @ Md.T + lam * (F - uF), -(F @ Md) + lam * (G - uG)

    for _ in range(max_iter):
        gF, gG = field(F, G)
        Fh, Gh = project_simplex(F - h * gF), project_simplex(G - h * gG)
        gF, gG = field(Fh, Gh)
        F, G = project_simplex(F - h * gF), project_simplex(G - h * gG)
        if matrix_game_gap(F, G, Md, lam).item() <= tol:
            break
    return F[0], G[0]


def _lp_equilibrium(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimax strategies of ``min_F max_G FᵀMG`` by linear programming."""
    m, k = M.shape
    # min player: min v s.t. (FᵀM)_j ≤ v ∀j, F ∈ Δ_m.  Variables (F, v).
    c = np.r_[np.zeros(m), 1.0]
    A_ub = np.c_[M.T, -np.ones(k)]
    A_eq = np.r_[np.ones(m), 0.0][None]
    r1 = linprog(c, A_ub=A_ub, b_ub=np.zeros(k), A_eq=A_eq, b_eq=[1.0],
                 bounds=[(0, None)] * m + [(None, None)], method="highs")
    # max player: max w s.t. (MG)_i ≥ w ∀i, G ∈ Δ_k.
    c2 = np.r_[np.zeros(k), -1.0]
    A_ub2 = np.c_[-M, np.ones(m)]
    A_eq2 = np.r_[np.ones(k), 0.0][None]
    r2 = linprog(c2, A_ub=A_ub2, b_ub=np.zeros(m), A_eq=A_eq2, b_eq=[1.0],
                 bounds=[(0, None)] * k + [(None, None)], method="highs")
    if not (r1.success and r2.success):
        raise RuntimeError(f"linear program failed: {r1.message} / {r2.message}")
    return r1.x[:m], r2.x[:k]
