"""Benchmark reporting: each benchmark adds rows to a named table; the session prints the
tables (with ratios against the baseline measured in the same run) and saves them as JSON
and, where matplotlib is installed, as a plot under benchmarks/results/."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

RESULTS = Path(__file__).parent / "results"


class Report:
    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.notes: dict[str, str] = {}
        self.plots: dict[str, Any] = {}

    def add(self, table: str, **row: Any) -> None:
        self.tables.setdefault(table, []).append(row)

    def note(self, table: str, text: str) -> None:
        self.notes[table] = text

    def plot(self, table: str, draw: Any) -> None:
        """``draw(rows, ax)`` renders the table once the session ends."""
        self.plots[table] = draw


_REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Iterator[Report]:
    yield _REPORT


def render(name: str, rows: list[dict[str, Any]], draw: Any) -> None:
    """Draw a table as ``results/<name>.png`` (nothing where matplotlib is not installed); also
    usable on a saved table: ``render(name, json.load(f)["rows"], module.draw_...)``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    draw(rows, ax)
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORT.tables:
        return
    RESULTS.mkdir(exist_ok=True)
    machine = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    w = terminalreporter.write_line
    for name, rows in _REPORT.tables.items():
        cols = list(dict.fromkeys(k for r in rows for k in r))
        widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols}
        w("")
        w(f"== {name} ==")
        if name in _REPORT.notes:
            w(_REPORT.notes[name])
        w("  ".join(c.rjust(widths[c]) for c in cols))
        for r in rows:
            w("  ".join(_fmt(r.get(c, "")).rjust(widths[c]) for c in cols))
        (RESULTS / f"{name}.json").write_text(
            json.dumps({"machine": machine, "note": _REPORT.notes.get(name), "rows": rows}, indent=2)
        )
        if name in _REPORT.plots:
            render(name, rows, _REPORT.plots[name])
    w(f"\nresults saved under {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
