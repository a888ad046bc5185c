"""The fault suite's table: every resilience test records what it injected with `faults.record(...)`; the session
prints one table at the end (faults injected, rows lost, rows duplicated: the target is 0 everywhere) and writes
it to test-output/resilience.json. Each test also asserts its own zeros, so a loss fails the test, not only the
table. Under pytest-xdist every worker hands its rows to the controller through a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from tests.support import REPO

OUTPUT = REPO / "test-output" / "resilience.json"


@dataclass
class Fault:
    test: str
    fault: str
    injected: int
    rows_expected: int
    rows_lost: int
    rows_duplicated: int
    note: str = ""


@dataclass
class FaultTable:
    rows: list[Fault] = field(default_factory=list)

    def record(
        self,
        test: str,
        fault: str,
        injected: int,
        *,
        expected: int = 0,
        lost: int = 0,
        duplicated: int = 0,
        note: str = "",
    ) -> None:
        self.rows.append(Fault(test, fault, injected, expected, lost, duplicated, note))

    def lines(self) -> list[str]:
        head = f"{'fault':44s} {'injected':>8s} {'rows':>6s} {'lost':>5s} {'dup':>5s}  note"
        out = [head, "-" * len(head)]
        for r in self.rows:
            out.append(
                f"{r.fault[:44]:44s} {r.injected:8d} {r.rows_expected:6d} {r.rows_lost:5d} "
                f"{r.rows_duplicated:5d}  {r.note}"
            )
        total = (sum(r.injected for r in self.rows), sum(r.rows_lost for r in self.rows))
        dup = sum(r.rows_duplicated for r in self.rows)
        out.append(
            f"{'total':44s} {total[0]:8d} {'':6s} {total[1]:5d} {dup:5d}  (target: 0 lost, 0 duplicated)"
        )
        return out


_TABLE = FaultTable()


@pytest.fixture(scope="session")
def faults() -> FaultTable:
    return _TABLE


def _worker_file(worker: str) -> Path:
    return OUTPUT.with_name(f"{OUTPUT.stem}-{worker}.json")


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    """Under pytest-xdist each worker holds its own rows: it hands them to the controller as a file."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and _TABLE.rows:
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        _worker_file(worker).write_text(json.dumps([asdict(r) for r in _TABLE.rows]))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for part in sorted(OUTPUT.parent.glob(f"{OUTPUT.stem}-gw*.json")):  # the workers' rows
        _TABLE.rows += [Fault(**row) for row in json.loads(part.read_text())]
        part.unlink()
    if not _TABLE.rows:
        return
    terminalreporter.section("fault suite: faults injected, rows lost / duplicated")
    for line in _TABLE.lines():
        terminalreporter.write_line(line)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps([asdict(r) for r in _TABLE.rows], indent=1))
