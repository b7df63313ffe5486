"""House rules that tools check: ruff lint and mypy (strict) on the library."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    path = str(exe) if exe.exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with the dev extra)")
    return path


def test_ruff_clean() -> None:
    out = subprocess.run(
        [_tool("ruff"), "check", "src", "tests", "benchmarks", "examples"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_clean() -> None:
    out = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
