"""Hostile and broken input: no request can crash, freeze or bloat a service.

Each case is what a program on the network could do with nothing but the wire contract.
The service must refuse it with a status that says why, count it, log it once per
interval (not once per request), and go on serving the next legitimate call.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import psutil
import pytest
from fakes import FloodingStorage, PlainStorage, SlowAgent, serving_in_thread
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service_pb2 import ListUrisReply, RequestReplyReply, SubscribeReply, SubscribeRequest
from farm_ng.core.event_service_pb2_grpc import (
    EventServiceServicer,
    EventServiceStub,
    add_EventServiceServicer_to_server,
)
from farm_ng.core.timestamp_pb2 import Timestamp
from farm_ng.core.uri import get_host_name, make_proto_uri
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value
from helpers import (
    ROOT,
    STARTUP_TIMEOUT_S,
    WAIT_TIMEOUT_S,
    Process,
    Services,
    collect,
    kill_leftovers,
    port_of,
    raw_request,
    request,
    service_config,
    stats,
    write_config,
)

from propagation import wire
from propagation.config import read_config
from propagation.network import check_port_free
from propagation.peers import PeerClient
from propagation.wire import RESIDUAL_TIME

INT32 = "type=google.protobuf.Int32Value&pb=google/protobuf/wrappers.proto"
EMPTY = "type=google.protobuf.Empty&pb=google/protobuf/empty.proto"
# farm-ng-core, asked to decode this, would import os and call os.abort().
ABORT = "type=x.abort&pb=os"


def assert_quiet(process: Process, most: int) -> None:
    """At most ``most`` lines about refusals, and no traceback."""
    assert "Traceback" not in process.output, process.output
    assert process.count("refused") <= most, process.output


@pytest.mark.parametrize(
    ("name", "path", "legitimate"),
    [("agent-3", "/update_residual", Int32Value(value=5)), ("storage", "/update_storage", Empty())],
)
def test_a_request_naming_another_type_is_refused(
    services: Services, tmp_path: Path, name: str, path: str, legitimate: Any
) -> None:
    config = write_config(tmp_path)
    process = services.service(config, name)
    code, details = raw_request(config, name, path, b"", ABORT)
    assert (code, details) == ("INVALID_ARGUMENT", f"{path} carries {legitimate.DESCRIPTOR.full_name}, not x.abort")
    # An Empty's empty payload would decode as Int32Value 0, a pause: the named type counts.
    if name.startswith("agent"):
        assert raw_request(config, name, path, b"", EMPTY)[0] == "INVALID_ARGUMENT"
    request(config, name, path, legitimate)  # still serving
    assert process.popen.poll() is None
    figures = stats(config, name)
    assert figures["refused_requests"] >= 1
    assert_quiet(process, 2)


def test_the_supervisor_serves_no_request(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    services.service(config, "supervisor-1")
    assert raw_request(config, "supervisor-1", "/update_storage", b"", EMPTY) == (
        "UNIMPLEMENTED",
        "no request/reply path '/update_storage' here",
    )


def test_garbage_is_refused_in_one_line_per_interval(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"agent-3": {"log_level": "WARNING"}})
    agent = services.service(config, "agent-3", wait=False)
    stats(config, "agent-3")  # serving
    entry_port = port_of(config, "agent-3")

    async def flood() -> list[str]:
        async with grpc.aio.insecure_channel(f"localhost:{entry_port}") as channel:
            stub = EventServiceStub(channel)
            codes = []
            for query, payload in [(INT32, b"\xff\xff\xff"), ("type=x.y&pb=no/such/module.proto", b"")] * 500:
                event = Event(uri=Uri(scheme="protobuf", path="/update_residual", query=query))
                try:
                    await stub.requestReply(request_of(event, payload), timeout=5.0)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
            return codes

    codes = asyncio.run(flood())
    assert set(codes) == {"INVALID_ARGUMENT"}
    assert stats(config, "agent-3")["refused_requests"] == 1000
    # The first refusal of its kind at once, then a count every 10 s: not 1000 lines.
    assert_quiet(agent, 3)
    assert len(agent.output) < 2000, agent.output


def request_of(event: Event, payload: bytes) -> Any:
    from farm_ng.core.event_service_pb2 import RequestReplyRequest  # noqa: PLC0415

    return RequestReplyRequest(event=event, payload=payload)


def test_a_huge_batch_is_refused_at_once(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=2000000000", "batch_size=1"]}})
    storage = services.service(config, "storage")
    started = time.monotonic()
    for count in (2_000_000_000, 0, -3):
        code, details = raw_request(
            config, "storage", "/update_storage_batch", Int32Value(value=count).SerializeToString(), INT32
        )
        assert (code, details) == ("INVALID_ARGUMENT", f"a batch of {count} is off 1..256"), count
    request(config, "storage", "/update_storage", Empty())
    assert time.monotonic() - started < 10  # bounded work: not two billion log lines
    figures = stats(config, "storage")
    assert (figures["refused_requests"], figures["bad_batches"], figures["accepted"]) == (3, 0, 1)
    assert storage.count(r"^Storage: ") == 1


def rss_mb(process: Process) -> float:
    return psutil.Process(process.popen.pid).memory_info().rss / 2**20


def test_long_and_unknown_subscribe_paths_cost_nothing(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    agent = services.service(config, "agent-3")
    stats(config, "agent-3")
    before = rss_mb(agent)
    port = port_of(config, "agent-3")

    async def subscribe_all() -> set[str]:
        codes = set()
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            stub = EventServiceStub(channel)
            for index in range(150):
                size = 3 * 2**20 if index % 2 else 30_000  # beyond the message limit, or an unknown path
                path = f"/{index}" + "x" * size
                call = stub.subscribe(SubscribeRequest(uri=Uri(path=path), every_n=1), timeout=5.0)
                try:
                    await call.read()
                except grpc.aio.AioRpcError as exc:
                    codes.add(exc.code().name)
        return codes

    assert asyncio.run(subscribe_all()) == {"RESOURCE_EXHAUSTED", "NOT_FOUND"}
    assert rss_mb(agent) - before < 30, (before, rss_mb(agent))
    assert stats(config, "agent-3")["refused_subscriptions"] == 75  # the big ones never reach it
    assert_quiet(agent, 3)


@pytest.mark.xdist_group("cpu")
def test_many_subscribers_are_bounded_and_the_agent_keeps_its_rate(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"agent-3": {"log_level": "WARNING"}})
    agent = services.service(config, "agent-3", wait=False)
    first = stats(config, "agent-3")
    first_read = time.monotonic()
    port = port_of(config, "agent-3")

    async def crowd() -> dict[str, int]:
        outcomes: dict[str, int] = {}
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            stub = EventServiceStub(channel)
            calls = [stub.subscribe(SubscribeRequest(uri=Uri(path="/sample"), every_n=1)) for _ in range(100)]

            async def first_reply(call: Any) -> str:
                try:
                    await asyncio.wait_for(call.read(), 10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return "OK"

            for outcome in await asyncio.gather(*(first_reply(call) for call in calls)):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            # They never read again: their queues fill and farm-ng-core drops for them.
            await asyncio.sleep(5)  # readiness-free: the load itself, 5 s of 32 stalled subscribers
            for call in calls:
                call.cancel()
        return outcomes

    assert asyncio.run(crowd()) == {"OK": 32, "RESOURCE_EXHAUSTED": 68}
    last = stats(config, "agent-3")
    rate = (last["published"] - first["published"]) / (time.monotonic() - first_read)
    assert rate > 0.5 * 100, (first, last)  # agent-3 publishes 100 a second
    assert last["refused_subscriptions"] == 68
    assert agent.count("dropped") <= 2, agent.output  # farm-ng-core's warning per event, tallied


class HostileAgent(EventServiceServicer):
    """An 'agent' whose samples alternate: a type farm-ng-core would import and call, and a
    ``Struct`` whose "sample" is text."""

    async def subscribe(self, request: SubscribeRequest, context: Any) -> AsyncIterator[SubscribeReply]:
        malformed = Struct()
        malformed.update({"sample": "high", "task_id": 0})
        for sequence in itertools.count():
            if sequence % 2:
                uri = Uri(scheme="protobuf", path="/sample", query=f"{ABORT}&service_name=agent-3")
                yield SubscribeReply(event=Event(uri=uri, sequence=sequence), payload=b"")
            else:
                uri = make_proto_uri("/sample", malformed, service_name="agent-3")
                yield SubscribeReply(event=Event(uri=uri, sequence=sequence), payload=malformed.SerializeToString())
            await asyncio.sleep(0.01)  # readiness-free: the fake agent publishes at 100 Hz

    async def requestReply(self, request: Any, context: Any) -> RequestReplyReply:
        return RequestReplyReply()

    async def listUris(self, request: Any, context: Any) -> ListUrisReply:
        return ListUrisReply()


def test_the_supervisor_refuses_what_a_hostile_agent_publishes(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    services.service(config, "storage")
    port = port_of(config, "agent-3")

    async def scenario() -> dict[str, Any]:
        server = grpc.aio.server()
        add_EventServiceServicer_to_server(HostileAgent(), server)
        server.add_insecure_port(f"localhost:{port}")
        await server.start()
        try:
            supervisor = services.service(config, "supervisor-2")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, supervisor.wait_for, r"refused \d+ events of /sample", WAIT_TIMEOUT_S)
            return await loop.run_in_executor(None, stats, config, "supervisor-2")
        finally:
            await server.stop(0)

    figures = asyncio.run(scenario())
    assert figures["refused_from_peers"] > 10
    assert figures["malformed"] > 10
    assert figures["received"] == figures["malformed"]


def test_a_residual_from_the_future_is_refused(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    agent = services.service(config, "agent-3")
    future = Timestamp(stamp=time.monotonic() + 1e6, clock_name=f"{get_host_name()}/monotonic", semantics=RESIDUAL_TIME)
    request(config, "agent-3", "/update_residual", Int32Value(value=0), timestamps=[future])
    figures = stats(config, "agent-3")
    assert (figures["future_residuals"], figures["paused"]) == (1, False)
    assert agent.count("^Remainder: 0$") == 0


# ---------------------------------------------------------------------------------
# Signals and the terminal


def test_ctrl_c_while_importing_and_three_times_in_a_row(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    argv = [sys.executable, "-X", "importtime", str(ROOT / "agent.py"), "--service-config", str(config)]
    early = Process("agent-3 importing", [*argv, "--service-name", "agent-3"])
    services.started.append(early)
    # -X importtime prints a line as each module is loaded: gRPC's core means gRPC is loading.
    early.wait_for(r"^import time:.*\| +grpc\._cython\.cygrpc$", timeout=30)
    early.signal(signal.SIGINT)
    assert early.wait_exit(WAIT_TIMEOUT_S) == 0, early.output
    assert not [line for line in early.lines if not line.startswith("import time:")], early.output

    late = services.service(config, "agent-3")
    for _ in range(3):
        late.signal(signal.SIGINT)
    assert late.wait_exit(WAIT_TIMEOUT_S) == 0, late.output
    assert "Traceback" not in late.output
    assert "KeyboardInterrupt" not in late.output


def test_sighup_stops_gracefully(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    storage = services.service(config, "storage")
    storage.signal(signal.SIGHUP)
    assert storage.wait_exit(WAIT_TIMEOUT_S) == 0, storage.output
    assert "Traceback" not in storage.output


def test_closed_stdout_and_broken_pipe_stop_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="false")

    def agent(name: str) -> list[str]:
        return [sys.executable, str(ROOT / "agent.py"), "--service-config", str(config), "--service-name", name]

    closed = subprocess.Popen(
        ["/bin/sh", "-c", 'exec "$@" >&-', "sh", *agent("agent-3")], stderr=subprocess.PIPE, text=True, env=env
    )
    broken = subprocess.Popen(agent("agent-2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert broken.stdout is not None
        broken.stdout.readline()
        broken.stdout.close()  # the reader goes away: every later line meets a broken pipe
        for name in ("agent-3", "agent-2"):
            first = stats(config, name)["published"]
            assert stats(config, name)["published"] > first  # serving and publishing
        for process in (closed, broken):
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
            assert process.stderr is not None
            assert process.stderr.read() == ""
    finally:
        for process in (closed, broken):
            if process.poll() is None:
                process.kill()
                process.wait(5)


# What a pipe holds on Linux.
PIPE_BYTES = 65536


@pytest.mark.slow
def test_a_stalled_terminal_stops_nothing(tmp_path: Path) -> None:
    # `python -m tools.launch | less`, then nobody reads for 30 s: writes to a full pipe
    # must not block any service's event loop, nor the launcher's.
    config = write_config(tmp_path)
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="false")
    argv = [sys.executable, "-m", "tools.launch", "--service-config", str(config)]
    launcher = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = b""
    try:
        deadline = time.monotonic() + 60
        # All six serve (the launcher starts them one by one) and propagate.
        while stats(config, "agent-3", timeout=max(1.0, deadline - time.monotonic()))["residuals"] == 0:
            assert time.monotonic() < deadline, "no propagation within 60 s"
        stalled_since = time.monotonic()
        time.sleep(20)  # readiness-free: the stall itself; the pipe fills within seconds
        before = {name: stats(config, name) for name in ("storage", "agent-1", "agent-3")}
        time.sleep(max(0.0, 30 - (time.monotonic() - stalled_since)))  # readiness-free: the stall itself
        after = {name: stats(config, name) for name in ("storage", "agent-1", "agent-3")}
        assert after["storage"]["accepted"] > before["storage"]["accepted"] + 50, (before, after)
        for name in ("agent-1", "agent-3"):
            assert after[name]["residuals"] > before[name]["residuals"], (name, before, after)
        # Read again, the output flows on: more than the pipe held, so the writer too
        # outlived the stall. (Whether lines were dropped depends on how much the services
        # said meanwhile; the counting is tests/test_logic.py's.)
        assert launcher.stdout is not None
        os.set_blocking(launcher.stdout.fileno(), False)
        reading_since = time.monotonic()
        while len(output) <= 2 * PIPE_BYTES:
            chunk = launcher.stdout.read(PIPE_BYTES)
            output += chunk or b""
            assert time.monotonic() < reading_since + WAIT_TIMEOUT_S, output[-2000:]
            if not chunk:
                time.sleep(0.05)  # readiness-free: polls a non-blocking pipe, bounded
    finally:
        launcher.send_signal(signal.SIGINT)
        try:
            os.set_blocking(launcher.stdout.fileno(), True)  # type: ignore[union-attr]
            output += launcher.communicate(timeout=WAIT_TIMEOUT_S)[0]
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait(5)
            killed = kill_leftovers(tmp_path)  # the services of a launcher that had to be killed
    # Its own last lines may stay behind the stall's backlog (its writer gets 0.4 s at exit):
    # its exit code says whether every service exited 0, and their ports that they are gone.
    assert launcher.returncode == 0, output[-3000:]
    assert killed == [], killed
    for entry in read_config(str(config)):
        check_port_free(entry.host, entry.port)  # the check a service makes before it serves


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="a host name of its own needs root and unshare"
)
def test_a_paused_agent_stuck_by_a_forged_residual_wakes_up(services: Services, tmp_path: Path) -> None:
    # Storage on another host: the agent cannot tell a stamp from storage's future. A forged 0
    # stamped far ahead would make it ignore every later residual; paused for a while, it takes
    # the next wake-up after a drain whatever it was told before.
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=200", "batch_size=20"]}})
    running = services.system(config, ["storage", "supervisor-1", "supervisor-2", "agent-1", "agent-2"])
    argv = [sys.executable, str(ROOT / "agent.py"), "--service-config", str(config), "--service-name", "agent-3"]
    agent = Process("agent-3", ["unshare", "--uts", "sh", "-c", 'hostname agent-host && exec "$@"', "sh", *argv])
    services.started.append(agent)
    agent.wait_for(r"^Remainder: \d+$", timeout=15)
    ((event, _),) = collect(config, "storage", "/residual", 1)
    storage_clock = wire.find_stamp(event, RESIDUAL_TIME).clock_name  # what anyone can read off /residual
    forged = Timestamp(stamp=1e12, clock_name=storage_clock, semantics=RESIDUAL_TIME)
    start = len(agent.lines)
    request(config, "agent-3", "/update_residual", Int32Value(value=0), timestamps=[forged])
    agent.wait_for(r"^Remainder: 0$", start=start)
    agent.wait_for(r"^Remainder: [1-9]\d*$", timeout=15, start=start)
    agent.wait_for(r"^Published sample", timeout=5, start=len(agent.lines))
    assert running["supervisor-2"].popen.poll() is None


# ---------------------------------------------------------------------------------
# Forged, slow and out-of-range peers


@pytest.mark.parametrize("answer_after", [0.95, None], ids=["late", "never"])
def test_a_slow_agent_costs_its_sibling_nothing(services: Services, tmp_path: Path, answer_after: float | None) -> None:
    # agent-2 answers /update_residual late or never, and publishes 100 samples a second
    # above confidence: each residual for it holds one call to it, never a relay.
    config = write_config(tmp_path, {"agent-1": {"args": ["rate=50", "num_tasks=1"]}})
    services.service(config, "storage")
    agent = services.service(config, "agent-1")
    with serving_in_thread(lambda: SlowAgent(config, "agent-2", answer_after), rate=100):
        supervisor = services.service(config, "supervisor-1")
        supervisor.wait_for(r"^agent-2 is up at ")
        first, first_read = stats(config, "agent-1"), time.monotonic()
        time.sleep(5)  # readiness-free: the window measured
        last, relayed = stats(config, "agent-1"), stats(config, "supervisor-1")
    heard = (last["residuals"] - first["residuals"]) / (time.monotonic() - first_read)
    sent = (last["published"] - first["published"]) / (time.monotonic() - first_read)
    # About three quarters of agent-1's 50 samples a second are above confidence 0.25.
    assert heard > 0.5 * 0.75 * sent, (first, last, relayed)
    assert relayed["superseded"] > 0  # agent-2's residuals waited and were replaced, not queued
    p99 = last.get("latency_p99_ms")
    print(f"agent-1 beside a slow agent-2: {heard:.0f} residuals/s for {sent:.0f} samples/s, latency p99 {p99} ms")
    assert "Traceback" not in agent.output + supervisor.output


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="a host name of its own needs root and unshare"
)
def test_a_forged_residual_from_storages_future_is_outlived(services: Services, tmp_path: Path) -> None:
    # The agent on another host cannot tell a stamp from storage's future. A forged 10^9
    # stamped far ahead: real residuals are stale for 2 s at most, then it pauses again when
    # storage is full, as before.
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=20", "batch_size=20", "drain_period=1"]}})
    services.system(config, ["storage", "supervisor-2"])
    argv = [sys.executable, str(ROOT / "agent.py"), "--service-config", str(config), "--service-name", "agent-3"]
    agent = Process("agent-3", ["unshare", "--uts", "sh", "-c", 'hostname agent-host && exec "$@"', "sh", *argv])
    services.started.append(agent)
    agent.wait_for(r"^Remainder: 0$", timeout=STARTUP_TIMEOUT_S)
    ((event, _),) = collect(config, "storage", "/residual", 1)
    storage_clock = wire.find_stamp(event, RESIDUAL_TIME).clock_name  # what anyone can read off /residual
    forged = Timestamp(stamp=1e12, clock_name=storage_clock, semantics=RESIDUAL_TIME)
    start = len(agent.lines)
    request(config, "agent-3", "/update_residual", Int32Value(value=10**9), timestamps=[forged])
    agent.wait_for(r"^Remainder: 1000000000$", start=start)
    paused = agent.wait_for(r"^Remainder: 0$", start=start + 1)
    figures = stats(config, "agent-3")
    assert figures["stale_residuals"] > 0, figures
    assert paused is not None


def test_a_negative_residual_from_storage_is_no_room(services: Services, tmp_path: Path) -> None:
    # farm-ng's original storage counts on past its maximum: -5 means no room, not "-5".
    config = write_config(tmp_path, {"supervisor-2": {"args": ["confidence=0", "max_batch=1"]}})
    agent = services.service(config, "agent-3")

    async def scenario() -> dict[str, Any]:
        async with PlainStorage(config, "storage", max_storage=-4):
            supervisor = services.service(config, "supervisor-2")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, agent.wait_for, r"^Remainder: 0$", WAIT_TIMEOUT_S)
            await loop.run_in_executor(None, supervisor.wait_for, r"^Residual: value: 0$", WAIT_TIMEOUT_S)
            return await loop.run_in_executor(None, stats, config, "supervisor-2")

    figures = asyncio.run(scenario())
    assert figures["negative_residuals"] > 0, figures
    assert agent.count(r"^Remainder: -") == 0, agent.output


def test_a_flood_of_residuals_is_not_a_flood_of_pauses(services: Services, tmp_path: Path) -> None:
    # Anyone can send /update_residual: alternating 0 and 2^31-1 as fast as it goes, the
    # agent pauses and resumes each time (counted), but publishes /pauses at most 20 times a
    # second, and keeps serving.
    config = write_config(tmp_path, {"agent-3": {"log_level": "WARNING"}})
    services.service(config, "agent-3", wait=False)
    stats(config, "agent-3")  # serving

    async def flood() -> tuple[int, float]:
        client = PeerClient(service_config(config, "agent-3"), "test", timeout=5.0)
        request = SubscribeRequest(uri=Uri(path="/pauses", query="service_name=agent-3"), every_n=1)
        heard = 0

        async def listen() -> None:
            nonlocal heard
            async for _ in client.subscribe(request, decode=True):
                heard += 1

        listening = asyncio.ensure_future(listen())
        started = time.monotonic()
        try:
            for value in itertools.islice(itertools.cycle([0, 2**31 - 1]), 2000):
                await client.request_reply("/update_residual", Int32Value(value=value))
        finally:
            seconds = time.monotonic() - started
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            await client.close()
        return heard, seconds

    heard, seconds = asyncio.run(flood())
    figures = stats(config, "agent-3")
    assert figures["pauses"] == 1000 and figures["resumes"] == 1000, figures
    assert heard <= 20 * seconds + 3, (heard, seconds)  # coalesced, plus the latched one and the periodic


def test_a_storage_flooding_its_residual_is_skipped_and_said_once(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"supervisor-2": {"args": ["confidence=0"]}})
    services.service(config, "agent-3")
    with serving_in_thread(lambda: FloodingStorage(config, "storage", max_storage=10**6), rate=2000):
        supervisor = services.service(config, "supervisor-2")
        supervisor.wait_for(r"skipped \d+ /residual events")
        process = psutil.Process(supervisor.popen.pid)
        before, started = sum(process.cpu_times()[:2]), time.monotonic()
        figures = stats(config, "supervisor-2")
        time.sleep(3)  # readiness-free: the window measured
        later = stats(config, "supervisor-2")
        cpu = (sum(process.cpu_times()[:2]) - before) / (time.monotonic() - started)
    assert later["residuals_skipped"] > figures["residuals_skipped"] > 0
    assert later["stored"] > figures["stored"]  # it still relays
    assert supervisor.count(r"skipped \d+ /residual events") <= 2, supervisor.output
    print(f"supervisor beside a storage flooding /residual: {cpu:.0%} CPU")
