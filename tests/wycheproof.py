"""Load Project Wycheproof vectors (tests/vectors/, Apache-2.0, see LICENSE there) and tally outcomes.

Each test module records how many cases of each result ran and passed; conftest prints the tally
at the end of the run, so every file's result counts are visible in `make test`.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).with_name("vectors")

# file -> Counter of "valid", "invalid", "acceptable", "skipped: <why>"
TALLY: dict[str, Counter] = defaultdict(Counter)


def load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / f"{name}.json").read_text())


def cases(name: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (group, test) for every test of the file."""
    for group in load(name)["testGroups"]:
        for test in group["tests"]:
            yield group, test


def record(name: str, result: str) -> None:
    TALLY[name][result] += 1


def skip(name: str, why: str) -> None:
    TALLY[name][f"skipped ({why})"] += 1


def summary_lines() -> list[str]:
    lines = []
    for name in sorted(TALLY):
        counts = TALLY[name]
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"{name}: {sum(counts.values())} cases — {parts}")
    return lines
