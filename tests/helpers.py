"""Real services on free localhost ports, and the calls tests make to them.

The fixtures that stop what a test started are in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

# This process talks gRPC and forks the services: gRPC's fork handlers, with its
# threads busy, can abort a process ("Check failed" in thd.h). The children exec at
# once and need none. Read by gRPC when it is first imported, hence before it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import psutil
import pytest
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service_pb2 import EventServiceConfig, RequestReplyRequest, SubscribeRequest
from farm_ng.core.event_service_pb2_grpc import EventServiceStub
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.message import Message

from propagation.config import find_entry, read_config
from propagation.peers import PeerClient

ROOT = Path(__file__).resolve().parent.parent

# Bounds that only a hang reaches, sized for a loaded 2-core machine: at load 8 a
# service once took over 15 s to print that it serves (0.6 s on a quiet one). A passing
# test never waits them out.
STARTUP_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 30.0


def ports_of_this_worker() -> range:
    """This test worker's share of the ports the OS never hands out by itself.

    A port from ``bind(0)`` lies in the ephemeral range, where every outgoing connection
    on the machine takes its local port too, and where another worker may be offered
    the same port before our service binds it. Below that range, each worker has a
    share of its own, and only the services we start bind there.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: IANA's dynamic range, as macOS uses
        low, high = 49152, 65535
    unpicked = range(20000, low) if low - 20000 >= 4000 else range(high + 1, 65536)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[len("gw") :])
    share = len(unpicked) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return unpicked[worker * share : (worker + 1) * share]


def free_ports(count: int, taken: Iterable[int] = ()) -> list[int]:
    """``count`` different ports of this worker that nothing listens on at this moment.

    ``taken`` names ports handed out already whose services may not have bound yet.
    The probes stay bound until all are chosen, so no port is given twice.
    """
    share = ports_of_this_worker()
    taken = set(taken)
    start = random.randrange(len(share))
    chosen: list[socket.socket] = []
    try:
        for port in (share[(start + step) % len(share)] for step in range(len(share))):
            if len(chosen) == count:
                break
            if port in taken:
                continue
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                probe.close()
                continue
            chosen.append(probe)
        if len(chosen) < count:
            pytest.fail(f"only {len(chosen)} of {count} ports free in {share}")
        return [probe.getsockname()[1] for probe in chosen]
    finally:
        for probe in chosen:
            probe.close()


def write_config(directory: Path, changes: dict[str, dict[str, Any]] | None = None, name: str = "config.json") -> Path:
    """A copy of service_config.json with free ports and ``changes`` per entry.

    ``changes`` maps a service name to fields to replace (``{"storage": {"args":
    [...]}}``); a value of None removes the entry.
    """
    configs = json.loads((ROOT / "service_config.json").read_text())["configs"]
    changes = changes or {}
    ports = free_ports(len(configs) + len(changes))
    result = []
    for original in configs:
        entry = dict(original, port=ports.pop())
        if entry["name"] in changes:
            if changes[entry["name"]] is None:
                continue
            entry.update(changes[entry["name"]])
        result.append(entry)
    for name_, extra in changes.items():
        if extra is not None and name_ not in {entry["name"] for entry in configs}:
            result.append(dict({"name": name_, "host": "localhost", "port": ports.pop()}, **extra))
    path = directory / name
    path.write_text(json.dumps({"configs": result}, indent=2))
    return path


def port_of(config: Path, name: str) -> int:
    """The port of one entry of a config file."""
    return next(entry["port"] for entry in json.loads(config.read_text())["configs"] if entry["name"] == name)


class Process:
    """A process whose merged output is collected line by line as it comes."""

    def __init__(self, label: str, argv: list[str], cwd: Path = ROOT) -> None:
        self.label = label
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived (time.monotonic())
        self._changed = threading.Condition()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything it printed so far."""
        with self._changed:
            return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        """How many lines so far match ``pattern``."""
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))

    def moments(self, pattern: str, since: float = 0.0) -> list[float]:
        """When the lines matching ``pattern`` arrived (``time.monotonic()``), from ``since`` on."""
        regex = re.compile(pattern)
        with self._changed:
            return [when for line, when in zip(self.lines, self.times) if when >= since and regex.search(line)]

    def matches(self, pattern: str, start: int = 0) -> list[re.Match[str]]:
        """The matches of ``pattern`` in lines from index ``start`` on."""
        regex = re.compile(pattern)
        with self._changed:
            return [m for m in (regex.search(line) for line in self.lines[start:]) if m]

    def wait_for(self, pattern: str, timeout: float = WAIT_TIMEOUT_S, start: int = 0, count: int = 1) -> re.Match[str]:
        """Waits until ``count`` lines from index ``start`` on match; returns the last.

        Fails at once, with the output, if the process exits first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in (regex.search(line) for line in self.lines[start:]) if m]
                if len(found) >= count:
                    return found[count - 1]
                if self.popen.poll() is not None and not self._reader.is_alive():
                    pytest.fail(
                        f"{self.label} exited ({self.popen.returncode}) before printing {pattern!r}:\n{self.output}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"{self.label} did not print {pattern!r} within {timeout} s:\n{self.output}")
                self._changed.wait(min(remaining, 0.2))

    def signal(self, signum: int) -> None:
        """Sends a signal if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        """Waits for it to exit; returns its exit code. Fails with the output if it does not."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.label} still running {timeout} s later:\n{self.output}")
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                # Longer than the launcher takes to stop its services (launch.STOP_TIMEOUT_S).
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)


class Services:
    """Starts scripts of this repo as processes; the fixture stops them all."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def run(self, script: str, *args: str, label: str | None = None) -> Process:
        """Starts ``python script args...`` in the repo."""
        process = Process(label or script, [sys.executable, str(ROOT / script), *args])
        self.started.append(process)
        return process

    def tool(self, name: str, *args: str, label: str | None = None) -> Process:
        """Starts ``python -m tools.<name> args...`` in the repo's top folder."""
        process = Process(label or name, [sys.executable, "-m", f"tools.{name}", *args])
        self.started.append(process)
        return process

    def service(self, config: Path, name: str, wait: bool = True) -> Process:
        """Starts the service ``name`` of ``config`` and waits until it serves."""
        script = "storage.py" if name.startswith("storage") else f"{name.split('-', maxsplit=1)[0]}.py"
        process = self.run(script, "--service-config", str(config), "--service-name", name, label=name)
        if wait:
            process.wait_for(rf"^{re.escape(name)} serving on ", STARTUP_TIMEOUT_S)
        return process

    def system(self, config: Path, order: list[str] | None = None) -> dict[str, Process]:
        """Starts every service of ``config`` (README order unless given)."""
        names = order or ["storage", "supervisor-1", "supervisor-2", "agent-1", "agent-2", "agent-3"]
        return {name: self.service(config, name) for name in names}

    def stop_all(self) -> None:
        """Stops every process started: all asked at once, then each waited for."""
        for process in reversed(self.started):
            process.signal(signal.SIGTERM)
        for process in reversed(self.started):
            process.stop()


def processes_naming(directory: Path) -> list[psutil.Process]:
    """The processes whose command line names ``directory`` (a config of a test's, say)."""
    return [
        process
        for process in psutil.process_iter(["pid", "cmdline"])
        if any(str(directory) in part for part in process.info["cmdline"] or [])
    ]


def kill_leftovers(directory: Path) -> list[str]:
    """Kills every process whose command line names ``directory``; returns what it killed.

    The launcher and the benchmark start services in sessions of their own: if a tool
    has to be killed, its services live on, with their config in the test's directory.
    """
    killed = []
    for process in processes_naming(directory):
        with contextlib.suppress(psutil.Error):
            process.kill()
            killed.append(f"{process.info['pid']}: {' '.join(process.info['cmdline'])}")
    return killed


def service_config(config: Path, name: str) -> EventServiceConfig:
    """One entry of a config file, as farm-ng-core's clients and services take it."""
    return find_entry(read_config(str(config)), name).service_config()


def request(config: Path, name: str, path: str, message: Message, timestamps: list[Any] | None = None) -> Any:
    """Sends one request/reply to a service of ``config``; returns the raw reply."""

    async def call() -> Any:
        client = PeerClient(service_config(config, name), "test", timeout=5.0)
        try:
            return await client.request_reply(path, message, timestamps=timestamps)
        finally:
            await client.close()

    return asyncio.run(call())


def requests(config: Path, name: str, path: str, messages: list[Message]) -> list[Any]:
    """Sends requests to one service all at once; returns the replies, decoded."""

    async def call() -> list[Any]:
        client = PeerClient(service_config(config, name), "test", timeout=5.0)
        try:
            return await asyncio.gather(*(client.request_reply(path, message, decode=True) for message in messages))
        finally:
            await client.close()

    return asyncio.run(call())


def collect(config: Path, name: str, path: str, count: int, timeout: float = 10.0) -> list[tuple[Any, Any]]:
    """The first ``count`` (event, message) pairs a service publishes on ``path``."""

    async def read() -> list[tuple[Any, Any]]:
        client = PeerClient(service_config(config, name), "test")
        request = SubscribeRequest(uri=Uri(path=path, query=f"service_name={name}"), every_n=1)
        received: list[tuple[Any, Any]] = []
        try:
            async for event, message in client.subscribe(request, decode=True):
                received.append((event, message))
                if len(received) >= count:
                    break
        finally:
            await client.close()
        return received

    async def bounded() -> list[tuple[Any, Any]]:
        try:
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"{name} did not publish {count} events on {path} within {timeout} s")

    return asyncio.run(bounded())


def stats(config: Path, name: str, timeout: float = 10.0, fresh: int = 2) -> dict[str, Any]:
    """A service's ``/stats`` figures, the ``fresh``-th published after subscribing.

    The first is latched and may be up to a second old.
    """
    _, message = collect(config, name, "/stats", fresh, timeout)[-1]
    return dict(message)


def raw_request(config: Path, name: str, path: str, payload: bytes, query: str) -> tuple[str, str]:
    """Sends a hand-made request/reply (any URI query, any payload); returns (status code name, details).

    What a hostile peer on the network could send: no farm-ng-core client in between.
    """
    entry = find_entry(read_config(str(config)), name)
    uri = Uri(scheme="protobuf", authority="test", path=path, query=query)
    request = RequestReplyRequest(event=Event(uri=uri, payload_length=len(payload)), payload=payload)

    async def call() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(f"{entry.host}:{entry.port}") as channel:
            try:
                await EventServiceStub(channel).requestReply(request, timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details() or ""
        return "OK", ""

    return asyncio.run(call())
