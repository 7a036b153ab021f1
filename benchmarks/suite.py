"""Benchmark suite of hidden matrix-game families with certified equilibria: prints the tables.

Every family of :data:`hcc.suite.FAMILIES` (``hcc suite --list``) in float64 and float32: the
hcc solvers at their defaults (default: exact-natgrad, cg-natgrad, kfac-natgrad) and the
baselines with a step size picked per family on separate tuning instances (plain eg,
consensus, and CGDs' ACGD on the same initial networks). Per family x dtype x solver: the
converged fraction within 1000 steps (V <= 1e-6), median iterations and median wall-clock to
V <= 1e-6, median final V; then the targets ([met]/[not met] with the numbers): the best hcc
solver at its defaults converges on >= 95% of all runs, its median iterations and wall-clock
are <= ACGD's on every family x dtype, and it reaches V <= 1e-8 on rps (λ = 0.1) in <= 10
iterations.

This script is the ``hcc suite`` command (same options, same output)::

    python benchmarks/suite.py --quick                    # smoke run, about a minute
    python benchmarks/suite.py -o runs/suite              # the full suite (long: see the README)
    python benchmarks/suite.py -f rps,gauss-l0.1 -s exact-natgrad,eg+cg -b eg,acgd

Wall-clock is the time inside the solver steps; on a shared machine it is noisy, and
comparisons are only meaningful within one run.
"""

from __future__ import annotations

import sys

from hcc.cli import main

if __name__ == "__main__":
    main(["suite", *sys.argv[1:]], prog_name="benchmarks/suite.py")
