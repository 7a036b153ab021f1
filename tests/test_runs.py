"""Interrupt and resume: a run stopped by SIGINT, then resumed, equals the uninterrupted run bit for bit.

One test sends a real SIGINT to a real ``hcc`` process; the others run the CLI in-process and raise
SIGINT in this process from the run's own checkpoint poll (a real signal through the run's handler,
at a chosen step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hcc_cli as cli

import hcc as api
import hcc.batch
import hcc.compare
from hcc.checkpoint import EXIT_INTERRUPTED, Checkpoint, Interrupted
from hcc.records import read_csv_rows
from hcc.registry import OptionError

REPO = Path(__file__).resolve().parents[1]


def strip_time(history: list[dict]) -> list[dict]:
    """A history without its wall-clock column (the only thing a resumed run may change)."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def same_params(a: object, b: object) -> bool:
    """Bitwise equality of two saved parameter pytrees."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb))


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def interrupt_at_poll(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Send SIGINT to this process at the ``n``-th checkpoint poll (the run's handler takes it)."""
    calls = [0]
    poll = Checkpoint.poll

    def poll_and_signal(self: Checkpoint, snapshot, where: str) -> None:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return poll(self, snapshot, where)

    monkeypatch.setattr(Checkpoint, "poll", poll_and_signal)
    return calls


# -- a real SIGINT to a real hcc process ---------------------------------------------------------


def test_sigint_to_hcc_solve_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    out, ref = tmp_path / "interrupted", tmp_path / "reference"
    args = ["solve", "bilinear", "-s", "eg", "--steps", "300", "--log-every", "3", "-g", "dim=3", "--tol", "1e-30",
            "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", "from hcc.cli import main; main()", *args, "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # streamed rows show it is mid-run
        hist = out / "history.csv"
        if hist.is_file() and hist.read_text().count("\n") >= 5:  # the header and 4 rows
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, (stdout, stderr)
    assert "Interrupted at step" in stderr and f"hcc resume {out}" in stderr and "Traceback" not in stderr
    assert not (out / "result.json").exists() and (out / ".checkpoint" / "state.pt").is_file()
    rows = read_csv_rows(out / "history.csv")  # streamed: every finished row, a valid CSV
    assert 4 <= len(rows) < 101 and [r["step"] for r in rows] == list(range(0, 3 * len(rows), 3))
    partial = api.Result.load(out)  # the loader reads an unfinished run from its streamed history
    assert partial.status == "interrupted" and len(partial.history) == len(rows)

    assert cli("resume", out, "-q").exit_code == 0
    assert cli(*args, "-o", ref).exit_code == 0
    a, b = result(out), result(ref)
    assert a["steps_run"] == b["steps_run"] == 300
    assert strip_time(a["history"]) == strip_time(b["history"])
    assert same_params(torch.load(out / "params.pt"), torch.load(ref / "params.pt"))
    assert not (out / ".checkpoint" / "state.pt").exists()  # finished: the state is gone, run.json stays
    assert cli("resume", out).exit_code == 2  # nothing left to resume


# -- in-process SIGINT at a chosen step -------------------------------------------------------------


def test_interrupted_solve_seeds_resumes_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, ref = tmp_path / "interrupted", tmp_path / "reference"
    args = ["solve", "rps", "-s", "eg", "--seeds", "3", "--steps", "30", "-g", "width=8", "-q", "--tol", "1e-12"]
    assert cli(*args, "-o", ref).exit_code == 0
    interrupt_at_poll(monkeypatch, 12)
    res = cli(*args, "-o", out)
    assert res.exit_code == EXIT_INTERRUPTED and "step 12 of 30" in res.stderr, res.output
    monkeypatch.undo()
    assert cli(*args, "-o", out, "--resume").exit_code == 0  # the command itself, with --resume
    a, b = result(out), result(ref)
    for ra, rb in zip(a["records"], b["records"], strict=True):
        assert strip_time(ra["history"]) == strip_time(rb["history"]) and ra["status"] == rb["status"]
    assert same_params(torch.load(out / "params.pt"), torch.load(ref / "params.pt"))


def test_interrupted_compare_resumes_bitwise_and_skips_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, ref = tmp_path / "interrupted", tmp_path / "reference"
    args = ["compare", "rps", "--solvers", "gda,eg", "--seeds", "2", "--steps", "25", "-g", "width=8", "--no-pdf",
            "-q", "--tol", "1e-12"]
    assert cli(*args, "-o", ref).exit_code == 0
    interrupt_at_poll(monkeypatch, 24 + 10)  # run 1 polls at steps 1..24: stop at step 10 of run 2
    res = cli(*args, "-o", out)
    assert res.exit_code == EXIT_INTERRUPTED and "gda lr=0.05 seed 1, step 10 of 25" in res.stderr, res.output
    monkeypatch.undo()

    runs = []
    real_run = hcc.compare.run

    def counting_run(*a, **kw):
        runs.append((a[1], kw["seed"]))
        return real_run(*a, **kw)

    monkeypatch.setattr(hcc.compare, "run", counting_run)
    assert cli("resume", out, "-q").exit_code == 0
    assert runs == [("gda", 1), ("eg", 0), ("eg", 1)]  # gda seed 0 had finished: not run again
    for name in ("gda-seed0", "gda-seed1", "eg-seed0", "eg-seed1"):
        a, b = result(out / "runs" / name), result(ref / "runs" / name)
        assert strip_time(a["history"]) == strip_time(b["history"]), name
        assert same_params(torch.load(out / "runs" / name / "params.pt"), torch.load(ref / "runs" / name / "params.pt"))
    ca, cb = (json.loads((d / "compare.json").read_text()) for d in (out, ref))
    assert [r["final"] for r in ca["runs"]] == [r["final"] for r in cb["runs"]]


def test_interrupted_sweep_resume_skips_finished_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, ref = tmp_path / "interrupted", tmp_path / "reference"
    args = ["sweep", "rps", "-s", "eg", "--lr", "0.05,0.1", "--seeds", "2", "--chunk", "2", "--steps", "20",
            "-g", "width=8", "-q", "--tol", "1e-12"]
    assert cli(*args, "-o", ref).exit_code == 0
    interrupt_at_poll(monkeypatch, 19 + 5)  # chunk 1 polls at steps 1..19: stop chunk 2 at step 5
    res = cli(*args, "-o", out)
    assert res.exit_code == EXIT_INTERRUPTED and "chunk 2 of 2, step 5 of 20" in res.stderr, res.output
    monkeypatch.undo()
    chunks = []
    real_chunk = hcc.batch._run_chunk
    monkeypatch.setattr(hcc.batch, "_run_chunk", lambda spec, c=None: chunks.append(spec["lrs"]) or real_chunk(spec, c))
    assert cli("resume", out, "-q").exit_code == 0
    assert chunks == [[0.1, 0.1]]
    assert (out / "sweep.csv").read_text() == (ref / "sweep.csv").read_text()


def test_interrupted_gan_resumes_bitwise_with_its_sampling_stream_and_sample_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stochastic game: the batch sampler's RNG and the kept sample snapshots are checkpointed too."""
    out, ref = tmp_path / "interrupted", tmp_path / "reference"
    args = ["solve", "gan", "-s", "adam", "--steps", "30", "--log-every", "3", "-g", "width=8", "-g", "batch_size=16",
            "-g", "n_eval=64", "-q"]
    assert cli(*args, "-o", ref).exit_code == 0
    interrupt_at_poll(monkeypatch, 17)
    assert cli(*args, "-o", out).exit_code == EXIT_INTERRUPTED
    monkeypatch.undo()
    assert cli("resume", out, "-q").exit_code == 0
    assert strip_time(result(out)["history"]) == strip_time(result(ref)["history"])
    assert same_params(torch.load(out / "params.pt"), torch.load(ref / "params.pt"))
    assert (out / "samples.png").read_bytes() == (ref / "samples.png").read_bytes()


# -- the API ------------------------------------------------------------------------------------------


def test_api_checkpoint_resumes_the_same_run_and_refuses_another(tmp_path: Path) -> None:
    game = api.make_game("rps", {"width": 8}, seed=1)
    solver = api.make_solver("eg", game)
    ref = api.solve(game, solver, steps=30, tol=1e-12)
    ckpt = Checkpoint(tmp_path, every=0.0)

    def stop_at(step: int, row: dict) -> None:
        if step == 11:
            ckpt.stop_requested = True

    with pytest.raises(Interrupted, match="step 11 of 30"):
        api.solve(game, solver, steps=30, tol=1e-12, checkpoint=ckpt, progress=stop_at)
    again = api.solve(game, solver, steps=30, tol=1e-12, checkpoint=Checkpoint.open(tmp_path))
    assert strip_time(again.history) == strip_time(ref.history) and same_params(again.params, ref.params)
    other = api.make_solver("eg", game, lr=0.05)
    with pytest.raises(OptionError, match="another run"):
        api.solve(game, other, steps=30, checkpoint=Checkpoint.open(tmp_path))


def test_a_second_signal_aborts_at_once(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, every=1e9)
    before = signal.getsignal(signal.SIGINT)
    with ckpt.signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert ckpt.stop_requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_checkpoint_state_is_generic_and_loaded_without_pickled_code(tmp_path: Path) -> None:
    """Whatever pytree a solver keeps (new fields included) round-trips; weights_only refuses objects."""
    ckpt = Checkpoint(tmp_path, every=0.0)
    gen = torch.Generator().manual_seed(3)
    state = {"rule": {"prev": (torch.ones(2), torch.zeros(3))}, "trust": [0.5, 1e-3], "calls": 7,
             "rng": gen.get_state(), "nothing": None, "name": "x", "version": torch.__version__,
             "np": (np.float64(0.25), np.int64(3), np.arange(3.0))}
    ckpt.save(state)
    back = Checkpoint.open(tmp_path).state
    assert back["version"] == str(torch.__version__) and back["np"][:2] == (0.25, 3)
    assert torch.equal(back["np"][2], torch.arange(3.0, dtype=torch.float64))
    assert back["trust"] == [0.5, 1e-3] and back["calls"] == 7 and torch.equal(back["rng"], gen.get_state())
    assert torch.equal(back["rule"]["prev"][1], torch.zeros(3)) and back["nothing"] is None
    torch.save({"schema_version": 1, "state": Checkpoint}, tmp_path / ".checkpoint" / "state.pt")
    with pytest.raises(OptionError, match="unreadable"):
        Checkpoint.open(tmp_path)
