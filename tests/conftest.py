"""Fixtures: every process a test starts is stopped after it, and its output shown if it failed."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from helpers import Services, kill_leftovers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Puts the slow tests first: started last, a minute-long one would end the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    """Starts processes; stops them all after the test and shows their output if it failed.

    A service that outlived the tool that started it (one killed after a timeout) is
    killed too: a passing test must leave none.
    """
    started = Services()
    try:
        yield started
    finally:
        started.stop_all()
        leftovers = kill_leftovers(tmp_path)
        report = getattr(request.node, "report_call", None)
        if report is None or report.failed:
            for process in started.started:
                tail = "\n".join(process.lines[-60:])
                print(f"----- {process.label} (exit {process.popen.returncode}), last lines:\n{tail}")
        elif leftovers:
            pytest.fail("processes outlived the test:\n" + "\n".join(leftovers))
