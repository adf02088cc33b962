"""Calls a test makes to services of a config: requests, subscriptions, and hand-made requests."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from configs import service_config
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service_pb2 import RequestReplyRequest, SubscribeRequest
from farm_ng.core.event_service_pb2_grpc import EventServiceStub
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.message import Message

from propagation.network import grpc_address
from propagation.peers import PeerClient


@contextlib.asynccontextmanager
async def client(config: Path, name: str, timeout: float = 5.0) -> AsyncIterator[PeerClient]:
    """A client of the service ``name`` of ``config``, closed after."""
    peer = PeerClient(service_config(config, name), "test", timeout=timeout)
    try:
        yield peer
    finally:
        await peer.close()


def request(config: Path, name: str, path: str, message: Message, timestamps: list[Any] | None = None) -> Any:
    """Sends one request/reply to a service of ``config``; returns the raw reply."""

    async def call() -> Any:
        async with client(config, name) as peer:
            return await peer.request_reply(path, message, timestamps=timestamps)

    return asyncio.run(call())


def requests(config: Path, name: str, path: str, messages: list[Message]) -> list[Any]:
    """Sends requests to one service all at once; returns the replies, decoded."""

    async def call() -> list[Any]:
        async with client(config, name) as peer:
            return await asyncio.gather(*(peer.request_reply(path, message, decode=True) for message in messages))

    return asyncio.run(call())


def collect(config: Path, name: str, path: str, count: int, timeout: float = 10.0) -> list[tuple[Any, Any]]:
    """The first ``count`` (event, message) pairs a service publishes on ``path``."""

    async def read() -> list[tuple[Any, Any]]:
        request = SubscribeRequest(uri=Uri(path=path, query=f"service_name={name}"), every_n=1)
        received: list[tuple[Any, Any]] = []
        async with client(config, name) as peer:
            async for event, message in peer.subscribe(request, decode=True):
                received.append((event, message))
                if len(received) >= count:
                    break
        return received

    async def bounded() -> list[tuple[Any, Any]]:
        try:
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"{name} did not publish {count} events on {path} within {timeout} s")

    return asyncio.run(bounded())


def stats(config: Path, name: str, timeout: float = 10.0, fresh: int = 2) -> dict[str, Any]:
    """A service's ``/stats`` figures, the ``fresh``-th published after subscribing.

    The first is latched and may be up to a second old.
    """
    _, message = collect(config, name, "/stats", fresh, timeout)[-1]
    return dict(message)


def raw_request(config: Path, name: str, path: str, payload: bytes, query: str) -> tuple[str, str]:
    """Sends a hand-made request/reply (any URI query, any payload); returns (status code name, details).

    What a hostile peer on the network could send: no farm-ng-core client in between.
    """
    entry = service_config(config, name)
    uri = Uri(scheme="protobuf", authority="test", path=path, query=query)
    request = RequestReplyRequest(event=Event(uri=uri, payload_length=len(payload)), payload=payload)

    async def call() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(grpc_address(entry.host, entry.port)) as channel:
            try:
                await EventServiceStub(channel).requestReply(request, timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details() or ""
        return "OK", ""

    return asyncio.run(call())
