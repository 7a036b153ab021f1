"""Objects named from outside the package: ``path/to/file.py:Name`` or ``package.module:Name``.

The CLI and :func:`hcc.make_game` accept such a *spec* wherever they accept a game name
(``hcc solve my_games.py:Duel``), and the finite games' ``network`` option takes one for a
strategy-network factory. A file is imported as a module of its own (its directory is not
put on ``sys.path``); each file is imported once per process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .registry import OptionError

#: ``file.py:Name`` / ``pkg.mod:Name`` (a Windows drive letter is not a module)
_SPEC = re.compile(r"^(?P<where>[^:]+|[A-Za-z]:[\\/][^:]+):(?P<attr>[A-Za-z_][\w.]*)$")


def is_spec(text: object) -> bool:
    """True when ``text`` names an object as ``WHERE:NAME`` (not a registry name)."""
    return isinstance(text, str) and _SPEC.match(text) is not None


def _module_from_file(path: Path, spec: str) -> ModuleType:
    path = path.resolve()
    name = "hcc_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise OptionError(f"{spec!r}: expected an existing Python file, got {str(path)!r} (not found)")
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise OptionError(f"{spec!r}: expected a Python source file, got {str(path)!r}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise OptionError(f"{spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    return module


def load_object(spec: str, what: str = "object") -> Any:
    """The object ``spec`` names: ``file.py:Name`` (a Python file) or ``package.module:Name``.

    ``Name`` may be dotted (``module:Outer.inner``). Errors are :class:`~hcc.registry.OptionError`
    saying which of the file, the module or the attribute was not found.
    """
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise OptionError(f"{what}: expected 'path/to/file.py:Name' or 'package.module:Name', got {spec!r}")
    where, attr = m["where"], m["attr"]
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _module_from_file(Path(where), spec)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise OptionError(f"{what} {spec!r}: expected an importable module, got {where!r} ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(module) if not n.startswith("_"))
            raise OptionError(f"{what} {spec!r}: {where!r} defines no {attr!r}; it defines: "
                              f"{', '.join(names[:20]) or '(nothing public)'}")
        obj = getattr(obj, part)
    return obj


__all__ = ["is_spec", "load_object"]
