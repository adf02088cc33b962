"""What a server refuses before farm-ng-core sees it: requests and subscriptions off the contract.

``EventServiceGrpc`` answers whatever arrives: it decodes a request by the type its URI
names (importing the module the sender chooses), keeps a queue for every path anyone
subscribes to (forever), and serves any number of subscribers. ``PathGuard`` is a gRPC
server interceptor (grpc's public mechanism) that lets through only:

- a request/reply on a path the role serves, naming and carrying that path's message;
- a subscription to a path the role publishes (or ``*``), while fewer than
  ``MAX_SUBSCRIBERS`` are open.

Anything else ends with a gRPC status that says why (``UNIMPLEMENTED``,
``INVALID_ARGUMENT``, ``NOT_FOUND``, ``RESOURCE_EXHAUSTED``), is counted in ``/health``
and ``/stats``, and is logged once per interval, not once per request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import grpc
from farm_ng.core.event_service_metrics import EventServiceHealthMetrics

from propagation.logs import Tally
from propagation.wire import Contract, WrongMessage, decode, shown

if TYPE_CHECKING:
    from farm_ng.core.event_service_pb2 import RequestReplyRequest, SubscribeRequest

__all__ = ["MAX_SUBSCRIBERS", "REFUSED_REQUESTS", "REFUSED_SUBSCRIPTIONS", "SUBSCRIBERS", "PathGuard"]

# Open subscriptions a service serves at once: its supervisors, a monitor, a recorder, a
# few watchers. Each costs a queue and a copy of every event.
MAX_SUBSCRIBERS = 32
REQUEST_REPLY = "/farm_ng.core.proto.EventService/requestReply"
SUBSCRIBE = "/farm_ng.core.proto.EventService/subscribe"
# The counters, in farm-ng-core's health metrics (/health) and in /stats.
REFUSED_REQUESTS = "refused_requests"
REFUSED_SUBSCRIPTIONS = "refused_subscriptions"
SUBSCRIBERS = "subscribers"


class PathGuard(grpc.aio.ServerInterceptor):
    """Refuses requests and subscriptions that the role's contract does not name."""

    def __init__(self, contract: Contract) -> None:
        """Guards a server of a role that serves ``contract``."""
        self._contract = contract
        self._metrics = EventServiceHealthMetrics()
        self._tally = Tally(logging.getLogger("guard"))
        self._subscribers = 0
        for key in (REFUSED_REQUESTS, REFUSED_SUBSCRIPTIONS, SUBSCRIBERS):
            self._metrics.update_data(key, 0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wraps the handlers of ``requestReply`` and ``subscribe`` in the checks."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None:
            return handler
        if method == REQUEST_REPLY:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_request(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if method == SUBSCRIBE:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_subscription(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _guard_request(self, serve: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: RequestReplyRequest, context: grpc.aio.ServicerContext) -> Any:
            path = request.event.uri.path
            if path not in self._contract.requests:
                await self._refuse(
                    context,
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"no request/reply path {shown(path)} here",
                    "refused %d request(s) to paths this service does not serve",
                )
            try:
                decode(request.event, request.payload, self._contract.requests[path])
            except WrongMessage as exc:
                await self._refuse(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    str(exc)[:200],
                    f"refused %d request(s) on {path} without a valid {self._contract.requests[path].DESCRIPTOR.name}",
                )
            return await serve(request, context)

        return guarded

    def _guard_subscription(self, serve: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def guarded(request: SubscribeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            path = request.uri.path
            if path != "*" and path not in self._contract.publishes:
                await self._refuse(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"nothing is published on {shown(path)} here",
                    "refused %d subscription(s) to paths this service does not publish",
                    REFUSED_SUBSCRIPTIONS,
                )
            if self._subscribers >= MAX_SUBSCRIBERS:
                await self._refuse(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{MAX_SUBSCRIBERS} subscribers already",
                    f"refused %d subscription(s): {MAX_SUBSCRIBERS} subscribers already",
                    REFUSED_SUBSCRIPTIONS,
                )
            self._count_subscribers(+1)
            try:
                async for reply in serve(request, context):
                    yield reply
            finally:
                self._count_subscribers(-1)

        return guarded

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        why: str,
        kind: str,
        counter: str = REFUSED_REQUESTS,
    ) -> None:
        """Counts a refusal, tallies its kind (a fixed text: not one line per path) and aborts."""
        self._bump(counter)
        self._tally.add(kind)
        await context.abort(code, why)

    def _bump(self, key: str) -> None:
        self._metrics.update_data(key, int(self._metrics.get(key)) + 1)

    def _count_subscribers(self, change: int) -> None:
        self._subscribers += change
        self._metrics.update_data(SUBSCRIBERS, self._subscribers)
