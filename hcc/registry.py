"""Registries and typed options shared by the CLI, the tests and the docs.

A registry is a plain dict with guarded registration (the pattern of BackPACK's
module-extension table): names are unique, lookups of unknown names raise an
error that lists the valid choices. Options are dataclasses; their fields,
defaults and ``metadata["help"]`` are what ``hcc list`` prints and what
``--game-opt key=value`` / ``--solver-opt key=value`` parse into.
"""

from __future__ import annotations

import dataclasses
import math
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

    def entry(self, cls: Any) -> Any:
        """Class decorator: register ``cls`` under its ``name`` attribute (``@RULES.entry``)."""
        return self.register(cls.name, cls)

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


#: value domains an option may declare with ``opt(..., domain=...)``, checked by :func:`build_options`
DOMAINS = {"positive": (lambda v: v > 0, "a positive number"), "nonnegative": (lambda v: v >= 0, "a number ≥ 0")}


def opt(default: Any, help: str, *, domain: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (read by ``hcc list``) and, optionally, the
    ``domain`` its (non-``None``) value must lie in (a key of :data:`DOMAINS`)."""
    meta = {"help": help, **({"domain": domain} if domain is not None else {})}
    if domain is not None and domain not in DOMAINS:
        raise KeyError(f"unknown option domain {domain!r}; expected one of: {', '.join(DOMAINS)}")
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


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
    if tp is float:
        return _finite_float(name, raw)
    if not isinstance(raw, str):
        if tp is int and isinstance(raw, int) and not isinstance(raw, bool):
            return _int64(name, raw)
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
        if tp is int:
            return _int64(name, int(raw))
        if tp is str:
            return raw
    except ValueError:
        raise OptionError(f"option {name!r}: expected {tp.__name__}, got {raw!r}") from None
    return raw


def _int64(name: str, value: int) -> int:
    """An int option: within int64, the range tensors are sized and seeded with."""
    if not -(2**63) <= value < 2**63:
        raise OptionError(f"option {name!r}: expected an integer below 2^63 in size, got {value}")
    return value


def _finite_float(name: str, raw: Any) -> float:
    """A float option: a real number or its text, finite (no option takes NaN or ±inf)."""
    try:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError
        value = float(raw)
    except (ValueError, OverflowError):
        raise OptionError(f"option {name!r}: expected float, got {raw!r}") from None
    if not math.isfinite(value):
        raise OptionError(f"option {name!r}: expected a finite number, got {raw!r}")
    return value


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
    for k, v in kwargs.items():
        domain = fields[k].metadata.get("domain")
        if domain is not None and v is not None and not DOMAINS[domain][0](v):
            raise OptionError(f"option {k!r}: expected {DOMAINS[domain][1]}, got {values[k]!r}")
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value in (float("inf"),):
        expected = "a non-negative" if allow_zero else "a positive"
        raise OptionError(f"{name}: expected {expected} finite number, got {value!r}")


#: seeds are what :meth:`torch.Generator.manual_seed` takes, kept to 63 bits so derived seeds still fit
MAX_SEED = 2**63 - 1


def check_seed(name: str, seed: Any, count: int = 1) -> int:
    """``seed`` (and ``seed + count − 1``) as an integer in ``[0, MAX_SEED]``, else a one-line error."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"{name}: expected an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED - max(count - 1, 0):
        top = f"; with {count} seeds the last is {seed + count - 1}" if count > 1 else ""
        raise OptionError(f"{name}: expected an integer in [0, 2^63 - 1]{top}, got {seed}")
    return seed


def check_number(name: str, value: Any, *, allow_none: bool = True) -> float | None:
    """A real number (not a bool or a string) as ``float``; ``None`` passes if ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_mapping(name: str, value: Any) -> dict[str, Any]:
    """An options mapping (``None`` → ``{}``), else a one-line error (e.g. a ``"k=v"`` string)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(f"{name}: expected a dict of option values like {{'lam': 0.2}}, got "
                          f"{type(value).__name__} {value!r}")
    return dict(value)


def check_name(name: str, value: Any) -> str:
    """A registry name: a string, else a one-line error."""
    if not isinstance(value, str):
        raise OptionError(f"{name}: expected a name (str), got {type(value).__name__} {value!r}")
    return value
