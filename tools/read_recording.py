"""Read a recording back: how many events of each path it holds, in all, and how many were latched.

    python -m tools.read_recording recordings                 # the newest recording there
    python -m tools.read_recording recordings/2025_01_31_12_00_00_000000_host.0000.bin

farm-ng-core's ``EventsFileReader`` decodes a payload by the type its event names, importing the module that
names: a file from elsewhere could run code. Here the sizes are bounded, and the plot decodes each payload by its
path (``wire``).
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import contextlib
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

from farm_ng.core.event_pb2 import Event
from google.protobuf.message import DecodeError

from propagation.cli import run_cli
from propagation.config import ConfigError, check, service_name_in
from propagation.network import MAX_MESSAGE_BYTES
from tools.figures import received_at, sent_at

LENGTH = struct.Struct("<I")


def recording_file(path: str) -> Path:
    """The recording ``path`` names: the file itself, or the newest ``*.bin`` in a directory; else ConfigError."""
    given = Path(path)
    if given.is_dir():
        # The recorder names files after the UTC time they were started.
        files = sorted(given.glob("*.bin"))
        check(files != [], f"{path} holds no recording (*.bin)")
        return files[-1]
    check(given.is_file(), f"recording {path} does not exist")
    return given


def read_events(file: Path) -> Iterator[tuple[str, Event, bytes]]:
    """Every event of a recording, in order: ``(service/path, event, payload)``; ConfigError if it is damaged."""
    with file.open("rb") as stream:
        while header := stream.read(LENGTH.size):
            event = None
            if len(header) == LENGTH.size and (length := LENGTH.unpack(header)[0]) <= MAX_MESSAGE_BYTES:
                with contextlib.suppress(DecodeError):
                    event = Event.FromString(stream.read(length))
            if event is None or event.payload_length > MAX_MESSAGE_BYTES:
                msg = f"recording {file} is damaged near byte {stream.tell()}"
                raise ConfigError(msg)
            payload = stream.read(event.payload_length)
            if len(payload) < event.payload_length:
                return  # cut short: the recorder was stopped while writing
            yield f"{service_name_in(event.uri.query) or '?'}{event.uri.path}", event, payload


def summary(file: Path) -> list[str]:
    """``<path> <count>`` per path, the number of events, how long the recording ran, and the latched ones.

    A latched event (the last a service published before the recorder subscribed) comes
    first, with its old send stamp.
    """
    events = [(name, sent_at(event), received_at(event)) for name, event, _ in read_events(file)]
    sent = [stamp for _, stamp, _ in events if stamp is not None]
    arrivals = [stamp for _, _, stamp in events if stamp is not None]
    lines = [f"{path} {count}" for path, count in sorted(Counter(name for name, _, _ in events).items())]
    # A file written without receive stamps: the send stamps are the next best.
    stamps = arrivals or sent
    span = max(stamps) - min(stamps) if stamps else 0.0
    lines.append(f"{len(events)} events, {span:.1f} s")
    started = min(arrivals) if arrivals else None
    latched = sum(1 for stamp in sent if started is not None and stamp < started)
    if latched:
        lines.append(f"{latched} of them sent before the recording started (latched)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.read_recording", description="Count the events of each path in a recording."
    )
    parser.add_argument("recording", help="a recording (.bin), or a directory: its newest recording")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Prints the summary of a recording; returns the exit code."""
    cli = build_parser().parse_args(argv)

    def body() -> None:
        file = recording_file(cli.recording)
        print(file, *summary(file), sep="\n")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
