"""The GPU path: the same runs on ``cuda`` as on the CPU (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

import hcc
from hcc.batch import run_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("solver", ["eg", "eg+exact", "eg+cg", "eg+kfac"])
def test_solve_on_cuda_matches_cpu(solver: str) -> None:
    runs = [hcc.run("rps", solver, steps=40, device=d, dtype="float64", stop_at_tol=False) for d in ("cpu", "cuda")]
    assert runs[1].device.startswith("cuda")
    for a, b in zip(runs[0].history, runs[1].history, strict=True):
        assert abs(a["lyapunov"] - b["lyapunov"]) <= 1e-8 * max(1.0, a["lyapunov"]), (a["step"], a, b)


@cuda
def test_batched_on_cuda_matches_cpu() -> None:
    kw = dict(seeds=[0, 1, 2], steps=30, dtype="float64", stop_at_tol=False)
    cpu, gpu = (run_batch("rps", "eg+exact", device=d, **kw) for d in ("cpu", "cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert abs(a.final["lyapunov"] - b.final["lyapunov"]) <= 1e-8 * max(1.0, a.final["lyapunov"])


@cuda
def test_auto_device_picks_cuda() -> None:
    assert hcc.run("bilinear", "eg", steps=3, device="auto").device.startswith("cuda")
