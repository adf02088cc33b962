"""Plot a recording: storage's fill over time, and each agent's samples/s with its pauses.

    python -m tools.plot recordings -o fill.png     # the newest recording there
    python -m tools.plot RECORDING.0000.bin         # writes RECORDING.0000.png

What it draws and prints: the README's "Watching, recording, plotting". All stamps are on one monotonic clock:
the services and the recorder run on one host. Needs matplotlib (requirements-dev.txt); the services do not.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)
from propagation.startup import require

import argparse
import contextlib
import dataclasses
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from farm_ng.core.event_pb2 import Event
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation.cli import run_cli
from propagation.config import check
from propagation.wire import PUBLISHED, WrongMessage, decode
from tools.figures import number, received_at, sent_at
from tools.read_recording import read_events, recording_file

# Samples are counted in bins this wide: a multiple of every default task period (5 or 10 a second), so that a
# steady agent gives a flat line; and short, so that a pause shows as a dip.
RATE_BIN_S = 0.4


@dataclasses.dataclass(frozen=True)
class Counters:
    """An agent's ``pauses`` and ``resumes`` as one message carried them; ``paused``: None on a ``/stats``."""

    sent: float
    pauses: int
    resumes: int
    paused: bool | None = None

    def before(self) -> tuple[int, int]:
        """The counters just before this message's own transition (if it is one)."""
        if not self.is_transition():
            return self.pauses, self.resumes
        return (self.pauses - 1, self.resumes) if self.paused else (self.pauses, self.resumes - 1)

    def number(self) -> int:
        """Which pause (or resume) of the agent this transition is: 1 for its first."""
        return self.pauses if self.paused else self.resumes

    def is_transition(self) -> bool:
        """Whether it may be a pause or resume: a ``/pauses`` but the one an agent sends at its start (its state)."""
        return self.paused is not None and self.number() > 0


@dataclasses.dataclass
class PauseFigures:
    """An agent's pause and resume marks over a recording, and its counters' increase."""

    pauses: list[float] = dataclasses.field(default_factory=list)  # when each was sent
    resumes: list[float] = dataclasses.field(default_factory=list)
    counted_pauses: int = 0  # how much its own counters grew
    counted_resumes: int = 0

    def line(self, agent: str) -> str:
        """``agent-1: 7 pauses, 7 resumes (its counters: +7, +7)``."""
        return (
            f"{agent}: {len(self.pauses)} pauses, {len(self.resumes)} resumes"
            f" (its counters: +{self.counted_pauses}, +{self.counted_resumes})"
        )

    def agree(self) -> bool:
        """Whether the marks match the agent's counters."""
        return (len(self.pauses), len(self.resumes)) == (self.counted_pauses, self.counted_resumes)


def pause_figures(messages: list[Counters], started: float) -> PauseFigures:
    """An agent's marks and counters over the recording that started at ``started``.

    A transition is a mark if its number is above the counters at the start: those of the last message sent before
    it (latched), else those just before the first. Counters that fall mean the agent restarted: they start from 0.
    """
    figures = PauseFigures()
    ordered = sorted(messages, key=lambda message: message.sent)
    earlier = [message for message in ordered if message.sent < started]
    last = (earlier[-1].pauses, earlier[-1].resumes) if earlier else ordered[0].before() if ordered else (0, 0)
    marked = list(last)  # the numbers of the last pause and resume marked (or counted at the start)
    for message in ordered[len(earlier) :]:
        if message.pauses < last[0] or message.resumes < last[1]:  # it restarted
            last, marked = (0, 0), [0, 0]
        figures.counted_pauses += message.pauses - last[0]
        figures.counted_resumes += message.resumes - last[1]
        last = (message.pauses, message.resumes)
        # An agent publishes /pauses at each change and every second: each transition is marked once.
        kind = 0 if message.paused else 1
        if message.is_transition() and message.number() > marked[kind]:
            marked[kind] = message.number()
            (figures.pauses if message.paused else figures.resumes).append(message.sent)
    return figures


@dataclasses.dataclass
class Recording:
    """What the plot needs from a recording, times in seconds of the services' clock."""

    # When the recorder received its first event; None for a file without receive stamps.
    started: float | None = None
    # (time, count) of storage from /level, and from /stats; its max_storage once known.
    levels: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    stats_fill: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    max_storage: float | None = None
    residuals: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    # (time, refused) from storage's /stats: its refused stores so far.
    refused: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    # Per agent: when it sent each sample, and the counters of its /pauses and /stats.
    samples: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    counters: dict[str, list[Counters]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    # Events left out because a figure was not a number, by service/path.
    invalid: Counter[str] = dataclasses.field(default_factory=Counter)

    def add(self, name: str, event: Event, message: Message) -> None:
        """Takes in one event if the plot shows it (``name``: ``agent-1/sample``); one not a number goes to ``invalid``.

        A ``/stats`` with ``max_storage`` is storage's, one with ``pauses`` an agent's.
        """
        stamp = sent_at(event)
        if stamp is None:
            return
        arrived = received_at(event)
        if arrived is not None:
            self.started = arrived if self.started is None else min(self.started, arrived)
        service, _, path = name.partition("/")
        if path == "sample":
            self.samples[service].append(stamp)
        elif path == "residual" and isinstance(message, Int32Value):
            self.residuals.append((stamp, message.value))
        elif isinstance(message, Struct) and path in ("level", "stats", "pauses"):
            figures = dict(message)
            if "max_storage" in figures:
                keys = ["count", "max_storage", *(["refused"] if path == "stats" else [])]
            elif path == "pauses" or "pauses" in figures:
                keys = ["pauses", "resumes"]
            else:
                return  # another service's figures
            values = [number(figures, key) for key in keys]
            paused = figures.get("paused") if path == "pauses" else False
            if not all(value is not None and math.isfinite(value) for value in values) or not isinstance(paused, bool):
                self.invalid[name] += 1
            elif "max_storage" in figures:
                count, self.max_storage = values[0], values[1]
                (self.levels if path == "level" else self.stats_fill).append((stamp, count))
                if path == "stats":
                    self.refused.append((stamp, values[2]))
            else:
                transition = paused if path == "pauses" else None
                self.counters[service].append(Counters(stamp, int(values[0]), int(values[1]), transition))

    def start(self) -> float:
        """Time 0 of the plot: when the recording started; without receive stamps, its earliest event (latched too)."""
        if self.started is not None:
            return self.started
        times = [stamp for stamp, _ in self.levels + self.stats_fill + self.residuals]
        times += [stamps[0] for stamps in self.samples.values() if stamps]
        return min(times, default=0.0)

    def fill_levels(self) -> list[tuple[float, float]]:
        """Storage's count over time, in order: from /level, or else the coarser /stats and /residual.

        /level comes before and after each drain and when full, so it reaches ``max_storage`` at every refusal.
        A residual is ``max_storage - count``: it needs ``max_storage`` from a /stats.
        """
        if self.levels or self.max_storage is None:  # without max_storage, there is no /stats fill either
            return sorted(self.levels)
        return sorted(self.stats_fill + [(stamp, self.max_storage - residual) for stamp, residual in self.residuals])

    def agents(self) -> list[str]:
        """The agents in the recording, in order: each keeps its colour in both panels."""
        return sorted(set(self.samples) | set(self.counters))

    def pause_figures(self) -> dict[str, PauseFigures]:
        """Each agent's pause and resume marks, with its counters over the recording."""
        return {agent: pause_figures(messages, self.start()) for agent, messages in sorted(self.counters.items())}


def load(file: Path) -> Recording:
    """The events of a recording that the plot shows, each decoded as its path's type (others skipped)."""
    recording = Recording()
    for name, event, payload in read_events(file):
        kind = PUBLISHED.get(event.uri.path)
        if kind is not None:
            with contextlib.suppress(WrongMessage):
                recording.add(name, event, decode(event, payload, kind))
    return recording


def clipped(levels: list[tuple[float, float]], start: float) -> tuple[float | None, list[tuple[float, float]]]:
    """The fill at ``start`` (the last level sent before it, if any) and the levels after it."""
    earlier = [count for stamp, count in levels if stamp < start]
    return (earlier[-1] if earlier else None), [(stamp, count) for stamp, count in levels if stamp >= start]


def refusals_while_full(recording: Recording) -> tuple[int, int, int]:
    """Storage's refused stores, how many of its ``/stats`` intervals they grew in, and in how many the line is full."""
    levels = recording.fill_levels()
    ordered = sorted(recording.refused)
    grown = intervals = full = 0
    for (before, refused_before), (after, refused_after) in zip(ordered, ordered[1:]):
        if refused_after <= refused_before:
            continue  # none refused, or storage restarted
        grown += int(refused_after - refused_before)
        intervals += 1
        # Full in the interval: a level at max_storage in it, or the last one before it.
        counts = [level_at(levels, before)] + [count for stamp, count in levels if before <= stamp <= after]
        full += recording.max_storage in counts
    return grown, intervals, full


def report(recording: Recording) -> list[str]:
    """The lines plotting prints: each agent's marks and counters, and storage's refusals."""
    marks = recording.pause_figures()
    lines = [figures.line(agent) for agent, figures in marks.items()]
    lines += [
        f"note: {agent}'s marks differ from its counters: the recording lacks some of its /pauses events"
        for agent, figures in marks.items()
        if not figures.agree()
    ]
    lines += [
        f"note: {count} events of {name} left out: a figure in them is not a number"
        for name, count in sorted(recording.invalid.items())
    ]
    if recording.levels and recording.max_storage is not None:
        grown, intervals, full = refusals_while_full(recording)
        lines.append(
            f"storage: refused +{grown:.0f} stores (its counter) in {intervals} of its /stats intervals;"
            f" the line reaches max_storage ({recording.max_storage:.0f}) in {full} of them"
        )
    elif recording.max_storage is not None:
        lines.append("storage: no /level in the recording; the fill comes from /stats and /residual")
    return lines


def sample_rates(stamps: list[float], start: float) -> tuple[list[float], list[float]]:
    """Samples/s in bins of ``RATE_BIN_S``: (bin middles since ``start``, rates); not the first and last, partial."""
    counts = Counter(int((stamp - start) // RATE_BIN_S) for stamp in stamps)
    bins = range(min(counts, default=0) + 1, max(counts, default=0))
    return [(index + 0.5) * RATE_BIN_S for index in bins], [counts[index] / RATE_BIN_S for index in bins]


def draw(recording: Recording, title: str, output: Path) -> None:
    """Draws the two panels (the fill, each agent's samples/s) and writes the PNG."""
    from matplotlib.figure import Figure  # noqa: PLC0415  (optional: main checked that it is there)

    start = recording.start()
    figure = Figure(figsize=(9, 5.5), dpi=80)  # not pyplot's: no display, no window to close
    fill_axes, rate_axes = figure.subplots(2, 1, sharex=True)
    figure.suptitle(f"storage fill and agent sample rates: {title}", fontsize=10)
    draw_fill(fill_axes, recording, start)
    for index, agent in enumerate(recording.agents()):
        times, rates = sample_rates(recording.samples.get(agent, []), start)
        rate_axes.plot(times, rates, color=f"C{index}", linewidth=1, label=agent)
    rate_axes.set(ylabel=f"samples/s (per {RATE_BIN_S:g} s)", ylim=(0, None))
    rate_axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    rate_axes.set(xlabel="seconds since the recording started", xlim=(0, None))
    figure.tight_layout()
    figure.savefig(output)


def draw_fill(axes: Any, recording: Recording, start: float) -> None:
    """Storage's count, with each agent's pauses (at the top) and resumes (at the level then)."""
    levels = recording.fill_levels()
    at_start, recorded = clipped(levels, start)
    line = ([(start, at_start)] if at_start is not None else []) + recorded
    axes.plot([stamp - start for stamp, _ in line], [count for _, count in line], ".-", color="C7", label="items")
    if at_start is not None:
        # On the y-axis: drawn over it (and past it), not clipped away under it.
        circle = {"markerfacecolor": "white", "markersize": 8, "clip_on": False, "zorder": 4}
        axes.plot([0], [at_start], "o", color="C7", label="items at the start\n(latched)", **circle)
    axes.set_ylabel("items in storage")
    if recording.max_storage is None:
        return
    top = recording.max_storage
    axes.axhline(top, color="C3", linestyle="--", linewidth=1, label="max_storage")
    marks = recording.pause_figures()
    for index, agent in enumerate(recording.agents()):
        if agent not in marks:
            continue
        # Agents pause and resume together: each agent's marks a little higher.
        lift = 0.04 * top * (index + 1)
        paused, resumed = marks[agent].pauses, marks[agent].resumes
        axes.plot([moment - start for moment in paused], [top + lift] * len(paused), "v", color=f"C{index}")
        resumed_at = [level_at(levels, moment) + lift for moment in resumed]
        axes.plot([moment - start for moment in resumed], resumed_at, "^", color=f"C{index}")
    axes.plot([], [], "kv", label="an agent paused: one row\nper agent above\nmax_storage")
    axes.plot([], [], "k^", label="it resumed: at the fill\nthen, raised a little\nper agent")
    axes.plot([], [], " ", label="(colour: the agent,\nas in the panel below)")
    axes.set_ylim(bottom=0, top=1.2 * top)
    axes.yaxis.get_major_locator().set_params(integer=True)  # items are whole
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def level_at(levels: list[tuple[float, float]], moment: float) -> float:
    """Storage's count as last known at ``moment``."""
    return next((count for stamp, count in reversed(levels) if stamp <= moment), 0.0)


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
    require(("matplotlib",), "matplotlib", "install it: .venv/bin/pip install -r requirements-dev.txt")

    def body() -> None:
        file = recording_file(cli.recording)
        output = Path(cli.output) if cli.output else file.with_suffix(".png")
        check(output.parent.is_dir(), f"cannot write {output}: folder {output.parent} does not exist")
        recording = load(file)
        draw(recording, file.name, output)
        print(*report(recording), f"wrote {output}", sep="\n")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
