"""Summaries of measured samples."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the samples fall (nearest rank)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99 in milliseconds."""
    return {
        "p50_ms": percentile(seconds, 0.50) * 1000,
        "p99_ms": percentile(seconds, 0.99) * 1000,
        "mean_ms": statistics.fmean(seconds) * 1000 if seconds else float("nan"),
    }


def median_figures(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over several runs of the same measurement."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}
