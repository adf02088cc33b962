"""Read a recording back: how many events of each path it holds, in all, and how many were latched.

    python -m tools.read_recording recordings                 # the newest recording there
    python -m tools.read_recording recordings/2025_01_31_12_00_00_000000_host.0000.bin

farm-ng-core's ``EventsFileReader`` decodes a payload by the type its event names, importing
the module that names: a file from elsewhere could run code. Here each payload is decoded by
its path (``wire``), and the sizes are bounded.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

from farm_ng.core.event_pb2 import Event
from google.protobuf.message import DecodeError, Message

from propagation.cli import run_cli
from propagation.config import ConfigError, service_name_in
from propagation.network import MAX_MESSAGE_BYTES
from propagation.wire import PUBLISHED, WrongMessage, decode
from tools.figures import received_at, sent_at

LENGTH = struct.Struct("<I")


def recording_file(path: str) -> Path:
    """The recording ``path`` names: the file itself, or the newest ``*.bin`` in a directory; else ConfigError."""
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


def read_events(file: Path) -> Iterator[tuple[str, Event, bytes]]:
    """Every event of a recording, in order: ``(service/path, event, payload)``; ConfigError if it is damaged."""
    with file.open("rb") as stream:
        while header := stream.read(LENGTH.size):
            (length,) = LENGTH.unpack(header) if len(header) == LENGTH.size else (None,)
            if length is None or length > MAX_MESSAGE_BYTES:
                raise _damaged(file, stream.tell())
            try:
                event = Event.FromString(stream.read(length))
            except DecodeError:
                raise _damaged(file, stream.tell()) from None
            if event.payload_length > MAX_MESSAGE_BYTES:
                raise _damaged(file, stream.tell())
            payload = stream.read(event.payload_length)
            if len(payload) < event.payload_length:
                return  # cut short: the recorder was stopped while writing
            yield f"{service_name_in(event.uri.query) or '?'}{event.uri.path}", event, payload


def _damaged(file: Path, where: int) -> ConfigError:
    return ConfigError(f"recording {file} is damaged near byte {where}")


def read_messages(file: Path) -> Iterator[tuple[str, Event, Message]]:
    """The events of a recording whose path this example knows, each decoded as its path's type (others skipped)."""
    for name, event, payload in read_events(file):
        kind = PUBLISHED.get(event.uri.path)
        if kind is None:
            continue
        try:
            yield name, event, decode(event, payload, kind)
        except WrongMessage:
            continue


def summary(file: Path) -> list[str]:
    """``<path> <count>`` per path, the number of events, how long the recording ran, and the latched ones.

    A latched event (the last a service published before the recorder subscribed) comes
    first, with its old send stamp.
    """
    counts: Counter[str] = Counter()
    sent, received = [], []
    for name, event, _ in read_events(file):
        counts[name] += 1
        sent.append(sent_at(event))
        received.append(received_at(event))
    lines = [f"{path} {count}" for path, count in sorted(counts.items())]
    arrivals = [stamp for stamp in received if stamp is not None]
    # A file written without receive stamps: the send stamps are the next best.
    stamps = arrivals or [stamp for stamp in sent if stamp is not None]
    span = max(stamps) - min(stamps) if stamps else 0.0
    lines.append(f"{sum(counts.values())} events, {span:.1f} s")
    started = min(arrivals) if arrivals else None
    latched = sum(1 for stamp in sent if started is not None and stamp is not None and stamp < started)
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
