"""The hostile suite: attacks on a real server, with a tally of what was tried.

Set CONVSVC_RELIABILITY_REPORT to a file path to get the tally as JSON at the end of the run
(docs/reliability.md quotes a full run).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest


class Tally:
    """Calls tried and status codes seen, per suite, and invariants checked."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.codes: dict[str, Counter[str]] = {}
        self.invariants: Counter[str] = Counter()

    def call(self, suite: str, code: str) -> None:
        self.calls[suite] += 1
        self.codes.setdefault(suite, Counter())[code] += 1

    def checked(self, invariant: str, times: int = 1) -> None:
        self.invariants[invariant] += times

    def as_json(self) -> dict[str, object]:
        return {
            "calls": dict(self.calls),
            "codes": {suite: dict(codes) for suite, codes in self.codes.items()},
            "invariants": dict(self.invariants),
        }


@pytest.fixture(scope="session")
def tally() -> Iterator[Tally]:
    counts = Tally()
    yield counts
    target = os.environ.get("CONVSVC_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps(counts.as_json(), indent=2, sort_keys=True))
