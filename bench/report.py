"""Rows, statistics and the markdown table every benchmark feeds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One figure.  ``ratio`` is kvmnumad's cost over the baseline's cost, so
    > 1 always means "slower than doing it by hand", whatever the unit."""

    figure: str
    kvmnumad: float | None
    baseline: float | None
    unit: str
    notes: str = ""
    higher_is_better: bool = False  # calls/s: the cost ratio is then baseline / kvmnumad
    bench: str = ""  # the benchmark (python -m bench --only NAME) that made it

    @property
    def ratio(self) -> float | None:
        k, b = self.kvmnumad, self.baseline
        if k is None or b is None or k <= 0 or b <= 0:
            return None
        return b / k if self.higher_is_better else k / b


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: with few samples p99 is the worst one, said as it is."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def timed_us(action: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    action()
    return (time.perf_counter_ns() - t0) / 1000


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.01:
        return f"{value:.3f}"
    return f"{value:.4f}"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| figure | kvmnumad | baseline | ratio | unit | notes |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        notes = r.notes.replace("|", "\\|")
        values = f"{_num(r.kvmnumad)} | {_num(r.baseline)} | {ratio}"
        lines.append(f"| {r.figure} | {values} | {r.unit} | {notes} |")
    return "\n".join(lines) + "\n"
