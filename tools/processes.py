"""The services as processes, for the launcher, the benchmark and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
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


def start_order(entries: Iterable[Entry]) -> list[Entry]:
    """The entries this example runs: storage, then the supervisors, then the agents (peers up before their callers)."""
    return sorted((entry for entry in entries if role_of(entry)), key=lambda entry: ROLES.index(role_of(entry)))


def service_argv(config: str | Path, entry: Entry) -> list[str]:
    """``python <role>.py --service-config CONFIG --service-name NAME``, with this Python."""
    if (role := role_of(entry)) is None:
        msg = f"{entry.name!r} is not a service of this example"
        raise ValueError(msg)
    return [sys.executable, str(ROOT / f"{role}.py"), "--service-config", str(config), "--service-name", entry.name]


def serving_line(name: str) -> re.Pattern[str]:
    """The line a service prints at INFO once it serves (``storage serving on localhost:7010``)."""
    return re.compile(rf"^{re.escape(name)} serving on (\S+)$")


async def spawn(argv: Sequence[str]) -> asyncio.subprocess.Process:
    """Starts a service, stdout and stderr on one pipe.

    In a session of its own: Ctrl-C in the terminal reaches only the tool that started
    it, which stops its services and waits for each.
    """
    return await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )


async def stop(processes: Sequence[asyncio.subprocess.Process]) -> None:
    """SIGTERM to all at once, then SIGKILL to those still running after ``STOP_TIMEOUT_S`` (one deadline for all)."""
    for process in processes:
        if process.returncode is None:
            process.terminate()
    if processes:
        await asyncio.wait([asyncio.ensure_future(process.wait()) for process in processes], timeout=STOP_TIMEOUT_S)
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


def stop_popens(popens: Sequence[subprocess.Popen[str]]) -> None:
    """``stop`` for ``subprocess.Popen``, with twice the deadline (a launcher stops its services in it)."""
    for popen in popens:
        if popen.poll() is None:
            popen.terminate()
    deadline = time.monotonic() + 2 * STOP_TIMEOUT_S
    for popen in popens:
        try:
            popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def free_ports(count: int, taken: Iterable[int] = ()) -> list[int]:
    """``count`` different ports nothing listens on now, none of ``taken`` (handed out, maybe not bound yet).

    Below the ephemeral range, where any outgoing connection may take a port from ``bind(0)``
    before a service binds it; a share of their own per pytest-xdist worker. The probes stay
    bound until all are chosen, so no port is given twice. OSError if fewer are free.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: IANA's dynamic range, as macOS uses
        low, high = 49152, 65535
    ports = range(20000, low) if low - 20000 >= 4000 else range(high + 1, 65536)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[len("gw") :])
    size = len(ports) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share, skip = ports[worker * size : (worker + 1) * size], set(taken)
    start = int.from_bytes(os.urandom(4), "big") % len(share)
    chosen: list[int] = []
    with contextlib.ExitStack() as probes:
        for port in itertools.chain(share[start:], share[:start]):
            if len(chosen) < count and port not in skip:
                with contextlib.suppress(OSError):  # in use
                    probes.enter_context(socket.socket()).bind(("127.0.0.1", port))
                    chosen.append(port)
    if len(chosen) < count:
        msg = f"only {len(chosen)} of {count} ports free in {share}"
        raise OSError(msg)
    return chosen
