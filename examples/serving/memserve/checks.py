"""Checks of the numbers memserve's configurations and command lines take: a bad one is a clear
error before anything starts, not a crash (or a server that refuses every request) later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def check_int(name: str, value: Any, low: int = 0, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return value


def check_positive(name: str, value: Any, *, infinite: bool = False) -> float:
    """``value`` if it is a positive number (``inf`` too where ``infinite``), else ``ValueError``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not ok or not (math.isfinite(value) or infinite):
        raise ValueError(f"{name} must be a positive {'' if infinite else 'finite '}number, got {value!r}")
    return float(value)


def check_port(name: str, value: Any) -> int:
    """A TCP port (0: any free one)."""
    return check_int(name, value, 0, 65535)


def check_device(name: str, value: Any) -> str:
    """``value`` if it names a device of this machine: ``cpu``, ``cuda`` (some GPU) or ``cuda:k``
    (GPU k), else ``ValueError``."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:k', got {value!r}") from exc
    if not isinstance(value, str) or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index is not None):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:k', got {value!r}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (gpus == 0 or (dev.index or 0) >= gpus):
        raise ValueError(f"{name} is {value!r} but this machine has {gpus} CUDA GPUs")
    return value


def arg(
    check: Callable[..., Any], *args: Any, parse: Callable[[str], Any] = int, **kwargs: Any
) -> Callable[[str], Any]:
    """An ``argparse`` type: ``parse`` the text, then ``check`` it (its error is the usage error)."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an int' if parse is int else 'a number'}: {text!r}") from None
        try:
            return check("the value", value, *args, **kwargs)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("the value ")) from None

    convert.__name__ = check.__name__.removeprefix("check_")  # argparse names it in "invalid ... value"
    return convert


def output_dir_arg(text: str) -> Path:
    """An ``argparse`` type: a folder for results, made now (before a long run, not after it)."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make {text}: {exc}") from None
    return path


def preset_arg(text: str) -> str:
    """An ``argparse`` type: the name of a model preset."""
    from .config import ModelConfigError, preset

    try:
        preset(text)
    except ModelConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
