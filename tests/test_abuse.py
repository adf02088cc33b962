"""A stranger on the network: HTTP/2 abuse, compressed bombs, crowds of unread subscribers.

Each case is what a program that can reach a port could do with hand-made HTTP/2 frames
(``raw_http2``) or gRPC's own client, never with a farm-ng-core client in between. The
service must bound what it costs (memory, time without answering) and go on serving its
peers: the other agents' residuals keep coming.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service_pb2 import ListUrisRequest, RequestReplyRequest, SubscribeRequest
from farm_ng.core.event_service_pb2_grpc import EventServiceStub
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import Int32Value
from helpers import ROOT, STARTUP_TIMEOUT_S, WAIT_TIMEOUT_S, Process, Services, port_of, requests, stats, write_config
from raw_http2 import REQUEST_REPLY, SUBSCRIBE, RawConnection, grpc_message

from propagation.guard import STRANGER_SUBSCRIBERS, STRANGER_SUBSCRIBERS_EACH
from propagation.network import address_of_peer

INT32 = "type=google.protobuf.Int32Value&pb=google/protobuf/wrappers.proto"
# Longer than a loaded machine keeps a service from answering; far shorter than an
# agent flooded by rapid reset took to answer again before streams were capped (23 s).
STALL_BOUND_S = 10.0


class Watch:
    """Samples a service's memory and asks it for its URIs every 0.1 s, in a thread of its own."""

    def __init__(self, process: Process, port: int) -> None:
        self._process = psutil.Process(process.popen.pid)
        self._port = port
        self.start_mb = self.peak_mb = self._rss_mb()
        self.longest_silence_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(f"localhost:{self._port}") as channel:
            stub = EventServiceStub(channel)
            answered = time.monotonic()
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, self._rss_mb())
                try:
                    await stub.listUris(ListUrisRequest(), timeout=1.0)
                    answered = time.monotonic()
                except grpc.aio.AioRpcError:
                    self.longest_silence_s = max(self.longest_silence_s, time.monotonic() - answered)
                await asyncio.sleep(0.1)  # the sampling period: RSS and silence have no event to await

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_TIMEOUT_S)

    def __str__(self) -> str:
        return f"RSS {self.start_mb:.0f} MB, peak {self.peak_mb:.0f} MB; longest silence {self.longest_silence_s:.1f} s"


def can_connect_from(source: str) -> bool:
    """Whether this machine lets a socket bind ``source`` (127.0.0.0/8 on Linux)."""
    with socket.socket() as probe:
        try:
            probe.bind((source, 0))
        except OSError:
            return False
    return True


needs_other_loopback = pytest.mark.skipif(
    not can_connect_from("127.0.0.2"), reason="needs loopback addresses besides 127.0.0.1 (Linux has 127.0.0.0/8)"
)


def residual_request(value: int) -> bytes:
    """A valid ``/update_residual`` request, as the payload of a gRPC message."""
    event = Event(uri=Uri(scheme="protobuf", path="/update_residual", query=INT32))
    return RequestReplyRequest(event=event, payload=Int32Value(value=value).SerializeToString()).SerializeToString()


@pytest.mark.xdist_group("cpu")
def test_rapid_reset_is_bounded_and_the_other_agents_go_on(services: Services, tmp_path: Path) -> None:
    # HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset at once, as fast as one
    # connection takes them. Without a cap on streams an agent grew to 1.8 GB and did not
    # answer for 23 s; agent-2's residuals fell from 38 to 5 a second.
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=1000000", "batch_size=10"]}})
    running = services.system(config, ["storage", "supervisor-1", "agent-1", "agent-2"])
    running["agent-2"].wait_for(r"^Remainder: \d+$")
    watch = Watch(running["agent-1"], port_of(config, "agent-1"))
    before = stats(config, "agent-2")
    attacker = RawConnection(port_of(config, "agent-1"))
    streams = 0
    try:
        message = grpc_message(residual_request(400))
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            attacker.send(b"".join(attacker.call_frames(REQUEST_REPLY, message, reset=True) for _ in range(100)))
            streams += 100
    finally:
        attacker.close()
        watch.stop()
    after = stats(config, "agent-2")
    print(f"{streams} streams opened and reset; agent-1: {watch}")
    assert watch.peak_mb - watch.start_mb < 200, str(watch)
    assert watch.longest_silence_s < STALL_BOUND_S, str(watch)
    assert after["residuals"] > before["residuals"], (before, after)
    stats(config, "agent-1")  # serving still


def test_many_calls_at_once_on_one_connection_all_succeed(services: Services, tmp_path: Path) -> None:
    # Streams are capped per connection, well above what a peer of the config opens: a
    # supervisor carries up to 64 relays at once, with its wake-ups and a subscription.
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=1000000", "batch_size=1000000"]}})
    services.service(config, "storage")
    replies = requests(config, "storage", "/update_storage", [Empty()] * 200)
    assert sorted(reply.value for reply in replies) == list(range(1_000_000 - 200, 1_000_000))


def test_a_supervisor_at_its_widest_relays(services: Services, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "storage": {"args": ["max_storage=1000000", "batch_size=10"]},
            "supervisor-2": {"args": ["confidence=0", "max_in_flight=64", "max_batch=1"]},
            "agent-3": {"args": ["rate=500", "num_tasks=2"]},
        },
    )
    running = services.system(config, ["storage", "supervisor-2", "agent-3"])
    running["agent-3"].wait_for(r"^Remainder: \d+$")
    first = stats(config, "supervisor-2")
    last = stats(config, "supervisor-2", fresh=4)
    assert last["stored"] > first["stored"], (first, last)
    assert last["not_stored"] == first["not_stored"], (first, last)


def test_compressed_bombs_are_refused_before_they_are_inflated(services: Services, tmp_path: Path) -> None:
    # 50 MB of zeros is 50 KB of gzip. gRPC checks the message limit after inflating: 32 of
    # them took an agent's memory up by 50 MB and seconds of CPU before each was refused.
    config = write_config(tmp_path)
    agent = services.service(config, "agent-3")
    port = port_of(config, "agent-3")
    bomb = gzip.compress(RequestReplyRequest(payload=bytes(50_000_000)).SerializeToString())
    process = psutil.Process(agent.popen.pid)
    cpu_before = sum(process.cpu_times()[:2])
    rss_before = process.memory_info().rss / 2**20
    attacker = RawConnection(port)
    try:
        for _ in range(32):  # within HTTP/2 flow control: bombs, not a protocol error
            attacker.call(REQUEST_REPLY, grpc_message(bomb, compressed=True), encoding="gzip")
        assert attacker.wait_for(lambda: len(attacker.refused()) == 32, WAIT_TIMEOUT_S), attacker.first_headers
    finally:
        attacker.close()
    cpu_used = sum(process.cpu_times()[:2]) - cpu_before
    growth = process.memory_info().rss / 2**20 - rss_before
    print(f"32 bombs: agent-3 used {cpu_used:.2f} s of CPU, RSS grew {growth:.0f} MB")
    assert cpu_used < 1.0
    assert growth < 20

    async def one_bomb_through_grpc() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            stub = EventServiceStub(channel)
            try:
                await stub.requestReply(
                    RequestReplyRequest(payload=bytes(1_000_000)), compression=grpc.Compression.Gzip
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details() or ""
        return "OK", ""

    code, details = asyncio.run(one_bomb_through_grpc())
    assert code == "UNIMPLEMENTED" and "gzip" in details, (code, details)
    stats(config, "agent-3")  # serving still


def test_a_connection_that_never_speaks_http2_is_closed(services: Services, tmp_path: Path) -> None:
    # Each such connection holds a file descriptor: gRPC's default let it for minutes.
    config = write_config(tmp_path)
    services.service(config, "agent-3")
    with socket.create_connection(("127.0.0.1", port_of(config, "agent-3")), timeout=WAIT_TIMEOUT_S) as idle:
        started = time.monotonic()
        while idle.recv(1024):  # the server's SETTINGS, then the close (a timeout would raise)
            pass
        print(f"closed after {time.monotonic() - started:.1f} s")


def test_unknown_methods_are_refused_and_counted(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    agent = services.service(config, "agent-3")
    port = port_of(config, "agent-3")

    async def call(method: str) -> str:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            try:
                await channel.unary_unary(method)(b"", timeout=WAIT_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
        return "OK"

    methods = ["/farm_ng.core.proto.EventService/publish", "/grpc.health.v1.Health/Check"] * 50
    assert {asyncio.run(call(method)) for method in methods[:2]} == {"UNIMPLEMENTED"}

    async def flood() -> None:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            for method in methods[2:]:
                with pytest.raises(grpc.aio.AioRpcError):
                    await channel.unary_unary(method)(b"", timeout=WAIT_TIMEOUT_S)

    asyncio.run(flood())
    assert stats(config, "agent-3")["refused_requests"] == 100
    assert agent.count("methods this service does not have") <= 2, agent.output


# ---------------------------------------------------------------------------------
# Subscribers


def subscribe_request(path: str, name: str) -> bytes:
    return grpc_message(
        SubscribeRequest(uri=Uri(path=path, query=f"service_name={name}"), every_n=1).SerializeToString()
    )


@needs_other_loopback
@pytest.mark.xdist_group("cpu")
def test_strangers_unread_streams_lock_no_service_out(services: Services, tmp_path: Path) -> None:
    # Before: a stranger holding 32 unread /health streams shut out a supervisor that
    # restarted, for as long as it held them. Here strangers on six addresses each ask for
    # ten streams of agent-3's /sample (100 a second), never read a byte (a window of 0),
    # and answer every ping; then supervisor-2 starts.
    config = write_config(tmp_path)
    running = services.system(config, ["storage", "agent-3"])
    port = port_of(config, "agent-3")
    watch = Watch(running["agent-3"], port)
    strangers = [RawConnection(port, source=f"127.0.0.{host}", window=0) for host in range(2, 8)]
    try:
        for stranger in strangers:
            for _ in range(10):
                stranger.call(SUBSCRIBE, subscribe_request("/sample", "agent-3"))
        for stranger in strangers:
            assert stranger.wait_for(lambda s=stranger: len(s.first_headers) == 10, WAIT_TIMEOUT_S)
        held = [len(stranger.open_streams()) for stranger in strangers]
        assert sum(held) == STRANGER_SUBSCRIBERS, held
        assert max(held) == STRANGER_SUBSCRIBERS_EACH, held
        supervisor = services.service(config, "supervisor-2")
        supervisor.wait_for(r"^Residual: value: \d+$", STARTUP_TIMEOUT_S)
        start = len(running["agent-3"].lines)
        time.sleep(10)  # readiness-free: the strangers hold their streams, unread, meanwhile
        running["agent-3"].wait_for(r"^Remainder: \d+$", start=start, count=20)
        figures = stats(config, "agent-3")
    finally:
        for stranger in strangers:
            stranger.close()
        watch.stop()
    print(f"held by strangers: {held}; agent-3: {watch}")
    assert figures["refused_subscriptions"] == 60 - STRANGER_SUBSCRIBERS
    assert watch.peak_mb - watch.start_mb < 30, str(watch)
    assert watch.longest_silence_s < STALL_BOUND_S, str(watch)


def test_peer_addresses_as_grpc_names_them() -> None:
    assert address_of_peer("ipv4:10.0.0.2:5000") == "10.0.0.2"
    assert address_of_peer("ipv6:%5B::1%5D:5000") == "::1"
    assert address_of_peer("ipv6:[::ffff:10.0.0.2]:5000") == "10.0.0.2"
    assert address_of_peer("unix:/tmp/socket") == "unix:/tmp/socket"


# ---------------------------------------------------------------------------------
# gRPC's own lines


def test_grpc_core_lines_go_through_the_tally(services: Services, tmp_path: Path) -> None:
    # Out of file descriptors, gRPC's core writes "File descriptor limit reached. Retrying."
    # to stderr once a second, past Python's logging.
    config = write_config(tmp_path)
    agent = services.service(config, "agent-3", shell='ulimit -n 64 && exec "$@"')
    crowd: list[socket.socket] = []
    try:
        while len(crowd) < 100:  # more than the agent may have open
            crowd.append(socket.create_connection(("127.0.0.1", port_of(config, "agent-3")), timeout=5))
        agent.wait_for(r"^WARNING: gRPC core, 1 time\(s\): File descriptor limit reached")
        summary = agent.wait_for(
            r"^WARNING: gRPC core, (\d+) time\(s\): File descriptor limit reached\. Retrying\. \(in the last 10 s\)$"
        )
    finally:
        for connection in crowd:
            connection.close()
    assert int(summary.group(1)) >= 5  # about one a second
    assert agent.count("File descriptor limit") == 2, agent.output
    assert not [line for line in agent.lines if re.match(r"^E\d{4} ", line)], agent.output
    first = stats(config, "agent-3")["published"]
    assert stats(config, "agent-3", fresh=3)["published"] > first  # serving and publishing again


def test_python_stderr_still_reaches_the_terminal() -> None:
    # Tracebacks and warnings (sys.stderr) do not go through the reader thread: they
    # must not wait for it, nor be lost when the process ends at once.
    code = (
        "import asyncio, sys, os\n"
        "from propagation.logs import read_back_core_log\n"
        "async def main():\n"
        "    undo = read_back_core_log(asyncio.get_running_loop())\n"
        "    print('from python', file=sys.stderr, flush=True)\n"
        "    os.write(2, b'not a core line\\n')\n"
        "    undo()\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["from python", "not a core line"], result.stderr


def test_a_service_started_without_stderr_serves(services: Services, tmp_path: Path) -> None:
    # File descriptor 2 closed at start: the next file opened takes it (gRPC's own, say);
    # reading "stderr" back must leave that one alone.
    config = write_config(tmp_path)
    agent = services.service(config, "agent-3", shell='exec "$@" 2>&-')
    first = stats(config, "agent-3")["published"]
    assert stats(config, "agent-3", fresh=3)["published"] > first
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(WAIT_TIMEOUT_S) == 0, agent.output
