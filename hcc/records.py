"""Records on disk: files that are never half-written, output folders checked first, one loader.

Every file a command leaves is either

- **streamed**: ``history.csv`` grows row by row as the run logs, each row flushed (a
  reader sees every finished row; a killed process leaves at worst one partial last
  line, which :func:`read_csv_rows` drops), or
- **atomic**: written to a temporary file in the same folder, flushed to disk and
  renamed over the target (:func:`atomic_write`), so it is either the old file, the new
  one, or absent — never a prefix.

Every JSON file carries ``schema_version`` (:data:`SCHEMA_VERSION`) and ``kind`` (which
command wrote it: :data:`KINDS`). :func:`read_record` is the one loader of every folder the
tool writes (legacy folders without a schema version included); anything else gets a
one-line :class:`~hcc.registry.OptionError` saying what was found.

:func:`prepare_out` checks an output folder before any work: created, writable, and
either new, empty, an earlier run to resume (``resume``) or one to replace (``overwrite``,
which clears it, but only if everything in it was written by hcc).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import OptionError

#: version of the layout of every JSON record; bumped when a field changes meaning
SCHEMA_VERSION = 1
#: the record each command leaves, by kind: its JSON file
KINDS: dict[str, str] = {
    "solve": "result.json", "seeds": "result.json", "sweep": "result.json", "compare": "compare.json",
    "spectrum": "spectrum.json",
}
#: the folder inside an output folder that holds a resumable run's state
CHECKPOINT_DIR = ".checkpoint"
#: every name a command writes into its folder (``--overwrite`` clears only folders made of these)
OUTPUT_NAMES = frozenset({
    "result.json", "history.csv", "lyapunov.png", "samples.png", "params.pt", "seeds.csv", "sweep.csv",
    "summary.csv", "sweep.png", "compare.json", "compare.png", "compare.pdf", "histories.csv", "table.md",
    "spectrum.json", "spectrum.png", "field.png", CHECKPOINT_DIR, "runs",
})
_TMP_MARK = ".tmp-"


# -- writing ---------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a temporary path beside ``path``, flush it to disk, rename it to ``path``.

    A crash or a signal at any point leaves either the previous ``path`` or the new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) into ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def jsonable(x: Any) -> Any:
    """NaN/inf → ``None`` (strict JSON), tuples → lists, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write_json(path: str | Path, kind: str, data: Mapping[str, Any]) -> Path:
    """A JSON record of ``kind``: ``schema_version`` and ``kind`` first, then ``data``; atomically."""
    doc = {"schema_version": SCHEMA_VERSION, "kind": kind, **{k: v for k, v in data.items()
                                                                 if k not in ("schema_version", "kind")}}
    return write_text(path, json.dumps(jsonable(doc), indent=1, allow_nan=False, ensure_ascii=False) + "\n")


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig`` atomically (the format from ``path``'s suffix)."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), **kwargs))


def blank_nonfinite(v: Any) -> Any:
    """The default CSV cell: NaN/inf as empty, everything else as it is."""
    return "" if isinstance(v, float) and not math.isfinite(v) else v


def _columns(rows: Iterable[Mapping[str, Any]], first: Sequence[str] = ()) -> list[str]:
    keys: list[str] = list(first)
    for row in rows:
        keys += [k for k in row if k not in keys]
    return keys


def _csv_text(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], cell: Callable[[Any], Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(keys))
    w.writeheader()
    for row in rows:
        w.writerow({k: cell(v) for k, v in row.items()})
    return buf.getvalue()


def write_history_csv(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    first: Sequence[str] = (),
    cell: Callable[[Any], Any] = blank_nonfinite,
) -> Path:
    """Rows as CSV, atomically: columns ``first``, then every other key in order of appearance; each
    value written as ``cell(value)`` (default: NaN/inf → empty)."""
    return write_text(path, _csv_text(history, _columns(history, first), cell))


class HistoryStream:
    """``history.csv`` written while a run produces it.

    Each row is appended and flushed. A row that brings a new column (the first step's
    measurements, a divergence row's ``param_norm``) rewrites the file so far atomically
    with the wider header, so the file is a valid CSV after every row.
    """

    def __init__(self, path: str | Path, rows: Sequence[Mapping[str, Any]] = (),
                 cell: Callable[[Any], Any] = blank_nonfinite) -> None:
        self.path, self.cell = Path(path), cell
        self.rows: list[Mapping[str, Any]] = list(rows)
        self.keys = _columns(self.rows)
        self._fh: io.TextIOWrapper | None = None
        self._rewrite()

    def _rewrite(self) -> None:
        if self._fh is not None:
            self._fh.close()
        write_text(self.path, _csv_text(self.rows, self.keys, self.cell) if self.keys else "")
        self._fh = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115  (kept open: appended to)

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.keys]
        if new or self._fh is None:
            self.keys += new
            self._rewrite()
            return
        csv.DictWriter(self._fh, fieldnames=self.keys).writerow({k: self.cell(v) for k, v in row.items()})
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# -- reading ---------------------------------------------------------------------------------------


def read_csv_rows(path: str | Path) -> list[dict[str, float | str]]:
    """A CSV written by hcc: numbers as floats, other text kept, empty cells dropped; a partial
    last line (a process killed mid-write) is ignored."""
    text = Path(path).read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        out.append({k: _number(v) for k, v in row.items() if k is not None and v not in ("", None)})
    return out


def _number(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


@dataclass
class Record:
    """A folder written by hcc, as found on disk."""

    kind: str  #: a key of :data:`KINDS`
    path: Path  #: the folder
    data: dict[str, Any]  #: its JSON record (for an unfinished run: the checkpoint's run spec)
    finished: bool = True  #: False for a run in progress or interrupted (``hcc resume`` continues it)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line error saying what is wrong with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OptionError(f"{path}: expected a JSON record, got a binary file") from None
    except OSError as e:
        raise OptionError(f"{path}: expected a readable JSON record, got {e.strerror or e}") from None
    if not text.strip():
        raise OptionError(f"{path}: expected a JSON record, got an empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionError(f"{path}: expected a complete JSON record, got invalid or truncated JSON ({e.msg} at "
                          f"line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{path}: expected a JSON object (an hcc record), got a JSON {type(data).__name__}")
    version = data.get("schema_version", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise OptionError(f"{path}: expected a record of schema version ≤ {SCHEMA_VERSION} (this hcc), got "
                          f"{version!r}; update hcc to read it")
    return data


#: keys a record of each kind must hold to be read
_REQUIRED = {
    "solve": ("game", "solver", "history"), "seeds": ("records",), "sweep": ("records",),
    "compare": ("game", "solvers", "runs", "summaries"), "spectrum": ("game", "solver"),
}


def _legacy_kind(name: str, data: Mapping[str, Any]) -> str | None:
    """The kind of a record written before schema versions (by its file name and keys)."""
    if name == "compare.json":
        return "compare"
    if name == "spectrum.json":
        return "spectrum"
    if "records" in data:
        return "sweep" if "lrs" in data else "seeds"
    return "solve" if "history" in data else None


def read_record(path: str | Path) -> Record:
    """The hcc folder at ``path`` (or the record file itself): which command wrote it and its record.

    A folder with a checkpoint but no final record is an unfinished run (``finished=False``,
    ``data`` = its run spec). Anything else raises a one-line
    :class:`~hcc.registry.OptionError` naming what was found.
    """
    p = Path(path)
    if p.is_file():
        if p.name not in set(KINDS.values()):
            raise OptionError(f"{path}: expected an hcc record ({', '.join(sorted(set(KINDS.values())))}) or "
                              f"its folder, got a file named {p.name!r}")
        names = [p.name]
        p = p.parent
    elif p.is_dir():
        names = [n for n in dict.fromkeys(KINDS.values()) if (p / n).is_file()]
    else:
        raise OptionError(f"{path}: expected an hcc output folder, got a path that does not exist")
    for name in names:
        data = read_json(p / name)
        kind = data.get("kind") if "schema_version" in data else _legacy_kind(name, data)
        if kind not in KINDS or KINDS[kind] != name:
            what = f"of kind {kind!r}" if kind is not None else f"with keys {', '.join(list(data)[:5]) or 'none'}"
            raise OptionError(f"{p / name}: expected an hcc record ({', '.join(KINDS)}), got a JSON object {what}")
        missing = [k for k in _REQUIRED[kind] if k not in data]
        if missing:
            raise OptionError(f"{p / name}: expected an hcc {kind} record, got one without {missing[0]!r}")
        return Record(kind, p, data)
    spec = p / CHECKPOINT_DIR / "run.json"
    if spec.is_file():
        data = read_json(spec)
        return Record(str(data.get("command", "?")), p, data, finished=False)
    found = ", ".join(sorted(c.name for c in p.iterdir())[:5]) or "nothing"
    raise OptionError(f"{path}: expected an hcc output folder (result.json, compare.json or spectrum.json), "
                      f"found {found}")


# -- output folders --------------------------------------------------------------------------------


def hcc_written(folder: Path) -> str | None:
    """``None`` if everything in ``folder`` was written by hcc, else the first foreign entry's name."""
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if _TMP_MARK in name:
            continue
        if name not in OUTPUT_NAMES:
            return name
        if name == "runs" and entry.is_dir():
            for run in entry.iterdir():
                bad = hcc_written(run) if run.is_dir() else run.name
                if bad is not None:
                    return f"runs/{run.name}/{bad}" if run.is_dir() else f"runs/{bad}"
    return None


def prepare_out(
    out: str | Path | None,
    *,
    default_root: Path,
    default_stem: str,
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Check (and create) the output folder before any work; return it.

    ``out=None``: a new ``default_root/default_stem`` (``-2``, ``-3``, … if taken). A given
    folder is created if missing; if it holds anything it is refused, unless ``resume``
    (the caller continues the run in it) or ``overwrite`` (it is cleared, provided
    everything in it was written by hcc). Finally a probe file checks that it is writable.
    Every failure is a one-line :class:`~hcc.registry.OptionError` naming the folder.
    """
    if out is None:
        path = _new_dir(Path(default_root), default_stem)
    else:
        if str(out).strip() == "":
            raise OptionError("--out: expected a folder path, got ''")
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise OptionError(f"--out: expected a folder, got the file {str(path)!r}")
        if path.is_dir() and any(path.iterdir()) and not resume:
            if not overwrite:
                raise OptionError(f"--out: expected a new or empty folder, got {str(path)!r} holding "
                                  f"{folder_listing(path)}; pass --overwrite to replace it or --resume to continue it")
            _clear(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptionError(f"--out: expected a folder that can be created, got {str(path)!r} "
                              f"({e.strerror or e})") from None
    _check_writable(path)
    return path


def folder_listing(path: Path) -> str:
    names = sorted(c.name for c in path.iterdir())
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _clear(path: Path) -> None:
    """Empty ``path`` (``--overwrite``), only if every entry in it was written by hcc."""
    foreign = hcc_written(path)
    if foreign is not None:
        raise OptionError(f"--overwrite: expected a folder written by hcc, got {str(path)!r} holding "
                          f"{foreign!r}; remove the folder yourself or pick another --out")
    for entry in path.iterdir():
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError as e:
            raise OptionError(f"--overwrite: could not remove {str(entry)!r} ({e.strerror or e})") from None


def _new_dir(root: Path, stem: str) -> Path:
    """Create and return ``root/stem`` (``stem-2``, ``stem-3``, … if taken)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            path = root / (stem if i == 1 else f"{stem}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise OptionError(f"--out: expected a writable default folder {str(root / stem)!r} (under the current "
                          f"folder), got {e.strerror or e}; pass --out") from None
    raise OptionError(f"--out: could not create a new folder {str(root / stem)}-N (all taken); pass --out")


def _check_writable(path: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=f".probe{_TMP_MARK}"):
            pass
    except OSError as e:
        raise OptionError(f"--out: expected a writable folder, got {str(path)!r} ({e.strerror or e})") from None


__all__ = [
    "CHECKPOINT_DIR", "KINDS", "OUTPUT_NAMES", "SCHEMA_VERSION", "HistoryStream", "Record", "atomic_write",
    "blank_nonfinite", "folder_listing", "hcc_written", "jsonable", "prepare_out", "read_csv_rows", "read_json",
    "read_record", "save_figure", "write_history_csv", "write_json", "write_text",
]
