"""Regularized zero-sum matrix games with neural strategy maps; rock-paper-scissors.

.. math::

    Ψ(θ, φ) = E_x[F_θ(x)ᵀ M G_φ(x')] + λ/2 (E‖F_θ − u‖² − E‖G_φ − u‖²),

with ``F_θ = softmax(MLP_θ(x))`` over the min player's ``m`` actions and
``G_φ = softmax(MLP_φ(x'))`` over the max player's ``k`` actions, ``u`` uniform.
With ``n_support > 1`` each player plays one mixed strategy per support point
(a contextual policy); the equilibrium is the same at every point.

The function-space equilibrium is computed, not assumed, exact to round-off and
certified (:func:`~hcc.games.equilibrium.certified_equilibrium`; the record is
:attr:`MatrixGame.certificate`); for rock-paper-scissors (Mladenovic, Sakos &
Piliouras; ``λ = 0.1``) it is uniform for both players, in closed form.

With ``param="functional"`` each player's parameters are its mixed strategies on the
support (:class:`~hcc.games.maps.Tabular`, one point of ``Δ`` per support point,
initialised to the networks' values and kept on the simplex by Euclidean
projection): plain GDA / extragradient on them are projected GDA / extragradient
on ``L(F, G)``, the function-space dynamics that the natural-gradient flow of the
network parametrization reproduces (softmax Jacobians have rows summing to zero,
so the natural direction moves ``F`` along the simplex's tangent: the projected
gradient, in the interior).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..registry import OptionError, opt
from .base import Batch, Game, seeded
from .equilibrium import Certificate, CertificationError, Equilibrium, certified_equilibrium
from .maps import NETWORK_HELP, check_network, strategy_network, tabulate
from .simplex import matrix_game_gap

RPS_MATRIX = [[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]]


def parse_payoff(spec: str) -> list[list[float]]:
    """A payoff matrix from a CSV file path or inline ``"a,b;c,d"`` rows.

    Text with a ``;`` or a ``,`` is inline rows (never looked up as a file: an inline matrix
    may be longer than a file name may be); write numbers with ``repr`` to keep float64.
    Raises :class:`OptionError` on ragged rows, non-numbers or an empty matrix.
    """
    path = Path(spec)
    inline = ";" in spec or "," in spec
    if not inline and (path.suffix.lower() in (".csv", ".txt") or path.exists()):
        if not path.exists():
            raise OptionError(f"payoff: expected a CSV file or inline rows 'a,b;c,d', got missing file {spec!r}")
        rows = [r for r in csv.reader(io.StringIO(_read_payoff_file(path))) if any(c.strip() for c in r)]
        where = f"payoff file {spec!r}"
    else:
        rows = [r.split(",") for r in spec.split(";") if r.strip()]
        where = f"inline payoff {spec!r}"
    rows = [_no_blank_cells(r, i, where) for i, r in enumerate(rows, 1)]
    try:
        M = [[float(c) for c in r] for r in rows]
    except ValueError as e:
        raise OptionError(f"{where}: expected numbers, got {e}") from None
    if not M or not M[0]:
        raise OptionError(f"{where}: expected a non-empty matrix, got no numbers")
    widths = {len(r) for r in M}
    if len(widths) != 1:
        raise OptionError(f"{where}: expected rows of equal length, got lengths {sorted(widths)}")
    if any(x != x or abs(x) == float("inf") for r in M for x in r):
        raise OptionError(f"{where}: expected finite numbers, got NaN/inf")
    return M


def _read_payoff_file(path: Path) -> str:
    """The text of a payoff file (UTF-8, a leading byte-order mark dropped), else a one-line error."""
    what = f"payoff: expected a UTF-8 CSV file of numbers, got {str(path)!r}"
    if path.is_dir():
        raise OptionError(f"{what}, a folder")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise OptionError(f"{what}, a binary (non-UTF-8) file") from None
    except OSError as e:
        raise OptionError(f"{what} ({e.strerror or e})") from None


def _no_blank_cells(row: list[str], i: int, where: str) -> list[str]:
    """``row`` without its trailing empty cells (``1,2,``); an empty cell between numbers is an error."""
    cells = list(row)
    while cells and not cells[-1].strip():
        cells.pop()
    for j, c in enumerate(cells, 1):
        if not c.strip():
            raise OptionError(f"{where}: expected a number in every cell, got an empty cell at row {i}, column {j}")
    return cells


@dataclass
class RPSOptions:
    """The options of a softmax-of-MLP matrix game other than its payoff (all of ``rps``'s)."""

    lam: float = opt(0.1, "λ ≥ 0, strength of the regularizer (0.1 in the hidden-RPS paper)")
    width: int = opt(32, "hidden width of each player's MLP")
    depth: int = opt(2, "number of hidden layers")
    input_dim: int = opt(4, "dimension of the fixed inputs x")
    n_support: int = opt(1, "number of support points (contexts) per player")
    activation: str = opt("tanh", "hidden activation (tanh, relu, elu)")
    out_scale: float = opt(3.0, "gain on the last layer's init (larger: start farther from uniform)")
    param: Literal["network", "functional"] = opt(
        "network", "strategy parametrization: network (softmax∘MLP, the hidden game) | "
        "functional (the mixed strategies themselves, kept on the simplex)"
    )
    network: str = opt("mlp", NETWORK_HELP)

    def validate(self) -> None:
        check_network(self.network)
        if self.lam < 0:
            raise OptionError(f"lam: expected λ ≥ 0, got {self.lam}")
        for k in ("width", "input_dim", "n_support"):
            if getattr(self, k) < 1:
                raise OptionError(f"{k}: expected a positive integer, got {getattr(self, k)}")
        if self.depth < 0:
            raise OptionError(f"depth: expected ≥ 0, got {self.depth}")


@dataclass
class MatrixOptions(RPSOptions):
    payoff: str = opt("0,1,-1;-1,0,1;1,-1,0", "payoff matrix M (min player's rows): CSV path or 'a,b;c,d'")


class MatrixGame(Game):
    """A λ-regularized zero-sum matrix game with softmax-of-MLP strategies."""

    name = "matrix"
    Options = MatrixOptions

    def __init__(self, options: MatrixOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        o = options
        M = torch.tensor(parse_payoff(o.payoff), dtype=torch.float64)
        m, k = M.shape
        with seeded(seed):
            net = (o.network, o.input_dim, o.width, o.depth)
            self.min_map = strategy_network(*net, m, o.activation, nn.Softmax(-1), o.out_scale)
            self.max_map = strategy_network(*net, k, o.activation, nn.Softmax(-1), o.out_scale)
            self.register_buffer("x_min", torch.randn(o.n_support, o.input_dim))
            self.register_buffer("x_max", torch.randn(o.n_support, o.input_dim))
        if o.param == "functional":  # the strategies themselves, starting where the networks start
            self.min_map = tabulate(self.min_map, self.x_min, "simplex")
            self.max_map = tabulate(self.max_map, self.x_max, "simplex")
        eq = self.solve_equilibrium(M.numpy(), o.lam)
        #: how ``(F*, G*)`` was obtained and checked
        self.certificate: Certificate = eq.certificate
        Fs, Gs = torch.from_numpy(eq.F), torch.from_numpy(eq.G)
        self.register_buffer("M", M.float())
        self.register_buffer("F_star", Fs.float())
        self.register_buffer("G_star", Gs.float())
        # keep the float64 values so .to(float64) restores full precision
        self._exact = (M, Fs, Gs)

    @staticmethod
    def solve_equilibrium(M: np.ndarray, lam: float) -> Equilibrium:
        try:
            return certified_equilibrium(M, lam)
        except CertificationError as e:
            raise OptionError(f"payoff: expected a game whose equilibrium can be certified, got {e}") from None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # re-derive buffers from the float64 originals, then cast like x_min
        M, Fs, Gs = self._exact
        ref = self.x_min
        self.M = M.to(device=ref.device, dtype=ref.dtype)
        self.F_star = Fs.to(device=ref.device, dtype=ref.dtype)
        self.G_star = Gs.to(device=ref.device, dtype=ref.dtype)
        return self

    @property
    def lr_scale(self) -> float:
        """``min(1, b(RPS) / b(M))``, ``b(M) = ‖P_m M P_k‖₂`` with ``P = I − 11ᵀ/n``: the rotation
        speed of the field on the simplices' tangent spaces, for which the default steps were tuned
        on RPS (``b = √3``). Extragradient, for one, is stable only for ``h·b`` below a constant.

        Never above 1: a weaker interaction does not make larger steps safe, because the
        regularizer and the payoff's additive part ``M_ij = a_i + c_j`` (which ``P M P`` removes)
        then set the stiffness. Measured: ``1,2;3,4`` (no interaction, ``b = 0``) converges with
        eg at the RPS step 0.1 in 211 steps and stalls at 5× (V = 0.35 after 2000 steps);
        ``ε·RPS`` converges at 10× the RPS step and fails at 100× for ε = 0.01."""
        return min(1.0, _tangent_norm(RPS_M64) / max(_tangent_norm(self._exact[0]), 1e-300))

    def describe(self) -> dict[str, Any]:
        """Also the payoff matrix itself and its SHA-256 (an edited payoff file changes the record)."""
        M = self._exact[0].tolist()
        digest = hashlib.sha256(json.dumps(M).encode()).hexdigest()
        return {**super().describe(), "payoff_matrix": M, "payoff_sha256": digest}

    def payoff(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        lam = self.options.lam
        m, k = self.M.shape
        bil = ((F @ self.M) * G).sum(-1).mean()
        reg = 0.5 * lam * ((F - 1.0 / m).pow(2).sum(-1).mean() - (G - 1.0 / k).pow(2).sum(-1).mean())
        return bil + reg

    def equilibrium(self, batch: Batch) -> tuple[Tensor, Tensor]:
        n_f, n_g = batch["x_min"].shape[0], batch["x_max"].shape[0]
        return self.F_star.expand(n_f, -1), self.G_star.expand(n_g, -1)

    def duality_gap(self, F: Tensor, G: Tensor, batch: Batch) -> Tensor:
        # the payoff pairs support point i of F with point i of G
        return matrix_game_gap(F, G, self.M, self.options.lam)


def _tangent_norm(M: Tensor) -> float:
    m, k = M.shape
    P = [torch.eye(n, dtype=M.dtype) - 1.0 / n for n in (m, k)]
    return float(torch.linalg.matrix_norm(P[0] @ M @ P[1], ord=2))


RPS_M64 = torch.tensor(RPS_MATRIX, dtype=torch.float64)


class RPS(MatrixGame):
    """Hidden rock-paper-scissors: the matrix game with ``M`` = RPS; equilibrium uniform."""

    name = "rps"
    Options = RPSOptions
    lr_scale = 1.0  # type: ignore[assignment]  # its own defaults (the "rps" row of the registry)

    def __init__(self, options: RPSOptions, seed: int = 0) -> None:
        payoff = ";".join(",".join(str(x) for x in r) for r in RPS_MATRIX)
        super().__init__(MatrixOptions(payoff=payoff, **vars(options)), seed)
        self.options = options  # type: ignore[assignment]

    @staticmethod
    def solve_equilibrium(M: np.ndarray, lam: float) -> Equilibrium:
        """Closed form: uniform for every ``λ ≥ 0`` (``Mu = 0``, the regularizer's centre)."""
        u = np.full(3, 1.0 / 3)
        cert = Certificate("closed form (uniform)", lam, (3, 3), (3, 3), 0.0, 1.0 / 3, 0.0 if lam > 0 else None, True,
                           "rock-paper-scissors: fully mixed, nonsingular kernel")
        return Equilibrium(u, u.copy(), 0.0, cert)
