"""Shared fixtures: float64 games built from the registries."""

from __future__ import annotations

import pytest
import torch

import hcc

# Tiny tensors: intra-op threads only add contention under `pytest -n 2`.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def build(name: str, seed: int = 0, **options) -> hcc.Game:
    """A game in float64 on the CPU."""
    return hcc.make_game(name, options, seed=seed).to(torch.float64)
