"""What agent.py, supervisor.py and storage.py share: the plumbing around one service.

- ``load_service``: the command line, the config file and the service's typed args,
  each problem reported as one line naming it (``ConfigError``);
- ``run_service``: logging, a server bound where the config says, the role's tasks,
  and a quiet stop on Ctrl-C or SIGTERM;
- ``PeerClient``: a farm-ng-core ``EventClient`` whose calls are bounded in time and
  which rides out its peer's restarts.

The scripts import this module; it does nothing when imported.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import math
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import grpc
from farm_ng.core import event_service_pb2_grpc
from farm_ng.core.event_client import EventClient
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import (
    EventServiceConfig,
    EventServiceConfigList,
    RequestReplyReply,
    RequestReplyRequest,
    SubscribeRequest,
)
from farm_ng.core.events_file_reader import payload_to_protobuf
from farm_ng.core.stamp import StampSemantics, get_monotonic_now, get_system_clock_now
from farm_ng.core.uri import make_proto_uri
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

if TYPE_CHECKING:
    from farm_ng.core.timestamp_pb2 import Timestamp
    from google.protobuf.message import Message

__all__ = [
    "ConfigError",
    "PeerClient",
    "PeerUnavailable",
    "ServiceSpec",
    "load_service",
    "run_service",
]

ArgsT = TypeVar("ArgsT")

# How long Ctrl-C lets calls in flight finish before the server closes them.
STOP_GRACE_S = 0.5

# gRPC's reconnect backoff grows to 120 s by default; a peer that comes back after a
# minute would then go unnoticed for tens of seconds. Capped at 1 s, a restarted peer
# is found within about a second, at the cost of one connection attempt a second
# while it is down.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ConfigError(Exception):
    """A problem with the command line, the config file or a service's args."""


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """What the command line named: the service's config and the config it came from."""

    config: EventServiceConfig
    config_list: EventServiceConfigList


# ---------------------------------------------------------------------------------
# Command line and config


def load_service(
    description: str, args_type: type[ArgsT], argv: Sequence[str] | None = None
) -> tuple[ServiceSpec, ArgsT]:
    """Parses the command line, reads the config and the service's args.

    Args:
        description: One line for ``--help``.
        args_type: A dataclass whose fields are the service's args; its ``__post_init__``
            raises ``ValueError`` for a value out of range.
        argv: The command line without the program name (default ``sys.argv[1:]``).

    Returns:
        The service's config and its args, parsed.

    Raises:
        ConfigError: naming the file, service, arg or value at fault.

    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--service-config", required=True, help="the EventServiceConfigList JSON file")
    parser.add_argument("--service-name", required=True, help="which entry of the config to run")
    cli = parser.parse_args(argv)
    config_list = read_config_list(cli.service_config)
    config = find_service(config_list, cli.service_name, cli.service_config)
    check_endpoint(config)
    return ServiceSpec(config, config_list), parse_service_args(config, args_type)


def read_config_list(path: str) -> EventServiceConfigList:
    """Reads an ``EventServiceConfigList`` JSON file, as farm-ng-core's tools do.

    Raises:
        ConfigError: the file is missing, unreadable, not JSON or not a config list.

    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        msg = f"config file {path} does not exist"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}"
        raise ConfigError(msg) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ConfigError(msg) from None
    try:
        return json_format.ParseDict(data, EventServiceConfigList())
    except (json_format.ParseError, TypeError, AttributeError) as exc:
        msg = f"config file {path} is not an EventServiceConfigList: {exc}"
        raise ConfigError(msg) from None


def find_service(config_list: EventServiceConfigList, name: str, path: str = "the config") -> EventServiceConfig:
    """Returns the entry called ``name``.

    Raises:
        ConfigError: no entry has that name.

    """
    for config in config_list.configs:
        if config.name == name:
            return config
    known = ", ".join(config.name for config in config_list.configs) or "none"
    msg = f"service {name!r} is not in {path} (it has: {known})"
    raise ConfigError(msg)


# The roles of this example; an entry's name starts with its role ("agent-1").
ROLES = ("storage", "supervisor", "agent")


def role_of(config: EventServiceConfig) -> str | None:
    """The role of a config entry, by its name's prefix; None if it has no port or role.

    A config may hold entries of other programs (a recorder, say): they are not ours.
    """
    if not config.port:
        return None
    return next((role for role in ROLES if config.name.startswith(role)), None)


def check_endpoint(config: EventServiceConfig) -> None:
    """Checks that an entry says where its service listens.

    Raises:
        ConfigError: the host is empty or the port is not in 1..65535.

    """
    if not config.host:
        msg = f"service {config.name!r} has no host in the config"
        raise ConfigError(msg)
    if not 0 < config.port < 65536:
        msg = f"service {config.name!r} has port {config.port} in the config; it needs one in 1..65535"
        raise ConfigError(msg)


def parse_service_args(config: EventServiceConfig, args_type: type[ArgsT]) -> ArgsT:
    """Turns an entry's ``"key=value"`` args into ``args_type``, a dataclass.

    Each field's annotation (``int``, ``float``) says how its value is parsed; a field
    without a default is required.

    Raises:
        ConfigError: an arg is malformed, unknown, repeated, missing, of the wrong type
            or out of range.

    """
    fields = {field.name: field for field in dataclasses.fields(args_type)}
    where = f"service {config.name!r}"
    values: dict[str, Any] = {}
    for arg in config.args:
        key, sep, text = arg.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            msg = f"{where}: arg {arg!r} is not of the form key=value"
            raise ConfigError(msg)
        if key not in fields:
            msg = f"{where}: unknown arg {key!r} (it takes: {', '.join(fields)})"
            raise ConfigError(msg)
        if key in values:
            msg = f"{where}: arg {key!r} is given twice"
            raise ConfigError(msg)
        values[key] = parse_value(where, key, text, str(fields[key].type))
    missing = [
        name
        for name, field in fields.items()
        if name not in values and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        msg = f'{where}: missing arg {missing[0]!r} (add "{missing[0]}=..." to its args)'
        raise ConfigError(msg)
    try:
        return args_type(**values)
    except ValueError as exc:
        msg = f"{where}: {exc}"
        raise ConfigError(msg) from None


def parse_value(where: str, key: str, text: str, type_name: str) -> int | float:
    """Parses one arg's value as the type its field names."""
    parsers: dict[str, Callable[[str], int | float]] = {"int": int, "float": float}
    kind = {"int": "a whole number", "float": "a number"}[type_name]
    try:
        value = parsers[type_name](text)
    except ValueError:
        msg = f"{where}: arg {key}={text!r} is not {kind}"
        raise ConfigError(msg) from None
    if not math.isfinite(value):
        msg = f"{where}: arg {key}={text!r} is not a finite number"
        raise ConfigError(msg)
    return value


def report_error(exc: ConfigError) -> int:
    """Prints ``error: <problem>`` as one line on stderr; returns the exit code, 1."""
    print("error:", " ".join(str(exc).split()), file=sys.stderr, flush=True)
    return 1


def require(ok: bool, key: str, value: float, rule: str) -> None:
    """Raises ``ValueError("arg key=value must be rule")`` unless ``ok``."""
    if not ok:
        msg = f"arg {key}={value:g} must be {rule}"
        raise ValueError(msg)


# ---------------------------------------------------------------------------------
# Running a service


def configure_logging(config: EventServiceConfig) -> None:
    """Sends every log line to stdout once, at the config's level.

    Importing ``farm_ng.core.event_client`` runs ``logging.basicConfig`` and each
    ``EventServiceGrpc`` adds a handler of its own, which prints every line twice;
    here the root logger alone prints, and a line's prefix says only what matters.
    """
    level = config.log_level or logging.INFO
    # Line-buffered so that each line shows at once in a pipe or a log file too.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LevelPrefixFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class _LevelPrefixFormatter(logging.Formatter):
    """``message`` for INFO and below, ``WARNING: message`` above."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if record.levelno <= logging.INFO else f"{record.levelname}: {line}"


def create_service(config: EventServiceConfig) -> EventServiceGrpc:
    """Builds the service on a server that refuses a port already in use.

    Must run inside the event loop (grpc.aio binds the server to the running loop).
    """
    # gRPC on Linux sets SO_REUSEPORT: a second server on a used port would start
    # silently and share the traffic.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    service = EventServiceGrpc(server, config)
    # EventServiceGrpc adds its own stderr handler; the root handler already prints.
    for handler in list(service.logger.handlers):
        service.logger.removeHandler(handler)
    return service


def bind(service: EventServiceGrpc) -> str:
    """Listens on the config's host and port, not on every interface.

    farm-ng-core's ``serve()`` binds ``[::]:port`` whatever the host says, which would
    put an unauthenticated service on every network the machine is on.

    Returns:
        The address it listens on.

    Raises:
        ConfigError: the host does not resolve or the port is taken.

    """
    host, port = service.config.host, service.config.port
    check_port_free(host, port)
    address = grpc_address(host, port)
    try:
        service.server.add_insecure_port(address)
    except RuntimeError:
        msg = f"cannot listen on {address}"
        raise ConfigError(msg) from None
    return address


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC reads it: an IPv6 address goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Tries the bind that gRPC will do, to name the problem in one line.

    gRPC reports a failed bind as a generic error (and a C-level log line); a plain
    socket tells why.

    Raises:
        ConfigError: the host does not resolve, is not an address of this machine, or
            the port is in use there.

    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        msg = f"host {host!r} does not resolve: {exc.strerror}"
        raise ConfigError(msg) from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: connections of a stopped server in TIME_WAIT must not
            # block a restart, while a live listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    msg = f"port {port} on {host} ({sockaddr[0]}) is already in use"
                elif exc.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6 and len(infos) > 1:
                    continue  # no IPv6 here: gRPC binds the IPv4 address alone
                else:
                    msg = f"cannot listen on {host}:{port} ({sockaddr[0]}): {exc.strerror}"
                raise ConfigError(msg) from None


def run_service(
    description: str,
    args_type: type[ArgsT],
    role: Callable[[EventServiceGrpc, ServiceSpec, ArgsT], Sequence[Awaitable[Any]]],
    argv: Sequence[str] | None = None,
) -> int:
    """The ``main()`` of every script: load, serve until Ctrl-C or SIGTERM, stop.

    Args:
        description: One line for ``--help``.
        args_type: The dataclass of the service's args.
        role: Builds the role's objects and returns the coroutines it runs beside the
            server. Called inside the event loop, after the server is built.
        argv: The command line without the program name.

    Returns:
        The exit code: 0 after a signal, 1 for bad input, 1 if a task failed.

    """

    def body() -> int:
        spec, args = load_service(description, args_type, argv)
        configure_logging(spec.config)
        return asyncio.run(_serve(spec, args, role))

    return run_cli(body)


def run_cli(body: Callable[[], int | None]) -> int:
    """Runs a script's body and returns its exit code, for ``sys.exit``.

    A ``ConfigError`` becomes one ``error: ...`` line and exit code 1; Ctrl-C before the
    event loop took over the signals ends quietly with 0; otherwise the body's code.
    """
    try:
        return body() or 0
    except ConfigError as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        return 0


async def _serve(
    spec: ServiceSpec,
    args: ArgsT,
    role: Callable[[EventServiceGrpc, ServiceSpec, ArgsT], Sequence[Awaitable[Any]]],
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    service = create_service(spec.config)
    coroutines = role(service, spec, args)
    try:
        address = bind(service)
    except ConfigError:
        for coroutine in coroutines:
            coroutine.close()  # type: ignore[attr-defined]
        raise
    await service.server.start()
    jobs = [asyncio.ensure_future(job) for job in [*coroutines, service.publish_health_metrics()]]
    service.logger.info("%s serving on %s", spec.config.name, address)

    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopping, *jobs], return_when=asyncio.FIRST_COMPLETED)
    failed = [job for job in done if job is not stopping]
    exit_code = 0
    for job in failed:
        exc = job.exception()
        service.logger.error("%s stopped: a task failed: %r", spec.config.name, exc)
        exit_code = 1

    # Stop the server first: calls in flight get STOP_GRACE_S to finish, and peers see
    # a clean close rather than a reset. Cancelling the tasks first would make stop()
    # raise CancelledError.
    await service.server.stop(STOP_GRACE_S)
    for job in [stopping, *jobs]:
        job.cancel()
    await asyncio.gather(stopping, *jobs, return_exceptions=True)
    return exit_code


# ---------------------------------------------------------------------------------
# Talking to peers


class PeerUnavailable(Exception):
    """A call to a peer failed: it is down, restarting, or did not answer in time."""


class PeerClient(EventClient):
    """An ``EventClient`` with one long-lived channel and calls bounded in time.

    farm-ng-core 2.3.2's ``EventClient`` builds a new channel for every call and every
    received message (its ready check awaits a coroutine that returns None), waits
    without bound for a peer that is down, and logs a warning per retry. This one keeps
    one channel (reconnecting within about a second of the peer's return), fails a call
    at once while the peer is down, and says once when the peer goes and once when it
    comes back.
    """

    def __init__(self, config: EventServiceConfig, owner: str) -> None:
        """Initializes the client; it connects on first use.

        Args:
            config: The peer's entry in the config.
            owner: The name of the service that uses this client, for its log lines.

        """
        super().__init__(config)
        self._owner = logging.getLogger(owner)
        self._reachable: bool | None = None  # None until the first call tells
        self._ever_reached = False

    @property
    def server_address(self) -> str:
        """The peer's address as gRPC reads it (EventClient's leaves IPv6 unbracketed)."""
        return grpc_address(self.config.host, self.config.port)

    @property
    def reachable(self) -> bool | None:
        """Whether the last call reached the peer; None before the first call."""
        return self._reachable

    async def _try_connect(self) -> bool:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.server_address, options=CHANNEL_OPTIONS)
            self.stub = event_service_pb2_grpc.EventServiceStub(self.channel)
        return True

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        if self.channel is not None:
            await self.channel.close(None)
            self.channel = self.stub = None

    def mark_up(self) -> None:
        """Records that the peer answered; says so if it had been down."""
        if not self._reachable:
            again = "is back" if self._ever_reached else "is up"
            self._owner.info("%s %s at %s", self.config.name, again, self.server_address)
        self._reachable = self._ever_reached = True

    def mark_down(self, why: str) -> None:
        """Records a failed call; says so once per outage."""
        if self._reachable is False:
            return
        self._reachable = False
        if self._ever_reached:
            self._owner.warning("%s is unreachable at %s (%s); retrying", self.config.name, self.server_address, why)
        else:  # not started yet: services may start in any order
            self._owner.info("%s is not up yet at %s; retrying", self.config.name, self.server_address)

    async def request_reply(  # type: ignore[override]
        self,
        path: str,
        message: Message,
        timestamps: list[Timestamp] | None = None,
        decode: bool = False,
        timeout: float = 1.0,
    ) -> RequestReplyReply | Message:
        """Sends a request and returns the reply, within ``timeout`` seconds.

        Args:
            path: The request's path, e.g. ``/update_storage``.
            message: The request's message.
            timestamps: Extra timestamps to carry in the request's event.
            decode: Return the decoded reply message instead of the raw reply.
            timeout: Seconds before the call is abandoned.

        Raises:
            PeerUnavailable: the peer is down or did not answer in time.

        """
        await self._try_connect()
        assert self.stub is not None
        stamps = list(timestamps or [])
        stamps.append(get_monotonic_now(semantics=StampSemantics.CLIENT_SEND))
        stamps.append(get_system_clock_now(semantics=StampSemantics.CLIENT_SEND))
        uri = make_proto_uri(path=path, message=message)
        uri.query += f"&service_name={self.config.name}"
        payload = message.SerializeToString()
        request = RequestReplyRequest(
            event=Event(uri=uri, timestamps=stamps, payload_length=len(payload)),
            payload=payload,
        )
        try:
            reply: RequestReplyReply = await self.stub.requestReply(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self.mark_down(_rpc_reason(exc))
            raise PeerUnavailable(self.config.name) from None
        self.mark_up()
        reply.event.timestamps.append(get_monotonic_now(semantics=StampSemantics.CLIENT_RECEIVE))
        return payload_to_protobuf(reply.event, reply.payload) if decode else reply

    async def subscribe(  # type: ignore[override]
        self,
        request: SubscribeRequest,
        decode: bool = True,
    ) -> AsyncIterator[tuple[Event, Message | bytes]]:
        """Yields the events of one path, across the peer's restarts, until cancelled.

        While the peer is down it waits quietly for the channel to reconnect.
        """
        await self._try_connect()
        assert self.channel is not None and self.stub is not None
        while True:
            await self.channel.channel_ready()
            call = self.stub.subscribe(request)
            first = True
            try:
                async for reply in call:
                    if first:  # later messages may be old ones still buffered
                        self.mark_up()
                        first = False
                    reply.event.timestamps.append(get_monotonic_now(StampSemantics.CLIENT_RECEIVE))
                    payload = payload_to_protobuf(reply.event, reply.payload) if decode else reply.payload
                    yield reply.event, payload
            except grpc.aio.AioRpcError as exc:
                self.mark_down(_rpc_reason(exc))
            finally:
                call.cancel()
            # The stream ended: the peer stopped. Wait for the next connection, after
            # a pause so that a peer that closes streams at once is not spun on.
            await asyncio.sleep(0.1)


def _rpc_reason(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    return code.name.lower() if code is not None else "error"


# Timestamps this example adds to events, beside farm-ng-core's own. A program that
# knows only the original contract ignores them.
# On a residual: storage's monotonic time when the residual was true. Residuals can
# overtake each other on the way to an agent; this orders them.
RESIDUAL_TIME = "storage/residual"
# On a residual sent to an agent: when the agent published the sample that caused it.
SAMPLE_PUBLISHED = "agent/sample_published"
# On a refused store's reply: storage was full.
STORE_REFUSED = "storage/refused"


def find_stamp(event: Event, semantics: str) -> Timestamp | None:
    """Returns the event's first timestamp with these semantics, if any."""
    for stamp in event.timestamps:
        if stamp.semantics == semantics:
            return stamp
    return None


def stamp_now(semantics: str) -> Timestamp:
    """A monotonic timestamp of this host, now."""
    return get_monotonic_now(semantics=semantics)


async def publish_every(
    service: EventServiceGrpc, path: str, figures: Callable[[], dict[str, Any]], period_s: float = 1.0
) -> None:
    """Publishes ``figures()`` as a ``Struct`` on ``path`` every ``period_s``, latched.

    Counters only grow, so a reader (the monitor, the benchmark) turns two of them into
    a rate.
    """
    while True:
        message = Struct()
        message.update(figures())
        await service.publish(path, message, latch=True)
        await asyncio.sleep(period_s)


def is_newer(stamp: Timestamp, last: Timestamp | None) -> bool:
    """Whether a ``RESIDUAL_TIME`` stamp is later than ``last``.

    Stamps of another clock (storage restarted on another host) count as newer.
    """
    return last is None or stamp.clock_name != last.clock_name or stamp.stamp > last.stamp
