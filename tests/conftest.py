"""Shared fixtures and helpers: float64 games from the registries, the CLI runner and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

import hcc
from hcc.cli import main

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


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hcc_cli(*args: str | Path) -> Result:
    """Invoke the ``hcc`` command line in-process (click's runner); stdout and stderr apart."""
    return CliRunner().invoke(main, [str(a) for a in args])


def load(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def assert_one_line_error(res: Result, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one ``Error: …`` line on stderr containing ``needles``."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_image(path: Path, magic: bytes = PNG_MAGIC) -> None:
    """A non-trivial image file (PNG by default; pass ``b"%PDF"`` for a PDF)."""
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[: len(magic)] == magic
