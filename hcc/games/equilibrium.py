r"""Certified equilibria of regularized matrix games, exact to round-off.

The game is

.. math::

    \min_{F ∈ Δ_m} \max_{G ∈ Δ_k}\; L(F, G) = Fᵀ M G + \tfrac{λ}{2}\big(‖F − u_m‖² − ‖G − u_k‖²\big),

``u`` uniform. Its saddle points are the solutions of the KKT system: with multipliers
``α, β`` of ``1ᵀF = 1``, ``1ᵀG = 1`` and ``μ, ν ≥ 0`` of ``F, G ≥ 0``,

.. math::

    (MG)_i + λ(F_i − 1/m) − α = μ_i,\quad β − (MᵀF)_j + λ(G_j − 1/k) = ν_j,\quad
    μ ⊥ F,\; ν ⊥ G.

Given the supports ``S = {F_i > 0}`` and ``T = {G_j > 0}`` this is a square linear system
in ``(F_S, G_T, α, β)``. :func:`certified_equilibrium` finds the supports by a finite
method, solves that system by a dense float64 solve and certifies the answer on the
full problem (no iteration stopped at a tolerance):

- ``λ > 0`` (strongly convex-concave, a unique saddle): the supports come from
  Lemke's complementary pivoting (Lemke 1965, lexicographic ratio test) on the
  monotone LCP below, which terminates with a solution for positive-semidefinite
  LCPs (Cottle, Pang & Stone, *The Linear Complementarity Problem*, 1992, Thm 4.4.13).
  The certificate bounds the distance to the saddle by the natural-map error bound
  for a ``λ``-strongly monotone, ``L``-Lipschitz field ``v`` (Pang 1987; Facchinei &
  Pang 2003, §6.3): ``‖x − x*‖ ≤ (1 + L)/λ · ‖x − Π(x − v(x))‖``.
- ``λ = 0``: the two linear programs of the game (scipy's HiGHS), refined on the
  supports by the (square, when the game is nondegenerate) system of equalized payoffs.
  Uniqueness: strict complementarity and a nonsingular bordered kernel imply a unique
  equilibrium (every optimal strategy is then a best response supported on ``S``
  that equalizes the payoffs on ``T``; Bohnenblust, Karlin & Shapley 1950); when that
  sufficient condition fails, linear programs over the optimal faces decide
  (the range of every coordinate over the set of optimal strategies).

>>> import numpy as np
>>> eq = certified_equilibrium(np.array([[3.0, -1.0], [-2.0, 1.0]]), 0.1)
>>> eq.certificate.distance_bound < 1e-12
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linprog

from .simplex import project_simplex

#: KKT residuals and sign violations up to this (relative to the payoff's scale) certify a point
CERT_TOL = 1e-12


class CertificationError(RuntimeError):
    """The computed point failed its certificate (a degenerate or ill-conditioned game)."""


@dataclass(frozen=True)
class Certificate:
    """What was checked about an equilibrium.

    ``residual``: the largest violation, over the whole KKT system, of stationarity on the
    supports, sign of the multipliers off them, and feasibility. ``margin``: the strict
    complementarity margin ``min(F_S, G_T, μ off S, ν off T)`` (> 0: nondegenerate).
    ``distance_bound``: a bound on ``‖(F, G) − (F*, G*)‖₂`` (``λ > 0``; ``None`` for λ = 0).
    ``unique``: whether the equilibrium is unique, and ``uniqueness`` says why.
    """

    method: str
    lam: float
    shape: tuple[int, int]
    support: tuple[int, int]
    residual: float
    margin: float
    distance_bound: float | None
    unique: bool
    uniqueness: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Equilibrium:
    """``(F*, G*)`` in float64, the game's value ``L(F*, G*)`` and its :class:`Certificate`."""

    F: np.ndarray
    G: np.ndarray
    value: float
    certificate: Certificate


def certified_equilibrium(M: np.ndarray, lam: float, tol: float = CERT_TOL) -> Equilibrium:
    """The equilibrium of the ``λ``-regularized matrix game ``M`` (min player's rows), certified.

    Raises :class:`CertificationError` when the point found does not pass its certificate
    at ``tol`` (relative to ``max|M| + λ``), naming what failed.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.size == 0 or not np.isfinite(M).all():
        raise ValueError(f"payoff: expected a finite non-empty 2-d matrix, got shape {M.shape}")
    if lam < 0:
        raise ValueError(f"lam: expected λ ≥ 0, got {lam}")
    scale = float(np.abs(M).max()) + lam
    atol = tol * max(scale, 1.0)
    return _regularized(M, lam, atol) if lam > 0 else _zero_sum(M, atol)


# -- λ > 0 ------------------------------------------------------------------------------------------


def _regularized(M: np.ndarray, lam: float, atol: float) -> Equilibrium:
    m, k = M.shape
    c = _shift(M, lam)
    z = lemke(*_saddle_lcp(M, lam))
    # supports: the complementary pairs that Lemke's method left with the primal variable on top
    mu, nu = _multipliers(M, lam, z[:m], z[m:m + k], z[m + k] - c, z[m + k + 1] - c)
    S, T = z[:m] > mu, z[m:m + k] > nu
    for _ in range(m + k):  # they certify at once unless round-off misplaced a near-tie: then repair
        F, G, alpha, beta = _solve_on_support(M, lam, S, T)
        mu, nu = _multipliers(M, lam, F, G, alpha, beta)
        resid = max(np.abs(mu[S]).max(), np.abs(nu[T]).max(), _sign_violation(F, G, mu, nu, S, T))
        if resid <= atol:
            break
        S, T = np.where(S, F >= -atol, mu < -atol), np.where(T, G >= -atol, nu < -atol)
        if not (S.any() and T.any()):
            break
    if not resid <= atol:
        raise CertificationError(f"λ = {lam}: the KKT system on the supports found by Lemke's method has residual "
                                 f"{resid:.3g} > {atol:.3g} (a degenerate or ill-conditioned game)")
    margin = float(min(F[S].min(), G[T].min(), _min_or_inf(mu[~S]), _min_or_inf(nu[~T])))
    L = float(np.hypot(lam, np.linalg.norm(M, 2)))
    bound = (1.0 + L) / lam * _natural_residual(M, lam, F, G)
    cert = Certificate("lemke + KKT solve on the support", lam, (m, k), (int(S.sum()), int(T.sum())), float(resid),
                       margin, float(bound), True, "λ > 0: strongly convex-concave")
    return Equilibrium(F, G, _value(M, lam, F, G), cert)


def _shift(M: np.ndarray, lam: float) -> float:
    """A constant added to ``M`` so that both multipliers ``α, β`` are ≥ 1 at the saddle."""
    return 1.0 + lam - float(M.min())


def _saddle_lcp(M: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    r"""``(Q, q)`` of the LCP ``w = Qz + q ≥ 0 ⊥ z ≥ 0``, ``z = (F, G, α, β)``, of the shifted game.

    .. math::

        w = \begin{pmatrix} λI & M' & −1 & 0\\ −M'ᵀ & λI & 0 & 1\\ 1ᵀ & 0 & 0 & 0\\ 0 & −1ᵀ & 0 & 0
        \end{pmatrix} z + \begin{pmatrix} −λu_m \\ −λu_k \\ −1 \\ 1\end{pmatrix},\qquad M' = M + c\,11ᵀ.

    ``Q + Qᵀ = diag(2λI, 2λI, 0, 0) ⪰ 0``: a monotone LCP. With ``c`` from :func:`_shift` every
    solution has ``α, β > 0``, hence ``1ᵀF = 1ᵀG = 1``: the saddle of ``M'``, which is that of
    ``M`` (the shift adds ``c`` to ``L`` on the simplices) with multipliers moved by ``c``.
    """
    m, k = M.shape
    Ms = M + _shift(M, lam)
    n = m + k + 2
    Q = np.zeros((n, n))
    Q[:m, :m] = lam * np.eye(m)
    Q[:m, m:m + k] = Ms
    Q[:m, m + k] = -1.0
    Q[m:m + k, :m] = -Ms.T
    Q[m:m + k, m:m + k] = lam * np.eye(k)
    Q[m:m + k, m + k + 1] = 1.0
    Q[m + k, :m] = 1.0
    Q[m + k + 1, m:m + k] = -1.0
    q = np.r_[np.full(m, -lam / m), np.full(k, -lam / k), -1.0, 1.0]
    return Q, q


def lemke(Q: np.ndarray, q: np.ndarray, max_pivots: int | None = None) -> np.ndarray:
    """A solution ``z`` of the LCP ``w = Qz + q ≥ 0, z ≥ 0, zᵀw = 0`` by Lemke's method.

    Covering vector ``1``; the lexicographic minimum-ratio rule (rows of ``B⁻¹``) rules out
    cycling on degenerate problems. Terminates with a solution for positive-semidefinite
    ``Q`` when the LCP is feasible; raises :class:`CertificationError` on ray termination.
    """
    n = q.size
    if (q >= 0).all():
        return np.zeros(n)
    # tableau [B⁻¹ | B⁻¹(−Q) | B⁻¹(−1) | B⁻¹q]; columns 0..n-1: w, n..2n-1: z, 2n: z0
    T = np.c_[np.eye(n), -Q, -np.ones(n), q]
    basis = np.arange(n)
    rhs = 2 * n + 1
    row = _lex_min_rows(T, np.flatnonzero(q == q.min()), -np.ones(n), n)
    entering = 2 * n
    for _ in range(max_pivots or 50 * n):
        _pivot(T, row, entering)
        leaving, basis[row] = basis[row], entering
        if leaving == 2 * n:
            z = np.zeros(2 * n + 1)
            z[basis] = T[:, rhs]
            return np.maximum(z[n:2 * n], 0.0)
        entering = leaving + n if leaving < n else leaving - n  # the complement of the leaving variable
        col = T[:, entering]
        cand = np.flatnonzero(col > 1e-12 * max(1.0, np.abs(col).max()))
        if cand.size == 0:
            raise CertificationError("Lemke's method ended on a secondary ray (the LCP has no solution it can reach)")
        ratios = T[cand, rhs] / col[cand]
        tie = cand[ratios <= ratios.min() + 1e-12 * (1.0 + abs(ratios.min()))]
        row = _lex_min_rows(T, tie, col, n)
    raise CertificationError(f"Lemke's method did not terminate within {max_pivots or 50 * n} pivots")


def _lex_min_rows(T: np.ndarray, rows: np.ndarray, col: np.ndarray, n: int) -> int:
    """The row of ``rows`` whose ``B⁻¹`` row divided by ``col`` is lexicographically smallest."""
    for j in range(n):
        if rows.size == 1:
            break
        vals = T[rows, j] / col[rows]
        rows = rows[vals <= vals.min() + 1e-12 * (1.0 + abs(vals.min()))]
    return int(rows[0])


def _pivot(T: np.ndarray, row: int, col: int) -> None:
    T[row] /= T[row, col]
    others = np.arange(T.shape[0]) != row
    T[others] -= np.outer(T[others, col], T[row])


def _solve_on_support(M: np.ndarray, lam: float, S: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(F, G, α, β)`` from the KKT equalities with ``F`` zero off ``S`` and ``G`` zero off ``T``.

    ``[[λI, M_ST, −1, 0], [M_STᵀ, −λI, 0, −1], [1ᵀ, 0, 0, 0], [0, 1ᵀ, 0, 0]]``: nonsingular for
    ``λ > 0`` (a quasi-definite block with full-rank constraints).
    """
    m, k = M.shape
    s, t = int(S.sum()), int(T.sum())
    A = np.zeros((s + t + 2, s + t + 2))
    A[:s, :s] = lam * np.eye(s)
    A[:s, s:s + t] = M[np.ix_(S, T)]
    A[:s, s + t] = -1.0
    A[s:s + t, :s] = M[np.ix_(S, T)].T
    A[s:s + t, s:s + t] = -lam * np.eye(t)
    A[s:s + t, s + t + 1] = -1.0
    A[s + t, :s] = 1.0
    A[s + t + 1, s:s + t] = 1.0
    b = np.r_[np.full(s, lam / m), np.full(t, -lam / k), 1.0, 1.0]
    x = np.linalg.solve(A, b)
    F, G = np.zeros(m), np.zeros(k)
    F[S], G[T] = x[:s], x[s:s + t]
    return F, G, x[s + t], x[s + t + 1]


def _multipliers(M: np.ndarray, lam: float, F: np.ndarray, G: np.ndarray, alpha: float,
                 beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``μ = MG + λ(F − u) − α`` and ``ν = β − MᵀF + λ(G − u)`` (both ≥ 0 at the saddle, 0 on the supports)."""
    m, k = M.shape
    return M @ G + lam * (F - 1.0 / m) - alpha, beta - M.T @ F + lam * (G - 1.0 / k)


def _sign_violation(F: np.ndarray, G: np.ndarray, mu: np.ndarray, nu: np.ndarray, S: np.ndarray,
                    T: np.ndarray) -> float:
    """The largest negative part of ``F_S, G_T`` and of the multipliers off the supports."""
    parts = [-F[S], -G[T], -mu[~S], -nu[~T], [0.0]]
    return float(max(np.max(p, initial=0.0) for p in parts))


def _natural_residual(M: np.ndarray, lam: float, F: np.ndarray, G: np.ndarray) -> float:
    """``‖x − Π(x − v(x))‖₂`` for the field ``v = (MG + λ(F − u), −MᵀF + λ(G − u))``."""
    m, k = M.shape
    step = [F - (M @ G + lam * (F - 1.0 / m)), G - (-M.T @ F + lam * (G - 1.0 / k))]
    rF, rG = (x - project_simplex(torch.from_numpy(y)).numpy() for x, y in zip((F, G), step))
    return float(np.sqrt(rF @ rF + rG @ rG))


def _value(M: np.ndarray, lam: float, F: np.ndarray, G: np.ndarray) -> float:
    m, k = M.shape
    return float(F @ M @ G + 0.5 * lam * (np.sum((F - 1 / m) ** 2) - np.sum((G - 1 / k) ** 2)))


def _min_or_inf(x: np.ndarray) -> float:
    return float(x.min()) if x.size else float("inf")


# -- λ = 0 ------------------------------------------------------------------------------------------


def _zero_sum(M: np.ndarray, atol: float) -> Equilibrium:
    m, k = M.shape
    F0, G0 = lp_equilibrium(M)
    lp_tol = 1e-7 * max(1.0, float(np.abs(M).max()))  # HiGHS's feasibility tolerance, scaled
    try:
        F, G, value, resid = _equalize(M, F0, G0, lp_tol, atol)
        method = "linear programs (HiGHS) + equalizer solve on the support"
    except CertificationError as e:  # keep the LP's point, and say so
        F, G, value = F0 / F0.sum(), G0 / G0.sum(), float(F0 @ M @ G0)
        resid, method = _zero_sum_residual(M, F, G, value, value), f"linear programs (HiGHS), not refined: {e}"
    S, T = F > atol, G > atol
    rowpay, colpay = M @ G, M.T @ F
    margin = float(min(F[S].min(), G[T].min(), _min_or_inf(rowpay[~S] - value), _min_or_inf(value - colpay[~T])))
    if margin > atol and S.sum() == T.sum() and _nonsingular(_bordered(M[np.ix_(S, T)])):
        unique, why = True, "strictly complementary with a nonsingular square kernel"
    else:
        unique = _optimal_sets_are_points(M, value, lp_tol)
        why = f"linear programs over the sets of optimal strategies ({'points' if unique else 'not points'})"
    cert = Certificate(method, 0.0, (m, k), (int(S.sum()), int(T.sum())), resid, margin, None, unique, why)
    return Equilibrium(F, G, value, cert)


def _equalize(M: np.ndarray, F0: np.ndarray, G0: np.ndarray, lp_tol: float,
              atol: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The LP's point refined: each player's strategy on its support solving the equalized payoffs.

    ``F`` on ``S`` with ``(MᵀF)_j = v`` for ``j`` in the opponent's support ``T`` (then, if that
    does not certify, in the set of its best responses), and likewise ``G``; exact when the
    system has full column rank, which it has at a nondegenerate equilibrium.
    """
    v0 = float(F0 @ M @ G0)
    S, T = F0 > lp_tol, G0 > lp_tol
    best_rows, best_cols = M @ G0 <= v0 + lp_tol, M.T @ F0 >= v0 - lp_tol
    resid = np.inf
    for rows, cols in ((S, T), (best_rows, best_cols)):
        F, vF = _equalizer(M.T[np.ix_(cols, S)], S)
        G, vG = _equalizer(M[np.ix_(rows, T)], T)
        resid = _zero_sum_residual(M, F, G, vF, vG)
        if resid <= atol:
            return F, G, 0.5 * (vF + vG), resid
    raise CertificationError(f"the equalizing strategies on the LP's supports miss the equilibrium conditions "
                             f"by {resid:.3g} > {atol:.3g}")


def _zero_sum_residual(M: np.ndarray, F: np.ndarray, G: np.ndarray, vF: float, vG: float) -> float:
    """Largest violation of: both values equal, no profitable deviation, ``F, G ∈ Δ``."""
    value = 0.5 * (vF + vG)
    return float(max(abs(vF - vG), value - (M @ G).min(), (M.T @ F).max() - value, -F.min(), -G.min(),
                     abs(F.sum() - 1), abs(G.sum() - 1)))


def lp_equilibrium(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimax strategies of ``min_F max_G FᵀMG`` by linear programming (HiGHS)."""
    # min player: min_F max_j (MᵀF)_j; max player: max_G min_i (MG)_i = −min_G max_i (−MG)_i
    return _lp_player(M.T), _lp_player(-M)


def _lp_player(A: np.ndarray) -> np.ndarray:
    """``argmin_{x ∈ Δ} max_j (A x)_j`` (``A`` is ``k × m``): ``min t`` s.t. ``Ax ≤ t·1``."""
    k, m = A.shape
    res = linprog(np.r_[np.zeros(m), 1.0], A_ub=np.c_[A, -np.ones(k)], b_ub=np.zeros(k),
                  A_eq=np.r_[np.ones(m), 0.0][None], b_eq=[1.0], bounds=[(0, None)] * m + [(None, None)],
                  method="highs")
    if not res.success:
        raise CertificationError(f"linear program failed: {res.message}")
    return np.maximum(res.x[:m], 0.0)


def _bordered(A: np.ndarray) -> np.ndarray:
    """``[[A, −1], [1ᵀ, 0]]``: the equalizer system of a support pair."""
    r, c = A.shape
    return np.block([[A, -np.ones((r, 1))], [np.ones((1, c)), np.zeros((1, 1))]])


def _nonsingular(A: np.ndarray) -> bool:
    return A.shape[0] == A.shape[1] and np.linalg.cond(A) < 1e10


def _equalizer(A: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, float]:
    """``x`` on ``support`` with ``A x_S = v·1`` and ``1ᵀx = 1``, and ``v``: least squares on the
    bordered system (its solution when consistent and of full column rank)."""
    sol, *_ = np.linalg.lstsq(_bordered(A), np.r_[np.zeros(A.shape[0]), 1.0], rcond=None)
    x = np.zeros(support.size)
    x[support] = sol[:-1]
    return x, float(sol[-1])


def _optimal_sets_are_points(M: np.ndarray, value: float, lp_tol: float) -> bool:
    """Whether each player's set of optimal strategies is one point: every coordinate's range over
    ``{F ∈ Δ: MᵀF ≤ v}`` and ``{G ∈ Δ: −MG ≤ −v}`` (constraints relaxed by ``lp_tol``) is ≤ 1e-6."""
    for A, b in ((M.T, value + lp_tol), (-M, -value + lp_tol)):
        k, m = A.shape
        for i in range(m):
            ends = []
            for sign in (1.0, -1.0):
                res = linprog(sign * np.eye(m)[i], A_ub=A, b_ub=np.full(k, b), A_eq=np.ones((1, m)), b_eq=[1.0],
                              bounds=[(0, None)] * m, method="highs")
                if not res.success:
                    raise CertificationError(f"uniqueness linear program failed: {res.message}")
                ends.append(res.x[i])
            if abs(ends[0] - ends[1]) > 1e-6:
                return False
    return True


__all__ = ["CERT_TOL", "Certificate", "CertificationError", "Equilibrium", "certified_equilibrium", "lemke",
           "lp_equilibrium"]
