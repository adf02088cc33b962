"""bench.py runs the real services and prints every row; timings are not checked here.

The machine is shared and noisy, so no figure is asserted: only that the benchmark
starts its services, measures, prints a number in every row, and stops what it started.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from helpers import Services, processes_naming

from tools import bench

# Short windows, two steps at once: the figures mean nothing, the table is complete. Two, not
# four: the suite runs on four workers, and four systems of six services beside them
# starved every process on the machine (tests elsewhere timed out waiting for theirs).
# --quick: its plan, the agent-rate steps side by side, fills the same rows as the full one.
SMOKE_ARGS = ("--quick", "--seconds", "1", "--jobs", "2")
# It takes about 50 s; at load 16 on 2 cores it took over 90.
SMOKE_TIMEOUT_S = 240.0
NUMBER = re.compile(r"\d")


def cells(output: str, label: str) -> list[str]:
    """The cells after the label in the table row ``label``."""
    prefix = f"| {label} |"
    line = next((line for line in output.splitlines() if line.startswith(prefix)), None)
    assert line is not None, f"no row {label!r} in:\n{output}"
    return [cell.strip() for cell in line[len(prefix) :].rstrip("|").split("|")]


# Many processes busy at once: never beside another such test (xdist group).
@pytest.mark.slow
@pytest.mark.xdist_group("cpu")
def test_bench_prints_every_row(services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its configs go to tmp_path: the fixture finds its services by them if it must be killed.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    process = services.tool("bench", *SMOKE_ARGS)
    assert process.wait_exit(SMOKE_TIMEOUT_S) == 0, process.output
    output = process.output
    for heading in ("machine: ", "python ", "grpcio ", "farm-ng-core ", "load average at start", "side by side"):
        assert heading in output
    for row in bench.rows():
        many, one, ratio = cells(output, row.label)
        assert NUMBER.search(many), f"{row.label}: {many!r}"
        if row.per_column:
            assert NUMBER.search(one), f"{row.label}: {one!r}"
            assert ratio, row.label
        else:
            assert (one, ratio) == ("", ""), row.label
    assert "Traceback" not in output


def test_bench_stops_its_services_on_ctrl_c(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its configs go to its temporary directory, so its services' command lines name tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    process = services.tool("bench", "--quick")
    # Step 2 has begun: step 1's services ran, step 2's are starting.
    process.wait_for(r"^\[2/\d+\] ", timeout=30)
    process.signal(signal.SIGINT)
    assert process.wait_exit(20) == 130, process.output
    assert "interrupted; services stopped" in process.output
    left = [proc.info["pid"] for proc in processes_naming(tmp_path)]
    assert left == [], process.output


def test_both_plans_fill_the_same_rows() -> None:
    # The full plan measures each agent-rate row in a step of its own, --quick in one.
    full, quick = bench.plan(), bench.plan(quick=True)
    assert len(quick) == len(full) - len(bench.OWN_RATE_STEPS) + 1
    assert [step.what for step in quick if "side by side" in step.what] == [
        "agents at 10 Hz x 1, 100 Hz x 1, 100 Hz x 10, side by side"
    ]


def test_counters_are_read_over_one_interval_for_every_service() -> None:
    def shot(stamp: float, published: float) -> bench.Snapshot:
        return bench.Snapshot(stamp=stamp, figures={"published": published}, cpu_s=stamp / 2, rss_bytes=0)

    # Two services whose /stats come 0.2 s apart, both counting 100 a second.
    window = bench.Window(
        opens=10.2,
        closes=11.0,
        snapshots={"a": [shot(10.0, 0), shot(11.0, 100)], "b": [shot(10.2, 20), shot(11.2, 120)]},
        health={"a": [(9.99, {"/sample/dropped": 0}), (10.99, {"/sample/dropped": 8})]},
    )
    assert window.per_second("a", "published") == pytest.approx(100)
    assert window.per_second("b", "published") == pytest.approx(100)
    assert window.cpu_share("a") == pytest.approx(0.5)
    # /health comes a moment before /stats on each beat: the last one stands for the close.
    assert window.health_per_second("a", "/sample/dropped") == pytest.approx((8 - 0.21 * 8) / 0.8)
    assert window.end("b").stamp == 11.2
