r"""The sequence form of a two-player zero-sum extensive-form game, vectorised in torch.

A player's strategies in an extensive-form game with perfect recall are its
*realization plans* (Koller, Megiddo & von Stengel, *Fast algorithms for finding
randomized strategies in game trees*, STOC 1994; von Stengel, *Efficient computation
of behavior strategies*, GEB 1996): one number per *sequence* (an information set
``I`` and one of its actions ``a``, plus the empty sequence ``∅``),

.. math::

    x_∅ = 1, \qquad x_{Ia} = x_{σ(I)}\, b_I(a),

with ``σ(I)`` the player's last sequence before ``I`` and ``b_I`` its behaviour (a
distribution over the legal actions of ``I``). The plans form a polytope, the
*treeplex* ``X = {x ≥ 0 : E x = e}`` (``x_∅ = 1`` and ``Σ_a x_{Ia} = x_{σ(I)}``), and the
expected payoff is bilinear in the plans: with ``A_{st}`` the chance-weighted sum of
the payoffs of the leaves reached by the pair of sequences ``(s, t)``,

.. math::

    u(x, y) = xᵀ A y .

So a zero-sum game is the bilinear saddle problem ``min_{x∈X} max_{y∈Y} xᵀAy``, and a
policy that maps behaviours to plans through the smooth products above makes it a
hidden convex-concave game.

:class:`Treeplex` holds one player's tree as numpy index arrays (constraints, depths,
ancestors); :class:`TreeplexIndex` holds them as torch buffers and evaluates, without a
Python loop over information sets (one gather or scatter per *depth* of the tree):

- :meth:`TreeplexIndex.realize`: behaviours ``(n_infosets, K)`` → plan (differentiable);
- :meth:`TreeplexIndex.plan`: realization rows ``(n_infosets, K)`` → plan (a gather);
- :meth:`TreeplexIndex.best_response`: ``max_{x∈X} uᵀx`` by backward induction over the
  treeplex (the value of an information set is the best action's value plus the values
  of the information sets that follow it).

:class:`RealizationMap` makes the plan a per-information-set strategy map, and
:func:`solve_lp` finds an equilibrium by the sequence-form linear program
(von Stengel 1996, Theorem 4.1; scipy's HiGHS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linprog
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class Treeplex:
    """One player's sequences as index arrays.

    Sequence ``0`` is the empty sequence; information sets are ``0 … n_infosets−1``
    (the player's decision points, without a root) and actions are slots
    ``0 … K−1``. ``seq[i, a]`` is the sequence of action ``a`` at information set ``i``
    (``−1`` where ``a`` is illegal there); ``parent[i]`` is ``σ(i)``, the sequence
    that leads to ``i``.
    """

    #: ``(n_infosets, K)`` int64, sequence id of each legal (infoset, action), −1 where illegal
    seq: np.ndarray
    #: ``(n_infosets,)`` int64, the parent sequence of each information set
    parent: np.ndarray
    #: ``(n_infosets,)`` the number of the player's own decisions before each information set (derived)
    depth: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n, _ = self.seq.shape
        legal = self.seq[self.seq >= 0]
        if self.parent.shape != (n,):
            raise ValueError(f"Treeplex: expected parent of shape ({n},), got {self.parent.shape}")
        if not (self.seq >= 0).any(axis=1).all():
            raise ValueError("Treeplex: every information set needs a legal action")
        if sorted(legal.tolist()) != list(range(1, self.n_sequences)):
            raise ValueError("Treeplex: expected the legal (infoset, action) pairs to number the sequences 1…S−1")
        # depth(i) = 0 below the root, else 1 + depth(the information set owning σ(i))
        up = np.maximum(self.owner[self.parent], 0)
        depth = np.where(self.parent == 0, 0, -1)
        for _ in range(n):
            new = np.where((self.parent != 0) & (depth[up] >= 0), depth[up] + 1, depth)
            if np.array_equal(new, depth):
                break
            depth = new
        if (depth < 0).any():
            raise ValueError("Treeplex: the parent sequences do not form a tree")
        object.__setattr__(self, "depth", depth)

    @property
    def n_infosets(self) -> int:
        return self.seq.shape[0]

    @property
    def n_actions(self) -> int:
        return self.seq.shape[1]

    @property
    def n_sequences(self) -> int:
        return int(self.seq.max()) + 1

    @property
    def mask(self) -> np.ndarray:
        """``(n_infosets, K)`` bool: the legal actions."""
        return self.seq >= 0

    @property
    def owner(self) -> np.ndarray:
        """``(S,)`` the information set each sequence belongs to (−1 for ``∅``)."""
        out = np.full(self.n_sequences, -1)
        i, _ = np.nonzero(self.mask)
        out[self.seq[self.mask]] = i
        return out

    @property
    def n_levels(self) -> int:
        return int(self.depth.max()) + 1

    def levels(self) -> list[np.ndarray]:
        """The information sets at each depth, the root's first."""
        return [np.nonzero(self.depth == d)[0] for d in range(self.n_levels)]

    def ancestors(self) -> np.ndarray:
        """``(n_infosets, D, 2)``: for each information set its own earlier decisions
        ``(infoset, action)``, nearest first, padded with ``(−1, −1)``; ``D = n_levels − 1``."""
        owner, act = self.owner, np.full(self.n_sequences, -1)
        act[self.seq[self.mask]] = np.nonzero(self.mask)[1]
        D = max(self.n_levels - 1, 0)
        out = np.full((self.n_infosets, D, 2), -1)
        s = self.parent.copy()
        for d in range(D):
            live = s > 0
            out[live, d, 0], out[live, d, 1] = owner[s[live]], act[s[live]]
            s = np.where(live, self.parent[np.maximum(owner[s], 0)], 0)
        return out

    def constraints(self) -> tuple[sparse.csr_matrix, np.ndarray]:
        """``(E, e)`` with ``X = {x ≥ 0 : Ex = e}``: row 0 is ``x_∅ = 1``, row ``1+i`` is
        ``Σ_a x_{ia} − x_{σ(i)} = 0``."""
        n, S = self.n_infosets, self.n_sequences
        i, a = np.nonzero(self.mask)
        rows = np.r_[0, 1 + i, 1 + np.arange(n)]
        cols = np.r_[0, self.seq[i, a], self.parent]
        vals = np.r_[1.0, np.ones(len(i)), -np.ones(n)]
        E = sparse.csr_matrix((vals, (rows, cols)), shape=(n + 1, S))
        e = np.zeros(n + 1)
        e[0] = 1.0
        return E, e



class TreeplexIndex(nn.Module):
    """A :class:`Treeplex` as torch index buffers (built once; they move with ``.to(device)``
    and keep their integer dtype under ``.to(dtype)``), and the three treeplex operations."""

    def __init__(self, tp: Treeplex) -> None:
        super().__init__()
        self.n_sequences, self.n_actions, self.n_levels = tp.n_sequences, tp.n_actions, tp.n_levels
        self.n_infosets = tp.n_infosets
        K = tp.n_actions
        i, a = np.nonzero(tp.mask)
        flat = np.zeros(tp.n_sequences, dtype=np.int64)
        flat[tp.seq[i, a]] = i * K + a
        self._buffer("flat_of_seq", flat[1:])
        for d, idx in enumerate(tp.levels()):
            ii, aa = np.nonzero(tp.mask[idx])
            inf = idx[ii]
            self._buffer(f"flat{d}", inf * K + aa)  # (infoset, action) pairs at depth d, flat
            self._buffer(f"seq{d}", tp.seq[inf, aa])  # their sequences
            self._buffer(f"parent{d}", tp.parent[inf])  # their parents' sequences
            self._buffer(f"infoset_parent{d}", tp.parent[idx])  # σ(i) of the depth-d infosets
            self._buffer(f"table{d}", tp.seq[idx])  # (n_d, K) their sequences, −1 where illegal
            self._buffer(f"infosets{d}", idx)  # the depth-d information sets

    def _buffer(self, name: str, value: np.ndarray) -> None:
        self.register_buffer(name, torch.as_tensor(np.asarray(value, dtype=np.int64)), persistent=False)

    def _level(self, kind: str, d: int) -> Tensor:
        return getattr(self, f"{kind}{d}")

    def realize(self, b: Tensor) -> Tensor:
        r"""The realization plan ``x ∈ R^S`` of behaviours ``b`` (``(n_infosets, K)``, rows on the
        simplex of the legal actions): ``x_∅ = 1``, ``x_{ia} = x_{σ(i)} b_i(a)``, one product per
        depth, differentiable in ``b``."""
        flat = b.reshape(-1)
        x = torch.cat([b.new_ones(1), b.new_zeros(self.n_sequences - 1)])
        for d in range(self.n_levels):  # the parents of depth-d sequences have depth < d: filled in
            parent = x.index_select(0, self._level("parent", d))
            x = x.index_put((self._level("seq", d),), parent * flat.index_select(0, self._level("flat", d)))
        return x

    def plan(self, F: Tensor) -> Tensor:
        """The plan whose entry ``x_{ia}`` is ``F[i, a]`` (realization rows, ``(n_infosets, K)``)."""
        return torch.cat([F.new_ones(1), F.reshape(-1).index_select(0, self.flat_of_seq)])

    def best_response(self, u: Tensor) -> Tensor:
        r"""``max_{x ∈ X} uᵀx`` for a utility per sequence ``u ∈ R^S``, by backward induction:

        .. math::

            V(s) = u_s + \sum_{i:\, σ(i) = s} \max_a V(ia), \qquad \max_{x∈X} uᵀx = V(∅).
        """
        V = u
        for d in reversed(range(self.n_levels)):
            table = self._level("table", d)
            vals = torch.where(table >= 0, V[table.clamp(min=0)], -torch.inf)
            V = V.index_add(0, self._level("infoset_parent", d), vals.max(-1).values)
        return V[0]

    def dilated_prox(self, q: Tensor, logw: Tensor, scale: float) -> Tensor:
        r"""The behaviours of the dilated-entropy proximal problem

        .. math::

            \min_{x∈X}\; qᵀx + \sum_i x_{σ(i)} \sum_a b_i(a)\big(s \log b_i(a) − \mathrm{logw}_{ia}\big),

        ``q ∈ R^S`` a cost per sequence, ``logw`` ``(n_infosets, K)`` log-weights, ``s = scale > 0``. With
        ``logw = s·log w`` it is ``qᵀx + s·D(x‖w)``, ``D`` the Bregman divergence of the dilated entropy,
        ``Σ_i x_{σ(i)} KL(b_i ‖ w_i)`` (Hoda, Gilpin, Peña & Sandholm, *Smoothing techniques for computing
        Nash equilibria of sequential games*, Math. OR 2010; Kroer, Waugh, Kılınç-Karzan & Sandholm,
        *Faster algorithms for extensive-form game solving via improved smoothing functions*, Math. Prog.
        2020); a sum of such divergences with coefficients adding up to ``s`` is the same form. The
        minimization decouples by backward induction:

        .. math::

            b_i(a) ∝ \exp\big((\mathrm{logw}_{ia} − Q_{ia}) / s\big), \qquad
            V_i = −s \log \sum_a \exp\big((\mathrm{logw}_{ia} − Q_{ia}) / s\big),

        ``Q_{ia} = q_{ia} + Σ_{j: σ(j) = ia} V_j`` (the information sets that follow ``ia``, solved
        first). Returns ``(n_infosets, K)`` behaviours, 0 on illegal actions.
        """
        W = q
        b = logw.new_zeros(self.n_infosets, self.n_actions)
        for d in reversed(range(self.n_levels)):
            table, inf = self._level("table", d), self._level("infosets", d)
            a = torch.where(table >= 0, (logw[inf] - W[table.clamp(min=0)]) / scale, -torch.inf)
            lse = torch.logsumexp(a, -1)
            b = b.index_put((inf,), torch.exp(a - lse[:, None]))
            W = W.index_add(0, self._level("infoset_parent", d), -scale * lse)
        return b


def log_behaviour(b: Tensor) -> Tensor:
    """``log b``, bounded below by the log of the dtype's smallest normal number: a probability that
    underflowed to 0 stays the least likely action (the prox ignores the illegal entries)."""
    return b.clamp_min(torch.finfo(b.dtype).tiny).log()


def mirror_prox_step(C: Tensor) -> float:
    """``5/‖C‖₂``, the default step of :func:`dilated_proximal_point` (measured stable on Kuhn and Leduc
    poker; ``15/‖C‖₂`` diverges on Leduc)."""
    return 5.0 / float(torch.linalg.matrix_norm(C, 2))


@dataclass(frozen=True)
class ProximalSolution:
    """What :func:`dilated_proximal_point` returns."""

    #: the behaviours of the two players at the proximal point
    behaviours: tuple[Tensor, Tensor]
    iterations: int
    #: the last iteration's largest change of a behaviour probability
    residual: float


def dilated_proximal_point(
    C: Tensor, plans: tuple[TreeplexIndex, TreeplexIndex], centre: tuple[Tensor, Tensor], eta: float, *,
    step: float | None = None, iters: int = 3000, tol: float = 1e-7, start: tuple[Tensor, Tensor] | None = None,
) -> ProximalSolution:
    r"""The proximal point of the sequence-form game ``min_x max_y xᵀCy`` in the dilated-entropy geometry.

    The saddle point of the regularized game

    .. math::

        \min_{x∈X}\max_{y∈Y}\; xᵀCy + \tfrac1η D(x‖\hat x) − \tfrac1η D(y‖\hat y),

    ``D`` the dilated KL of :meth:`TreeplexIndex.dilated_prox` and ``(\hat x, \hat y)`` the plans of the
    behaviours ``centre``: one implicit step of the Bregman proximal point method (Rockafellar 1976;
    Censor & Zenios 1992) on the bilinear treeplex game, the function-space game of a neural policy.
    Unlike an implicit step in the behaviours (where the payoff is multilinear, not convex-concave) this
    problem is strongly convex-concave, so it has one solution and a first-order method finds it: mirror
    prox (Nemirovski 2004) in the same geometry, each half step a closed-form dilated prox

    .. math::

        x' = \arg\min_{x∈X} γ\,gᵀx + \tfrac{γ}{η} D(x‖\hat x) + D(x‖x_t)

    (``logw = (γ/η)\log \hat b + \log b_t``, ``s = 1 + γ/η``), from ``start`` (default the centre) until no
    behaviour probability moves by more than ``tol`` in an iteration, or ``iters`` iterations. The step
    ``γ`` defaults to :func:`mirror_prox_step` of ``C``.
    """
    gamma = mirror_prox_step(C) if step is None else step
    a = gamma / eta
    s = 1.0 + a
    anchors = tuple(a * log_behaviour(c) for c in centre)
    b = tuple(c.clone() for c in (start if start is not None else centre))
    x_plan, y_plan = plans

    def half(bx: Tensor, by: Tensor, base: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = x_plan.realize(bx), y_plan.realize(by)
        gx, gy = C @ y, -(C.T @ x)  # x descends xᵀCy, y descends −xᵀCy
        return tuple(  # type: ignore[return-value]
            plan.dilated_prox(gamma * g, anchor + log_behaviour(b0), s)
            for plan, g, anchor, b0 in zip(plans, (gx, gy), anchors, base, strict=True)
        )

    residual, it = float("inf"), 0
    while it < iters:
        it += 1
        mid = half(*b, b)
        new = half(*mid, b)
        residual = max(float((n - o).abs().max()) for n, o in zip(new, b, strict=True))
        b = new
        if residual <= tol:
            break
    return ProximalSolution(b, it, residual)


def solve_lp(A: np.ndarray, tp_x: Treeplex, tp_y: Treeplex) -> tuple[float, np.ndarray, np.ndarray]:
    r"""``(v, x*, y*)`` with ``v = max_{x∈X} min_{y∈Y} xᵀAy = min_y max_x xᵀAy``.

    The row player maximizes ``xᵀAy``. Dualizing the inner ``min_y {(Aᵀx)ᵀy : Fy = f, y ≥ 0}``
    gives the linear program (von Stengel 1996, Theorem 4.1)

    .. math::

        \max_{x, q}\; fᵀq \quad \text{s.t.}\quad Fᵀq ≤ Aᵀx,\; Ex = e,\; x ≥ 0,

    and symmetrically for ``y``. Both are solved with scipy's HiGHS on sparse matrices.
    """
    x, v_x = _lp_side(sparse.csr_matrix(A), tp_x, tp_y)
    y, v_y = _lp_side(sparse.csr_matrix(-A.T), tp_y, tp_x)
    if abs(v_x + v_y) > 1e-7 * max(1.0, abs(v_x)):
        raise RuntimeError(f"sequence-form LP: the two sides disagree (max-min {v_x}, min-max {-v_y})")
    return v_x, x, y


def _lp_side(A: sparse.csr_matrix, tp_x: Treeplex, tp_y: Treeplex) -> tuple[np.ndarray, float]:
    """``max_x min_y xᵀAy`` and a maximizer ``x``."""
    E, e = tp_x.constraints()
    F, f = tp_y.constraints()
    nx, nq = E.shape[1], F.shape[0]
    c = np.r_[np.zeros(nx), -f]  # minimize −fᵀq
    A_ub = sparse.hstack([-A.T, F.T]).tocsr()  # Fᵀq − Aᵀx ≤ 0
    A_eq = sparse.hstack([E, sparse.csr_matrix((E.shape[0], nq))]).tocsr()
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(A_ub.shape[0]), A_eq=A_eq, b_eq=e,
                  bounds=[(0, None)] * nx + [(None, None)] * nq, method="highs")
    if not res.success:
        raise RuntimeError(f"sequence-form LP failed: {res.message}")
    return res.x[:nx], float(-res.fun)


class RealizationMap(nn.Module):
    r"""Realization rows from a behaviour policy, one support point per information set.

    With ``policy`` a map from ``[features | legal mask]`` to a distribution over the ``K``
    actions (e.g. :func:`~hcc.games.maps.masked_policy`), row ``i`` of the output is

    .. math::

        F_i(a) = x_{ia} = b_i(a) \prod_{(j, a_j) ≺ i} b_j(a_j),

    the product over the player's own earlier decisions ``(j, a_j)`` on the way to ``i``
    (:meth:`Treeplex.ancestors`). To keep every row a function of its own input row (the
    per-point maps the curvature code assumes), the input row carries those decisions:
    ``n_slots`` blocks ``[features | mask | one-hot of the action taken]``, block 0 the
    information set itself, then its ancestors, nearest first; padding blocks have zero
    features and one-hot, an all-ones mask and contribute a factor 1
    (:func:`realization_inputs` builds the rows). The policy runs once on all blocks.
    """

    def __init__(self, policy: nn.Module, n_features: int, n_actions: int, n_slots: int) -> None:
        super().__init__()
        self.policy = policy
        self.n_features, self.n_actions, self.n_slots = n_features, n_actions, n_slots

    def forward(self, x: Tensor) -> Tensor:
        d, K, n = self.n_features, self.n_actions, x.shape[0]
        slots = x.reshape(n, self.n_slots, d + 2 * K)
        probs = self.policy(slots[..., : d + K].reshape(n * self.n_slots, d + K)).reshape(n, self.n_slots, K)
        taken = slots[:, 1:, d + K :]
        factor = (probs[:, 1:] * taken).sum(-1) + 1 - taken.sum(-1)  # b_j(a_j), or 1 in a padding block
        return probs[:, 0] * factor.prod(-1, keepdim=True)


def realization_inputs(tp: Treeplex, features: np.ndarray) -> np.ndarray:
    """The input rows of a :class:`RealizationMap` (``n_slots = tp.n_levels``) from per-infoset
    ``features`` (``(n_infosets, d)``)."""
    n, d = features.shape
    K = tp.n_actions
    anc = tp.ancestors()
    mask = tp.mask.astype(features.dtype)
    blocks = [np.concatenate([features, mask, np.zeros((n, K))], 1)]
    for s in range(anc.shape[1]):
        j, a = anc[:, s, 0], anc[:, s, 1]
        live = j >= 0
        block = np.concatenate([np.zeros((n, d)), np.ones((n, K)), np.zeros((n, K))], 1)
        block[live, :d] = features[j[live]]
        block[live, d : d + K] = mask[j[live]]
        block[live, d + K + a[live]] = 1.0
        blocks.append(block)
    return np.concatenate(blocks, 1)
