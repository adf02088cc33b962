"""Recorder: serves farm-ng-core's ``RecorderService``; its ``start``/``stop`` commands drive it.

    python recorder.py --service-config record_config.json --service-name recorder
    python -m farm_ng.core.event_service_recorder start --service-config record_config.json --service-name recorder
    python -m farm_ng.core.event_service_recorder stop --service-config record_config.json --service-name recorder

``start`` records what the port-less ``record_default`` entry of the config subscribes to
into ``<data dir>/<UTC time>_<host>.0000.bin`` and prints that name without the
``.0000.bin``; ``stop`` closes the file. The entry's args name the data directory
(``"--data-dir=recordings"``).

farm-ng-core's own ``python -m farm_ng.core.event_service_recorder service`` serves the
same ``RecorderService``, but it builds its gRPC server before the event loop runs,
which fails on Python 3.12 ("attached to a different loop"), and it listens on every
interface. Here the server is built inside the loop and listens on the entry's host
and port only, as the services do; Ctrl-C closes a recording in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING

from farm_ng.core.event_service_recorder import RecorderService

from service_runtime import (
    STOP_GRACE_S,
    ConfigError,
    bind,
    check_endpoint,
    configure_logging,
    create_service,
    find_service,
    read_config_list,
    run_cli,
)

if TYPE_CHECKING:
    from farm_ng.core.event_service_pb2 import EventServiceConfig


def check_data_dir(config: EventServiceConfig) -> None:
    """Checks that the entry's args name a data directory, as ``RecorderService`` needs.

    Raises:
        ConfigError: no ``--data-dir`` among the args.

    """
    if not any(arg == "--data-dir" or arg.startswith("--data-dir=") for arg in config.args):
        msg = f'service {config.name!r} needs args ["--data-dir=<directory for recordings>"]'
        raise ConfigError(msg)


async def serve(config: EventServiceConfig) -> None:
    """Serves the recorder until Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    service = create_service(config)
    recorder = RecorderService(service)
    address = bind(service)
    await service.server.start()
    health = asyncio.ensure_future(service.publish_health_metrics())
    service.logger.info("%s serving on %s", config.name, address)
    await stop.wait()
    await recorder.stop_recording()
    await service.server.stop(STOP_GRACE_S)
    health.cancel()
    # asyncio.run then cancels the recording task, if any, and waits for it: the
    # recording file is closed on the way out.


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and serves the recorder; returns the exit code."""
    parser = argparse.ArgumentParser(description="Serve farm-ng-core's recorder; start and stop drive it.")
    parser.add_argument("--service-config", required=True, help="the EventServiceConfigList JSON file")
    parser.add_argument("--service-name", required=True, help="the recorder's entry in the config")
    cli = parser.parse_args(argv)

    def body() -> None:
        config = find_service(read_config_list(cli.service_config), cli.service_name, cli.service_config)
        check_endpoint(config)
        check_data_dir(config)
        configure_logging(config)
        asyncio.run(serve(config))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
