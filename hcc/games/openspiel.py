r"""OpenSpiel's two-player zero-sum games as hidden convex-concave games.

Any two-player zero-sum game of OpenSpiel (Lanctot et al., *OpenSpiel: a framework for
reinforcement learning in games*, 2019) by name — extensive-form games (Kuhn poker,
Leduc poker, …) and normal-form ones (``matrix_rps``, ``matrix_mp``, …; simultaneous-move
games are played through OpenSpiel's own turn-based conversion, which for a one-shot
game is the payoff matrix in sequence form) — in its *sequence form*
(:mod:`hcc.games.sequence_form`): with realization plans ``x`` (OpenSpiel's player 0)
and ``y`` (player 1) and OpenSpiel's sequence-form payoff ``A`` (player 0's
chance-weighted returns, from ``open_spiel.python.algorithms.sequence_form_utils``),

.. math::

    Ψ(θ, φ) = L(x_θ, y_φ) = -x_θᵀ A\, y_φ,

player 1's expected return: the min player is OpenSpiel's player 0, the max player its
player 1. ``L`` is bilinear on the treeplexes, hence convex-concave in function space.

**Strategy maps.** Each player has one network, evaluated on its information sets
(the support points): ``[information-state tensor | legal-action mask] ↦ MLP ↦ logits
↦`` a softmax over the legal actions (:func:`~hcc.games.maps.masked_policy`). Option
``strategy`` says which function is the player's strategy ``F`` (and so which metric the
natural-gradient preconditioners take, the Gram matrix of ``∂F/∂θ``):

- ``behaviour``: ``F_i = b_i``, the behaviour at information set ``i``; the payoff turns
  behaviours into plans, ``x_{ia} = x_{σ(i)} b_i(a)`` (:meth:`~hcc.games.sequence_form.TreeplexIndex.realize`);
- ``realization``: ``F_i(a) = x_{ia}``, the realization plan itself, each row computed
  from the information set's own features and those of the player's earlier
  decisions (:class:`~hcc.games.sequence_form.RealizationMap`); ``Ψ`` is then bilinear in
  ``(F, G)``.

**Progress.** The plans of the equilibria need not be unique (Kuhn poker's first player
has a one-parameter family), so ``½‖x − x*‖²`` to one LP solution is no measure of
progress; :attr:`OpenSpielGame.progress_metric` is the duality gap instead,

.. math::

    \max_{y'∈Y} L(x, y') − \min_{x'∈X} L(x', y) = \mathrm{BR}_1(x) + \mathrm{BR}_0(y) = \mathrm{NashConv},

two best responses by backward induction over the treeplexes
(:meth:`~hcc.games.sequence_form.TreeplexIndex.best_response`), zero exactly at an equilibrium. It is recorded as
``exploitability`` and the run stops on it. OpenSpiel's ``exploitability`` is
``NashConv / 2``; the referee, OpenSpiel's own ``exploitability`` of the current policies
converted to an OpenSpiel ``TabularPolicy``, is recorded as ``openspiel_exploitability``
(option ``referee_every``; about 0.3 s on Leduc poker, 1 ms on Kuhn).

The sequence-form LP (:func:`~hcc.games.sequence_form.solve_lp`) gives the game value,
:meth:`OpenSpielGame.lp`.

**The proximal step** (rule ``prox``, :meth:`OpenSpielGame.proximal_target`). With behaviour
strategies the payoff is multilinear in ``F``, so the rule's own implicit step in the behaviours'
logits need not be solvable (on Leduc poker its Newton solve stalled at a relative residual of
0.999); the game takes the step where it is convex-concave instead, in the realization plans, with the
dilated entropy as the Bregman divergence
(:func:`~hcc.games.sequence_form.dilated_proximal_point`), and hands the rule the target's
behaviours. Measured (seed 0, float64): Kuhn poker, ``exact-natgrad`` at its defaults, NashConv
≤ 1e-5 in 11 steps (4.5 s); Leduc poker with ``-S pullback_iters=10 -S logit_range=8`` (ten
Levenberg-Marquardt fits to each target; logits within 8 of the row maximum, a probability floor
of e⁻⁸, which the 468 information sets' network can fit), OpenSpiel exploitability 0.0089 ≤ 1e-2
in 8 steps (127 s; seed 1, not used in choosing the options: 0.0084 in 8 steps). With the default
``logit_range`` (24 in float64) Leduc is at 0.019 after 10 steps,
its pull-backs rejected about half the time (the network does not fit logit gaps of 24 at every
information set); with ``logit_range=8`` Kuhn stalls at 1.9e-4 (its equilibrium has actions of
probability exactly 0).

Needs the optional extra ``hcc[openspiel]`` (``pip install open-spiel``).

>>> game = make_game("openspiel", {"name": "kuhn_poker"})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..curvature.heads import link
from ..registry import OptionError, opt
from .base import Batch, Game, Params, seeded
from .maps import ACTIVATIONS, masked_policy
from .sequence_form import (
    RealizationMap,
    Treeplex,
    TreeplexIndex,
    dilated_proximal_point,
    log_behaviour,
    mirror_prox_step,
    realization_inputs,
    solve_lp,
)

#: the game the registry's default steps for ``openspiel`` were tuned on (see :attr:`OpenSpielGame.lr_scale`)
REFERENCE_GAME = "kuhn_poker"
INSTALL_HINT = "pip install 'hcc[openspiel]' (or pip install open-spiel)"


def _pyspiel() -> Any:
    try:
        import pyspiel
    except ImportError:
        raise OptionError(f"game 'openspiel': expected the open-spiel package, got none installed; "
                          f"{INSTALL_HINT}") from None
    return pyspiel


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: OpenSpiel's C++ layer prints an exception there before raising it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_game(name: str) -> Any:
    """The OpenSpiel game ``name`` (a ``pyspiel.load_game`` string, e.g. ``"leduc_poker"`` or
    ``"goofspiel(num_cards=3)"``), turn-based; one-line errors for unknown, non-two-player
    or non-zero-sum games."""
    pyspiel = _pyspiel()
    expected = "a two-player zero-sum OpenSpiel game (e.g. kuhn_poker, leduc_poker, matrix_rps)"
    if name.split("(")[0].strip() not in pyspiel.registered_names():  # before OpenSpiel prints its whole list
        raise OptionError(f"name: expected {expected}, got {name!r}, not a registered OpenSpiel game")
    try:
        with _quiet_stderr():
            game = pyspiel.load_game(name)
    except pyspiel.SpielError as e:
        why = (str(e).strip().splitlines() or ["not loadable"])[0]
        raise OptionError(f"name: expected {expected}, got {name!r}: {why}") from None
    gt = game.get_type()
    if game.num_players() != 2:
        raise OptionError(f"name: expected a two-player game, got {name!r} with {game.num_players()} players")
    if gt.utility != pyspiel.GameType.Utility.ZERO_SUM:
        raise OptionError(f"name: expected a zero-sum game, got {name!r} ({gt.utility.name.lower()})")
    if gt.dynamics == pyspiel.GameType.Dynamics.SIMULTANEOUS:
        game = pyspiel.convert_to_turn_based(game)
    if game.get_type().chance_mode == pyspiel.GameType.ChanceMode.SAMPLED_STOCHASTIC:
        raise OptionError(f"name: expected explicit chance outcomes, got {name!r} with sampled chance")
    return game


@dataclass(eq=False)
class SequenceForm:
    """A game's sequence form and its link to OpenSpiel's tabular policies.

    Player ``p``'s information sets are ordered as in OpenSpiel's ``TabularPolicy``
    (``template.states_per_player[p]``), actions are OpenSpiel's action ids (``K =
    num_distinct_actions``).
    """

    game: Any
    #: player 0's expected return ``xᵀ A y``, ``(S_0, S_1)``
    payoff: np.ndarray
    treeplexes: tuple[Treeplex, Treeplex]
    #: per player: the information-state tensors (or ``None`` if the game has none)
    tensors: tuple[np.ndarray | None, np.ndarray | None]
    #: per player: rows of the template's ``action_probability_array``
    rows: tuple[np.ndarray, np.ndarray]
    #: a uniform ``TabularPolicy`` (copied, never changed)
    template: Any

    @functools.cached_property
    def speed(self) -> float:
        r"""``√(n_0 n_1)·‖A‖₂``: the rotation speed of the natural flow in function space.

        With the metric ``A = (1/n)ΣJᵢᵀJᵢ`` (a mean over the ``n`` information sets) the natural
        flow moves ``F`` by ``n·∂L/∂F``, so for the bilinear ``L`` its speed is ``n‖A‖₂`` (one ``n``
        per player: the geometric mean)."""
        n0, n1 = (tp.n_infosets for tp in self.treeplexes)
        return math.sqrt(n0 * n1) * float(np.linalg.norm(self.payoff, 2))

    def tabular_policy(self, behaviours: tuple[np.ndarray, np.ndarray]) -> Any:
        """An OpenSpiel ``TabularPolicy`` playing ``behaviours[p]`` (``(n_infosets_p, K)``) for player ``p``."""
        pol = self.template.__copy__()
        for r, b in zip(self.rows, behaviours, strict=True):
            pol.action_probability_array[r] = np.asarray(b, dtype=np.float64)
        return pol

    def referee(self, behaviours: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        """OpenSpiel's ``exploitability`` (NashConv / 2) of the policy."""
        from open_spiel.python.algorithms import exploitability

        pol = self.tabular_policy(behaviours)
        return {"openspiel_exploitability": float(exploitability.exploitability(self.game, pol))}


@functools.lru_cache(maxsize=8)
def sequence_form(name: str) -> SequenceForm:
    """The sequence form of OpenSpiel game ``name`` (cached: Leduc's takes about a second)."""
    game = load_game(name)  # first: a one-line error if open-spiel is missing
    from open_spiel.python import policy
    from open_spiel.python.algorithms import sequence_form_utils as sfu

    infosets, isa_to_seq, isa_maps, parent_map, payoff, _ = sfu.construct_vars(game)
    template = policy.TabularPolicy(game)
    K = game.num_distinct_actions()
    tps, tensors, rows = [], [], []
    for p in range(2):
        keys = template.states_per_player[p]
        if len(keys) != len(infosets[p]) - 1:
            raise OptionError(f"name: expected one policy row per information set of player {p} in {name!r}, got "
                              f"{len(keys)} rows for {len(infosets[p]) - 1} information sets (imperfect recall?)")
        r = np.array([template.state_lookup[k] for k in keys], dtype=np.int64)
        seq = np.full((len(keys), K), -1, dtype=np.int64)
        parent = np.zeros(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            parent[i] = isa_to_seq[p][parent_map[p][key]]
            for isa in isa_maps[p][key]:
                seq[i, sfu.get_action_from_key(isa)] = isa_to_seq[p][isa]
        if not np.array_equal(seq >= 0, template.legal_actions_mask[r] > 0):
            raise OptionError(f"name: the legal actions of {name!r} differ between its sequence form and its policy")
        tps.append(Treeplex(seq, parent))
        tensors.append(template.state_in[r] if template.state_in is not None else None)
        rows.append(r)
    if len(set(rows[0]) & set(rows[1])):
        raise OptionError(f"name: expected distinct information-state keys for the two players of {name!r}")
    return SequenceForm(game, payoff[0], (tps[0], tps[1]), (tensors[0], tensors[1]), (rows[0], rows[1]), template)


@dataclass
class OpenSpielOptions:
    name: str = opt("kuhn_poker", "OpenSpiel game, two-player zero-sum (a pyspiel.load_game string: kuhn_poker, "
                    "leduc_poker, matrix_rps, goofspiel(num_cards=3), …)")
    strategy: Literal["behaviour", "realization"] = opt(
        "behaviour", "the function-space strategy (and the natural metric's space): behaviour (action "
        "probabilities per information set) | realization (the sequence-form plan)")
    features: Literal["tensor", "onehot"] = opt(
        "tensor", "policy inputs: OpenSpiel's information-state tensors | a one-hot of the information set")
    width: int = opt(64, "hidden width of each player's policy network")
    depth: int = opt(2, "number of hidden layers")
    activation: str = opt("tanh", "hidden activation (tanh, relu, elu)")
    out_scale: float = opt(1.0, "gain on the last layer's init (larger: start farther from uniform play)")
    referee_every: int = opt(1, "record OpenSpiel's exploitability at every k-th logged step (0: never)")
    prox_iters: int = opt(3000, "behaviour strategies, rule prox: mirror-prox iterations (cap) of the dilated "
                          "proximal step")
    prox_mix: float = opt(1e-3, "behaviour strategies, rule prox: share of uniform play mixed into the proximal "
                          "step's centre (keeps every action's probability above prox_mix / K)")

    def validate(self) -> None:
        if self.width < 1:
            raise OptionError(f"width: expected a positive integer, got {self.width}")
        if self.depth < 0:
            raise OptionError(f"depth: expected ≥ 0, got {self.depth}")
        if self.activation not in ACTIVATIONS:
            raise OptionError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.referee_every < 0:
            raise OptionError(f"referee_every: expected an integer ≥ 0, got {self.referee_every}")
        if self.prox_iters < 1:
            raise OptionError(f"prox_iters: expected a positive integer, got {self.prox_iters}")
        if not 0 <= self.prox_mix < 1:
            raise OptionError(f"prox_mix: expected 0 ≤ prox_mix < 1, got {self.prox_mix}")


class OpenSpielGame(Game):
    """An OpenSpiel two-player zero-sum game in sequence form with neural policies."""

    name = "openspiel"
    Options = OpenSpielOptions
    progress_metric = "exploitability"
    default_steps = 5000
    #: the referee (OpenSpiel's exploitability) costs 0.3 s on Leduc poker: record every 10 steps by default
    default_log_every = 10

    def __init__(self, options: OpenSpielOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        o = options
        sf = sequence_form(o.name)
        self.sf = sf
        K = sf.game.num_distinct_actions()
        self.plans = nn.ModuleList([TreeplexIndex(tp) for tp in sf.treeplexes])
        inputs, maps = [], []
        with seeded(seed):
            for p, tp in enumerate(sf.treeplexes):
                feats = sf.tensors[p] if o.features == "tensor" and sf.tensors[p] is not None else None
                if feats is None:
                    feats = np.eye(tp.n_infosets)
                elif len(np.unique(feats, axis=0)) < tp.n_infosets:
                    raise OptionError(f"features: player {p}'s information-state tensors of {o.name!r} are not "
                                      "distinct; use features=onehot")
                d = feats.shape[1]
                policy = masked_policy(d, K, o.width, o.depth, o.activation, o.out_scale)
                if o.strategy == "realization":
                    x = realization_inputs(tp, feats)
                    maps.append(RealizationMap(policy, d, K, tp.n_levels))
                else:
                    x = np.concatenate([feats, tp.mask], 1)
                    maps.append(policy)
                inputs.append(torch.as_tensor(x, dtype=torch.float32))
        self.min_map, self.max_map = maps
        self.register_buffer("x_min", inputs[0])
        self.register_buffer("x_max", inputs[1])
        self._C64 = torch.as_tensor(-sf.payoff, dtype=torch.float64)  # Ψ = xᵀCy, player 1's return
        self.register_buffer("C", self._C64.float())
        self._logged = 0

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.C = self._C64.to(device=self.x_min.device, dtype=self.x_min.dtype)  # exact payoffs in float64
        return self

    # -- the function-space game ---------------------------------------------------------------
    def plan(self, F: Tensor, player: int) -> Tensor:
        """Player ``player``'s realization plan from its strategy rows."""
        idx = self.plans[player]
        return idx.realize(F) if self.options.strategy == "behaviour" else idx.plan(F)

    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        return self.plan(F, 0) @ self.C @ self.plan(G, 1)

    def duality_gap(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        """NashConv: ``max_y' xᵀCy' − min_x' x'ᵀCy`` by backward induction on both treeplexes."""
        x, y = self.plan(F, 0), self.plan(G, 1)
        return self.plans[1].best_response(self.C.T @ x) + self.plans[0].best_response(-(self.C @ y))

    def proximal_target(
        self, z: tuple[Tensor, Tensor], eta: float, start: tuple[Tensor, Tensor] | None = None
    ) -> tuple[tuple[Tensor, Tensor], int, float] | None:
        r"""The proximal step of the rule ``prox`` for behaviour strategies, in the treeplex's own geometry.

        In the behaviours the payoff is multilinear, not convex-concave, and the implicit step the rule
        would solve there need not have a solution Newton's method can reach (on Leduc poker it stalls).
        So the step is taken where the game *is* convex-concave, in the realization plans, with the
        dilated KL as the Bregman divergence: the saddle point of
        ``xᵀCy + D(x‖x̂)/η − D(y‖ŷ)/η`` (:func:`~hcc.games.sequence_form.dilated_proximal_point`),
        whose behaviours are the target. The centre ``(x̂, ŷ)`` is the current policy mixed with
        ``prox_mix`` of uniform play: a proximal step in the KL geometry can only scale a probability
        by a bounded factor, and an action the policy has all but dropped would otherwise return too
        slowly once it is needed (on Leduc poker the gap stalls near 0.07 without it, at 0.023 after
        6 steps with 1e-3). Realization strategies (the payoff already bilinear) use the rule's own solve.
        """
        if self.options.strategy != "behaviour":
            return None
        o = self.options
        centre = []
        for zp in z:
            b = link(zp, "masked")
            legal = (zp.chunk(2, -1)[1] > 0).to(b.dtype)
            centre.append((1 - o.prox_mix) * b + o.prox_mix * legal / legal.sum(-1, keepdim=True))
        warm = None if start is None else (link(start[0], "masked"), link(start[1], "masked"))
        sol = dilated_proximal_point(self.C, (self.plans[0], self.plans[1]), (centre[0], centre[1]), eta,
                                     step=self._prox_step, iters=o.prox_iters, start=warm)
        # the masked head's coordinates [logits | mask]; illegal logits are ignored by the head
        tx, ty = (torch.cat([log_behaviour(b), zp.chunk(2, -1)[1]], -1)
                  for b, zp in zip(sol.behaviours, z, strict=True))
        return (tx, ty), sol.iterations, sol.residual

    @functools.cached_property
    def _prox_step(self) -> float:
        """The mirror-prox step of the proximal solve (:func:`~hcc.games.sequence_form.mirror_prox_step`)."""
        return mirror_prox_step(self._C64)

    # -- the referee -------------------------------------------------------------------------------
    def behaviours(self, params: Params) -> tuple[Tensor, Tensor]:
        """Each player's action probabilities per information set, ``(n_infosets, K)`` (differentiable)."""
        out = []
        for p, (module, theta) in enumerate(zip(self.maps(), params, strict=True)):
            policy, x = module, (self.x_min, self.x_max)[p]
            if isinstance(module, RealizationMap):
                policy, x = module.policy, x[:, : module.n_features + module.n_actions]
                theta = {k.removeprefix("policy."): v for k, v in theta.items()}
            out.append(functional_call(policy, theta, (x,)))
        return out[0], out[1]

    def tabular_policy(self, params: Params) -> Any:
        """The current policies as an OpenSpiel ``TabularPolicy``."""
        return self.sf.tabular_policy(self._behaviour_arrays(params))

    def extra_metrics(self, params: Params, batch: Batch) -> dict[str, float]:
        """OpenSpiel's ``exploitability`` at every ``referee_every``-th call (one per logged step of a run)."""
        k = self.options.referee_every
        self._logged += 1
        if k == 0 or (self._logged - 1) % k:
            return {}
        return self.sf.referee(self._behaviour_arrays(params))

    def _behaviour_arrays(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            b0, b1 = self.behaviours(params)
        return b0.double().cpu().numpy(), b1.double().cpu().numpy()

    @property
    def lr_scale(self) -> float:
        """``speed(Kuhn poker) / speed(this game)`` (:attr:`SequenceForm.speed`): the registry's steps
        for ``openspiel`` were tuned on Kuhn poker; Leduc poker (468 information sets a player
        against 6) gets steps about 60 times smaller."""
        return sequence_form(REFERENCE_GAME).speed / max(self.sf.speed, 1e-12)

    # -- reference -----------------------------------------------------------------------------------
    def lp(self) -> tuple[float, np.ndarray, np.ndarray]:
        """``(v, x*, y*)``: the value ``min_x max_y Ψ`` and an equilibrium, by the sequence-form LP."""
        if not hasattr(self, "_lp"):
            v0, x, y = solve_lp(self.sf.payoff, *self.sf.treeplexes)
            self._lp = (-v0, x, y)
        return self._lp

    def describe(self) -> dict[str, Any]:
        tps = self.sf.treeplexes
        return {**super().describe(), "openspiel_game": str(self.sf.game),
                "infosets": [tp.n_infosets for tp in tps], "sequences": [tp.n_sequences for tp in tps],
                "lp_value": self.lp()[0]}
