"""Recorder: serves farm-ng-core's ``RecorderService``; its ``start``/``stop`` commands drive it.

    python -m tools.recorder --service-config tools/record_config.json --service-name recorder
    python -m farm_ng.core.event_service_recorder start \
        --service-config tools/record_config.json --service-name recorder
    python -m farm_ng.core.event_service_recorder stop \
        --service-config tools/record_config.json --service-name recorder

``start`` records what the port-less ``record_default`` entry of the config subscribes to
into ``<data dir>/<UTC time>_<host>.0000.bin`` and prints that name without the
``.0000.bin``; ``stop`` closes the file. The entry's args name the data directory
(``"--data-dir=recordings"``).

farm-ng-core's own ``python -m farm_ng.core.event_service_recorder service`` serves the
same ``RecorderService``, but it builds its gRPC server before the event loop runs,
which fails on Python 3.12 ("attached to a different loop"), and it listens on every
interface. Here the server is built inside the loop, listens on the entry's host and
port only, and refuses any request but ``/start/record_default`` (carrying an
``EventServiceConfigList``) and ``/stop`` (``Empty``): ``RecorderService`` decodes
``/start`` by the type the request names. Ctrl-C closes a recording in progress.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import asyncio
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


def check_data_dir(entry: Entry) -> None:
    """Checks that the entry's args name a data directory, as ``RecorderService`` needs.

    Raises:
        ConfigError: no ``--data-dir`` among the args.

    """
    if not any(arg == "--data-dir" or arg.startswith("--data-dir=") for arg in entry.args):
        msg = f'service {entry.name!r} needs args ["--data-dir=<directory for recordings>"]'
        raise ConfigError(msg)


async def serve_recorder(entry: Entry) -> int:
    """Serves the recorder until Ctrl-C or SIGTERM, then closes a recording in progress."""
    service = EventServiceGrpc(create_server(RECORDER), entry.service_config())
    recorder = RecorderService(service)
    try:
        return await serve(service)
    finally:
        await recorder.stop_recording()
        # asyncio.run then cancels the recording task, if any, and waits for it: the
        # recording file is closed on the way out.


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
        check_data_dir(entry)
        output = configure_logging(entry.log_level)
        try:
            return asyncio.run(serve_recorder(entry))
        finally:
            output.close()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
