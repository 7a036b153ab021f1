"""Checkpoints: a run's full state saved at an interval and on SIGINT/SIGTERM, so it can resume.

A :class:`Checkpoint` lives in ``<out>/.checkpoint/``: ``run.json`` (what was asked: the
command and its resolved arguments, written when the run starts) and ``state.pt`` (where
it is: parameters, solver and preconditioner state, RNG states, step, history so far,
finished runs of a comparison or sweep), written atomically with :func:`torch.save`.

The state is saved generically, as whatever pytree the run layer hands over (dicts,
lists and tuples of tensors, numbers, strings and ``None``; generator states are uint8
tensors): new fields in a solver's state need no change here. It is read back with
``torch.load(weights_only=True)``, which rebuilds exactly those types and never runs
pickled code from the file.

Runs poll their checkpoint once per step (:meth:`Checkpoint.poll`): it saves when
``every`` seconds have passed since the last save, and when a SIGINT/SIGTERM arrived
(:meth:`Checkpoint.signals`) it saves and raises :class:`Interrupted`. A second signal
while the first is handled aborts at once (``KeyboardInterrupt``), keeping the last save.

Nested runs (a comparison's runs, a sweep's chunks) share one file:
:meth:`Checkpoint.nested` gives the inner run a view whose saves are wrapped by the
outer run's bookkeeping (its finished runs) before they are written.

>>> import hcc
>>> from hcc.checkpoint import Checkpoint
>>> game = hcc.make_game("rps"); solver = hcc.make_solver("eg", game)
>>> ckpt = Checkpoint("runs/rps-eg", every=30.0)            # doctest: +SKIP
>>> res = hcc.solve(game, solver, checkpoint=ckpt)          # Ctrl-C: saved, raises Interrupted
>>> ckpt = Checkpoint.open("runs/rps-eg")                   # later: the same call resumes
>>> res = hcc.solve(game, solver, checkpoint=ckpt)          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .records import CHECKPOINT_DIR, SCHEMA_VERSION, atomic_write, read_json, write_json
from .registry import OptionError, check_positive

#: default seconds between two saves of a running job's state
DEFAULT_EVERY = 60.0
#: exit code of a run stopped by SIGINT/SIGTERM after saving its checkpoint (128 + SIGINT)
EXIT_INTERRUPTED = 130
STATE_FILE, SPEC_FILE = "state.pt", "run.json"


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after saving its checkpoint in :attr:`folder`."""

    def __init__(self, folder: Path, where: str) -> None:
        super().__init__(f"interrupted at {where}; checkpoint saved in {folder}")
        self.folder, self.where = folder, where


class Checkpoint:
    """Where a run keeps its resumable state and when it saves it (module docstring).

    ``state`` is the state to resume from (``None``: start fresh); :meth:`open` loads it
    from a folder.
    """

    def __init__(self, out: str | Path, every: float = DEFAULT_EVERY, *, state: Any = None) -> None:
        check_positive("checkpoint interval (s)", every, allow_zero=True)
        self.out = Path(out)
        self.folder = self.out / CHECKPOINT_DIR
        self.every = float(every)
        self.state = state
        self.stop_requested = False
        self.saves = 0
        self._last = time.monotonic()
        self._parent: Checkpoint | None = None
        self._wrap: Callable[[Any], Any] | None = None
        self._label = ""
        self._depth = 0

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, out: str | Path, every: float = DEFAULT_EVERY) -> Checkpoint:
        """The checkpoint of the run in ``out``, with its saved state (``None`` if it has none yet)."""
        ckpt = cls(out, every)
        path = ckpt.folder / STATE_FILE
        if path.is_file():
            try:
                doc = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001  (any unreadable file is one message)
                raise OptionError(f"{path}: expected a checkpoint saved by hcc, got an unreadable file "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
            if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION or "state" not in doc:
                raise OptionError(f"{path}: expected a checkpoint of schema version {SCHEMA_VERSION}, got "
                                  f"{doc.get('schema_version') if isinstance(doc, dict) else type(doc).__name__!r}")
            ckpt.state = doc["state"]
        return ckpt

    @staticmethod
    def spec_of(out: str | Path) -> dict[str, Any] | None:
        """The run spec saved in ``out`` (``run.json``), or ``None`` if it holds no checkpoint."""
        path = Path(out) / CHECKPOINT_DIR / SPEC_FILE
        return read_json(path) if path.is_file() else None

    def write_spec(self, command: str, args: dict[str, Any]) -> None:
        """Record what the run is (``run.json``), before its first step."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / SPEC_FILE, "checkpoint", {"command": command, "args": args})

    # -- nesting -----------------------------------------------------------------------------------

    @property
    def root(self) -> Checkpoint:
        node = self
        while node._parent is not None:
            node = node._parent
        return node

    def nested(self, wrap: Callable[[Any], Any], state: Any = None, label: str = "") -> Checkpoint:
        """A view for an inner run: its state ``s`` is saved as ``wrap(s)`` (then wrapped by this one's
        own outer runs); ``state`` is the inner run's state to resume from; ``label`` prefixes where
        an interruption happened (e.g. ``"eg seed 2"``)."""
        child = Checkpoint.__new__(Checkpoint)
        child.__dict__.update(self.__dict__)
        child._parent, child._wrap, child.state = self, wrap, state
        child._label = ", ".join(x for x in (self._label, label) if x)
        return child

    # -- saving --------------------------------------------------------------------------------------

    def save(self, state: Any) -> None:
        """Write ``state`` (wrapped by the outer runs) to ``state.pt``, atomically."""
        node: Checkpoint = self
        while node._wrap is not None and node._parent is not None:
            state = node._wrap(state)
            node = node._parent
        root = node
        root.folder.mkdir(parents=True, exist_ok=True)
        doc = {"schema_version": SCHEMA_VERSION, "state": _plain(state)}
        atomic_write(root.folder / STATE_FILE, lambda tmp: torch.save(doc, tmp))
        root._last = time.monotonic()
        root.saves += 1

    def due(self) -> bool:
        root = self.root
        return root.stop_requested or time.monotonic() - root._last >= root.every

    def poll(self, snapshot: Callable[[], Any], where: str) -> None:
        """Called once per step: save ``snapshot()`` if due; after a signal, save and raise
        :class:`Interrupted` (``where`` says how far the run got)."""
        if not self.due():
            return
        self.save(snapshot())
        if self.root.stop_requested:
            raise Interrupted(self.root.out, ", ".join(x for x in (self._label, where) if x))

    def clear(self) -> None:
        """Remove the saved state (the run finished and its records are written); ``run.json`` stays,
        the record of what was run (and what ``--resume`` compares against)."""
        (self.root.folder / STATE_FILE).unlink(missing_ok=True)

    # -- signals ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """While inside, SIGINT/SIGTERM ask the run to save and stop at the end of its step (a second
        signal aborts at once). Only in the main thread (signal handlers live there); re-entrant."""
        root = self.root
        if threading.current_thread() is not threading.main_thread() or root._depth > 0:
            root._depth += 1
            try:
                yield
            finally:
                root._depth -= 1
            return

        def handler(signum: int, frame: Any) -> None:
            if root.stop_requested:
                raise KeyboardInterrupt
            root.stop_requested = True

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        root._depth += 1
        try:
            yield
        finally:
            root._depth -= 1
            for s, h in old.items():
                signal.signal(s, h)


def global_rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU, and every CUDA device if there is one) a run may draw from."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x: Any) -> Any:
    """``x`` with subclasses of the plain types (``TorchVersion`` is a ``str``), NumPy scalars and arrays
    turned into plain types and tensors, which ``torch.load(weights_only=True)`` rebuilds; containers
    recursively."""
    if isinstance(x, torch.Tensor) or x is None or type(x) in (bool, int, float, str):
        return x
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        items = [_plain(v) for v in x]
        return items if isinstance(x, list) else tuple(items)
    for base in (bool, int, float, str):
        if isinstance(x, base):
            return base(x)
    if getattr(x, "ndim", None) == 0 and callable(getattr(x, "item", None)):  # NumPy scalars
        return x.item()
    if hasattr(x, "__array__"):  # NumPy arrays
        return torch.as_tensor(x)
    return x


__all__ = ["DEFAULT_EVERY", "EXIT_INTERRUPTED", "Checkpoint", "Interrupted", "global_rng_state", "set_global_rng_state"]
