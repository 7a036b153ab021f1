"""Registries and typed options shared by the CLI, the tests and the docs.

A registry is a plain dict with guarded registration (the pattern of BackPACK's
module-extension table): names are unique, lookups of unknown names raise an
error that lists the valid choices. Options are dataclasses; their fields,
defaults and ``metadata["help"]`` are what ``hcc list`` prints and what
``--game-opt key=value`` / ``--solver-opt key=value`` parse into.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class OptionError(ValueError):
    """Bad user input: an unknown name or an option value of the wrong kind."""


class Registry(Generic[T], Mapping[str, T]):
    """A name → entry table with guarded registration.

    >>> r = Registry[int]("widget")
    >>> r.register("a", 1)
    1
    >>> r["b"]
    Traceback (most recent call last):
    ...
    hcc.registry.OptionError: unknown widget 'b'; expected one of: a
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise OptionError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(self._entries)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (read by ``hcc list``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _coerce(name: str, raw: Any, tp: Any) -> Any:
    """Convert a CLI string (or a Python value) to the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, raw, a)
            except OptionError as e:
                errors.append(str(e))
        raise OptionError("; ".join(errors))
    if origin is typing.Literal:
        if raw not in args:
            raise OptionError(f"option {name!r}: expected one of {', '.join(map(str, args))}, got {raw!r}")
        return raw
    if not isinstance(raw, str):
        if tp is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if tp is int and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if tp is bool and isinstance(raw, bool):
            return raw
        if tp is str and isinstance(raw, str):
            return raw
        if tp in (int, float, bool, str):
            raise OptionError(f"option {name!r}: expected {tp.__name__}, got {raw!r}")
        return raw
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float, str):
            return tp(raw)
    except ValueError:
        raise OptionError(f"option {name!r}: expected {tp.__name__}, got {raw!r}") from None
    return raw


def build_options(cls: type[T], values: Mapping[str, Any] | None = None, *, owner: str = "") -> T:
    """Instantiate the options dataclass ``cls`` from ``values`` (strings are parsed).

    Unknown keys raise :class:`OptionError` naming the valid ones.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f" for {owner}" if owner else ""
        valid = ", ".join(fields) or "(none)"
        raise OptionError(f"unknown option {unknown[0]!r}{where}; expected one of: {valid}")
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    inst = cls(**kwargs)
    validate = getattr(inst, "validate", None)
    if validate is not None:
        validate()
    return inst


def parse_key_values(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Parse repeated ``key=value`` CLI items."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise OptionError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def options_table(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) rows for an options dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        tp = hints[f.name]
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((f.name, tname, default, f.metadata.get("help", "")))
    return rows


def check_positive(name: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    """Raise a one-line error unless ``value`` is a positive (or non-negative) finite number."""
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value in (float("inf"),):
        expected = "a non-negative" if allow_zero else "a positive"
        raise OptionError(f"{name}: expected {expected} finite number, got {value!r}")
