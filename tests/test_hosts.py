"""Services on three hosts (network namespaces): partitions, a restart behind one, a thin link.

Storage runs on the first host, the supervisors on the second, the agents on the third,
each host a network namespace on one bridge. A partition takes a host's link down: its
packets vanish, with no reset and no FIN, as when a robot leaves Wi-Fi range. A thin link
is a token bucket (``tc qdisc ... tbf``) on both directions of the agents' link.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from helpers import ROOT, STARTUP_TIMEOUT_S, WAIT_TIMEOUT_S, Process, Services, port_of, write_config

from propagation.stats import LATENCY_WINDOW_S

LOOPBACK = {"127.0.0.1", "::1"}
ORDER = ["storage", "supervisor-1", "supervisor-2", "agent-1", "agent-2", "agent-3"]
HOST_OF = {"storage": 0, "supervisor-1": 1, "supervisor-2": 1, "agent-1": 2, "agent-2": 2, "agent-3": 2}
SUPERVISOR_OF = {"agent-1": "supervisor-1", "agent-2": "supervisor-1", "agent-3": "supervisor-2"}
AGENTS = ("agent-1", "agent-2", "agent-3")
SUPERVISORS = ("supervisor-1", "supervisor-2")
# The promises (an outage noticed in about 5 s, propagation back within 5 s of the heal) are
# timing targets: only the long cases, which run alone (-m long), hold the services to them.
# The others run beside the rest of the suite on a loaded machine, and wait only for as long
# as a hang takes; they print what they measured.
NOTICED_S = 8.0
RESUMED_S = 5.0


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (from /proc/net)."""
    addresses = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc/net writes each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width // 2, 4))
            ip = ipaddress.ip_address(words)
            addresses.add(str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip))
    return addresses


def test_localhost_listens_on_loopback_only(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    services.service(config, "storage")
    addresses = listening_addresses(port_of(config, "storage"))
    assert addresses, "nothing listens on storage's port"
    assert addresses <= LOOPBACK, addresses


def can_make_namespaces() -> str | None:
    """Why the multi-host tests cannot run here, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool} command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"fpprobe{os.getpid()}"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", f"fpprobe{os.getpid()}"], check=False)
    return None


class Hosts:
    """Three hosts on one bridge, each a network namespace with one address."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.bridge = f"fpbr{tag}"
        self.names = [f"fp{tag}{letter}" for letter in "abc"]
        self.addresses = [f"10.231.{tag % 250}.{index + 1}" for index in range(3)]

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def create(self) -> None:
        self.ip("link", "add", self.bridge, "type", "bridge")
        self.ip("link", "set", self.bridge, "up")
        for namespace, address in zip(self.names, self.addresses):
            self.ip("netns", "add", namespace)
            self.ip("link", "add", f"{namespace}h", "type", "veth", "peer", "name", f"{namespace}n")
            self.ip("link", "set", f"{namespace}h", "master", self.bridge, "up")
            self.ip("link", "set", f"{namespace}n", "netns", namespace)
            self.ip("-n", namespace, "addr", "add", f"{address}/24", "dev", f"{namespace}n")
            self.ip("-n", namespace, "link", "set", f"{namespace}n", "up")
            self.ip("-n", namespace, "link", "set", "lo", "up")

    def remove(self) -> None:
        for namespace in self.names:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", f"{namespace}h"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)

    def partition(self, host: int) -> None:
        """Cuts a host off: its packets vanish, nobody is told."""
        self.ip("link", "set", f"{self.names[host]}h", "down")

    def heal(self, host: int) -> None:
        self.ip("link", "set", f"{self.names[host]}h", "up")

    def thin(self, host: int, rate: str) -> None:
        """Shapes both directions of a host's link to ``rate`` (a token bucket, 200 ms of queue)."""
        namespace = self.names[host]
        shape = ("qdisc", "add", "dev")
        limits = ("root", "tbf", "rate", rate, "burst", "3000", "latency", "200ms")
        subprocess.run(["ip", "netns", "exec", namespace, "tc", *shape, f"{namespace}n", *limits], check=True)
        subprocess.run(["tc", *shape, f"{namespace}h", *limits], check=True)

    def widen(self, host: int) -> None:
        namespace = self.names[host]
        subprocess.run(
            ["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", f"{namespace}n", "root"], check=True
        )
        subprocess.run(["tc", "qdisc", "del", "dev", f"{namespace}h", "root"], check=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = can_make_namespaces()
    if reason:
        pytest.skip(reason)
    made = Hosts()
    try:
        made.create()
        yield made
    finally:
        made.remove()


class System:
    """The six services, each on its host."""

    def __init__(self, services: Services, hosts: Hosts, config: Path) -> None:
        self.services = services
        self.hosts = hosts
        self.config = config
        self.running: dict[str, Process] = {}

    def start(self, name: str) -> Process:
        script = "storage.py" if name == "storage" else f"{name.split('-', maxsplit=1)[0]}.py"
        argv = ["ip", "netns", "exec", self.hosts.names[HOST_OF[name]], sys.executable, str(ROOT / script)]
        process = Process(name, [*argv, "--service-config", str(self.config), "--service-name", name])
        self.services.started.append(process)
        address = self.hosts.addresses[HOST_OF[name]]
        process.wait_for(rf"^{name} serving on {address}:\d+$", STARTUP_TIMEOUT_S)
        self.running[name] = process
        return process

    def watch_stats(self, name: str) -> Process:
        """Prints the /stats of ``name`` as they come, from a watcher on that service's own host."""
        argv = ["ip", "netns", "exec", self.hosts.names[HOST_OF[name]], sys.executable, "-m", "tools.watch"]
        args = ["--service-config", str(self.config), "--service-name", name, "--path", "/stats"]
        watcher = Process(f"watch {name}", [*argv, *args])
        self.services.started.append(watcher)
        watcher.wait_for(rf"^{name}/stats ", STARTUP_TIMEOUT_S)
        return watcher

    def propagating(self, timeout: float) -> None:
        """Every agent hears a residual, and storage stores, from now on."""
        for name in (*AGENTS, "storage"):
            process = self.running[name]
            pattern = r"^Remainder: \d+$" if name != "storage" else r"^Storage: \d+/"
            process.wait_for(pattern, timeout, start=len(process.lines))

    def survived(self) -> None:
        for process in self.running.values():
            assert process.popen.poll() is None, f"{process.label} exited:\n{process.output}"
            assert "Traceback" not in process.output, process.output


@pytest.fixture
def system(services: Services, hosts: Hosts, tmp_path: Path) -> System:
    changes = {name: {"host": hosts.addresses[index]} for name, index in HOST_OF.items()}
    made = System(services, hosts, write_config(tmp_path, changes))
    for name in ORDER:
        made.start(name)
    made.propagating(15)
    return made


def test_propagation_across_three_hosts(system: System) -> None:
    system.survived()


def settled(process: Process, peer: str, timeout: float = 15.0) -> int:
    """Waits until ``process`` last said ``peer`` is up (a busy machine can miss a deadline).

    Returns:
        The number of lines so far: what it says from there on is about the next outage.

    """
    deadline = time.monotonic() + timeout
    pattern = rf"\b{peer} is (up|back|unreachable|not up yet)\b"
    while time.monotonic() < deadline:
        said = process.matches(pattern)
        if said and said[-1].group(1) in ("up", "back"):
            return len(process.lines)
        time.sleep(0.1)  # readiness-free: polls what it printed, bounded by the deadline
    pytest.fail(f"{process.label} did not settle on {peer} being up:\n{process.output}")


def outage(system: System, host: int, seconds: float, peers: dict[str, tuple[str, ...]], timely: bool = False) -> None:
    """Partitions ``host`` for ``seconds``; each client of a peer there says so once, then it resumes.

    ``peers`` maps each client service to the peers on that host it talks to. With
    ``timely``, the outage must be noticed within ``NOTICED_S`` and propagation resume
    within ``RESUMED_S`` of the heal; else within a hang's bound.
    """
    noticed_within, resumed_within = (NOTICED_S, RESUMED_S) if timely else (WAIT_TIMEOUT_S, WAIT_TIMEOUT_S)
    before = {client: min(settled(system.running[client], name) for name in names) for client, names in peers.items()}
    cut = time.monotonic()
    system.hosts.partition(host)
    for client, names in peers.items():
        for name in names:
            system.running[client].wait_for(f"{name} is unreachable", noticed_within, start=before[client])
    noticed = time.monotonic() - cut
    time.sleep(max(0.0, seconds - (time.monotonic() - cut)))  # readiness-free: the outage itself
    # What each client said while the host was cut off: after the heal, a client of a
    # machine too busy to answer in time may rightly say so again.
    during = {client: system.running[client].lines[before[client] :] for client in peers}
    healed = time.monotonic()
    system.hosts.heal(host)
    system.propagating(resumed_within)
    resumed = time.monotonic() - healed
    for client, names in peers.items():
        process = system.running[client]
        for name in names:
            assert sum(f"{name} is unreachable" in line for line in during[client]) == 1, process.output
            assert not any(f"{name} is back" in line for line in during[client]), process.output
            process.wait_for(f"{name} is back", resumed_within, start=before[client] + len(during[client]))
    system.survived()
    print(f"partition of host {host}: noticed after {noticed:.1f} s, propagating again {resumed:.1f} s after the heal")


@pytest.mark.slow
def test_partition_of_the_agents_host(system: System) -> None:
    outage(system, 2, 30, {"supervisor-1": ("agent-1", "agent-2"), "supervisor-2": ("agent-3",)})


@pytest.mark.slow
def test_partition_of_storages_host(system: System) -> None:
    outage(system, 0, 30, {"supervisor-1": ("storage",), "supervisor-2": ("storage",)})


@pytest.mark.long
def test_two_minute_partitions(system: System) -> None:
    outage(system, 2, 120, {"supervisor-1": ("agent-1", "agent-2"), "supervisor-2": ("agent-3",)}, timely=True)
    outage(system, 0, 120, {"supervisor-1": ("storage",), "supervisor-2": ("storage",)}, timely=True)


def test_restart_behind_a_partition(system: System) -> None:
    # agent-3 dies and comes back while its host is cut off: supervisor-2's stream to the old
    # process is half-open, and stays so for longer than either side's liveness checks.
    supervisor = system.running["supervisor-2"]
    before = settled(supervisor, "agent-3")
    system.hosts.partition(2)
    supervisor.wait_for("agent-3 is unreachable", WAIT_TIMEOUT_S, start=before)
    system.running["agent-3"].popen.kill()
    system.running["agent-3"].wait_exit(5)
    system.start("agent-3")
    time.sleep(10)  # readiness-free: the partition outlasts the servers' keepalive (5 s)
    healed = time.monotonic()
    system.hosts.heal(2)
    system.propagating(WAIT_TIMEOUT_S)
    print(f"restart behind a partition: propagating again {time.monotonic() - healed:.1f} s after the heal")
    supervisor.wait_for("agent-3 is back", WAIT_TIMEOUT_S, start=before)
    system.survived()


# Its bounds (p99 under 1 s, gaps under 5 s) are timing targets: in the full suite, beside
# other tests on two cores, it failed twice in four runs. It runs with the long cases
# (.ci/run: ./test.sh -m long), away from the rest of the suite.
@pytest.mark.long
@pytest.mark.skipif(
    tuple(int(part) for part in grpc.__version__.split(".")[:2]) < (1, 74),
    reason=f"grpcio {grpc.__version__} (the last for Python 3.8 is 1.70) ignores grpc.http2.lookahead_bytes",
)
def test_a_thin_link_keeps_residuals_fresh(system: System) -> None:
    # 96 kbit/s carries about a fifth of the agents' samples: what does not fit must be
    # dropped (and counted), not queued, so that the residuals that come back are fresh.
    # The agents' /stats are read on their own host: the thin link is theirs alone.
    watchers = {name: system.watch_stats(name) for name in (*AGENTS, "supervisor-1", "supervisor-2")}
    system.hosts.thin(2, "96kbit")
    started = time.monotonic()
    try:
        time.sleep(30)  # readiness-free: 30 s on the thin link
    finally:
        system.hosts.widen(2)
    ended = time.monotonic()
    supervisors = {name: stats_lines(watchers[name], ended - 2, ended + 5)[-1:] for name in SUPERVISORS}
    for name in AGENTS:
        watcher = watchers[name]
        # Each /stats holds the latency percentiles of the agent's last 5 s. Those whose window
        # began within 4 s of the switch also hold what was in flight when the link thinned (up
        # to a flow-control window, drained at 96 kbit/s) and what waited behind it: the switch,
        # not a queue. (2 s was once too short: 1.28 s in a window that began 2 s after it.)
        settled = started + LATENCY_WINDOW_S + 4
        p99s = [figures.get("latency_p99_ms", float("inf")) for figures in stats_lines(watcher, settled, ended)]
        assert len(p99s) >= 15, watcher.output
        assert max(p99s) < 1000, (name, p99s, supervisors, stats_lines(watcher, ended - 2, ended + 5)[-1:])
        heard = [started, *system.running[name].moments(r"^Remainder: ", since=started), ended]
        longest_gap = max(after - before for before, after in zip(heard, heard[1:]))
        assert longest_gap < 5.0, name
        print(f"thin link: {name} latency p99 at most {max(p99s):.0f} ms, longest gap {longest_gap:.1f} s")
    system.propagating(RESUMED_S)
    system.survived()


def stats_lines(watcher: Process, since: float, until: float) -> list[dict[str, Any]]:
    """The /stats a watcher printed between two moments, as dicts."""
    return [
        json.loads(line.split(" ", 2)[2])
        for line, when in zip(watcher.lines, watcher.times)
        if since <= when <= until and line.split(" ", 1)[0].endswith("/stats")
    ]
