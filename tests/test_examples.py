"""The README's main job runs and checks itself (bit-exact KV, no leaks)."""

from __future__ import annotations

import json
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


def test_engine_demo_runs_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memserve.engine_demo", "--conversations", "2", "--turns", "2", "--reply-tokens", "4"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "greedy tokens identical with and without caching: True" in out.stdout
    assert out.stdout.count(" 0 leaked") == 2
    assert "hit ratio" in out.stdout and "turns" in out.stderr  # progress goes to stderr


def test_main_job_compares_stages(tmp_path: Path) -> None:
    """The README's main job, on the tiny model and two stages: same tokens, a table, a plot."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memserve",
            "--model",
            "tiny-llama3",
            "--stages",
            "colocated,pd-caching-3",
            "--conversations",
            "2",
            "--turns",
            "2",
            "--reply-tokens",
            "6",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "every mode gave the same greedy tokens: True" in out.stdout
    rows = {r["stage"]: r for r in json.loads((tmp_path / "stages.json").read_text())["rows"]}
    assert rows["pd-caching-3"]["handoff_blocks"] > 0 and rows["colocated"]["hit_ratio"] == 0
    assert rows["pd-caching-3"]["hit_ratio"] > 0
    assert (tmp_path / "stages.png").stat().st_size > 0


def test_evaluation_smoke(tmp_path: Path) -> None:
    """The evaluation's quick version: every metric present and sane (never a speed threshold)."""
    # sessions arrive 4 a second (default: 1): the smoke checks metrics, not pacing
    args = ["pd", "routing", "links", "--quick", "--rate", "4", "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "memserve.evaluate", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.stdout.count("every mode gave the same greedy tokens: True") == 3
    for name, modes in (("pd_sharegpt", 4), ("routing_loogle", 3), ("links_sharegpt", 3)):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(data["rows"]) == modes and (tmp_path / f"{name}.png").stat().st_size > 0
        for row in data["rows"]:
            assert row["requests"] > 0 and 0 <= row["hit_ratio"] <= 1
            assert 0 < row["ttft_p50"] <= row["ttft_p99"] and row["ttft_mean"] <= row["jct_mean"]
            assert row["tokens_per_s"] > 0 and row["moved_mb"] >= 0
        for results in data["requests"].values():
            assert all(r["ttft"] > 0 and r["jct"] >= r["ttft"] and r["output"] for r in results)
    rows = {r["stage"]: r for r in json.loads((tmp_path / "pd_sharegpt.json").read_text())["rows"]}
    assert rows["pd-basic"]["hit_ratio"] == 0 < rows["pd-caching-3"]["hit_ratio"]
    assert rows["pd-caching-2"]["handoff_blocks"] < rows["pd-basic"]["handoff_blocks"]
    # over the slow link the cost model recomputes instead of moving KV; a link-blind scheduler never does
    rows = {r["stage"]: r for r in json.loads((tmp_path / "links_sharegpt.json").read_text())["rows"]}
    assert rows["fast link"]["recomputed"] == rows["0.2 MB/s, always move"]["recomputed"] == 0
    assert rows["0.2 MB/s, cost model"]["recomputed"] > 0
    assert rows["0.2 MB/s, cost model"]["handoff_blocks"] < rows["0.2 MB/s, always move"]["handoff_blocks"]


def test_engine_lifecycle_example_runs_clean() -> None:
    """docs/engine-guide.md's runnable example: reuse, demotion and promotion, DLPack, no leaks."""
    path = ROOT / "examples" / "engine_lifecycle.py"
    assert len(path.read_text().splitlines()) < 60
    out = subprocess.run([sys.executable, str(path)], check=True, capture_output=True, text=True, timeout=120)
    assert "turn 1 reused 0 tokens; turn 2 reused 12 tokens" in out.stdout
    assert "again reused 16 tokens (promoted back from host)" in out.stdout
    assert "no leaks" in out.stdout and out.stderr == ""
