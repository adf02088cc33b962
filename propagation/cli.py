"""Every service's command line: one line for bad input, a quiet Ctrl-C, an exit code.

python agent.py --service-config service_config.json --service-name agent-1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from typing import TYPE_CHECKING, Awaitable, Callable, Generic, NoReturn, Sequence

from propagation.args import ArgsT, parse_args
from propagation.config import ConfigError, Entry, check_entry, find_entry, read_config, script_role

if TYPE_CHECKING:
    from farm_ng.core.event_service_pb2 import EventServiceConfig

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a terminal that closed


@dataclasses.dataclass(frozen=True)
class ServiceSpec(Generic[ArgsT]):
    """What the command line named, checked: the entry, its args and the whole config."""

    entry: Entry
    entries: tuple[Entry, ...]
    args: ArgsT

    @property
    def config(self) -> EventServiceConfig:
        """The entry of the service to run, as farm-ng-core's ``EventServiceConfig``."""
        return self.entry.service_config()

    def config_of(self, name: str) -> EventServiceConfig:
        """The entry called ``name`` as an ``EventServiceConfig`` (for a peer's client)."""
        return find_entry(self.entries, name).service_config()


def load(
    description: str,
    args_type: type[ArgsT],
    argv: Sequence[str] | None = None,
    script: str | None = None,
) -> ServiceSpec[ArgsT]:
    """Parses the command line, reads the config, checks the entry and its args.

    The entry is checked as the role that ``script`` runs (the running script unless
    given: ``agent.py`` runs agents), whatever its name.

    Raises:
        ConfigError: naming the file, service, arg or value at fault.
        SystemExit: the command line itself is wrong (argparse's usage line, exit 2).

    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--service-config", required=True, help="the EventServiceConfigList JSON file")
    parser.add_argument("--service-name", required=True, help="which entry of the config to run")
    cli = parser.parse_args(argv)
    entries = read_config(cli.service_config)
    entry = find_entry(entries, cli.service_name, cli.service_config)
    check_entry(entry, entries, script_role(sys.argv[0] if script is None else script))
    return ServiceSpec(entry, tuple(entries), parse_args(entry, args_type))


def run(
    doc: str | None,
    args_type: type[ArgsT],
    main: Callable[[ServiceSpec[ArgsT]], Awaitable[int | None]],
    argv: Sequence[str] | None = None,
) -> NoReturn:
    """Runs a service: loads its spec, sets up logging, runs ``main`` in an event loop, exits.

    ``doc`` is the script's docstring, whose first line is ``--help``'s description. The exit
    code is what ``main`` returns (0 for None), 1 for bad input. The process ends with
    ``os._exit`` once its last lines are written: the interpreter's own exit would put back
    the default signal handlers, then wait for gRPC's threads (on Python 3.8 and 3.9 a second
    SIGTERM meanwhile killed the process; gRPC's poller could hold the exit for seconds).
    """

    def body() -> int:
        from propagation.logs import configure_logging  # noqa: PLC0415 (after the checks)

        spec = load((doc or "").strip().split("\n")[0], args_type, argv)
        output = configure_logging(spec.entry.log_level)
        try:
            return asyncio.run(main(spec)) or 0  # type: ignore[arg-type]
        finally:
            # asyncio.run put back the default handlers: a second SIGTERM while the last
            # lines are written must not kill the process (-15) either.
            quiet_signals()
            output.close()

    code = run_cli(body)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a closed or broken stdout
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run_cli(body: Callable[[], int | None]) -> int:
    """Runs a script's body; returns its exit code: 1 with one ``error: ...`` line for a ``ConfigError``.

    Ctrl-C at any moment ends quietly with 0, a second or third one too.
    """
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _exit_quietly)
    try:
        return body() or 0
    except ConfigError as exc:
        # A closed stderr or a broken pipe: the exit code still says it.
        with contextlib.suppress(OSError, AttributeError):
            print("error:", " ".join(str(exc).split()), file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # asyncio restores the default handlers on its way out: a Ctrl-C while the
        # interpreter shuts down must not print a traceback either.
        quiet_signals()


def quiet_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the process at once, quietly, with code 0, from now on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_quietly)


def _exit_quietly(signum: int, _frame: object) -> None:
    # Before the service has a port or a file open there is nothing to clean up;
    # os._exit also skips the flush of a stdout that may be a broken pipe.
    os._exit(0)
