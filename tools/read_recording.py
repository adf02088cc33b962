"""Read a recording back: how many events of each path it holds.

    python read_recording.py recordings                       # the newest recording there
    python read_recording.py recordings/2025_01_31_12_00_00_000000_host.0000.bin

prints one line per path, then a total:

    agent-1/sample 480
    storage/stats 10
    1234 events, 9.8 s

The recording is a file that farm-ng-core's ``event_service_recorder`` wrote. Its
``EventsFileReader`` reads it; it names each path after the service that published
it (``agent-1/sample``).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from farm_ng.core.events_file_reader import EventsFileReader
from farm_ng.core.stamp import StampSemantics, get_stamp_by_semantics_and_clock_type

from service_runtime import ConfigError, run_cli

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from google.protobuf.message import Message


def recording_file(path: str) -> Path:
    """The recording ``path`` names: the file itself, or the newest ``*.bin`` in a directory.

    Raises:
        ConfigError: there is no such file, or the directory holds no recording.

    """
    given = Path(path)
    if given.is_dir():
        # The recorder names files after the UTC time they were started.
        files = sorted(given.glob("*.bin"))
        if not files:
            msg = f"{path} holds no recording (*.bin)"
            raise ConfigError(msg)
        return files[-1]
    if not given.is_file():
        msg = f"recording {path} does not exist"
        raise ConfigError(msg)
    return given


def read_events(file: Path) -> Iterator[tuple[Event, Message]]:
    """Every event of a recording with its decoded message, in the order recorded."""
    with EventsFileReader(file) as reader:
        yield from reader.read_messages()


def sent_at(event: Event) -> float | None:
    """When the service sent an event, by its host's monotonic clock."""
    return get_stamp_by_semantics_and_clock_type(event, StampSemantics.SERVICE_SEND, "monotonic")


def summary(file: Path) -> list[str]:
    """``<path> <count>`` per path, then the number of events and the time they span."""
    counts: Counter[str] = Counter()
    stamps = []
    with EventsFileReader(file) as reader:
        # The index reads events without decoding their messages.
        for position in reader.get_index():
            counts[position.event.uri.path] += 1
            stamp = sent_at(position.event)
            if stamp is not None:
                stamps.append(stamp)
    lines = [f"{path} {count}" for path, count in sorted(counts.items())]
    span = max(stamps) - min(stamps) if stamps else 0.0
    lines.append(f"{sum(counts.values())} events, {span:.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Prints the summary of a recording; returns the exit code."""
    parser = argparse.ArgumentParser(description="Count the events of each path in a recording.")
    parser.add_argument("recording", help="a recording (.bin), or a directory: its newest recording")
    cli = parser.parse_args(argv)

    def body() -> None:
        file = recording_file(cli.recording)
        print(file)
        for line in summary(file):
            print(line)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
