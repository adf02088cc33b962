"""Peers played by the test process, written from the example's original contract.

They use farm-ng-core as farm-ng's own example scripts do: plain ``EventServiceGrpc``
and ``EventClient``, no extra paths or timestamps. Our scripts must work beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import parse_qs

import grpc
from farm_ng.core.event_client import EventClient
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import EventServiceConfigList
from farm_ng.core.events_file_reader import proto_from_json_file
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value
from helpers import service_config


class PlainService:
    """An ``EventServiceGrpc`` on its config entry's port, started and stopped by the test."""

    def __init__(self, config: Path, name: str) -> None:
        self.service = EventServiceGrpc(grpc.aio.server(), service_config(config, name))
        self.service.add_request_reply_handler(self.on_request)

    async def on_request(self, event: Event, message: Message) -> Message:
        return Empty()

    async def __aenter__(self) -> PlainService:
        config = self.service.config
        self.service.server.add_insecure_port(f"{config.host}:{config.port}")
        await self.service.server.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.service.server.stop(0)


class PlainAgent(PlainService):
    """Publishes chosen samples on ``/sample``; records the residuals it is sent."""

    def __init__(self, config: Path, name: str) -> None:
        super().__init__(config, name)
        self.residuals: list[tuple[Event, Int32Value]] = []

    async def on_request(self, event: Event, message: Message) -> Message:
        if event.uri.path == "/update_residual" and isinstance(message, Int32Value):
            self.residuals.append((event, message))
        return Empty()

    async def publish(self, values: list[float]) -> dict[float, float]:
        """Publishes once a subscriber listens; returns each sample's send stamp -> value."""
        while (await self.service.publish("/sample", sample(0.0))).number_clients == 0:
            await asyncio.sleep(0.05)  # readiness-free: polls the subscriber count; callers bound the wait
        sent = {}
        for value in values:
            await self.service.publish("/sample", sample(value))
            sent[self.service.metrics.stamps_buffer["/sample"][-1]] = value
        return sent


class PlainStorage(PlainService):
    """Counts stores and replies the residual; no ``/residual``, no stamps, no cap."""

    def __init__(self, config: Path, name: str, max_storage: int) -> None:
        super().__init__(config, name)
        self.max_storage = max_storage
        self.count = 0

    async def on_request(self, event: Event, message: Message) -> Message:
        if event.uri.path == "/update_storage":
            self.count += 1
            return Int32Value(value=self.max_storage - self.count)
        return Empty()


def sample(value: float) -> Struct:
    """A sample as agents publish it."""
    message = Struct()
    message.update({"sample": value, "task_id": 0})
    return message


async def plain_supervisor(config: Path, name: str, confidence: float) -> None:
    """A supervisor as the original contract describes it, until cancelled.

    An ``EventClient`` for every other entry, a subscription per entry of its own
    ``subscriptions``; each sample above confidence is stored and the decoded residual
    sent to the agent that published it.
    """
    config_list: EventServiceConfigList = proto_from_json_file(config, EventServiceConfigList())
    clients = {entry.name: EventClient(entry) for entry in config_list.configs if entry.name != name}

    async def relay(subscription: object) -> None:
        agent = clients[parse_qs(subscription.uri.query)["service_name"][0]]  # type: ignore[attr-defined]
        async for _, message in agent.subscribe(subscription, decode=True):  # type: ignore[arg-type]
            if message["sample"] > confidence:
                residual = await clients["storage"].request_reply("/update_storage", Empty(), decode=True)
                await agent.request_reply("/update_residual", residual)

    own = next(entry for entry in config_list.configs if entry.name == name)
    await asyncio.gather(*(relay(subscription) for subscription in own.subscriptions))


class SlowAgent(PlainService):
    """An agent that publishes samples above any confidence and answers ``/update_residual``
    late (after ``answer_after`` seconds) or never (None)."""

    def __init__(self, config: Path, name: str, answer_after: float | None) -> None:
        super().__init__(config, name)
        self.answer_after = answer_after

    async def on_request(self, event: Event, message: Message) -> Message:
        if self.answer_after is None:
            await asyncio.Event().wait()  # never
        await asyncio.sleep(self.answer_after)  # readiness-free: the slowness itself
        return Empty()

    async def publish_until(self, stop: threading.Event, rate: float) -> None:
        while not stop.is_set():
            await self.service.publish("/sample", sample(0.99))
            await asyncio.sleep(1 / rate)  # readiness-free: its publish rate


class FloodingStorage(PlainStorage):
    """A storage that publishes ``/residual`` at about ``rate`` a second, in bursts."""

    async def publish_until(self, stop: threading.Event, rate: float) -> None:
        residual = Int32Value(value=5)
        while not stop.is_set():
            for _ in range(int(rate / 100)):
                await self.service.publish("/residual", residual)
            await asyncio.sleep(0.01)  # readiness-free: its publish rate


@contextlib.contextmanager
def in_a_thread(serve: Callable[[threading.Event], Awaitable[None]]) -> Iterator[None]:
    """Runs ``serve(stop)`` in an event loop of its own, in a thread, until the block ends and sets ``stop``."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(serve(stop))
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors


def serving_in_thread(fake: Callable[[], PlainService], rate: float) -> contextlib.AbstractContextManager[None]:
    """Serves ``fake()`` in a thread of its own, publishing at ``rate``, until the block ends."""

    async def serve(stop: threading.Event) -> None:
        async with fake() as service:
            await service.publish_until(stop, rate)  # type: ignore[attr-defined]

    return in_a_thread(serve)


def publishing_stats(config: Path, figures: dict[str, dict[str, Any]]) -> contextlib.AbstractContextManager[None]:
    """Serves each service named in ``figures`` on its port of ``config``, publishing those figures on ``/stats``.

    What a stranger can publish: figures that are not what the example's services put
    there (NaN, strings, infinity, a number for a list). Latched, five times a second,
    from a thread of its own until the block ends.
    """

    async def serve(stop: threading.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            services = [await stack.enter_async_context(PlainService(config, name)) for name in figures]
            while not stop.is_set():
                for plain, values in zip(services, figures.values()):
                    message = Struct()
                    message.update(values)
                    await plain.service.publish("/stats", message, latch=True)
                await asyncio.sleep(0.2)  # readiness-free: its publish period

    return in_a_thread(serve)
