r"""Local spectra at an equilibrium: the field's Jacobian and a solver's update operator.

The Numerics of GANs (Mescheder, Nowozin & Geiger, NeurIPS 2017) studies a
game through the **gradient vector field** (its sign convention, used throughout
this module)

.. math::

    v(θ, φ) = \big(-∇_θ Ψ,\; ∇_φ Ψ\big),

which both players *follow* (``x ← x + h v``). The solvers of :mod:`hcc.solvers`
use the opposite sign (both descend, ``x ← x − h d``); here ``v = −`` that field.
At an equilibrium ``x̄`` (``v(x̄) = 0``) a solver is a fixed-point iteration
``z ← T(z)`` on an *augmented state* ``z`` (the parameters, plus the previous
iterate for heavy-ball momentum, plus the previous direction for optimistic GDA),
and it is locally convergent iff the **spectral radius** of the update operator
``T'(z̄)`` is below 1 (Ostrowski; The Numerics of GANs, Proposition 3).

For simultaneous gradient descent-ascent ``T'(x̄) = I + h ∇v(x̄)``, so an
eigenvalue ``λ = −a + ib`` of ``∇v`` (``a > 0``) maps to ``1 + hλ`` with
``|1 + hλ|² = 1 − 2ha + h²(a² + b²)`` (The Numerics of GANs, Lemma 4):

.. math::

    ρ(I + h∇v) < 1 \iff h < \min_{λ = −a + ib} \frac{2a}{a^2 + b^2}.

An eigenvalue with ``a ≤ 0`` (purely imaginary, e.g. the unregularized bilinear
game's ``±i``, or with positive real part) admits no stable step: its bound is 0.
Eigenvalues ``λ = 0`` are *neutral*: in an overparametrized game the equilibria
form a manifold, its tangent directions are in the kernel of ``∇v`` and give
eigenvalue exactly 1 of every update operator; they are skipped by the bound and
reported separately (``neutral_dims``, ``spectral_radius_transverse``).

Everything is computed by automatic differentiation in float64 on the flattened
state: ``∇v`` with :func:`torch.func.jacfwd` of the field, ``T'`` with
:func:`torch.func.jacfwd` of :meth:`hcc.solvers.Solver.step` itself, so any
rule × preconditioner registered works without a hand-derived operator.

>>> from hcc import make_game, make_solver
>>> from hcc.spectrum import spectrum
>>> game = make_game("bilinear", {"dim": 2})
>>> spec = spectrum(game, make_solver("eg", game))
>>> spec.spectral_radius < 1
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import jacfwd
from torch.utils import _pytree as pytree

from .batch import untraceable
from .curvature.pytree import flatten, sq_norm, unflatten
from .games.base import Batch, Game, Params
from .games.maps import Direct
from .records import write_json
from .registry import OptionError, check_seed
from .solvers import Solver, make_solver
from .solvers.oracle import vector_field

#: rules whose update is not differentiable at ``v = 0`` (they divide by ‖v‖ or √(second moment))
NONSMOOTH_RULES = frozenset({"nsgda", "adam"})
#: relative size under which an eigenvalue of ∇v counts as 0 (a neutral, equilibrium-manifold direction)
NEUTRAL_RTOL = 1e-7


@dataclass
class Spectrum:
    """The spectra at one equilibrium, and how that equilibrium was obtained.

    ``field_eigs``: eigenvalues of ``∇v`` (convention ``v = (−∇_θΨ, ∇_φΨ)``);
    ``update_eigs``: eigenvalues of the solver's update operator ``T'`` on the
    augmented state (``state_dim`` of them).
    """

    game: str
    solver: str
    lr: float
    game_options: dict[str, Any]
    solver_options: dict[str, Any]
    field_eigs: np.ndarray
    update_eigs: np.ndarray
    spectral_radius: float
    #: ρ(T') over the eigenvalues that are not exactly 1 (the neutral manifold directions)
    spectral_radius_transverse: float
    #: Lemma 4: the largest stable step of *simultaneous GDA* (plain gradients) for this ∇v
    lemma4_step_bound: float
    #: number of (numerically) zero eigenvalues of ∇v
    neutral_dims: int
    param_dim: int
    state_dim: int
    #: what was differentiated (augmented state layout)
    state_layout: list[str]
    equilibrium: str
    #: ‖v‖ at the point used (0 up to round-off at an exact equilibrium)
    field_norm: float
    #: ‖T(z̄) − z̄‖ of the augmented state
    fixed_point_residual: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["field_eigs"] = _pairs(self.field_eigs)
        d["update_eigs"] = _pairs(self.update_eigs)
        d["sign_convention"] = "v = (-grad_theta Psi, +grad_phi Psi); GDA update operator I + lr * jac(v)"
        return d

    def save(self, out: str | Path, plot: bool = True) -> Path:
        """Write ``spectrum.json`` (and ``spectrum.png`` with ``plot``) into ``out``; returns ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "spectrum.json", "spectrum", _finite(self.to_dict()))
        if plot:
            from .plots_dynamics import plot_spectrum

            plot_spectrum(self, out / "spectrum.png")
        return out


def _pairs(z: np.ndarray) -> list[list[float]]:
    return [[float(c.real), float(c.imag)] for c in z]


def _finite(x: Any) -> Any:
    """JSON without ``Infinity``/``NaN``: non-finite floats become strings."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _dynamic(state: Any) -> tuple[Any, Any]:
    """Split a rule state into its dynamic part (tensors with ≥ 1 dim: previous iterates and
    directions, moments) and its frozen part (0-d counters and flags such as OGDA's ``started``)."""
    leaves, spec = pytree.tree_flatten(state)
    dyn = [isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1 for t in leaves]
    return dyn, (leaves, spec)


# -- the pieces ------------------------------------------------------------------------------


def game_field(game: Game, params: Params, batch: Batch) -> Params:
    """``v = (−∇_θΨ, ∇_φΨ)``, the Numerics-of-GANs field (minus :func:`hcc.solvers.vector_field`)."""
    return pytree.tree_map(torch.neg, vector_field(game, params, batch))


def field_jacobian(game: Game, params: Params, batch: Batch) -> Tensor:
    """The dense Jacobian ``∇v`` (``M × M``, ``M`` = all parameters) of :func:`game_field` at ``params``."""
    z0 = flatten(params).detach()
    return jacfwd(lambda z: flatten(game_field(game, unflatten(z, params), batch)))(z0)


def update_operator(
    game: Game, solver: Solver, params: Params, batch: Batch, state: dict[str, Any] | None = None
) -> tuple[Tensor, dict[str, Any]]:
    r"""The Jacobian ``T'(z̄)`` of one :meth:`Solver.step` on the augmented state ``z = (θ, φ, s)``.

    ``s`` are the rule-state tensors with at least one dimension (GDA with momentum:
    the previous iterate; OGDA: the previous direction; Adam: its moments); 0-d
    state entries (step counters, OGDA's first-step flag) and the preconditioner's
    state (warm starts, running curvature averages) are held fixed at their values
    in ``state``. By default ``state`` is the steady state at ``params``: the rule's
    ``init`` followed by one step from ``params`` (which, at an equilibrium, does not
    move them and sets OGDA's flag and previous direction). Exact for identity and
    exact natural-gradient preconditioners (stateless); for K-FAC / warm-started CG
    it is the operator with the curvature estimate frozen.

    Returns ``(T', info)`` with ``info``: ``layout`` (names of the state blocks),
    ``fixed_point_residual`` ``‖T(z̄) − z̄‖``.
    """
    if solver.rule.name in NONSMOOTH_RULES:
        raise OptionError(f"solver {solver.name!r}: its update rule {solver.rule.name!r} is not differentiable at "
                          f"an equilibrium (v = 0); expected a smooth rule (one of gda, eg, ogda, consensus, "
                          f"hamiltonian)")
    params = pytree.tree_map(lambda t: t.detach(), params)
    if state is None:
        state = solver.init(game, params)
        _, state, _ = solver.step(game, params, state, batch)
        state = pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)
    rstate = state["rule"]
    dyn, (leaves, spec) = _dynamic(rstate)
    dyn_leaves = [t for t, d in zip(leaves, dyn) if d]
    n_par = flatten(params).numel()

    def rebuild(z: Tensor) -> tuple[Params, Any]:
        p = unflatten(z[:n_par], params)
        it = iter(unflatten(z[n_par:], dyn_leaves)) if dyn_leaves else iter(())
        new_leaves = [next(it) if d else t for t, d in zip(leaves, dyn)]
        return p, pytree.tree_unflatten(new_leaves, spec)

    def T(z: Tensor) -> Tensor:
        p, rs = rebuild(z)
        new_p, new_state, _ = solver.step(game, p, {"rule": rs, "precond": state["precond"]}, batch)
        new_leaves = pytree.tree_leaves(new_state["rule"])
        return torch.cat([flatten(new_p), *[t.reshape(-1) for t, d in zip(new_leaves, dyn) if d]])

    z0 = torch.cat([flatten(params), *[t.reshape(-1) for t in dyn_leaves]]).detach()
    with torch.no_grad():
        residual = float((T(z0) - z0).norm())
    jac = jacfwd(T)(z0)
    keys = [pytree.keystr(k) for k, _ in pytree.tree_flatten_with_path(rstate)[0]]
    layout = ["params"] + sorted({k.split("]")[0] + "]" for k, d in zip(keys, dyn) if d})
    return jac, {"layout": layout, "fixed_point_residual": residual}


def lemma4_step_bound(eigs: np.ndarray | Tensor, neutral_rtol: float = NEUTRAL_RTOL) -> float:
    r"""The Numerics of GANs, Lemma 4: ``sup{h > 0 : ρ(I + h∇v) < 1}`` from the eigenvalues of ``∇v``.

    .. math::

        h^\star = \min_{λ = −a + ib,\; λ ≠ 0} \frac{2a}{a^2 + b^2},

    with ``h* = 0`` as soon as one eigenvalue has ``a ≤ 0`` (purely imaginary or
    unstable: no step is stable) and ``h* = ∞`` if all eigenvalues are (numerically,
    ``|λ| ≤ neutral_rtol·max|λ|``) zero. Zero eigenvalues give ``|1 + h·0| = 1``
    whatever ``h`` (neutral directions) and are skipped.
    """
    lam = np.asarray(eigs.detach().cpu().numpy() if isinstance(eigs, Tensor) else eigs, dtype=complex)
    scale = np.abs(lam).max(initial=0.0)
    lam = lam[np.abs(lam) > neutral_rtol * scale] if scale > 0 else lam[:0]
    if lam.size == 0:
        return math.inf
    a, b = -lam.real, lam.imag
    # a purely imaginary λ has a ~ round-off: treat |a| ≤ rtol·|λ| as 0 (no stable step)
    if np.any(a <= neutral_rtol * np.abs(lam)):
        return 0.0
    return float(np.min(2 * a / (a**2 + b**2)))


# -- equilibria ------------------------------------------------------------------------------


def equilibrium_params(
    game: Game,
    batch: Batch | None = None,
    *,
    tol: float = 1e-26,
    max_steps: int = 5000,
    solver: str = "exact-natgrad",
) -> tuple[Params, str]:
    """Parameters at the game's function-space equilibrium ``(F*, G*)``, and how they were found.

    When both strategy maps are the identity (:class:`~hcc.games.maps.Direct`, the
    bilinear game) the parameters *are* ``(F*, G*)``. Otherwise the equilibrium is
    known only in function space and the parameters are found by running
    ``solver`` (the exact natural extragradient, which converges linearly on these
    games) from the game's initial parameters until ``V ≤ tol``: one point of the
    equilibrium manifold, the one the natural flow selects from that start.
    Raises :class:`OptionError` for games with no known equilibrium (GANs) or when
    the tolerance is not reached.
    """
    batch = game.sample_batch() if batch is None else batch
    eq = game.equilibrium(batch)
    if eq is None:
        raise OptionError(f"game {game.name!r}: expected a game with a known equilibrium (F*, G*), got none")
    params = game.init_params()
    if all(isinstance(m, Direct) for m in game.maps()):
        Fs, Gs = eq
        new = ({k: Fs[0].to(v).reshape(v.shape) for k, v in params[0].items()},
               {k: Gs[0].to(v).reshape(v.shape) for k, v in params[1].items()})
        return new, "closed form: the strategy maps are the identity, parameters = (F*, G*)"
    s = make_solver(solver, game)
    state = s.init(game, params)
    V = float(game.lyapunov(*game.strategies(params, batch), batch))
    for t in range(1, max_steps + 1):
        params, state, _ = s.step(game, params, state, batch)
        V = float(game.lyapunov(*game.strategies(params, batch), batch))
        if V <= tol:
            return params, f"solved: {solver} (lr {s.lr:g}) from the seed's init, V = {V:.2e} <= {tol:g} at step {t}"
        if not math.isfinite(V):
            break
    raise OptionError(f"game {game.name!r}: {solver} did not reach V <= {tol:g} in {max_steps} steps (V = {V:.3g})")


# -- the whole thing -------------------------------------------------------------------------



def spectrum(
    game: Game,
    solver: Solver,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    equilibrium: str | None = None,
) -> Spectrum:
    """Eigenvalues of ``∇v`` and of ``solver``'s update operator at an equilibrium of ``game``.

    ``params`` default to :func:`equilibrium_params` (computed in the game's dtype:
    build the game in float64 for clean spectra). ``equilibrium`` describes where
    ``params`` come from when they are given. See the module docstring for the sign
    convention and :func:`lemma4_step_bound` for the bound.
    """
    why = untraceable(solver)
    if why is not None:
        raise OptionError(f"spectrum: expected a solver whose step torch.func can differentiate (preconditioner "
                          f"identity, exact or cg), got {solver.name!r}: {why}")
    batch = game.sample_batch() if batch is None else batch
    if params is None:
        params, equilibrium = equilibrium_params(game, batch)
    Jv = field_jacobian(game, params, batch)
    T, info = update_operator(game, solver, params, batch)
    lam = torch.linalg.eigvals(Jv).detach().cpu().numpy()
    mu = torch.linalg.eigvals(T).detach().cpu().numpy()
    lam = lam[np.lexsort((lam.imag, lam.real))]
    mu = mu[np.lexsort((mu.imag, mu.real))]
    scale = np.abs(lam).max(initial=0.0)
    neutral = int(np.sum(np.abs(lam) <= NEUTRAL_RTOL * scale)) if scale > 0 else lam.size
    transverse = mu[np.abs(mu - 1) > 1e-6]
    v = game_field(game, params, batch)
    return Spectrum(
        game=game.name, solver=solver.name, lr=solver.lr, game_options=dataclasses.asdict(game.options),
        solver_options=solver.options(), field_eigs=lam, update_eigs=mu,
        spectral_radius=float(np.abs(mu).max(initial=0.0)),
        spectral_radius_transverse=float(np.abs(transverse).max(initial=0.0)),
        lemma4_step_bound=lemma4_step_bound(lam), neutral_dims=neutral, param_dim=Jv.shape[0], state_dim=T.shape[0],
        state_layout=info["layout"], equilibrium=equilibrium or "given parameters",
        field_norm=math.sqrt(float(sq_norm(v))), fixed_point_residual=info["fixed_point_residual"],
    )


def run_spectrum(
    game: str,
    solver: str,
    *,
    lr: float | None = None,
    game_options: dict[str, Any] | None = None,
    solver_options: dict[str, Any] | None = None,
    seed: int = 0,
) -> Spectrum:
    """:func:`spectrum` by names (the CLI's API), in float64 on the CPU.

    >>> from hcc.spectrum import run_spectrum
    >>> run_spectrum("bilinear", "gda").spectral_radius > 1
    True
    """
    from .games import make_game

    check_seed("seed", seed)
    g = make_game(game, game_options, seed=seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return spectrum(g, make_solver(solver, g, lr=lr, options=solver_options))
    finally:
        torch.set_default_dtype(old)


__all__ = [
    "NONSMOOTH_RULES", "Spectrum", "equilibrium_params", "field_jacobian", "game_field", "lemma4_step_bound",
    "run_spectrum", "spectrum", "update_operator",
]
