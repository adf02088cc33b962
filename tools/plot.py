"""Plot a recording: storage's fill over time, and each agent's samples/s with its pauses.

    python -m tools.plot recordings -o fill.png     # the newest recording there
    python -m tools.plot RECORDING.0000.bin         # writes RECORDING.0000.png

The recording must hold storage's ``/stats`` and ``/residual``, and each agent's
``/sample`` and ``/stats`` (``record_config.json`` records them). The upper panel is the
fill: storage's ``count`` from ``/stats`` (every second) and ``max_storage - residual``
from ``/residual`` (after every drain). The lower panel is each agent's samples/s, from
the send stamps of its ``/sample`` events. In the upper panel, a triangle down marks
where an agent paused (storage was full), a triangle up where it resumed (after the
drain). Times are seconds since the first event.

A pause lasts at most until storage's next drain, 0.1 s later, so the ``paused`` flag
of the agents' ``/stats`` (once a second) rarely catches one. The pauses are found in the
samples instead: an agent paused where its samples stop for ``PAUSE_GAP_S`` longer than
its period (``1/rate``, from its ``/stats``) while storage drained (an agent resumes when
it hears of a drain; a gap without one is the machine being busy).

Needs matplotlib (``pip install matplotlib``; requirements-dev.txt pins it); the
services do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation.cli import run_cli
from propagation.config import ConfigError
from tools.read_recording import read_messages, recording_file, sent_at

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from google.protobuf.message import Message

# Samples are counted in bins this wide: a multiple of every default task period (5 or
# 10 times a second), so that a steady agent gives a flat line; and short, so that a
# pause shows as a dip.
RATE_BIN_S = 0.4
# An agent that publishes nothing for this much longer than its period has paused, if
# storage drained meanwhile: a gap without a drain is the machine being busy.
PAUSE_GAP_S = 0.015


@dataclasses.dataclass
class Recording:
    """What the plot needs from a recording, times in seconds of the services' clock."""

    # (time, count) of storage, and its max_storage once known.
    fill: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    max_storage: float | None = None
    residuals: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    # Per agent: when it sent each sample, and its rate per task from its /stats.
    samples: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    rates: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, name: str, event: Event, message: Message) -> None:
        """Takes in one event if it is one the plot shows (``name``: ``agent-1/sample``)."""
        stamp = sent_at(event)
        if stamp is None:
            return
        service, _, path = name.partition("/")
        if service.startswith("storage") and path == "stats" and isinstance(message, Struct):
            self.fill.append((stamp, message["count"]))
            self.max_storage = message["max_storage"]
        elif service.startswith("storage") and path == "residual" and isinstance(message, Int32Value):
            self.residuals.append((stamp, message.value))
        elif service.startswith("agent") and path == "sample":
            self.samples[service].append(stamp)
        elif service.startswith("agent") and path == "stats" and isinstance(message, Struct):
            # Its tasks take turns: together they publish rate x num_tasks times a second.
            self.rates[service] = message["rate"] * message["num_tasks"]

    def start(self) -> float:
        """The time of the earliest event the plot shows."""
        times = [stamp for stamp, _ in self.fill + self.residuals]
        times += [stamps[0] for stamps in self.samples.values() if stamps]
        return min(times, default=0.0)

    def fill_levels(self) -> list[tuple[float, float]]:
        """Storage's count over time, from its /stats and its /residual, in order.

        A residual is ``max_storage - count``: it needs ``max_storage`` from a /stats.
        """
        levels = list(self.fill)
        if self.max_storage is not None:
            levels += [(stamp, self.max_storage - residual) for stamp, residual in self.residuals]
        return sorted(levels)


def load(file: Path) -> Recording:
    """Reads the events the plot shows from a recording."""
    recording = Recording()
    for name, event, message in read_messages(file):
        recording.add(name, event, message)
    return recording


def sample_rates(stamps: list[float], start: float) -> tuple[list[float], list[float]]:
    """Samples/s in bins of ``RATE_BIN_S``: (bin middles since ``start``, rates).

    The first and the last bin are left out: the recording covers only part of them.
    """
    counts: dict[int, int] = defaultdict(int)
    for stamp in stamps:
        counts[int((stamp - start) // RATE_BIN_S)] += 1
    if not counts:
        return [], []
    bins = range(min(counts) + 1, max(counts))
    return [(index + 0.5) * RATE_BIN_S for index in bins], [counts[index] / RATE_BIN_S for index in bins]


def pauses(stamps: list[float], rate: float | None, drains: list[float]) -> tuple[list[float], list[float]]:
    """When an agent paused and when it resumed: the gaps in its samples that a drain ended.

    ``rate`` is the agent's samples per second, all tasks together: while it runs it
    publishes at least every ``1/rate``. A pause begins where the next sample was due.
    """
    if not rate:
        return [], []
    period = 1.0 / rate
    ordered = sorted(stamps)
    gaps = [
        (before, after)
        for before, after in zip(ordered, ordered[1:])
        if after - before > period + PAUSE_GAP_S and any(before < drain < after for drain in drains)
    ]
    return [before + period for before, _ in gaps], [after for _, after in gaps]


def draw(recording: Recording, title: str, output: Path, pyplot: Any) -> None:
    """Draws the two panels and writes the PNG."""
    start = recording.start()
    figure, (fill_axes, rate_axes) = pyplot.subplots(2, 1, sharex=True, figsize=(9, 5.5), dpi=80)
    figure.suptitle(f"storage fill and agent sample rates: {title}", fontsize=10)
    draw_fill(fill_axes, recording, start)
    draw_rates(rate_axes, recording, start)
    rate_axes.set_xlabel("seconds since the first event")
    figure.tight_layout()
    figure.savefig(output)
    pyplot.close(figure)


def draw_fill(axes: Any, recording: Recording, start: float) -> None:
    """Storage's count, with each agent's pauses (at the top) and resumes (at the level after the drain)."""
    levels = recording.fill_levels()
    axes.plot([stamp - start for stamp, _ in levels], [count for _, count in levels], ".-", color="C7", label="items")
    axes.set_ylabel("items in storage")
    if recording.max_storage is None:
        return
    top = recording.max_storage
    axes.axhline(top, color="C3", linestyle="--", linewidth=1, label="max_storage")
    drains = [stamp for stamp, _ in recording.residuals]
    for index, (agent, stamps) in enumerate(sorted(recording.samples.items())):
        paused, resumed = pauses(stamps, recording.rates.get(agent), drains)
        # Agents pause and resume together: each agent's marks a little higher.
        lift = 0.04 * top * (index + 1)
        axes.plot([moment - start for moment in paused], [top + lift] * len(paused), "v", color=f"C{index}")
        resumed_at = [level_at(levels, moment) + lift for moment in resumed]
        axes.plot([moment - start for moment in resumed], resumed_at, "^", color=f"C{index}")
    axes.plot([], [], "kv", label="an agent paused")
    axes.plot([], [], "k^", label="it resumed")
    axes.set_ylim(top=1.2 * top)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def level_at(levels: list[tuple[float, float]], moment: float) -> float:
    """Storage's count as last known at ``moment``."""
    known = [count for stamp, count in levels if stamp <= moment]
    return known[-1] if known else 0.0


def draw_rates(axes: Any, recording: Recording, start: float) -> None:
    """Each agent's samples/s."""
    for index, (agent, stamps) in enumerate(sorted(recording.samples.items())):
        times, rates = sample_rates(stamps, start)
        axes.plot(times, rates, color=f"C{index}", linewidth=1, label=agent)
    axes.set_ylabel(f"samples/s (per {RATE_BIN_S:g} s)")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.plot", description="Plot storage's fill and the agents' sample rates of a recording."
    )
    parser.add_argument("recording", help="a recording (.bin), or a directory: its newest recording")
    parser.add_argument("-o", "--output", help="the PNG to write (default: the recording's name, .png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Plots a recording into a PNG; returns the exit code."""
    cli = build_parser().parse_args(argv)
    # Optional: only this script needs matplotlib.
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")  # no display needed
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        print("plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1

    def body() -> None:
        file = recording_file(cli.recording)
        output = Path(cli.output) if cli.output else file.with_suffix(".png")
        if not output.parent.is_dir():
            msg = f"cannot write {output}: folder {output.parent} does not exist"
            raise ConfigError(msg)
        draw(load(file), file.name, output, pyplot)
        print(f"wrote {output}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
