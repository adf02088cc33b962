"""Recorder: serves farm-ng-core's ``RecorderService``; its ``start``/``stop`` commands drive it (see the README).

    python -m tools.recorder --service-config tools/record_config.json --service-name recorder

farm-ng-core's own ``event_service_recorder service`` builds its gRPC server before the event loop runs, which
fails on Python 3.12, and listens on every interface. This one builds it in the loop, listens on the entry's host
and port only, and takes only ``/start/record_default`` and ``/stop``, each decoded as its own type
(``RecorderService`` decodes by the type the request names). Ctrl-C closes a recording in progress.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import asyncio
import contextlib
import sys

from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import EventServiceConfigList
from farm_ng.core.event_service_recorder import RecorderService
from google.protobuf.empty_pb2 import Empty

from propagation.cli import run_cli
from propagation.config import ConfigError, Entry, check_endpoint, find_entry, read_config
from propagation.logs import configure_logging
from propagation.serving import create_server, serve
from propagation.wire import Contract

# What the recorder answers, and what each request carries in.
RECORDER = Contract(requests={"/start/record_default": EventServiceConfigList, "/stop": Empty}, publishes=("/health",))


async def serve_recorder(entry: Entry) -> int:
    """Serves the recorder until Ctrl-C or SIGTERM, then closes a recording in progress."""
    service = EventServiceGrpc(create_server(RECORDER), entry.service_config())
    recorder = RecorderService(service)
    try:
        return await serve(service)
    finally:
        await recorder.stop_recording()
        # asyncio.run then cancels the recording task, if any, and waits for it: the file is closed.


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.recorder", description="Serve farm-ng-core's recorder; start and stop drive it."
    )
    parser.add_argument("--service-config", required=True, help="the EventServiceConfigList JSON file")
    parser.add_argument("--service-name", required=True, help="the recorder's entry in the config")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and serves the recorder; returns the exit code."""
    cli = build_parser().parse_args(argv)

    def body() -> int:
        entry = find_entry(read_config(cli.service_config), cli.service_name, cli.service_config)
        check_endpoint(entry)
        if not any(arg.partition("=")[0] == "--data-dir" for arg in entry.args):  # RecorderService's
            msg = f'service {entry.name!r} needs args ["--data-dir=<directory for recordings>"]'
            raise ConfigError(msg)
        with contextlib.closing(configure_logging(entry.log_level)):
            return asyncio.run(serve_recorder(entry))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
