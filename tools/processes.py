"""The services as processes: which script runs an entry, in what order, when it serves, how it stops.

One home for what the launcher, the benchmark and the tests each need to start and stop
services: the script of an entry's role (``propagation.config.role_of`` decides the
role), the start order (storage, then supervisors, then agents), the command line, the
line a service prints once it serves, terminate-wait-kill with one deadline for all,
and free ports below the ephemeral range. Standard library only, besides the config.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from propagation.config import ROLES, Entry, role_of

ROOT = Path(__file__).resolve().parent.parent
# Bounds that only a hang reaches, sized for a loaded 2-core machine: a service needs
# about 0.6 s to serve on a quiet one, and took over 15 s at load 16.
READY_TIMEOUT_S = 60.0
# How long services get to stop after SIGTERM (they take well under a second) before SIGKILL.
STOP_TIMEOUT_S = 5.0


def script_of(entry: Entry) -> Path | None:
    """The script that runs an entry (``storage.py`` for storage); None for another program's entry."""
    role = role_of(entry)
    return None if role is None else ROOT / f"{role}.py"


def start_order(entries: Iterable[Entry]) -> list[Entry]:
    """The entries this example runs, storage first, then the supervisors, then the agents.

    Any order works; this one has each service's peers up before it calls them.
    """
    ours = [(ROLES.index(role), entry) for entry in entries if (role := role_of(entry)) is not None]
    return [entry for _, entry in sorted(ours, key=lambda pair: pair[0])]


def service_argv(config: str | Path, entry: Entry) -> list[str]:
    """``python <role>.py --service-config CONFIG --service-name NAME``, with this Python."""
    script = script_of(entry)
    if script is None:
        msg = f"{entry.name!r} is not a service of this example"
        raise ValueError(msg)
    return [sys.executable, str(script), "--service-config", str(config), "--service-name", entry.name]


def serving_line(name: str) -> re.Pattern[str]:
    """The line a service prints once it serves (``storage serving on localhost:7010``), at INFO."""
    return re.compile(rf"^{re.escape(name)} serving on (\S+)$")


def exit_cause(code: int | None) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``."""
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


async def spawn(argv: Sequence[str]) -> asyncio.subprocess.Process:
    """Starts a service, its output (stdout and stderr) on one pipe.

    In a session of its own: Ctrl-C in the terminal reaches only the tool that started
    it, which stops its services and waits for each.
    """
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )


async def stop(processes: Sequence[asyncio.subprocess.Process], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to all at once, then SIGKILL to those still running after ``timeout`` (one deadline for all)."""
    for process in processes:
        if process.returncode is None:
            process.terminate()
    if processes:
        await asyncio.wait([asyncio.ensure_future(process.wait()) for process in processes], timeout=timeout)
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


def stop_popens(popens: Sequence[subprocess.Popen[str]], timeout: float = 2 * STOP_TIMEOUT_S) -> None:
    """``stop`` for ``subprocess.Popen``: SIGTERM to all, one deadline, then SIGKILL."""
    for popen in popens:
        if popen.poll() is None:
            popen.terminate()
    deadline = time.monotonic() + timeout
    for popen in popens:
        try:
            popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def ports_below_ephemeral() -> range:
    """The ports the OS never hands out by itself; this test worker's share of them under pytest-xdist.

    A port from ``bind(0)`` lies in the ephemeral range, where every outgoing connection
    on the machine takes its local port too: it may be taken before a service binds it.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: IANA's dynamic range, as macOS uses
        low, high = 49152, 65535
    ports = range(20000, low) if low - 20000 >= 4000 else range(high + 1, 65536)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[len("gw") :])
    share = len(ports) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return ports[worker * share : (worker + 1) * share]


def free_ports(count: int, taken: Iterable[int] = ()) -> list[int]:
    """``count`` different ports below the ephemeral range that nothing listens on now.

    ``taken`` names ports handed out already whose services may not have bound yet.
    The probes stay bound until all are chosen, so no port is given twice.

    Raises:
        OSError: fewer than ``count`` are free.

    """
    share, skip = ports_below_ephemeral(), set(taken)
    start = int.from_bytes(os.urandom(4), "big") % len(share)
    probes: list[socket.socket] = []
    try:
        for port in (share[(start + step) % len(share)] for step in range(len(share))):
            if len(probes) == count:
                break
            if port in skip:
                continue
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                probe.close()
                continue
            probes.append(probe)
        if len(probes) < count:
            msg = f"only {len(probes)} of {count} ports free in {share}"
            raise OSError(msg)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
