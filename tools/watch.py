"""Watch: prints what a service publishes, decoded, one event a line, until Ctrl-C or ``--count``.

    python -m tools.watch --service-config service_config.json --service-name agent-3 --path /sample --count 5
    agent-3/sample 1234 {"sample": 0.5398770072851099, "task_id": 0.0}

A message JSON cannot hold (NaN, say) is shown in protobuf's text format, marked invalid. A service that is down
is said on stderr and tried again, each attempt bounded.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service_pb2 import EventServiceConfig, SubscribeRequest
from farm_ng.core.uri_pb2 import Uri
from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from propagation.cli import run_cli
from propagation.config import ConfigError, check, check_endpoint, find_entry, read_config
from propagation.peers import PeerClient


def describe(service_name: str, event: Event, message: Message | bytes) -> str:
    """``agent-3/sample 1234 {"sample": 0.53, "task_id": 0.0}``."""
    if isinstance(message, Message):
        try:
            shown = json_format.MessageToJson(message, indent=None, sort_keys=True)
        except ValueError as exc:  # NaN or infinity: JSON has no such number
            shown = f"{text_format.MessageToString(message, as_one_line=True)} (invalid: {exc})"
    else:
        shown = f"<{len(message)} bytes>"
    return f"{service_name}{event.uri.path} {event.sequence} {shown}"


async def watch(config: EventServiceConfig, path: str, count: int | None) -> None:
    """Prints the events of ``path`` as they come until ``count`` have come, or until Ctrl-C or SIGTERM."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, asyncio.current_task().cancel)
    client = PeerClient(config, "watch")
    request = SubscribeRequest(uri=Uri(path=path, query=f"service_name={config.name}"), every_n=1)
    printed = 0
    with contextlib.suppress(asyncio.CancelledError):
        try:
            async for event, message in client.subscribe(request, decode=True):
                try:
                    print(describe(config.name, event, message), flush=True)
                except BrokenPipeError:  # `| head` read what it wanted
                    # stdout to /dev/null: Python's last flush on the way out must not fail again.
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())
                    os.close(devnull)
                    return
                printed += 1
                if count is not None and printed >= count:
                    return
        finally:
            await client.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.watch", description="Print what a service publishes, decoded, one event a line."
    )
    parser.add_argument("--service-config", required=True, help="the EventServiceConfigList JSON file")
    parser.add_argument("--service-name", required=True, help="the service to watch")
    parser.add_argument("--path", default="*", help="the path to follow, e.g. /sample; '*' (default) is every path")
    parser.add_argument("--count", type=int, help="stop after this many events")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and prints events; returns the exit code."""
    cli = build_parser().parse_args(argv)
    # Only events on stdout; PeerClient's lines (a peer not up yet, gone, back, a refusal) on stderr, bare.
    logger = logging.getLogger("watch")
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def body() -> None:
        entry = find_entry(read_config(cli.service_config), cli.service_name, cli.service_config)
        check_endpoint(entry)
        if cli.path != "*" and not cli.path.startswith("/"):
            msg = f"--path {cli.path!r} must start with '/' (e.g. /sample), or be '*'"
            raise ConfigError(msg)
        check(cli.count is None or cli.count >= 1, f"--count {cli.count} must be at least 1")
        asyncio.run(watch(entry.service_config(), cli.path, cli.count))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
