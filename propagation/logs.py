"""Log lines: each once, through a queue, so that a stalled terminal never stops a service.

A problem that may repeat thousands of times a second goes to a ``Tally``: its first line
at once, then one line per interval with the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from typing import IO, Callable

# Lines waiting for the terminal: a few seconds of a service at INFO.
QUEUE_LINES = 10_000
# How long the last lines may take on the way out: with the server's 0.5 s grace, a
# service stops within a second even when its terminal is stalled.
CLOSE_WAIT_S = 0.4
TALLY_INTERVAL_S = 10.0
GRPC_SEND_FAILED = "ExecuteBatchError raised in core by servicer method"
# A line of gRPC's C core (abseil's format): severity, date, time, thread, file:line, text.
# "E1204 17:00:23.220626   16190 posix_engine_listener.cc:164] File descriptor limit reached. Retrying."
CORE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+\] (.*)$")
# Kinds of core lines tallied apart; beyond that they share one count.
MAX_CORE_KINDS = 50


class LogOutput:
    """Where the log lines go: a bounded queue (``handler``), written out by a thread.

    When the output stalls (``| less``, Ctrl-S, a full pipe) further lines are dropped and
    counted; the count is printed when it flows again. A closed stdout or a broken pipe
    silences the output and nothing else. The thread writes with ``os.write``, no Python
    file object: blocked on a stalled terminal, it holds no lock that the interpreter needs
    to exit (a blocked ``sys.stdout`` would make the exit wait for it, or abort).
    """

    def __init__(self, stream: IO[str] | None, lines: int = QUEUE_LINES) -> None:
        self.handler = _DroppingQueueHandler(queue.Queue(lines))
        self._stream = stream  # kept open: the descriptor is its
        self._fd: int | None = None
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no stream, or stdout closed at start, say
            self._fd = stream.fileno()  # type: ignore[union-attr]
        self._reported = 0  # of handler.dropped
        self._writer = threading.Thread(target=self._write_lines, daemon=True)  # the process may exit without it
        self._writer.start()

    def write(self, line: str) -> None:
        """Queues one line as it is (no level prefix), never waiting."""
        self.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))

    def close(self) -> None:
        """Writes what is queued, then stops the thread; waits ``CLOSE_WAIT_S`` at most."""
        with contextlib.suppress(queue.Full):  # stalled: the lines still queued are dropped
            self.handler.queue.put_nowait(None)
            self._writer.join(CLOSE_WAIT_S)

    def _write_lines(self) -> None:
        """``message`` for INFO and below, ``WARNING: message`` above; until ``close()`` or the output fails."""
        while self._fd is not None and (record := self.handler.queue.get()) is not None:
            line = record.getMessage()  # formatted already, with any traceback, by the handler
            if record.levelno > logging.INFO:
                line = f"{record.levelname}: {line}"
            if dropped := self.handler.dropped - self._reported:
                self._reported += dropped
                line = f"WARNING: {dropped} log lines dropped while the output was blocked\n{line}"
            data = (line + "\n").encode(errors="replace")
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except OSError as exc:
                if self._stream is sys.stdout and exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO):
                    # Python flushes stdout once more at exit; to a broken pipe that prints an
                    # "Exception ignored" message. Point stdout at /dev/null instead.
                    with contextlib.suppress(OSError):
                        devnull = os.open(os.devnull, os.O_WRONLY)
                        os.dup2(devnull, self._fd)
                        os.close(devnull)
                self._fd = None


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Puts records on the queue without waiting; a full queue counts the line as dropped."""

    dropped = 0  # only grows, under the handler's lock

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def configure_logging(level: int) -> LogOutput:
    """Sends every log line once to stdout, through a queue, at ``level`` (INFO if 0).

    Importing ``farm_ng.core.event_client`` runs ``logging.basicConfig`` and each
    ``EventServiceGrpc`` adds a stderr handler of its own (``serving`` removes that one):
    left alone every line would print twice. Here the root logger alone prints (``force``
    replaces the handler ``basicConfig`` made).

    Returns:
        The output, to ``close()`` on the way out.

    """
    output = LogOutput(sys.stdout)
    output.handler.addFilter(repeat_filter)
    logging.basicConfig(handlers=[output.handler], format="%(message)s", level=level or logging.INFO, force=True)
    return output


class Tally:
    """Logs a repeating problem once, then once per ``TALLY_INTERVAL_S`` with how many there were.

    ``add(kind)`` from the event loop; each kind is a message template of its own.
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        self._logger = logger
        self._level = level
        self._pending: dict[str, int] = {}
        self._last_line: dict[str, float] = {}
        self._flush: asyncio.TimerHandle | None = None

    def add(self, kind: str) -> None:
        """Counts one occurrence of ``kind`` (a message like ``"refused %d requests on /x"``)."""
        self._pending[kind] = self._pending.get(kind, 0) + 1
        if time.monotonic() - self._last_line.get(kind, -TALLY_INTERVAL_S) >= TALLY_INTERVAL_S:
            # What is pending goes in this line, not in another one a moment later.
            self._log(kind, summed=self._pending[kind] > 1)
        elif self._flush is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next add() reports
                self._flush = asyncio.get_running_loop().call_later(TALLY_INTERVAL_S, self.report)

    def report(self) -> None:
        """Logs one line per kind counted since its last line."""
        self._flush = None
        for kind in list(self._pending):
            self._log(kind, summed=True)

    def _log(self, kind: str, summed: bool) -> None:
        self._last_line[kind] = time.monotonic()
        line = f"{kind} (in the last {TALLY_INTERVAL_S:g} s)" if summed else kind
        self._logger.log(self._level, line, self._pending.pop(kind))


def repeat_filter(record: logging.LogRecord) -> bool:
    """A log filter that turns the libraries' line-per-event messages into a tally each (and drops them).

    - farm-ng-core's ``EventServiceGrpc`` warns ``dropped N sequence M path: P`` for every
      event it drops because a subscriber's queue is full: thousands of lines a second
      while a peer is slow or gone. Its counts stay in ``/health`` (``P/dropped``).
    - grpc.aio logs an ``ExecuteBatchError`` with a traceback when a stream's subscriber
      went away (its host vanished, say) while an event was being sent to it.
    """
    args = record.args
    if record.msg == "dropped %d sequence %d path: %s" and isinstance(args, tuple) and len(args) == 3:
        _tally(record.name, logging.WARNING).add(f"dropped %d events of {args[2]} for subscribers that do not keep up")
        return False
    if record.name.startswith("grpc") and str(record.msg).startswith(GRPC_SEND_FAILED):
        _tally("grpc", logging.INFO).add("%d subscription(s) ended: the subscriber went away while an event was sent")
        return False
    return True


@functools.lru_cache(maxsize=None)  # one per logger
def _tally(name: str, level: int) -> Tally:
    return Tally(logging.getLogger(name), level=level)


def read_back_core_log(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Reads what is written to stderr (file descriptor 2) back into the log, until undone.

    gRPC's C core logs to file descriptor 2 directly (``GRPC_VERBOSITY`` sets how much:
    ``startup`` sets errors only), not through Python's logging: a condition that
    lasts makes it write the same line once a second. Here each kind of core line (its
    text) goes to a ``Tally`` in ``loop``: its first occurrence at once, then a count per
    interval. A line of another form, or a fatal one, is written to the real stderr as it
    came. Python's ``sys.stderr`` is pointed at the real stderr first: its tracebacks and
    warnings do not wait for this thread, and reach the terminal even if the process
    then dies at once.

    Returns:
        What undoes it: file descriptor 2 is the real stderr again, and the reader stops
        once it has handed on the last lines (waiting ``CLOSE_WAIT_S`` at most).

    """
    if sys.__stderr__ is None:
        # Started without a stderr: file descriptor 2 may be any file opened since.
        return lambda: None
    real = os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = direct = os.fdopen(os.dup(real), "w", buffering=1, errors="backslashreplace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    tally = Tally(logging.getLogger("grpc"))

    def forward_core_lines() -> None:
        kinds: set[str] = set()
        with os.fdopen(read_end, "rb") as lines:
            for raw in lines:
                match = CORE_LINE.match(raw.decode(errors="replace").rstrip("\n"))
                if match is not None and match.group(1) != "F":
                    text = match.group(2)
                    if text not in kinds and len(kinds) >= MAX_CORE_KINDS:
                        text = "(another kind of line)"
                    kinds.add(text)
                    with contextlib.suppress(RuntimeError):  # the loop is closed: the service is on its way out
                        loop.call_soon_threadsafe(tally.add, "gRPC core, %d time(s): " + text.replace("%", "%%"))
                        continue
                with contextlib.suppress(OSError):  # not a core line, a fatal one, or no loop left: as it came
                    os.write(real, raw)

    reader = threading.Thread(target=forward_core_lines, daemon=True)
    reader.start()

    def undo() -> None:
        os.dup2(real, 2)  # the pipe's last writer is gone: the reader reads to the end
        reader.join(CLOSE_WAIT_S)
        sys.stderr = python_stderr
        with contextlib.suppress(OSError, ValueError):
            direct.close()
        if not reader.is_alive():
            os.close(real)

    return undo
