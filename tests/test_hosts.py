"""Services listen where the config says, and propagate across hosts."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from helpers import ROOT, STARTUP_TIMEOUT_S, Process, Services, port_of, write_config

LOOPBACK = {"127.0.0.1", "::1"}


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
    """Why the multi-host test cannot run here, or None if it can."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"fpprobe{os.getpid()}"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", f"fpprobe{os.getpid()}"], check=False)
    return None


class Hosts:
    """Three hosts on one bridge, each a network namespace with one address."""

    SUBNET = "10.231.{}.{}"

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.bridge = f"fpbr{tag}"
        self.names = [f"fp{tag}{letter}" for letter in "abc"]
        self.addresses = [self.SUBNET.format(tag % 250, index + 1) for index in range(3)]

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


def test_propagation_across_three_hosts(services: Services, hosts: Hosts, tmp_path: Path) -> None:
    # storage on the first host, the supervisors on the second, the agents on the third
    host_of = {"storage": 0, "supervisor-1": 1, "supervisor-2": 1, "agent-1": 2, "agent-2": 2, "agent-3": 2}
    config = write_config(tmp_path, {name: {"host": hosts.addresses[index]} for name, index in host_of.items()})
    running: dict[str, Process] = {}
    for name in ["storage", "supervisor-1", "supervisor-2", "agent-1", "agent-2", "agent-3"]:
        script = "storage.py" if name == "storage" else f"{name.split('-', maxsplit=1)[0]}.py"
        argv = ["ip", "netns", "exec", hosts.names[host_of[name]], sys.executable, str(ROOT / script)]
        process = Process(name, [*argv, "--service-config", str(config), "--service-name", name])
        services.started.append(process)
        address = hosts.addresses[host_of[name]]
        process.wait_for(rf"^{name} serving on {address}:\d+$", STARTUP_TIMEOUT_S)
        running[name] = process
    running["storage"].wait_for(r"^Storage: \d+/500 ", 15)
    for name in ("agent-1", "agent-2", "agent-3"):
        running[name].wait_for(r"^Remainder: \d+$", 15)
