"""Starts every service of a config, each as its own process, and keeps them running until Ctrl-C.

    python -m tools.launch [--service-config service_config.json] [--restart] [--monitor [LOG]]

``./run.sh`` runs it in ``.venv``. What it prints, when it ends and its exit code: the
README's Quick start and "Restarts and outages". Its output goes through ``LogOutput``
(dropped and counted while the terminal stalls), and it keeps reading every service's
output, so that no service waits on a full pipe.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from propagation.cli import run_cli
from propagation.config import ConfigError, Entry, read_config, role_of
from propagation.logs import LogOutput
from tools import processes

# A service that dies this soon after it began to serve (or before) failed fast; after
# this many fast failures in a row --restart gives up on it. Restarts wait 1 s, 2 s, 4 s.
FAST_FAILURE_S = 10.0
MAX_FAST_FAILURES = 3
RESTART_DELAY_S = 1.0


class Service:
    """One entry of the config and its process (a new one at each restart), its output prefixed."""

    def __init__(self, config_path: str, entry: Entry, out: LogOutput) -> None:
        self.entry = entry
        self.name = entry.name
        self.argv = processes.service_argv(config_path, entry)
        self.command = f"python {Path(self.argv[1]).name} {' '.join(self.argv[2:])}"  # as typed in the repo's folder
        self._out = out
        self.process: asyncio.subprocess.Process | None = None  # ready, ended and cause are its, once started

    async def start(self) -> asyncio.subprocess.Process:
        """Starts a process; ``ready`` is done once it serves, ``ended`` once it exited and its output is read."""
        self.ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()  # since when it serves
        self.cause = ""  # its last error line
        self.process = await processes.spawn(self.argv)
        self.ended: asyncio.Future[int] = asyncio.ensure_future(self._run(self.process))
        if self.entry.log_level > logging.INFO:  # it will not print that it serves
            self._listening = asyncio.ensure_future(self._wait_listening(self.process))
        return self.process

    async def _run(self, process: asyncio.subprocess.Process) -> int:
        """Copies every line as it comes, whatever happens to the launcher's own output."""
        assert process.stdout is not None
        serving = processes.serving_line(self.name)
        while raw := await process.stdout.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            self._out.write(f"[{self.name}] {line}")
            if serving.match(line) and not self.ready.done():
                self.ready.set_result(time.monotonic())
            elif line.startswith(("error: ", "ERROR: ")):
                self.cause = line.split(": ", 1)[1]
        return await process.wait()

    async def _wait_listening(self, process: asyncio.subprocess.Process) -> None:
        """Sets ``ready`` once this very process listens on the entry's port (not another program)."""
        with contextlib.suppress(psutil.Error):  # it is gone
            while process.returncode is None and not self.ready.done():
                sockets = psutil.Process(process.pid).net_connections("inet")
                if any(conn.status == psutil.CONN_LISTEN and conn.laddr.port == self.entry.port for conn in sockets):
                    self.ready.set_result(time.monotonic())
                await asyncio.sleep(0.1)

    def is_running(self) -> bool:
        """Whether its current process is still running."""
        return self.process is not None and not self.ended.done()

    def death(self) -> str:
        """``storage exited with code 1 before serving: port 7010 ... in use; is another ./run.sh running?``."""
        assert self.process is not None
        code = self.process.returncode
        if code is not None and code < 0:
            line = f"{self.name} was killed by {signal.Signals(-code).name}"
        else:
            line = f"{self.name} exited with code {code}"
        if not self.ready.done():
            line += " before serving"
        if self.cause:
            line += f": {self.cause}"
        if "already in use" in self.cause:
            line += "; is another ./run.sh running?"
        return line


class Launcher:
    """Starts a config's services in order, keeps them running (``restart``: again) and stops them together.

    With ``monitor_log`` their output goes to that file, and the monitor takes the terminal.
    """

    def __init__(self, config_path: str, monitor_log: str | None, restart: bool) -> None:
        self._config_path = config_path
        self._monitor_log = monitor_log
        self._restart = restart
        self._terminal = LogOutput(sys.stdout)
        self._out = self._terminal  # the services' output: the terminal, or the log file
        self._services: list[Service] = []
        self._monitor: asyncio.subprocess.Process | None = None
        self._deaths = 0

    def say(self, line: str) -> None:
        """Prints one line of the launcher's own (to the log too, with the monitor)."""
        self._out.write(f"[launch] {line}")
        if self._out is not self._terminal and (self._monitor is None or self._monitor.returncode is not None):
            self._terminal.write(f"[launch] {line}")

    async def run(self) -> int:
        """Runs the system until a signal, the monitor's exit or the end of every service; returns the exit code."""
        try:
            entries = read_config(self._config_path)
            for entry in entries:
                if role_of(entry) is None:
                    self.say(f"skipping {entry.name!r}: not a service of this example (no port or unknown role)")
            if not (ordered := processes.start_order(entries)):
                msg = f"{self._config_path} has no storage, supervisor or agent entry"
                raise ConfigError(msg)
            if self._monitor_log is not None:
                self._out = LogOutput(open(self._monitor_log, "a", encoding="utf-8"))  # noqa: SIM115
            self._services = [Service(self._config_path, entry, self._out) for entry in ordered]
            stopping = asyncio.get_running_loop().create_future()  # done (cancelled) at the first signal
            # SIGHUP too: closing the terminal must not orphan the services (sessions of their own).
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                asyncio.get_running_loop().add_signal_handler(signum, stopping.cancel)
            try:
                code = await self.start_all(stopping)
            finally:
                stopped_cleanly = await self.shut_down()
            return code or (0 if stopped_cleanly and not self._deaths else 1)
        finally:
            for output in {self._out, self._terminal}:
                output.close()

    async def start_all(self, stopping: asyncio.Future[Any]) -> int:
        """Starts each service once the one before serves, then keeps them running; returns the exit code."""
        for service in self._services:
            process = await service.start()
            self.say(f"starting {service.name} (pid {process.pid}): {service.command}")
            watched = [service.ready, stopping, *(other.ended for other in self._services if other.process is not None)]
            done, _ = await asyncio.wait(
                watched, timeout=processes.READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            dead = [other for other in self._services if other.process is not None and other.ended.done()]
            for other in dead:  # not counted in _deaths: the exit code is 1 anyway
                self.say(other.death())
            if stopping in done:
                return 1 if dead else 0
            if dead or not done:
                if not done:
                    self.say(f"{service.name} is not serving after {processes.READY_TIMEOUT_S:g} s")
                self.say("stopping the others")
                return 1
        self.say(f"all {len(self._services)} services are serving; Ctrl-C stops them")
        return await self.keep_running(stopping)

    async def keep_running(self, stopping: asyncio.Future[Any]) -> int:
        """Watches the services until a signal, the monitor's exit or the end of every one."""
        keepers = asyncio.ensure_future(asyncio.gather(*(self.keep(service) for service in self._services)))
        watched: list[asyncio.Future[Any]] = [stopping, keepers]
        if self._monitor_log is not None:  # it takes the terminal
            self.say(f"services' output goes to {self._monitor_log}; starting the monitor")
            argv = [sys.executable, "-m", "tools.monitor", "--service-config", str(Path(self._config_path).resolve())]
            self._monitor = await asyncio.create_subprocess_exec(*argv, cwd=processes.ROOT)
            watched.append(asyncio.ensure_future(self._monitor.wait()))
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            keepers.cancel()
            await asyncio.gather(keepers, return_exceptions=True)
        if keepers in done:
            self.say("every service is gone; nothing left to run")
            if self._monitor is not None:  # it has the terminal: say it there too, once it is gone
                await processes.stop([self._monitor])
                self._terminal.write(f"[launch] every service is gone; their last lines are in {self._monitor_log}")
            return 1
        return 0 if stopping in done else watched[-1].result()  # else the monitor's exit code

    async def keep(self, service: Service) -> None:
        """Waits for a service to end; with ``--restart`` starts it again until it fails fast too often."""
        fast_failures = 0
        while True:
            await asyncio.wait([service.ended])  # not `await service.ended`: cancelling keep() must not cancel it
            self._deaths += 1
            running = sum(other.is_running() for other in self._services)
            others = f"the other {running} keep running" if running else "no other is running"
            if not self._restart:
                self.say(f"{service.death()}; {others}")
                self.say(f"to start it again: {service.command} (or use --restart)")
                return
            served_for = time.monotonic() - service.ready.result() if service.ready.done() else 0.0
            fast_failures = fast_failures + 1 if served_for < FAST_FAILURE_S else 1
            if fast_failures >= MAX_FAST_FAILURES:
                self.say(
                    f"{service.death()}; it failed {fast_failures} times in a row within {FAST_FAILURE_S:g} s"
                    f" of serving: not restarting it ({others})"
                )
                return
            delay = RESTART_DELAY_S * 2 ** (fast_failures - 1)
            self.say(f"{service.death()}; restarting it in {delay:g} s")
            await asyncio.sleep(delay)
            process = await service.start()
            self.say(f"restarting {service.name} (pid {process.pid})")
            await asyncio.wait([service.ready, service.ended], return_when=asyncio.FIRST_COMPLETED)
            if service.ready.done():
                self.say(f"{service.name} is serving again")

    async def shut_down(self) -> bool:
        """Stops the monitor, then every service still running; says how that went: True if each exited with 0."""
        if self._monitor is not None:
            await processes.stop([self._monitor])  # stuck on a stalled terminal, say: killed after the deadline
        running = [service for service in self._services if service.is_running()]
        await processes.stop([service.process for service in running if service.process is not None])
        if running:  # their last lines
            await asyncio.wait([service.ended for service in running], timeout=processes.STOP_TIMEOUT_S)
        failed = [service for service in running if service.process is None or service.process.returncode != 0]
        if failed:
            self.say("not stopped cleanly: " + ", ".join(service.death() for service in failed))
        elif len(running) == len(self._services):
            self.say(f"stopped all {len(running)} services")
        elif running:
            self.say(f"stopped the {len(running)} services still running")
        return not failed


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.launch", description="Start every service of the config; Ctrl-C stops them all."
    )
    parser.add_argument("--service-config", default="service_config.json", help="the config to launch")
    parser.add_argument("--restart", action="store_true", help="start a service that died again, after a backoff")
    monitor = "show the live monitor instead of the logs, which go to LOG (default launch.log)"
    parser.add_argument("--monitor", nargs="?", const="launch.log", metavar="LOG", help=monitor)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs the launcher."""
    cli = build_parser().parse_args(argv)
    return run_cli(lambda: asyncio.run(Launcher(cli.service_config, cli.monitor, cli.restart).run()))


if __name__ == "__main__":
    sys.exit(main())
