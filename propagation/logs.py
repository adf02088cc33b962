"""Log lines: each once, through a queue, so that a stalled terminal never stops a service.

- ``configure_logging``: every record goes to a bounded queue; a thread writes the queue to
  stdout (the standard library's ``QueueHandler`` and ``QueueListener``). When the output
  stalls (``| less``, Ctrl-S, a full pipe) the queue fills and further lines are dropped
  and counted, never waited for; the count is printed when the output flows again. A
  closed stdout or a broken pipe silences the output and nothing else.
- ``Tally``: a problem that may repeat thousands of times a second (a refused request,
  an event dropped for a slow subscriber) logs its first occurrence, then one line per
  interval with the count.
- farm-ng-core's per-event ``dropped N sequence M path: P`` warnings, and grpc's
  traceback for a subscriber that went away mid-send, go to a tally each.
- ``read_back_core_log``: gRPC's C core writes its own lines straight to stderr, past
  Python's logging (``File descriptor limit reached. Retrying.`` once a second while a
  service is out of file descriptors); read back from stderr, each kind goes to a tally.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
# How often a repeating problem is summed up in one line.
TALLY_INTERVAL_S = 10.0
# farm-ng-core's EventServiceGrpc warns with this for every event a full subscriber
# queue drops.
FARM_NG_DROPPED = "dropped %d sequence %d path: %s"
# grpc.aio logs this, with a traceback, when a stream's receiver is gone mid-send.
GRPC_SEND_FAILED = "ExecuteBatchError raised in core by servicer method"
# A line of gRPC's C core (abseil's format): severity, date, time, thread, file:line, text.
# "E1204 17:00:23.220626   16190 posix_engine_listener.cc:164] File descriptor limit reached. Retrying."
CORE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+\] (.*)$")
# Kinds of core lines tallied apart; beyond that they share one count.
MAX_CORE_KINDS = 50


class LogOutput:
    """Where the log lines go: a writer thread behind a bounded queue."""

    def __init__(self, stream: IO[str] | None, lines: int = QUEUE_LINES) -> None:
        self._lock = threading.Lock()
        self._dropped = 0
        self._writer = _FileWriter(stream, self)
        self._queue: queue.Queue[logging.LogRecord] = queue.Queue(lines)
        self.handler = _DroppingQueueHandler(self._queue, self)
        self._listener = logging.handlers.QueueListener(self._queue, self._writer)
        self._listener.start()

    def write(self, line: str) -> None:
        """Queues one line as it is (no level prefix), never waiting."""
        self.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))

    def count_dropped(self) -> None:
        """Counts a line that found the queue full."""
        with self._lock:
            self._dropped += 1

    def take_dropped(self) -> int:
        """The lines dropped since the last call."""
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def close(self) -> None:
        """Writes what is queued, then stops the thread; waits ``CLOSE_WAIT_S`` at most.

        ``QueueListener.stop()`` waits for the thread without bound: with a stalled
        terminal that would be forever. It runs in a thread of its own here, and the
        writer is a daemon thread: the process may exit without it.
        """

        def stop() -> None:
            with contextlib.suppress(queue.Full):  # full: the stalled lines are dropped
                self._listener.stop()

        stopping = threading.Thread(target=stop, daemon=True)
        stopping.start()
        stopping.join(CLOSE_WAIT_S)


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Puts records on the queue without waiting; a full queue counts the line as dropped."""

    def __init__(self, lines: queue.Queue[logging.LogRecord], output: LogOutput) -> None:
        super().__init__(lines)
        self._output = output

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._output.count_dropped()


class _FileWriter(logging.Handler):
    """Writes each line to a file descriptor with ``os.write``; goes quiet for good if it is closed.

    ``os.write`` and no Python file object: a thread blocked on a stalled terminal then
    holds no lock that the interpreter needs to exit (a blocked ``sys.stdout`` would make
    the exit wait for it, or abort).
    """

    def __init__(self, stream: IO[str] | None, output: LogOutput) -> None:
        super().__init__()
        self.setFormatter(_LevelPrefixFormatter())
        self._output = output
        self._stream = stream  # kept open: the descriptor is its
        self._fd = _descriptor_of(stream)
        self._is_stdout = stream is sys.stdout

    def emit(self, record: logging.LogRecord) -> None:
        if self._fd is None:
            return
        dropped = self._output.take_dropped()
        text = self.format(record) + "\n"
        if dropped:
            text = f"WARNING: {dropped} log lines dropped while the output was blocked\n{text}"
        data = text.encode(errors="replace")
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            self._go_quiet(exc)

    def _go_quiet(self, exc: OSError) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._is_stdout and exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO):
            # Python flushes stdout once more at exit; to a broken pipe that prints an
            # "Exception ignored" message. Point stdout at /dev/null instead.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)


def _descriptor_of(stream: IO[str] | None) -> int | None:
    """The file descriptor under ``stream``; None if there is none (stdout closed at start)."""
    if stream is None:
        return None
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


class _LevelPrefixFormatter(logging.Formatter):
    """``message`` for INFO and below, ``WARNING: message`` above."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if record.levelno <= logging.INFO else f"{record.levelname}: {line}"


def configure_logging(level: int) -> LogOutput:
    """Sends every log line once to stdout, through a queue, at ``level`` (INFO if 0).

    Importing ``farm_ng.core.event_client`` runs ``logging.basicConfig`` and each
    ``EventServiceGrpc`` adds a stderr handler of its own (``serving`` removes that one):
    left alone every line would print twice. Here the root logger alone prints.

    Returns:
        The output, to ``close()`` on the way out.

    """
    output = LogOutput(sys.stdout)
    output.handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(output.handler)
    root.setLevel(level or logging.INFO)
    return output


class Tally:
    """Logs a repeating problem once, then once per interval with how many there were.

    ``add(kind)`` from the event loop; each kind is a message template of its own. A line
    for a kind is logged at once when it is new, then at most once per ``interval`` with
    the number since the last line.
    """

    def __init__(
        self, logger: logging.Logger, interval: float = TALLY_INTERVAL_S, level: int = logging.WARNING
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._level = level
        self._pending: dict[str, int] = {}
        self._last_line: dict[str, float] = {}
        self._flush: asyncio.TimerHandle | None = None

    def add(self, kind: str, count: int = 1) -> None:
        """Counts ``count`` occurrences of ``kind`` (a message like ``"refused %d requests on /x"``)."""
        now = time.monotonic()
        if now - self._last_line.get(kind, -self._interval) >= self._interval:
            self._last_line[kind] = now
            # What is pending goes in this line, not in another one a moment later.
            pending = self._pending.pop(kind, 0)
            line = f"{kind} (in the last {self._interval:g} s)" if pending else kind
            self._logger.log(self._level, line, count + pending)
            return
        self._pending[kind] = self._pending.get(kind, 0) + count
        if self._flush is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next add() reports
                loop = asyncio.get_running_loop()
                self._flush = loop.call_later(self._interval, self.report)

    def report(self) -> None:
        """Logs one line per kind counted since its last line."""
        self._flush = None
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        for kind, count in pending.items():
            self._last_line[kind] = now
            self._logger.log(self._level, f"{kind} (in the last {self._interval:g} s)", count)


class RepeatFilter(logging.Filter):
    """Turns the libraries' line-per-event messages into a tally each.

    - farm-ng-core's ``EventServiceGrpc`` logs ``dropped N sequence M path: P`` for every
      event it drops because a subscriber's queue is full: thousands of lines a second
      while a peer is slow or gone. Its counts stay in ``/health`` (``P/dropped``).
    - grpc.aio logs an ``ExecuteBatchError`` with a traceback when a stream's subscriber
      went away (its host vanished, say) while an event was being sent to it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tallies: dict[str, Tally] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Lets a record through, or tallies it and drops it."""
        if record.msg == FARM_NG_DROPPED and isinstance(record.args, tuple) and len(record.args) == 3:
            path = str(record.args[2])
            self._tally(record.name, logging.WARNING).add(
                f"dropped %d events of {path} for subscribers that do not keep up"
            )
            return False
        if record.name.startswith("grpc") and str(record.msg).startswith(GRPC_SEND_FAILED):
            self._tally("grpc", logging.INFO).add(
                "%d subscription(s) ended: the subscriber went away while an event was sent"
            )
            return False
        return True

    def _tally(self, name: str, level: int) -> Tally:
        if name not in self._tallies:
            self._tallies[name] = Tally(logging.getLogger(name), level=level)
        return self._tallies[name]


def read_back_core_log(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Reads what is written to stderr (file descriptor 2) back into the log, until undone.

    gRPC's C core logs to file descriptor 2 directly (``GRPC_VERBOSITY`` sets how much,
    ``cli.quiet_grpc_core`` errors only), not through Python's logging: a condition that
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
    reader = threading.Thread(target=_forward_core_lines, args=(read_end, real, loop, tally), daemon=True)
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


def _forward_core_lines(read_end: int, real: int, loop: asyncio.AbstractEventLoop, tally: Tally) -> None:
    kinds: set[str] = set()
    with os.fdopen(read_end, "rb") as lines:
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\n")
            match = CORE_LINE.match(line)
            if match is None or match.group(1) == "F":
                with contextlib.suppress(OSError):
                    os.write(real, raw)
                continue
            text = match.group(2)
            if text not in kinds and len(kinds) >= MAX_CORE_KINDS:
                text = "(another kind of line)"
            kinds.add(text)
            kind = "gRPC core, %d time(s): " + text.replace("%", "%%")
            try:
                loop.call_soon_threadsafe(tally.add, kind)
            except RuntimeError:  # the loop is closed: the service is on its way out
                with contextlib.suppress(OSError):
                    os.write(real, raw)
