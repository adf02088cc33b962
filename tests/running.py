"""Processes a test starts: their output line by line as it comes, and stopping them all."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from propagation.config import find_entry, read_config
from tools import processes
from tools.processes import ROOT

# Bounds that only a hang reaches, sized for a loaded 2-core machine: at load 8 a
# service once took over 15 s to print that it serves (0.6 s on a quiet one). A passing
# test never waits them out.
STARTUP_TIMEOUT_S = processes.READY_TIMEOUT_S
WAIT_TIMEOUT_S = 30.0


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
        return len(self.matches(pattern))

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
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.matches(pattern, start)
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
        """SIGTERM, then SIGKILL (longer than the launcher takes to stop its services); then its last lines."""
        processes.stop_popens([self.popen])
        self._reader.join(5)


class Services:
    """Starts scripts of this repo as processes; the fixture stops them all."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def run(self, script: str, *args: str, label: str | None = None) -> Process:
        """Starts ``python script args...`` in the repo."""
        return self.start(Process(label or script, [sys.executable, str(ROOT / script), *args]))

    def tool(self, name: str, *args: str, label: str | None = None) -> Process:
        """Starts ``python -m tools.<name> args...`` in the repo's top folder."""
        return self.start(Process(label or name, [sys.executable, "-m", f"tools.{name}", *args]))

    def start(self, process: Process) -> Process:
        """Keeps a process the test started, for ``stop_all``."""
        self.started.append(process)
        return process

    def service(self, config: Path, name: str, wait: bool = True, shell: str | None = None) -> Process:
        """Starts the service ``name`` of ``config`` with its role's script; waits until it says it serves.

        ``shell``, if given, is an ``sh -c`` line that sets up the process and ends in ``exec "$@"``.
        """
        argv = processes.service_argv(config, find_entry(read_config(str(config)), name))
        if shell is not None:
            argv = ["sh", "-c", shell, "sh", *argv]
        process = self.start(Process(name, argv))
        if wait:
            process.wait_for(processes.serving_line(name).pattern, STARTUP_TIMEOUT_S)
        return process

    def system(self, config: Path, order: list[str] | None = None) -> dict[str, Process]:
        """Starts the services of ``config``, one serving before the next: those of ``order`` in that order, or all."""
        names = order or [entry.name for entry in processes.start_order(read_config(str(config)))]
        return {name: self.service(config, name) for name in names}

    def stop_all(self) -> None:
        """Stops every process started: all asked at once, one deadline, then each one's last lines."""
        processes.stop_popens([process.popen for process in reversed(self.started)])
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
