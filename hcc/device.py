"""Devices and dtypes by name, checked at the boundary (``--device``, ``--dtype``, ``make_game``)."""

from __future__ import annotations

import re

import torch

from .registry import OptionError

#: the floating-point types a run may use, by name
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: the default of every entry point (``make_game``, ``run``, the CLI): float64, so that records are
#: comparable at round-off and a resumed run equals the uninterrupted one bit for bit
DEFAULT_DTYPE = "float64"


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if present, else the CPU); a one-line error otherwise."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise OptionError(f"device: expected cpu, cuda, cuda:N or auto, got {type(device).__name__} {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise OptionError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError(f"device: expected 'cpu' or 'auto' on this machine (no CUDA GPU found), got {device!r}")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise OptionError(f"device: expected cuda:0 … cuda:{torch.cuda.device_count() - 1} on this machine, "
                              f"got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float32`` or ``float64`` (a name or the torch dtype); a one-line error otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise OptionError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise OptionError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


__all__ = ["DEFAULT_DTYPE", "DTYPES", "resolve_device", "resolve_dtype"]
