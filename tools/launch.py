"""Starts every service of a config, each as its own process, and stops them together.

    python -m tools.launch [--service-config service_config.json] [--monitor [LOG]]

Storage starts first, then the supervisors, then the agents; each must be serving
before the next starts. Every line a service prints comes out prefixed with its name
(``[storage] Storage: 37/500 (463 remaining)``). Ctrl-C or SIGTERM stops them all; if
one dies, the launcher says which and how, stops the rest and exits non-zero; so it
does if one does not stop cleanly (the exit code says so even when a stalled terminal
swallowed the line).

Output goes through a bounded queue to a writer thread: if the terminal stalls (``| less``,
Ctrl-S), lines are dropped and counted, and the launcher keeps reading every service's
output, so that no service ever waits on a full pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from propagation.cli import run_cli
from propagation.config import ROLES, ConfigError, Entry, read_config, role_of
from propagation.logs import LogOutput

ROOT = Path(__file__).resolve().parent.parent
# A service needs about 0.6 s to serve on a quiet machine; a busy or small one (load 16
# on 2 cores took over 15 s) needs more. One that dies is reported at once anyway.
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0


def start_order(entries: list[Entry]) -> list[tuple[Entry, str]]:
    """The entries this example runs, each with its script: storage, supervisors, agents."""
    runnable = [(entry, role) for entry in entries if (role := role_of(entry)) is not None]
    runnable.sort(key=lambda pair: ROLES.index(pair[1]))
    return [(entry, f"{role}.py") for entry, role in runnable]


async def wait_serving(host: str, port: int, timeout: float) -> bool:
    """Whether something accepts connections at host:port within ``timeout`` seconds.

    A plain TCP connect, not a gRPC channel: the launcher forks a process per service,
    and gRPC's threads in a process that forks can abort it ("Check failed" in thd.h).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


class Launched:
    """One service's process and the task that copies its output, prefixed."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, out: LogOutput) -> None:
        self.name = name
        self.process = process
        self._out = out
        self.output = asyncio.ensure_future(self._copy_output())

    async def _copy_output(self) -> None:
        """Reads every line as it comes, whatever happens to the launcher's own output."""
        assert self.process.stdout is not None
        prefix = f"[{self.name}] "
        while line := await self.process.stdout.readline():
            self._out.write(prefix + line.decode(errors="replace").rstrip("\n"))

    def describe_exit(self) -> str:
        """``exited with code 1`` or ``was killed by SIGKILL``."""
        code = self.process.returncode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


class Launcher:
    """Starts services in order and stops them together."""

    def __init__(self, config_path: str, monitor_log: str | None = None) -> None:
        """Prepares to launch ``config_path``.

        Args:
            config_path: The config whose services to start.
            monitor_log: If given, the services' output goes to this file and the
                monitor takes the terminal.

        """
        self._config_path = config_path
        self._monitor_log = monitor_log
        self._terminal = LogOutput(sys.stdout)
        self._out = self._terminal  # the services' output: the terminal, or the log file
        self._running: list[Launched] = []
        self._monitor: asyncio.subprocess.Process | None = None
        self._why_stopped: str | None = None

    def say(self, line: str) -> None:
        """Prints one line of the launcher's own (to the log too, with the monitor)."""
        self._out.write(f"[launch] {line}")
        if self._out is not self._terminal and self._monitor is None:  # else the monitor owns the terminal
            self._terminal.write(f"[launch] {line}")

    async def run(self) -> int:
        """Runs the system until a signal or a service's death; returns the exit code."""
        try:
            plan = self.plan()
            if self._monitor_log is not None:
                self._out = LogOutput(open(self._monitor_log, "a", encoding="utf-8"))  # noqa: SIM115
            return await self.run_until_stopped(plan)
        finally:
            if self._out is not self._terminal:
                self._out.close()
            self._terminal.close()

    async def run_until_stopped(self, plan: list[tuple[Entry, str]]) -> int:
        """Starts the plan and runs it until a signal, a death or the monitor's exit."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP too: closing the terminal must not orphan the services, which live in
        # sessions of their own.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, stop.set)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            code = await self.run_plan(plan, stopping)
        finally:
            stopping.cancel()
            stopped_cleanly = await self.shut_down()
        return code or (0 if stopped_cleanly else 1)

    def plan(self) -> list[tuple[Entry, str]]:
        """The entries to start, in order, each with its script.

        Raises:
            ConfigError: the config is unreadable or has nothing to start.
        """
        entries = read_config(self._config_path)
        for entry in entries:
            if role_of(entry) is None:
                self.say(f"skipping {entry.name!r}: not a service of this example (no port or unknown role)")
        plan = start_order(entries)
        if not plan:
            msg = f"{self._config_path} has no storage, supervisor or agent entry"
            raise ConfigError(msg)
        return plan

    async def run_plan(self, plan: list[tuple[Entry, str]], stopping: asyncio.Future[bool]) -> int:
        """Starts each service in turn, then waits for a signal, a death or the monitor's exit."""
        for entry, script in plan:
            if not await self.start(entry, script, stopping):
                return 0 if stopping.done() else 1
        self.say(f"all {len(plan)} services are serving; Ctrl-C stops them")
        exits = {asyncio.ensure_future(launched.process.wait()): launched for launched in self._running}
        watched: list[asyncio.Future[Any]] = [stopping, *exits]
        monitor = await self.start_monitor() if self._monitor_log is not None else None
        if monitor is not None:
            watched.append(monitor)
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for finished in done & exits.keys():
            launched = exits[finished]
            await launched.output
            self._why_stopped = f"{launched.name} {launched.describe_exit()}"
            self.say(f"{self._why_stopped}; stopping the others")
            return 1
        if monitor is not None and monitor in done:
            return monitor.result()
        return 0

    async def shut_down(self) -> bool:
        """Stops everything started and says how that went (on the terminal too, after the monitor).

        Returns:
            Whether every service exited with code 0.

        """
        had_monitor = self._monitor is not None
        failed = await self.stop_all()
        self._monitor = None
        if had_monitor and self._why_stopped is not None:
            self._terminal.write(f"[launch] {self._why_stopped}; its last lines are in {self._monitor_log}")
        if failed:
            self.say(f"not stopped cleanly: {', '.join(failed)}")
        elif self._running:
            self.say(f"stopped all {len(self._running)} services")
        return not failed

    async def start(self, entry: Entry, script: str, stopping: asyncio.Future[bool]) -> bool:
        """Starts one service and waits until it serves; False if it died or timed out."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / script),
            "--service-config",
            self._config_path,
            "--service-name",
            entry.name,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: Ctrl-C reaches the launcher alone, which stops every
            # service and waits for each, instead of each exiting on its own.
            start_new_session=True,
        )
        self.say(
            f"starting {entry.name} (pid {process.pid}): "
            f"python {script} --service-config {self._config_path} --service-name {entry.name}"
        )
        launched = Launched(entry.name, process, self._out)
        self._running.append(launched)
        serving = asyncio.ensure_future(wait_serving(entry.host, entry.port, READY_TIMEOUT_S))
        exited = asyncio.ensure_future(process.wait())
        await asyncio.wait([serving, exited, stopping], return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            serving.cancel()
            await launched.output
            self.say(f"{entry.name} {launched.describe_exit()} before serving; stopping the others")
            return False
        exited.cancel()
        if stopping.done():
            serving.cancel()
            return False
        if not serving.result():
            self.say(f"{entry.name} is not serving on {entry.host}:{entry.port} after {READY_TIMEOUT_S:g} s")
            return False
        return True

    async def start_monitor(self) -> asyncio.Future[int]:
        """Runs the monitor in the terminal; returns a future of its exit code."""
        self.say(f"services' output goes to {self._monitor_log}; starting the monitor")
        self._monitor = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tools.monitor",
            "--service-config",
            str(Path(self._config_path).resolve()),
            cwd=ROOT,
        )
        return asyncio.ensure_future(self._monitor.wait())

    async def stop_all(self) -> list[str]:
        """Stops the monitor and the services, all at once; returns those that did not exit 0."""
        if self._monitor is not None and self._monitor.returncode is None:
            self._monitor.terminate()
            try:
                await asyncio.wait_for(self._monitor.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:  # stuck writing to a stalled terminal, say
                self._monitor.kill()
                await self._monitor.wait()
        for launched in reversed(self._running):
            if launched.process.returncode is None:
                launched.process.terminate()
        # One deadline for all: six services that each hang would otherwise take six times as long.
        exits = [asyncio.ensure_future(launched.process.wait()) for launched in self._running]
        if exits:
            await asyncio.wait(exits, timeout=STOP_TIMEOUT_S)
        failed = []
        for launched in reversed(self._running):
            if launched.process.returncode is None:
                launched.process.kill()
                await launched.process.wait()
            await launched.output
            if launched.process.returncode != 0:
                failed.append(f"{launched.name} {launched.describe_exit()}")
        return failed


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.launch", description="Start every service of the config; Ctrl-C stops them all."
    )
    parser.add_argument("--service-config", default="service_config.json", help="the config to launch")
    parser.add_argument(
        "--monitor",
        nargs="?",
        const="launch.log",
        metavar="LOG",
        help="show the live monitor instead of the logs, which go to LOG (default launch.log)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs the launcher."""
    cli = build_parser().parse_args(argv)
    return run_cli(lambda: asyncio.run(Launcher(cli.service_config, cli.monitor).run()))


if __name__ == "__main__":
    sys.exit(main())
