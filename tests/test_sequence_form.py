"""Sequence-form machinery on a hand-built tree (no OpenSpiel needed) and the masked softmax head.

References: explicit products for plans, enumeration of pure strategies for best responses,
and the reduced normal form solved by the matrix-game LP (:mod:`hcc.games.simplex`) for the
sequence-form LP value (Kuhn's theorem: realization-equivalent strategies).
"""

from __future__ import annotations

import builtins
import itertools

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

import hcc
from hcc.games.equilibrium import lp_equilibrium
from hcc.games.maps import MaskedSoftmax, masked_policy
from hcc.games.sequence_form import RealizationMap, Treeplex, TreeplexIndex, realization_inputs, solve_lp
from hcc.registry import OptionError

# Player x: infoset 0 (actions 0, 1 legal of K = 3); after (0, 0) infoset 1 (actions 0, 2); after
# (0, 1) infoset 2 (all three); after (1, 2) infoset 3 (actions 1, 2). Sequences are numbered 1…9.
X_SEQ = np.array([[1, 2, -1], [3, -1, 4], [5, 6, 7], [-1, 8, 9]])
X_PARENT = np.array([0, 1, 2, 4])
# Player y: one information set with three actions (a matrix player).
Y_SEQ, Y_PARENT = np.array([[1, 2, 3]]), np.array([0])


def pure_plans(tp: Treeplex) -> np.ndarray:
    """Every pure strategy's plan (one action per information set), one row each."""
    choices = [np.nonzero(tp.mask[i])[0] for i in range(tp.n_infosets)]
    rows = []
    for pick in itertools.product(*choices):
        x = np.zeros(tp.n_sequences)
        x[0] = 1.0
        for i in np.argsort(tp.depth, kind="stable"):
            x[tp.seq[i, pick[i]]] = x[tp.parent[i]]
        rows.append(x)
    return np.unique(np.array(rows), axis=0)


def random_behaviour(tp: Treeplex, rng: np.random.Generator) -> np.ndarray:
    b = rng.random(tp.mask.shape) * tp.mask
    return b / b.sum(1, keepdims=True)


def test_treeplex_structure_and_realization():
    tp = Treeplex(X_SEQ, X_PARENT)
    assert tp.depth.tolist() == [0, 1, 1, 2] and tp.n_sequences == 10
    anc = tp.ancestors()
    assert anc[3].tolist() == [[1, 2], [0, 0]] and anc[2].tolist() == [[0, 1], [-1, -1]]
    b = random_behaviour(tp, np.random.default_rng(0))
    x = TreeplexIndex(tp).realize(torch.as_tensor(b)).numpy()
    ref = np.ones(10)
    ref[[1, 2]] = b[0, [0, 1]]
    ref[[3, 4]] = ref[1] * b[1, [0, 2]]
    ref[[5, 6, 7]] = ref[2] * b[2]
    ref[[8, 9]] = ref[4] * b[3, [1, 2]]
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-15)
    E, e = tp.constraints()
    np.testing.assert_allclose(E @ x, e, rtol=0, atol=1e-15)
    # the realization map's rows (features: one-hot infosets) are these plan entries
    feats = np.eye(tp.n_infosets)
    net = masked_policy(tp.n_infosets, 3, width=8, depth=1, out_scale=2.0).double()
    rmap = RealizationMap(net, tp.n_infosets, 3, tp.n_levels)
    rows = rmap(torch.as_tensor(realization_inputs(tp, feats)))
    beh = net(torch.as_tensor(np.concatenate([feats, tp.mask], 1)))
    idx = TreeplexIndex(tp)
    torch.testing.assert_close(idx.plan(rows), idx.realize(beh), rtol=0, atol=1e-15)
    # vmapped over a stack of behaviours (batched solves) = one by one
    bs = torch.stack([torch.as_tensor(random_behaviour(tp, np.random.default_rng(s))) for s in range(3)])
    torch.testing.assert_close(vmap(idx.realize)(bs), torch.stack([idx.realize(v) for v in bs]), rtol=0, atol=0)


def test_best_response_is_the_best_pure_strategy():
    tp = Treeplex(X_SEQ, X_PARENT)
    P = pure_plans(tp)
    assert len(P) == 6  # reduced: (0,0) then 1 + 2 plans below infoset 1; (0,1) then 3 at infoset 2
    rng = np.random.default_rng(1)
    idx = TreeplexIndex(tp)
    for _ in range(5):
        u = rng.normal(size=tp.n_sequences)
        assert abs(float(idx.best_response(torch.as_tensor(u))) - (P @ u).max()) < 1e-14


def test_lp_value_is_the_reduced_normal_form_value():
    tx, ty = Treeplex(X_SEQ, X_PARENT), Treeplex(Y_SEQ, Y_PARENT)
    rng = np.random.default_rng(2)
    A = rng.normal(size=(tx.n_sequences, ty.n_sequences))
    v, x, y = solve_lp(A, tx, ty)
    M = pure_plans(tx) @ A @ pure_plans(ty).T  # the row player maximizes
    F, G = lp_equilibrium(-M)  # min over rows of −M
    assert abs(v - F @ M @ G) < 1e-9
    ix, iy = TreeplexIndex(tx), TreeplexIndex(ty)
    # x is a max-min plan: its worst case is v; y's best case for the maximizer is v
    assert abs(float(-iy.best_response(torch.as_tensor(-A.T @ x))) - v) < 1e-9
    assert abs(float(ix.best_response(torch.as_tensor(A @ y))) - v) < 1e-9


def test_treeplex_rejects_malformed_trees():
    with pytest.raises(ValueError, match="legal action"):
        Treeplex(np.array([[1, 2], [-1, -1]]), np.array([0, 1]))
    with pytest.raises(ValueError, match="do not form a tree"):
        Treeplex(np.array([[1, 2], [3, 4]]), np.array([3, 1]))
    with pytest.raises(ValueError, match="number the sequences"):
        Treeplex(np.array([[1, 3]]), np.array([0]))


def test_missing_open_spiel_is_a_one_line_error(monkeypatch):
    """Without the package the game says which extra to install (runs whether or not it is installed)."""
    real_import = builtins.__import__

    def no_pyspiel(name, *args, **kwargs):
        if name == "pyspiel":
            raise ImportError("No module named 'pyspiel'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyspiel)
    from hcc.games import openspiel

    openspiel.sequence_form.cache_clear()
    with pytest.raises(OptionError, match=r"expected the open-spiel package.*hcc\[openspiel\]"):
        hcc.make_game("openspiel", {"name": "kuhn_poker"})


def test_masked_softmax_contract():
    """Zero at illegal actions, a distribution over the legal ones, Jacobian ``diag(p) − ppᵀ`` there."""
    z = torch.randn(5, 4)
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=z.dtype)
    head = MaskedSoftmax()
    p = head(torch.cat([z, m], 1))
    assert torch.all(p[m == 0] == 0)
    torch.testing.assert_close(p.sum(1), torch.ones(5), rtol=0, atol=1e-15)
    for i in range(5):
        legal = m[i] > 0
        ref = torch.softmax(z[i, legal], 0)
        torch.testing.assert_close(p[i, legal], ref, rtol=0, atol=1e-15)
        J = jacrev(lambda zi, i=i: head(torch.cat([zi, m[i]])[None])[0])(z[i])
        S = torch.diag(ref) - ref[:, None] * ref[None]
        torch.testing.assert_close(J[legal][:, legal], S, rtol=0, atol=1e-15)
        assert torch.all(J[~legal] == 0) and torch.all(J[:, ~legal] == 0)
    net = masked_policy(3, 4, width=8, depth=1)
    x = torch.cat([torch.randn(5, 3), m], 1)
    rows = torch.cat([net(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(net(x), rows, rtol=0, atol=1e-15)




# -- the dilated-entropy proximal step ------------------------------------------------------------


def _dilated_objective(idx: TreeplexIndex, tp: Treeplex, b: torch.Tensor, q: torch.Tensor, logw: torch.Tensor,
                       s: float) -> torch.Tensor:
    """``qᵀx + Σ_i x_σ(i) Σ_a b_i(a)(s log b_i(a) − logw_ia)`` written out from the plan (the reference)."""
    x = idx.realize(b)
    mask = torch.as_tensor(tp.mask)
    per_infoset = torch.where(mask, b * (s * b.clamp_min(1e-300).log() - logw), 0.0).sum(-1)
    return q @ x + (x[torch.as_tensor(tp.parent)] * per_infoset).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dilated_prox_is_the_minimizer(seed):
    """The closed form (backward induction) against a direct minimization over the behaviours' logits
    (L-BFGS on the written-out objective; the problem is strictly convex in the plan, so its one
    interior critical point is the minimum), float64: objective to 1e-10, plan to 1e-6."""
    from scipy.optimize import minimize

    tp = Treeplex(X_SEQ, X_PARENT)
    idx = TreeplexIndex(tp).double()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tp.n_sequences, generator=g, dtype=torch.float64)
    logw = torch.randn(tp.n_infosets, tp.n_actions, generator=g, dtype=torch.float64)
    s = 0.7
    b = idx.dilated_prox(q, logw, s)
    mask = torch.as_tensor(tp.mask)
    assert torch.allclose(b.sum(-1), torch.ones(tp.n_infosets, dtype=torch.float64))
    assert bool((b[~mask] == 0).all()) and bool((b[mask] > 0).all())

    def f(v: np.ndarray) -> tuple[float, np.ndarray]:
        z = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        bz = torch.softmax(torch.where(mask, z.reshape(mask.shape), -torch.inf), -1)
        val = _dilated_objective(idx, tp, bz, q, logw, s)
        (grad,) = torch.autograd.grad(val, z)
        return float(val.detach()), grad.numpy()

    res = minimize(f, np.zeros(mask.numel()), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    z_ref = torch.tensor(res.x).reshape(mask.shape)
    b_ref = torch.softmax(torch.where(mask, z_ref, -torch.inf), -1)
    assert float(_dilated_objective(idx, tp, b, q, logw, s)) <= res.fun + 1e-10
    assert torch.allclose(idx.realize(b), idx.realize(b_ref), atol=1e-6)


def test_dilated_proximal_point_solves_the_regularized_game():
    """The mirror-prox solution is the saddle point: each player's behaviours are the dilated prox of
    ``η·(its gradient at the solution)`` about its centre (the optimality condition), to 1e-6; and a
    few steps of the proximal point method reach the game's LP value (duality gap ≤ 1e-6)."""
    from hcc.games.sequence_form import dilated_proximal_point

    tx, ty = Treeplex(X_SEQ, X_PARENT), Treeplex(Y_SEQ, Y_PARENT)
    ix, iy = TreeplexIndex(tx).double(), TreeplexIndex(ty).double()
    g = torch.Generator().manual_seed(0)
    C = torch.randn(tx.n_sequences, ty.n_sequences, generator=g, dtype=torch.float64)
    uniform = tuple(torch.as_tensor(tp.mask, dtype=torch.float64) / torch.as_tensor(tp.mask).sum(-1, keepdim=True)
                    for tp in (tx, ty))
    eta = 3.0
    sol = dilated_proximal_point(C, (ix, iy), uniform, eta, iters=20000, tol=1e-13)
    bx, by = sol.behaviours
    x, y = ix.realize(bx), iy.realize(by)
    log_c = tuple(c.clamp_min(1e-300).log() for c in uniform)  # s = 1: logw = log of the centre
    assert torch.allclose(bx, ix.dilated_prox(eta * (C @ y), log_c[0], 1.0), atol=1e-6)
    assert torch.allclose(by, iy.dilated_prox(-eta * (C.T @ x), log_c[1], 1.0), atol=1e-6)

    b, gaps = uniform, []
    for _ in range(8):
        b = dilated_proximal_point(C, (ix, iy), b, 100.0, iters=20000, tol=1e-12).behaviours
        x, y = ix.realize(b[0]), iy.realize(b[1])
        gaps.append(float(iy.best_response(C.T @ x) + ix.best_response(-(C @ y))))
    assert gaps[-1] <= 1e-6, gaps
    v, *_ = solve_lp(-C.numpy(), tx, ty)  # max_x min_y xᵀ(−C)y = −min_x max_y xᵀCy
    assert float(x @ C @ y) == pytest.approx(-v, abs=1e-5)
