"""The oldest transformers the ``hf`` extra accepts passes the tests that use transformers.

The rest of the suite runs on whatever transformers the venv has (the newest). HF reshaped its
``Cache`` layer API within the accepted range (method names and signatures changed in 4.57, 5.0,
5.10 and 5.15), so this test installs the floor release series beside the venv and runs those
tests on it in a child pytest.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/integrations/test_transformers.py", "tests/serving/test_model.py"]


def floor() -> str:
    """The lowest transformers version the installed ``mempool``'s ``hf`` extra accepts."""
    for req in importlib.metadata.requires("mempool") or []:
        found = re.fullmatch(r'transformers\s*>=\s*([\d.]+)\s*;\s*extra\s*==\s*"hf"', req)
        if found:
            return found.group(1)
    raise AssertionError("the hf extra names no transformers>=X")


def test_the_oldest_accepted_transformers_passes_the_hf_tests() -> None:
    version = floor()
    # the floor's release series (its latest patch), with the dependencies it resolves to, kept in
    # the venv so that a second run installs nothing
    target = Path(sys.prefix) / "compat" / f"transformers-{version}"
    if not (target / ".complete").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "--upgrade"]
            + [f"transformers~={version}.0"],
            check=True,
            timeout=240,
        )
        (target / ".complete").touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    got = child.stdout.strip()
    assert got.split(".")[:2] == version.split(".")[:2], got  # the floor's series, not the venv's own
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", summary) and "failed" not in summary and "error" not in summary, summary
