r"""The curvature layer: metrics of a map and their linear operators, knowing nothing of games.

From ``(module, params, x)`` — a map ``F_θ`` (an ``nn.Module``), its parameters as a dict and
a support of ``n`` points — and a geometry (:mod:`~hcc.curvature.heads`: ``l2``, ``fisher``,
``logit``) this package builds the metric ``A = ĴᵀĴ/n`` and operators that apply it and its
damped (pseudo-)inverse. The data flow is one-way: game → curvature → preconditioner → rule →
solver → run; nothing here imports a game or a solver.

- :mod:`~hcc.curvature.pytree`: flat vectors, stacking, leaf-wise arithmetic;
- :mod:`~hcc.curvature.heads`: output heads and the output factors ``Q`` of each geometry;
- :mod:`~hcc.curvature.jacobians`: per-sample Jacobians (``func``/``backpack``), BackPACK twins,
  the structured MLP factors, :class:`~hcc.curvature.jacobians.MetricMap`;
- :mod:`~hcc.curvature.operators`: the operator base class, the exact operators (kernel,
  structured, dense), CG;
- :mod:`~hcc.curvature.layers`, :mod:`~hcc.curvature.kfac`, :mod:`~hcc.curvature.diag`: the
  block structure of a map (``nn.Linear`` and ``nn.Conv2d`` layers), K-FAC and the diagonal GGN.

Measurements (accuracy, speed, tuning) are in ``docs/curvature.md`` and ``docs/kfac.md``.
"""

from .diag import DiagInverse, DiagOperator, diag_operator, ggn_diagonal
from .heads import GEOMETRIES, Geometry, Head, output_factor, split_head
from .jacobians import (
    MetricMap,
    jacobian_matrix,
    metric_map,
    per_sample_jacobian,
    supports_structured,
)
from .kfac import KFACInverse, KFACOperator, KronFactors, kfac_operator, kronecker_factors
from .layers import Layer, MapStructure, analyze_map, dense_metric, metric_jacobian
from .operators import (
    CGOperator,
    CGResult,
    CurvatureOperator,
    DenseOperator,
    KernelOperator,
    StructuredOperator,
    cg_natural_direction,
    choose_method,
    exact_natural_direction,
    exact_operator,
)

__all__ = [
    # geometry
    "GEOMETRIES", "Geometry", "Head", "output_factor", "split_head",
    # Jacobians
    "MetricMap", "jacobian_matrix", "metric_map", "per_sample_jacobian", "supports_structured",
    # operators
    "CurvatureOperator", "KernelOperator", "StructuredOperator", "DenseOperator", "CGOperator", "CGResult",
    "exact_operator", "choose_method", "exact_natural_direction", "cg_natural_direction",
    # block-diagonal approximations
    "Layer", "MapStructure", "analyze_map", "dense_metric", "metric_jacobian",
    "KronFactors", "KFACOperator", "KFACInverse", "kronecker_factors", "kfac_operator",
    "DiagOperator", "DiagInverse", "ggn_diagonal", "diag_operator",
]
