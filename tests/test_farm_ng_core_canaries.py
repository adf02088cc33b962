"""Canaries: farm-ng-core 2.3.2 behaviours that this example works around.

Each test asserts one behaviour exactly as farm-ng-core 2.3.2 (with grpcio 1.70) shows it
today. They are expected to PASS. A failing canary means that farm-ng-core (or gRPC, or
Python) changed: see docs/farm-ng-core-workarounds.md, which names the canary of each
behaviour, what our example does about it, and a reproduction; the workaround may be
removable. (One canary, ``test_one_parameter_handler_gets_the_raw_request_and_imports_nothing``,
guards the workaround itself: if it fails, the workaround needs a second look.)

The file is self-contained on purpose (no conftest helpers). Every server it starts is
stopped, every wait is bounded, ports are chosen by the OS at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

# The suite forks processes while gRPC's threads may be busy; gRPC reads this once, at
# its first import (the same setting as tests/conftest.py, repeated to stand alone).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import psutil
import pytest
from farm_ng.core.event_client import EventClient
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import EventServiceConfig, RequestReplyReply, RequestReplyRequest
from farm_ng.core.event_service_pb2_grpc import EventServiceStub
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.wrappers_pb2 import Int32Value

if TYPE_CHECKING:
    from pathlib import Path

T = TypeVar("T")

CHANGED = "farm-ng-core changed: see docs/farm-ng-core-workarounds.md, the workaround may be removable"

# A bound on each scenario, so that a hang fails its test instead of blocking the run.
SCENARIO_TIMEOUT_S = 10.0
# A bound on each child interpreter (it needs about 0.3 s on a quiet machine).
CHILD_TIMEOUT_S = 30.0


def run(scenario: Awaitable[T], timeout: float = SCENARIO_TIMEOUT_S) -> T:
    """Runs a coroutine in a fresh event loop, for at most ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(scenario, timeout))


def free_port() -> int:
    """A TCP port that nothing listens on at this moment, on any address (the OS picks it)."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address, 0))
                return probe.getsockname()[1]
        except OSError:  # no IPv6 here
            continue
    msg = "cannot bind any TCP port"
    raise OSError(msg)


@contextlib.asynccontextmanager
async def live_service(
    name: str, handler: Callable[..., Awaitable[Any]] | None = None
) -> AsyncIterator[tuple[EventServiceGrpc, int]]:
    """An ``EventServiceGrpc`` serving on 127.0.0.1 at a port the OS picks; stopped on exit."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    service = EventServiceGrpc(server, EventServiceConfig(name=name, port=port))
    if handler is not None:
        service.add_request_reply_handler(handler)
    await server.start()
    try:
        yield service, port
    finally:
        await server.stop(None)
        for added in list(service.logger.handlers):  # the StreamHandler it adds per service
            service.logger.removeHandler(added)


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` in a fresh interpreter (this one's); returns its exit code and output."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )


# ---------------------------------------------------------------------------------
# 1. EventClient builds a new channel for every call


def test_request_reply_builds_a_new_channel_per_call() -> None:
    async def answer(request: RequestReplyRequest) -> Int32Value:
        return Int32Value(value=7)

    async def scenario() -> tuple[list[Any], list[Any]]:
        async with live_service("canary-channels", answer) as (_, port):
            client = EventClient(EventServiceConfig(name="canary-channels", host="127.0.0.1", port=port))
            channels: list[grpc.aio.Channel] = []
            replies = []
            try:
                for _ in range(2):
                    replies.append(await client.request_reply("/ping", Int32Value(value=1), decode=True))
                    channels.append(client.channel)
            finally:
                for channel in {id(channel): channel for channel in [*channels, client.channel] if channel}.values():
                    await channel.close()
            return channels, replies

    channels, replies = run(scenario())
    assert replies == [Int32Value(value=7)] * 2, f"{CHANGED}: both calls should get the handler's reply; got {replies}"
    assert channels[0] is not None, f"{CHANGED}: request_reply() left no channel in client.channel"
    assert channels[0] is not channels[1], (
        f"{CHANGED}: EventClient kept one channel across two request_reply() calls "
        "(it used to build a new one per call); PeerClient's own long-lived channel may be unnecessary"
    )


# ---------------------------------------------------------------------------------
# 2. Concurrent publish() calls on one path share a sequence number


def test_concurrent_publishes_on_one_path_get_the_same_sequence() -> None:
    # The send counters live in a process-wide singleton: a path of its own per run.
    path = f"/canary-sequence-{uuid.uuid4().hex}"

    async def scenario() -> tuple[list[int], list[int], int]:
        server = grpc.aio.server()
        service = EventServiceGrpc(server, EventServiceConfig(name="canary-sequence", port=1))
        try:
            one_at_a_time = [(await service.publish(path, Int32Value(value=i))).sequence_number for i in range(3)]
            burst = await asyncio.gather(*(service.publish(path, Int32Value(value=i)) for i in range(5)))
            after = (await service.publish(path, Int32Value(value=0))).sequence_number
        finally:
            await server.stop(None)
            for added in list(service.logger.handlers):
                service.logger.removeHandler(added)
        return one_at_a_time, [result.sequence_number for result in burst], after

    one_at_a_time, concurrent, after = run(scenario())
    assert one_at_a_time == [0, 1, 2], f"{CHANGED}: one at a time, sequences should count up; got {one_at_a_time}"
    assert concurrent == [3] * 5, (
        f"{CHANGED}: 5 concurrent publish() calls on one path got sequences {concurrent} "
        "(they used to all get 3); the publish lock may be unnecessary"
    )
    assert after == 4, (
        f"{CHANGED}: after the burst the counter stood at {after} (it used to be 4: 5 sends counted once)"
    )


# ---------------------------------------------------------------------------------
# 3. serve() listens on every interface whatever config.host says


def test_serve_binds_every_interface_whatever_the_host() -> None:
    port = free_port()
    config = EventServiceConfig(name="canary-bind", host="127.0.0.1", port=port)
    interfaces_up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
    non_loopback = [
        address.address
        for name, addresses in psutil.net_if_addrs().items()
        if name in interfaces_up
        for address in addresses
        if address.family == socket.AF_INET and not address.address.startswith("127.")
    ]

    async def connects(host: str) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    async def scenario() -> tuple[list[str], dict[str, bool]]:
        server = grpc.aio.server()
        service = EventServiceGrpc(server, config)
        serving = asyncio.ensure_future(service.serve())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                # Bounded by run(): ready means serve() has bound and started.
                await channel.channel_ready()
            listening = [
                connection.laddr.ip
                for connection in psutil.Process().net_connections(kind="tcp")
                if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
            ]
            reached = {host: await connects(host) for host in non_loopback[:1]}
        finally:
            await server.stop(None)  # first: cancelling serve() first makes stop() raise
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            for added in list(service.logger.handlers):
                service.logger.removeHandler(added)
        return listening, reached

    listening, reached = run(scenario())
    assert listening, f"{CHANGED}: serve() should listen on port {port}; nothing listens there"
    assert set(listening) <= {"::", "0.0.0.0"}, (
        f"{CHANGED}: with host 127.0.0.1, serve() now listens on {listening} "
        "(it used to listen on the wildcard [::]); binding the entry's host ourselves may be unnecessary"
    )
    # On a machine with a non-loopback address, a client there reaches the service.
    assert all(reached.values()), f"{CHANGED}: serve() listened on {listening} but {reached} could not connect"


# ---------------------------------------------------------------------------------
# 4. Every service log line prints twice


def test_service_log_lines_print_twice() -> None:
    child = run_child(
        """
        import asyncio
        import grpc
        import farm_ng.core.event_client
        from farm_ng.core.event_service import EventServiceGrpc
        from farm_ng.core.event_service_pb2 import EventServiceConfig

        async def main():
            server = grpc.aio.server()
            service = EventServiceGrpc(server, EventServiceConfig(name="canary-log", port=1))
            service.logger.info("canary log line")
            await server.stop(None)

        asyncio.run(main())
        """
    )
    assert child.returncode == 0, f"{CHANGED}: the child failed:\n{child.stderr}"
    lines = [line for line in (child.stdout + child.stderr).splitlines() if "canary log line" in line]
    assert sorted(lines) == ["INFO:canary-log:canary log line", "canary log line"], (
        f"{CHANGED}: one service log line now prints as {lines} (it used to print twice: once by the "
        "root handler of logging.basicConfig, once by the service's own StreamHandler); "
        "our one-root-handler logging setup may be unnecessary"
    )


# ---------------------------------------------------------------------------------
# 5. request_reply() to a server that is down waits without bound


def test_request_reply_to_a_server_that_is_down_waits_without_bound() -> None:
    port = free_port()  # nothing listens there

    async def scenario() -> tuple[str, Any]:
        client = EventClient(EventServiceConfig(name="canary-down", host="127.0.0.1", port=port))
        try:
            outcome = await asyncio.wait_for(client.request_reply("/ping", Int32Value(value=1)), 1.5)
        except asyncio.TimeoutError:
            return "still waiting after 1.5 s", client.channel and client.channel.get_state()
        except Exception as exc:  # any other outcome is the change to report
            return f"raised {exc!r}", None
        finally:
            if client.channel is not None:
                await client.channel.close()
        return f"returned {outcome!r}", None

    outcome, state = run(scenario())
    assert outcome == "still waiting after 1.5 s", (
        f"{CHANGED}: request_reply() to a port with nothing listening {outcome} "
        "(it used to wait without bound); the call timeouts we add may be unnecessary"
    )
    # Not slow to connect: gRPC already knew the peer was down, and it kept waiting.
    assert state == grpc.ChannelConnectivity.TRANSIENT_FAILURE, f"{CHANGED}: the channel was {state} while it waited"


# ---------------------------------------------------------------------------------
# 6. A server built before the event loop runs


SERVER_BUILT_OUTSIDE_THE_LOOP = """
    import asyncio
    import sys
    import grpc
    from farm_ng.core.event_client import EventClient
    from farm_ng.core.event_service import EventServiceGrpc
    from farm_ng.core.event_service_pb2 import EventServiceConfig
    from google.protobuf.wrappers_pb2 import Int32Value

    server = grpc.aio.server()  # before any event loop runs
    port = server.add_insecure_port("127.0.0.1:0")
    service = EventServiceGrpc(server, EventServiceConfig(name="canary-outside", port=port))

    async def answer(request):
        return Int32Value(value=42)

    async def main():
        service.add_request_reply_handler(answer)
        await server.start()
        try:
            client = EventClient(EventServiceConfig(name="canary-outside", host="127.0.0.1", port=port))
            reply = await asyncio.wait_for(client.request_reply("/ping", Int32Value(value=1), decode=True), 5)
            print("CALL-OK", reply.value)
        finally:
            await server.stop(None)

    if sys.argv[1] == "asyncio.run":
        asyncio.run(main())
    else:  # what farm-ng-core's own event_service_recorder `service` command does
        asyncio.get_event_loop().run_until_complete(main())
"""


@pytest.mark.parametrize("runner", ["asyncio.run", "get_event_loop"])
def test_server_built_outside_the_loop_fails(runner: str) -> None:
    if runner == "get_event_loop" and sys.version_info < (3, 12):
        pytest.skip(
            "before Python 3.12, asyncio.get_event_loop() returns the loop grpc.aio.server() bound to, so "
            "farm-ng-core's own pattern works (measured on 3.8, 3.9, 3.10 and 3.11); it breaks from 3.12"
        )
    child = run_child(SERVER_BUILT_OUTSIDE_THE_LOOP, runner)
    assert "CALL-OK" not in child.stdout and child.returncode != 0, (
        f"{CHANGED}: a grpc.aio server built before the loop, run with {runner}, now serves a call "
        f"on Python {sys.version_info[0]}.{sys.version_info[1]}; building it inside the loop may be unnecessary"
    )
    assert "attached to a different loop" in child.stderr, f"{CHANGED}: it failed differently:\n{child.stderr}"


# ---------------------------------------------------------------------------------
# 7. Two-parameter handlers decode requests by the type the sender names


def probe_module(directory: Path) -> str:
    """Writes a throwaway module whose ``probe()`` records that it was called; returns its name."""
    name = f"canary_probe_{uuid.uuid4().hex}"
    (directory / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from google.protobuf.wrappers_pb2 import Int32Value

            CALLS = []

            def probe():
                CALLS.append("probe")
                return Int32Value()
            """
        )
    )
    return name


async def send_raw_request(port: int, query: str, payload: bytes) -> RequestReplyReply | grpc.aio.AioRpcError:
    """Sends one request whose URI query is ``query``, as any gRPC client can; returns the reply or error."""
    request = RequestReplyRequest(
        event=Event(uri=Uri(scheme="protobuf", path="/anything", query=query), payload_length=len(payload)),
        payload=payload,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return await EventServiceStub(channel).requestReply(request)
        except grpc.aio.AioRpcError as exc:
            return exc


def test_two_parameter_handler_imports_and_calls_what_the_sender_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = probe_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    received: list[Any] = []

    async def handler(event: Event, message: Any) -> Int32Value:
        received.append(message)
        return Int32Value(value=1)

    async def scenario() -> RequestReplyReply | grpc.aio.AioRpcError:
        async with live_service("canary-decode", handler) as (_, port):
            return await send_raw_request(port, f"type=x.probe&pb={module}", Int32Value(value=7).SerializeToString())

    try:
        reply = run(scenario())
        imported = sys.modules.get(module)
        calls = list(getattr(imported, "CALLS", []))
    finally:
        sys.modules.pop(module, None)
    assert imported is not None, (
        f"{CHANGED}: a request naming pb={module} no longer makes the server import that module "
        f"(the call ended with {reply!r}); decoding by path with a one-parameter handler may be unnecessary"
    )
    assert calls == ["probe"], f"{CHANGED}: the server imported {module} but called probe() {len(calls)} times"
    assert received == [Int32Value(value=7)], f"{CHANGED}: the handler should get what probe() made, parsed: {received}"
    assert isinstance(reply, RequestReplyReply), f"{CHANGED}: the call should succeed: {reply!r}"


def test_one_parameter_handler_gets_the_raw_request_and_imports_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = probe_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    received: list[Any] = []

    async def handler(request: RequestReplyRequest) -> Int32Value:
        received.append(request)
        return Int32Value(value=Int32Value.FromString(request.payload).value + 1)

    async def scenario() -> RequestReplyReply | grpc.aio.AioRpcError:
        async with live_service("canary-raw", handler) as (_, port):
            return await send_raw_request(port, f"type=x.probe&pb={module}", Int32Value(value=7).SerializeToString())

    try:
        reply = run(scenario())
        imported = module in sys.modules
    finally:
        sys.modules.pop(module, None)
    guard = "farm-ng-core changed: see docs/farm-ng-core-workarounds.md; our one-parameter handlers rely on this"
    assert not imported, f"{guard}: a one-parameter handler's request now imports pb={module}"
    assert len(received) == 1 and isinstance(received[0], RequestReplyRequest), (
        f"{guard}: a one-parameter handler now receives {received}, not the raw RequestReplyRequest"
    )
    assert received[0].event.uri.query == f"type=x.probe&pb={module}", f"{guard}: the request changed on the way"
    assert isinstance(reply, RequestReplyReply), f"{guard}: the call should succeed: {reply!r}"
    assert Int32Value.FromString(reply.payload) == Int32Value(value=8), (
        f"{guard}: the reply is not the handler's: {reply}"
    )
