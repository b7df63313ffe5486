"""The README's main job runs and checks itself (bit-exact KV, no leaks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pool_demo_runs_clean() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pool_demo.py")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "bit-exact" in out.stdout
    assert "no leaks" in out.stdout
    assert "hit ratio" in out.stdout and out.stderr == ""


def test_memserve_demo_runs_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memserve", "--conversations", "2", "--turns", "2", "--reply-tokens", "4"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "greedy tokens identical with and without caching: True" in out.stdout
    assert out.stdout.count(" 0 leaked") == 2
    assert "hit ratio" in out.stdout and "turns" in out.stderr  # progress goes to stderr
