"""bench.py runs the real services and prints every row; timings are not checked here.

The machine is shared and noisy, so no figure is asserted: only that the benchmark
starts its services, measures, prints a number in every row, and stops what it started.
Whether its figures are plausible is said in its own output (its "check:" lines).
"""

from __future__ import annotations

import math
import re
import signal
from pathlib import Path

import pytest
from helpers import STARTUP_TIMEOUT_S, WAIT_TIMEOUT_S, Services, processes_naming

from tools import bench
from tools.bench_system import Snapshot, Window

# Short windows, two steps at once: the figures mean nothing, the table is complete. Two, not
# four: the suite runs on four workers, and four systems of six services beside them
# starved every process on the machine (tests elsewhere timed out waiting for theirs).
# --quick: its plan, the agent-rate steps side by side, fills the same rows as the full one.
SMOKE_ARGS = ("--quick", "--seconds", "1", "--jobs", "2")
# It takes about 40 s; at load 16 on 2 cores it took over 90; its own bounds are a minute per wait.
SMOKE_TIMEOUT_S = 300.0
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
    assert output.index("| figure |") < output.index("machine: "), "the table comes first, the notes after"
    for heading in ("python ", "grpcio ", "farm-ng-core ", "side by side", "check: 2 steps ran at once"):
        assert heading in output, heading
    for row in bench.Table().rows:
        many, one, better = cells(output, row.label)
        assert NUMBER.search(many), f"{row.label}: {many!r}"
        if row.better:
            assert NUMBER.search(one), f"{row.label}: {one!r}"
            ratio = r"(x\d+\.\d\d|x>100|-)"
            assert re.fullmatch(rf"{ratio}( / {ratio})*", better), f"{row.label}: {better!r}"
        else:
            assert (one, better) == ("", ""), row.label
    assert "Traceback" not in output
    # It stopped every service it started (the fixture would kill and report any left).
    assert processes_naming(tmp_path) == [], output


def test_bench_stops_its_services_on_ctrl_c(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its configs go to its temporary directory, so its services' command lines name tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    process = services.tool("bench", "--quick")
    # Step 2 has begun: step 1's services ran, step 2's are starting.
    process.wait_for(r"^\[2/\d+\] ", timeout=STARTUP_TIMEOUT_S)
    process.signal(signal.SIGINT)
    assert process.wait_exit(WAIT_TIMEOUT_S) == 130, process.output
    assert "interrupted; services stopped" in process.output
    left = [proc.info["pid"] for proc in processes_naming(tmp_path)]
    assert left == [], process.output


def test_both_plans_fill_the_same_rows() -> None:
    # The full plan measures each agent-rate row in a step of its own, --quick in one.
    full, quick = bench.plan(bench.Table()), bench.plan(bench.Table(), quick=True)
    assert len(quick) == len(full) - len(bench.OWN_RATE_STEPS) + 1
    assert [step.what for step in quick if "side by side" in step.what] == [
        "agents at 10 Hz x 1, 100 Hz x 1, 100 Hz x 10, side by side"
    ]


def test_every_ratio_says_how_many_times_better_the_default_does() -> None:
    # Lower is better for the first number, higher for the second; the third is an offered load.
    row = bench.Row("x", "{:.0f} / {:.0f} / {:.0f}", "<>.")
    row.add(8, 5, 200, 1000)
    row.add(1, 10, 100, 1000)
    assert row.cells() == ["5 / 200 / 1000", "10 / 100 / 1000", "x2.00 / x2.00 / -"]
    row.add(8, 0, 300, 1000)  # a second run: medians
    row.add(1, 10, 100, 1000)
    assert row.cells()[2] == "x4.00 / x2.50 / -"
    # None lost against some: as good as it gets; none on either side: the same.
    assert (bench.times_better("<", 0.0, 3.0), bench.times_better("<", 0.0, 0.0)) == ("x>100", "-")
    assert bench.times_better(">", 1.0, float("nan")) == "-"


def test_counters_are_read_over_one_interval_for_every_service() -> None:
    def shot(stamp: float, published: float) -> Snapshot:
        return Snapshot(stamp=stamp, figures={"published": published}, cpu_s=stamp / 2)

    # Two services whose /stats come 0.2 s apart, both counting 100 a second.
    window = Window(
        opens=10.2,
        closes=11.0,
        stats={"a": [shot(10.0, 0), shot(11.0, 100)], "b": [shot(10.2, 20), shot(11.2, 120)]},
        health={"a": [Snapshot(9.99, {"/sample/dropped": 0}), Snapshot(10.99, {"/sample/dropped": 8})]},
    )
    assert window.per_second("a", "published") == pytest.approx(100)
    assert window.per_second("b", "published") == pytest.approx(100)
    assert window.cpu_share("a") == pytest.approx(0.5)
    # /health comes a moment before /stats on each beat: the last one stands for the close.
    assert window.health_per_second("a", "/sample/dropped") == pytest.approx((8 - 0.21 * 8) / 0.8)
    assert window.end("b").stamp == 11.2
    # A figure that is not a number reads as NaN: shown as not measured, not a crash.
    odd = Window(opens=10.2, closes=11.0, stats={"a": [shot(10.0, 0), Snapshot(11.0, {"published": "x"})]}, health={})
    assert math.isnan(odd.per_second("a", "published"))
