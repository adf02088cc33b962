"""Measures the services: agent rates, propagation latency, the relay ceiling, CPU, memory and stop times.

    python -m tools.bench             # one run of 5 s windows, about two and a half minutes
    python -m tools.bench --quick     # 1 s windows, under a minute: rougher figures
    python -m tools.bench --runs 3    # the median of three runs of every figure

What it measures and how to read its table: docs/benchmark.md. Each step runs a system of
its own (``tools.bench_system``) and fills ``Row`` objects of the ``Table``; ``plan`` lists the steps.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

# This process talks gRPC and forks the services: gRPC's fork handlers, with its threads busy, can abort
# a process ("Check failed" in thd.h); the children exec at once and need none. Read at gRPC's import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import psutil

from propagation.config import ConfigError, read_config, role_of
from tools import processes
from tools.bench_system import BENCH_CLIENT, BenchError, Service, System, Window, floor, measure

# A supervisor's args in each column: the default design, then one at a time (one sample a call).
RELAY_DESIGN = {8: ("max_in_flight=8",), 1: ("max_in_flight=1", "max_batch=1")}
IN_FLIGHT = tuple(RELAY_DESIGN)
RATE_STEPS = ((10, 1), (100, 1), (1000, 1), (100, 10))  # (rate, num_tasks) of the agent-rate rows
DEFAULT_AGENTS = ("agent-1", "agent-2", "agent-3")  # service_config.json's
LATENCY_RATES = (200, 500, 1000)  # agent-3's rate in the default config for the latency rows (it is 100 there)
UNSTORED_RATE = 1000  # agent-3's rate for the row of samples not stored
# The offered load (samples/s from one agent task) while looking for the relay ceiling.
CEILING_RATES = (250, 500, 1000, 2000, 4000)
# The agent-rate rows that need a step of their own: the others are ceiling steps.
OWN_RATE_STEPS = tuple((rate, tasks) for rate, tasks in RATE_STEPS if tasks > 1 or rate not in CEILING_RATES)
# The relay rate at which CPU per relayed sample is measured, at WARNING and at INFO.
CPU_RATE = 500
CPU_LOG_LEVELS = ("WARNING", "INFO")
# Enough room that storage never refuses in a benchmark, and still an int32 residual.
UNBOUNDED_STORAGE = 1_000_000_000
DEFAULT_WINDOW_S = 5.0
QUICK_WINDOW_S = 1.0
RELAY_AGENT, RELAY_SUPERVISOR = "agent-1", "supervisor-1"
RELAY_NAMES = (RELAY_AGENT, RELAY_SUPERVISOR, "storage")
# Above this many cores' worth of CPU used by processes other than the benchmark and its
# services, the figures were shared with other work (a shell, a logger: a few hundredths).
OTHERS_CPU_LIMIT = 0.1


@dataclasses.dataclass
class Row:
    """One row of the table: a label, one format for all its numbers (``"{:.1f} / {:.1f}"``), each run's numbers.

    ``better`` says, for each number, whether lower (``<``) or higher (``>``) is better, or
    neither (``.``, an offered load). A row without ``better`` has one column only.
    """

    label: str
    form: str
    better: str = ""
    runs: dict[int, list[tuple[float, ...]]] = dataclasses.field(default_factory=dict)

    def add(self, in_flight: int, *numbers: float) -> None:
        """Keeps one run's numbers for the column of ``in_flight``."""
        self.runs.setdefault(in_flight, []).append(tuple(numbers))

    def median(self, in_flight: int) -> tuple[float, ...] | None:
        """Each number's median over the runs; None if none measured it."""
        return tuple(map(statistics.median, zip(*self.runs[in_flight]))) if in_flight in self.runs else None

    def cells(self) -> list[str]:
        """Its cells: the default design's numbers, then (if it has them) one at a time's, and how much better."""
        mine, theirs = (self.median(in_flight) for in_flight in IN_FLIGHT)
        ratios = [times_better(kind, own, other) for kind, own, other in zip(self.better, mine or (), theirs or ())]
        return [shown(self.form, mine), shown(self.form, theirs), " / ".join(ratios) if mine and theirs else ""]


def shown(form: str, numbers: tuple[float, ...] | None) -> str:
    """Numbers in a row's format; empty if there are none, ``-`` for one not measured."""
    return "" if numbers is None else form.format(*numbers).replace("nan", "-").replace("inf", "killed")


def times_better(kind: str, own: float, other: float) -> str:
    """How many times better ``own`` is than ``other``: ``x2.00``, ``x>100`` (0 against some); else (or ``.``) ``-``."""
    above, below = (other, own) if kind == "<" else (own, other)
    if kind == "." or not (0 <= above < math.inf and 0 <= below < math.inf) or above == below == 0:
        return "-"
    return "x>100" if above > 100 * below else f"x{above / below:.2f}"


class Table:
    """Every row, in the order made, each filled by the steps that measure it."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        latency, two, three = "latency ms p50 / p90 / p99", "{:.2f} / {:.2f} / {:.2f}", "{:.0f} / {:.0f} / {:.0f}"
        each = "agent / supervisor / storage"
        self.rates: dict[tuple[int, int], Row] = {}
        for rate, count in RATE_STEPS:
            label = f"agent rate, achieved/configured: {rate:g} Hz x {count} task{'s' if count > 1 else ''}"
            self.rates[rate, count] = self.row(label, "{:.3f} ±{:.3f}")
        rate, count = next(step for step in RATE_STEPS if step[1] > 1)
        self.duplicates = self.row(
            f"duplicate sequence numbers on /sample, {rate:g} Hz x {count} tasks: duplicates / received",
            "{:.0f} / {:.0f}",
        )
        # By agent at the default config, or by agent-3's rate.
        places: dict[str | int, str] = {agent: f"default config, {agent}" for agent in DEFAULT_AGENTS}
        places.update({rate: f"agent-3 at {rate:g} Hz" for rate in LATENCY_RATES})
        self.latency = {key: self.row(f"{latency}, {place}", two, "<<<") for key, place in places.items()}
        self.unstored = self.row(
            f"agent-3 at {UNSTORED_RATE} Hz: unstored/s (dropped + not stored + refused + agent queue) / relayable/s",
            "{:.0f} / {:.0f}",
            "<.",
        )
        self.relay = {
            rate: self.row(f"relay at {rate:g}/s offered: published / stored / lost per s", three, ".><")
            for rate in CEILING_RATES
        }
        self.ceiling = self.row("relay ceiling: best stored/s over the steps", "{:.0f}", ">")
        cpu = f"CPU s per 1000 relayed at {CPU_RATE}/s, {{}}: {each}"
        self.cpu = {level: self.row(cpu.format(level), "{:.3f} / {:.3f} / {:.3f}", "<<<") for level in CPU_LOG_LEVELS}
        self.floor = self.row(
            "floor, CPU ms: one bare farm-ng-core requestReply (client + server) / one subscribed event (both ends)",
            "{:.3f} / {:.3f}",
        )
        self.in_floors = self.row(
            f"CPU per relay at {CPU_RATE}/s, WARNING, in floors: {each} / all",
            "{:.2f} / {:.2f} / {:.2f} / {:.2f}",
            "<<<<",
        )
        self.rss = self.row(f"RSS MB after the ceiling steps: {each}", three, "<<<")
        self.stop = self.row(f"stop after SIGTERM, ms, slowest of every step's services: {each}", three)

    def row(self, label: str, form: str, better: str = "") -> Row:
        """A new row, after those made before."""
        self.rows.append(Row(label, form, better))
        return self.rows[-1]

    def lines(self) -> list[str]:
        """The rows as a markdown table."""
        many, one = (f"{in_flight} in flight" for in_flight in IN_FLIGHT)
        head = f"| figure | default ({many}, batches) | one at a time ({one}) | default is x better |"
        return [head, "|---|---|---|---|", *(f"| {row.label} | {' | '.join(row.cells())} |" for row in self.rows)]

    def finish_run(self, stopped: list[Service]) -> None:
        """The rows a run's other rows give: the ceiling, the CPU per relay in floors, the stop times."""
        for in_flight in IN_FLIGHT:
            self.ceiling.add(in_flight, max(row.runs[in_flight][-1][1] for row in self.relay.values()))
            call_ms, event_ms = self.floor.runs[IN_FLIGHT[0]][-1]
            cpu = self.cpu["WARNING"].runs[in_flight][-1]  # CPU s per 1000: ms per relay
            self.in_floors.add(in_flight, *(ms / (2 * call_ms + event_ms) for ms in (*cpu, sum(cpu))))
        slowest = (
            max((service.stopped_in for service in stopped if service.role == role), default=math.nan)
            for role in ("agent", "supervisor", "storage")
        )
        self.stop.add(IN_FLIGHT[0], *(1000 * seconds for seconds in slowest))


def default_entries(in_flight: int, agent_3_rate: float | None = None) -> list[dict[str, Any]]:
    """service_config.json's services as they are, with the supervisors' relay design set (and agent-3's rate)."""
    entries = []
    for entry in processes.start_order(read_config(str(processes.ROOT / "service_config.json"))):
        raw = dict(entry.raw)
        if role_of(entry) == "supervisor":
            kept = [arg for arg in entry.args if not arg.replace(" ", "").startswith("max_")]
            raw["args"] = [*kept, *RELAY_DESIGN[in_flight]]
        if entry.name == "agent-3" and agent_3_rate is not None:
            raw["args"] = [f"rate={agent_3_rate:g}", "num_tasks=1"]
        entries.append(raw)
    return entries


def relay_entries(loads: Sequence[tuple[int, int]], log_level: str, in_flight: int) -> list[dict[str, Any]]:
    """Storage that never fills; for each ``(rate, num_tasks)``, agent-N and supervisor-N relaying its every sample."""
    common = {"host": "localhost", "log_level": log_level}
    entries = [{"name": "storage", **common, "args": [f"max_storage={UNBOUNDED_STORAGE}", "batch_size=1"]}]
    for number, (rate, tasks) in enumerate(loads, 1):
        sample = {"uri": {"path": "/sample", "query": f"service_name=agent-{number}"}, "every_n": 1}
        relaying = ["confidence=0", *RELAY_DESIGN[in_flight]]
        entries.append({"name": f"supervisor-{number}", **common, "args": relaying, "subscriptions": [sample]})
        entries.append({"name": f"agent-{number}", **common, "args": [f"rate={rate:g}", f"num_tasks={tasks}"]})
    return entries


@dataclasses.dataclass(frozen=True)
class Step:
    """One measurement: what it is, the config it runs, and what it makes of the window."""

    what: str
    entries: list[dict[str, Any]]
    fill: Callable[[Window], None]
    counted: str | None = None  # an agent whose /sample sequence numbers go to the duplicates row


def plan(table: Table, quick: bool = False) -> list[Step]:
    """Every step of one run, filling ``table``: a row's two columns one right after the other.

    With ``quick``, the agent-rate steps run side by side as one step.
    """

    def latency(window: Window, in_flight: int, rate: int | None) -> None:
        for agent in DEFAULT_AGENTS if rate is None else ("agent-3",):
            latencies = (window.figure(agent, f"latency_p{p}_ms") for p in (50, 90, 99))  # over its last 5 s
            table.latency[agent if rate is None else rate].add(in_flight, *latencies)
        if rate == UNSTORED_RATE:
            table.unstored.add(in_flight, *unstored(window, "supervisor-2", "agent-3"))

    def agent_rates(loads: Sequence[tuple[int, int]], window: Window) -> None:
        for number, (rate, tasks) in enumerate(loads, 1):
            # Samples/s over the configured rate, and its resolution: one whole sample in the window.
            achieved = window.per_second(f"agent-{number}", "published") / (rate * tasks)
            table.rates[rate, tasks].add(IN_FLIGHT[0], achieved, 1 / (rate * tasks * window.seconds()))

    def relay(window: Window, in_flight: int, rate: int, level: str) -> None:
        stored = window.per_second(RELAY_SUPERVISOR, "stored")
        if rate == CPU_RATE:  # each process's CPU s per 1000 samples stored
            cpu = (1000 * window.cpu_share(name) / stored if stored else math.nan for name in RELAY_NAMES)
            table.cpu[level].add(in_flight, *cpu)
        if level == "INFO":  # a step for its CPU row only
            return
        if (rate, 1) in table.rates and in_flight == IN_FLIGHT[0]:
            agent_rates([(rate, 1)], window)
        lost, _ = unstored(window, RELAY_SUPERVISOR, RELAY_AGENT)
        table.relay[rate].add(in_flight, window.per_second(RELAY_AGENT, "published"), stored, lost)
        if rate == CEILING_RATES[-1]:
            table.rss.add(in_flight, *(window.end(name).rss_bytes / 2**20 for name in RELAY_NAMES))

    steps = []
    for rate in (None, *LATENCY_RATES):
        what = "default config" if rate is None else f"default config, agent-3 at {rate:g} Hz"
        steps += both(what, partial(default_entries, agent_3_rate=rate), partial(latency, rate=rate))
    for loads in [OWN_RATE_STEPS] if quick else [[load] for load in OWN_RATE_STEPS]:
        rates = ", ".join(f"{rate:g} Hz x {tasks}" for rate, tasks in loads)
        counted = next((f"agent-{number}" for number, (_, tasks) in enumerate(loads, 1) if tasks > 1), None)
        what = f"agents at {rates}, side by side" if quick else f"agent at {rates}"
        steps.append(Step(what, relay_entries(loads, "WARNING", IN_FLIGHT[0]), partial(agent_rates, loads), counted))
    for rate, level in [*((rate, "WARNING") for rate in CEILING_RATES), (CPU_RATE, "INFO")]:
        what = f"relay at {rate:g}/s{' at INFO' if level == 'INFO' else ''}"
        steps += both(what, partial(relay_entries, [(rate, 1)], level), partial(relay, rate=rate, level=level))
    return steps


def both(what: str, entries: Callable[[int], list[dict[str, Any]]], fill: Callable[..., None]) -> list[Step]:
    """A step for each column: the config of each ``in_flight`` of ``IN_FLIGHT``, filling its column."""
    return [Step(f"{what}, max_in_flight={n}", entries(n), partial(fill, in_flight=n)) for n in IN_FLIGHT]


def unstored(window: Window, supervisor: str, agent: str) -> tuple[float, float]:
    """Samples above confidence not stored per s (by the supervisor, or dropped by the agent's server), and all."""
    lost = window.per_second(supervisor, "dropped", "not_stored", "unconfirmed", "refused")
    queue_lost = window.health_per_second(agent, "/sample/dropped")
    relayable = window.per_second(supervisor, "received") - window.per_second(supervisor, "below_confidence")
    return lost + queue_lost, relayable + queue_lost


async def run_once(table: Table, steps: list[Step], directory: Path, window_s: float, jobs: int) -> None:
    """One run into ``table``: the floor, then the steps, each on a system of its own, ``jobs`` at a time."""
    slots = asyncio.Semaphore(jobs)  # 1, but for the test suite's quick check
    ports: set[int] = set()
    stopping: list[asyncio.Future[list[Service]]] = []  # each step's services, stopped: with how long it took

    async def run(step: Step, number: int) -> None:
        # One step when a slot is free, saying which (on stderr: the table is on stdout).
        async with slots:
            print(f"[{number}/{len(steps)}] {step.what}", file=sys.stderr, flush=True)
            system = System(directory / f"step-{number}.json", step.entries, ports)
            sequences: list[int] = []
            counting = None
            try:
                await system.start()
                # The last step's services stopped while these started: none is left when the window opens.
                await finish_stopping()
                if step.counted:
                    counting = asyncio.ensure_future(system.services[step.counted].read_sequences(sequences))
                window = await measure(system, window_s)
            finally:
                if counting is not None:
                    counting.cancel()
                    await asyncio.gather(counting, return_exceptions=True)
                stopping.append(asyncio.ensure_future(system.stop()))
            step.fill(window)
            if counting is not None:
                table.duplicates.add(IN_FLIGHT[0], len(sequences) - len(set(sequences)), len(sequences))

    async def finish_stopping() -> None:
        # wait(), not gather(): cancelling the caller must not cancel the stops. More may begin meanwhile.
        while not all(stop.done() for stop in stopping):
            await asyncio.wait(stopping)

    print(f"[0/{len(steps)}] floor: a bare farm-ng-core call and event", file=sys.stderr, flush=True)
    table.floor.add(IN_FLIGHT[0], *await floor(window_s))
    running = [asyncio.ensure_future(run(step, number)) for number, step in enumerate(steps, 1)]
    try:
        await asyncio.gather(*running)
    finally:
        for task in running:  # after a failure, the others end too
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await finish_stopping()
    table.finish_run([service for stop in stopping for service in stop.result()])


def cpu_times() -> tuple[float, float, float]:
    """Now, the machine's busy CPU s, and this process's with its children's (a service counts once waited for)."""
    machine, ours = psutil.cpu_times(), psutil.Process().cpu_times()
    # On Linux, user already holds guest: not summed twice.
    busy = machine.user + machine.system + sum(getattr(machine, name, 0.0) for name in ("nice", "irq", "softirq"))
    return time.monotonic(), busy, ours.user + ours.system + ours.children_user + ours.children_system


def notes(table: Table, runs: int, window_s: float, jobs: int, quick: bool, others_cpu: float) -> list[str]:
    """How the figures were measured and how to read them; and checks of the run itself."""
    loads = ", ".join(f"{rate:g} Hz x {tasks}" for rate, tasks in OWN_RATE_STEPS)
    side_by_side = f"  --quick: the agent-rate rows of {loads} ran side by side, each with its own supervisor."
    lines = [
        f"machine: {os.cpu_count()} cores, {platform.system()} {platform.machine()};"
        f" other processes used {others_cpu:.2f} of them on average while it ran",
        f"python {platform.python_version()}, grpcio {grpc.__version__},"
        f" farm-ng-core {version('farm-ng-core')}, protobuf {version('protobuf')}",
        f"{runs} run(s), medians shown; each step's figures over one interval of about {window_s:g} s, the same for",
        "  all its services (each counter read between its service's /stats, once a second, around the ends).",
        "default is x better: above x1 the default does better than one at a time (lower latency, CPU, memory,",
        "  losses; more stored); x>100: none against some; '-': an offered load, or 0 on both sides.",
        "Agent rates: ±, one sample in the window: 10 Hz over 1 s is 10 samples give or take one, not a slow agent.",
        "Agent rates, relay steps, ceiling, CPU, RSS: one agent task -> one supervisor (confidence=0) -> storage",
        "  that never fills, every service at log_level WARNING (the INFO row: the same at INFO, output to a pipe).",
        *[side_by_side] * quick,
        "Relay rows: published - stored - lost is how much the backlog grew over the interval: stored/s a little",
        "  above published/s is a backlog drained; far below it with few lost, one building up (the supervisor lags).",
        "Latency: service_config.json as it is (log_level INFO): agent publish -> residual back at the agent;",
        "  unstored: dropped, not stored or unconfirmed, or refused by the supervisor, or dropped by the agent.",
        "Floor: the CPU of a bare farm-ng-core call and event, both ends, in this process, in the same run; in floors:",
        "  each process's CPU per relay over 2 calls + 1 event, the least a relay takes with farm-ng-core.",
    ]
    checks = [f"{jobs} steps ran at once: these figures are not measurements"] * (jobs > 1)
    if others_cpu > OTHERS_CPU_LIMIT:
        checks.append(f"other processes used {others_cpu:.2f} cores on average: they shared the CPU")
    for (rate, tasks), row in table.rates.items():
        ratio, resolution = row.median(IN_FLIGHT[0]) or (math.nan, 0.0)
        if not abs(ratio - 1) <= 2 * resolution + 0.02:
            checks.append(f"agent at {rate:g} Hz x {tasks} published {ratio:.3f} of its rate: it could not keep up")
    return lines + [f"check: {line}" for line in checks]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench", description="Benchmark the services: rates, latency, relay ceiling, CPU, RSS."
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_WINDOW_S:g} s windows instead of 5 s")
    parser.add_argument("--runs", type=int, default=1, help="runs; the table shows each figure's median")
    # For the test suite: the length of each window, in seconds, and how many steps
    # run at once (their figures then mean nothing).
    parser.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    return parser


async def run_bench(cli: argparse.Namespace) -> int:
    """Runs the benchmark and prints the table, then the notes; Ctrl-C or SIGTERM cancels it, and its services stop."""
    loop, bench = asyncio.get_running_loop(), asyncio.current_task()

    def interrupt() -> None:
        # Once only: a second Ctrl-C must not cut short the stopping of the services.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: None)
        bench.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    window_s = cli.seconds or (QUICK_WINDOW_S if cli.quick else DEFAULT_WINDOW_S)
    started, cpu_at_start = time.monotonic(), cpu_times()
    print(f"tools.bench: {cli.runs} run(s) of {window_s:g} s windows{' (--quick)' if cli.quick else ''}", flush=True)
    table = Table()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as directory:
            for index in range(cli.runs):
                await run_once(table, plan(table, cli.quick), Path(directory), window_s, cli.jobs)
                done = time.monotonic() - started
                print(f"run {index + 1}/{cli.runs} done after {done:.0f} s", file=sys.stderr, flush=True)
    except asyncio.CancelledError:
        print("interrupted; services stopped", file=sys.stderr)
        return 130
    print("", *table.lines(), "", sep="\n")
    # In cores: the CPU of the processes other than this one and its services.
    wall, busy, ours = (after - before for after, before in zip(cpu_times(), cpu_at_start))
    others_cpu = max(0.0, busy - ours) / wall if wall > 0 else 0.0
    bench_cpu = sum(psutil.Process().cpu_times()[:2])
    print(f"took {time.monotonic() - started:.0f} s; the benchmark itself used {bench_cpu:.1f} CPU s")
    print(*notes(table, cli.runs, window_s, cli.jobs, cli.quick, others_cpu), sep="\n", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the benchmark."""
    parser = build_parser()
    cli = parser.parse_args(argv)
    if cli.runs < 1 or cli.jobs < 1 or (cli.seconds is not None and cli.seconds <= 0):
        parser.error("--runs and --jobs must be at least 1, --seconds positive")
    # The clients' "peer is up" lines are noise here; outages still show.
    logging.getLogger(BENCH_CLIENT).setLevel(logging.WARNING)
    try:
        return asyncio.run(run_bench(cli))
    except (BenchError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the loop took over signals
        return 130


if __name__ == "__main__":
    sys.exit(main())
