"""Serving one ``EventServiceGrpc``: a server with this example's limits, run until a signal.

    server = create_server(wire.AGENT)
    service = EventServiceGrpc(server, spec.config)
    ...
    return await serve(service, [tasks...], stats=agent.stats)

``serve`` does what farm-ng-core's ``EventServiceGrpc.serve()`` does, differently where
it matters: it listens on the entry's host (``serve()`` binds ``[::]``, every network),
refuses a port in use, publishes ``/stats`` beside ``/health``, tallies gRPC's own stderr
lines, and stops on Ctrl-C, SIGTERM or SIGHUP: the server first, then the tasks.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Iterable, Sequence

import grpc
from google.protobuf.struct_pb2 import Struct

from propagation.config import ConfigError
from propagation.guard import COUNTERS, PathGuard
from propagation.logs import read_back_core_log
from propagation.network import MAX_MESSAGE_BYTES, addresses_of, check_port_free, grpc_address, is_loopback

if TYPE_CHECKING:
    from farm_ng.core.event_service import EventServiceGrpc

    from propagation.config import Entry
    from propagation.wire import Contract


STOP_GRACE_S = 0.5
# The options against a stranger's abuse are listed in the README (Security).
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    # gRPC on Linux sets SO_REUSEPORT: a second server on a used port would start
    # silently and share the traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Calls at once on one connection (unlimited by default). It bounds HTTP/2 rapid
    # reset: reset streams count until the server is done with them, instead of piling up
    # work (one connection took an agent to 1.8 GB and 23 s without an answer). Calls beyond
    # it fail (UNAVAILABLE; gRPC's client does not wait); a supervisor's connection carries
    # at most 64 relays (max_in_flight), its wake-ups, a subscription and a probe.
    ("grpc.max_concurrent_streams", 256),
    # Compressed messages are refused (UNIMPLEMENTED) before inflating: the message limit
    # is checked after, so 50 KB of gzip would be 50 MB first. No client here compresses.
    ("grpc.compression_enabled_algorithms_bitset", 1),
    # A connection that does not open HTTP/2 within 5 s is closed (default: a minute or
    # two, each holding a file descriptor).
    ("grpc.server_handshake_timeout_ms", 5_000),
    # A client whose host vanished (no FIN, no reset) is noticed within
    # keepalive_time + keepalive_timeout, and its subscriptions end.
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Clients may ping as often as they like (no strikes, no GOAWAY): gRPC answers a
    # ping flood cheaply (1.2 million pings in 5 s cost an agent 0.5 s of CPU).
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
)
# Events a subscriber of a service reachable over a network may have waiting (farm-ng-core's
# default, kept on loopback, is 10); newer ones are dropped and counted (/health:
# <path>/dropped). On a link thinned to 96 kbit/s each waiting sample adds some 65 ms: with
# 3, agents' samples neared the freshness bound (gaps of up to 4.8 s without a residual);
# with 1, the longest gap was 3.1 s. What else goes out this way is re-asserted on a period.
NETWORK_SUBSCRIBER_QUEUE = 1


def create_server(contract: Contract, peers: Iterable[Entry] = ()) -> grpc.aio.Server:
    """A ``grpc.aio`` server with this example's limits, guarding ``contract``.

    Must run inside the event loop: grpc.aio binds the server to the running loop (made
    before it, it fails on Python 3.12 with "attached to a different loop").

    Args:
        contract: What the role serves and publishes.
        peers: The config's entries (``spec.entries``): subscribers on their hosts have
            slots that strangers cannot take. Without them only loopback has.

    """
    trusted = addresses_of(entry.host for entry in peers if entry.host)
    return grpc.aio.server(options=list(SERVER_OPTIONS), interceptors=[PathGuard(contract, trusted)])


async def serve(
    service: EventServiceGrpc,
    tasks: Sequence[Coroutine[Any, Any, Any]] = (),
    stats: Callable[[], dict[str, Any]] = dict,
) -> int:
    """Serves ``service`` and runs ``tasks`` beside it until Ctrl-C, SIGTERM or SIGHUP.

    Args:
        service: The service, built on ``create_server()``'s server.
        tasks: The role's coroutines: they run until the service stops.
        stats: The role's figures, published on ``/stats`` every second.

    Returns:
        The exit code: 0 after a signal, 1 if a task failed.

    Raises:
        ConfigError: the host does not resolve, or the port is in use.

    """
    loop = asyncio.get_running_loop()
    stopping = loop.create_future()  # done (cancelled) at the first signal
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stopping.cancel)
    # EventServiceGrpc adds a stderr handler of its own; the root logger prints already.
    service.logger.handlers.clear()
    host, port = service.config.host, service.config.port
    if not is_loopback(host):
        service.QUEUE_MAX_SIZE = NETWORK_SUBSCRIBER_QUEUE
    address = grpc_address(host, port)  # the config's host, not every interface as farm-ng-core's serve()
    try:
        check_port_free(host, port)  # gRPC would say only that it failed
        service.server.add_insecure_port(address)
    except (ValueError, RuntimeError) as exc:
        for task in tasks:
            task.close()
        msg = str(exc) if isinstance(exc, ValueError) else f"cannot listen on {address}"
        raise ConfigError(msg) from None
    undo_core_log = read_back_core_log(loop)
    try:
        await service.server.start()
        publishing = [service.publish_health_metrics(), publish_stats(service, stats)]
        jobs = [asyncio.ensure_future(job) for job in [*tasks, *publishing]]
        service.logger.info("%s serving on %s", service.config.name, address)

        done, _ = await asyncio.wait([stopping, *jobs], return_when=asyncio.FIRST_COMPLETED)
        ended = done - {stopping}
        for job in ended:
            why = "it was cancelled" if job.cancelled() else repr(job.exception())
            service.logger.error("%s stopped: a task ended: %s", service.config.name, why)
        # The server first: calls in flight get STOP_GRACE_S to finish and peers see a
        # clean close. Cancelling the tasks first would make stop() raise CancelledError.
        await service.server.stop(STOP_GRACE_S)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        return 1 if ended else 0
    finally:
        undo_core_log()


async def publish_stats(service: EventServiceGrpc, figures: Callable[[], dict[str, Any]]) -> None:
    """Publishes the role's figures and the guard's counters on ``/stats`` every second, latched."""
    while True:
        message = Struct()
        message.update({**figures(), **{key: service.metrics.get(key) for key in COUNTERS}})
        await service.publish("/stats", message, latch=True)
        await asyncio.sleep(1.0)
