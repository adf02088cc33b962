"""``PathGuard``: what a server refuses before farm-ng-core sees it.

``EventServiceGrpc`` answers whatever arrives: it decodes a request by the type its URI
names (importing the module the sender chooses), keeps a queue for every path anyone
subscribes to (forever), and serves any number of subscribers, read or not. This gRPC
server interceptor (grpc's public mechanism) lets through only the requests and
subscriptions the role's contract names, carrying its messages, and subscribers within
their share of the slots (strangers never take a slot of the config's hosts). Anything else,
and a call of a method the service lacks, ends with a status that says why, counted in
``/health`` and ``/stats`` and logged once per interval.

A subscriber that stops reading keeps its slot, at a bounded cost (its queue, whose overflow
is dropped and counted, and one event waiting for HTTP/2 window). It is not ended: while an
event waits for window, gRPC can neither send the stream's status nor reset it, and the
subscriber would be left reading a silent stream that never closes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable

import grpc
from farm_ng.core.event_service_metrics import EventServiceHealthMetrics

from propagation.logs import Tally
from propagation.network import address_of_peer
from propagation.wire import Contract, WrongMessage, check_request, decode, shown

if TYPE_CHECKING:
    from farm_ng.core.event_service_pb2 import RequestReplyRequest, SubscribeRequest


# Open subscriptions a service serves at once from the hosts of its config: its
# supervisors, a monitor, a recorder, a few watchers. Each costs a queue and a copy of
# every event.
MAX_SUBSCRIBERS = 32
# From all other addresses together, and from each: a monitor or a watcher on a laptop, say; and any stranger.
STRANGER_SUBSCRIBERS = 16
STRANGER_SUBSCRIBERS_EACH = 4
REQUEST_REPLY = "/farm_ng.core.proto.EventService/requestReply"
SUBSCRIBE = "/farm_ng.core.proto.EventService/subscribe"
# The counters, in farm-ng-core's health metrics (/health) and in /stats.
REFUSED_REQUESTS = "refused_requests"
REFUSED_SUBSCRIPTIONS = "refused_subscriptions"
SUBSCRIBERS = "subscribers"
COUNTERS = (REFUSED_REQUESTS, REFUSED_SUBSCRIPTIONS, SUBSCRIBERS)
# This machine, whatever the config says: a process here can reach the service anyway.
LOOPBACK = frozenset({"127.0.0.1", "::1"})


class PathGuard(grpc.aio.ServerInterceptor):
    """Refuses calls that the role's contract does not name, and subscriptions beyond a fair share."""

    def __init__(self, contract: Contract, trusted: Iterable[str] = ()) -> None:
        """Guards a server of a role that serves ``contract``.

        Args:
            contract: What the role serves and publishes.
            trusted: The addresses of the hosts of the config's services (``addresses_of``);
                loopback is always among them.

        """
        self._contract = contract
        self._trusted = LOOPBACK | frozenset(trusted)
        self._metrics = EventServiceHealthMetrics()
        self._tally = Tally(logging.getLogger("guard"))
        self._trusted_subscribers = 0
        self._strangers: dict[str, int] = {}  # another address: its subscriptions open
        for key in COUNTERS:
            self._metrics.update_data(key, 0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wraps the handlers of ``requestReply`` and ``subscribe`` in the checks."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None:  # gRPC answers UNIMPLEMENTED
            self._count(REFUSED_REQUESTS, "refused %d call(s) of methods this service does not have")
            return handler
        if method == REQUEST_REPLY:
            wrap, guarded = grpc.unary_unary_rpc_method_handler, self._guard_request(handler.unary_unary)
        elif method == SUBSCRIBE:
            wrap, guarded = grpc.unary_stream_rpc_method_handler, self._guard_subscription(handler.unary_stream)
        else:
            return handler
        return wrap(
            guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def _guard_request(self, serve: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: RequestReplyRequest, context: grpc.aio.ServicerContext) -> Any:
            path = request.event.uri.path
            kind = self._contract.requests.get(path)
            if kind is None:
                self._count(REFUSED_REQUESTS, "refused %d request(s) to paths this service does not serve")
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no request/reply path {shown(path)} here")
            try:
                check_request(path, decode(request.event, request.payload, kind))
            except WrongMessage as exc:
                self._count(REFUSED_REQUESTS, f"refused %d request(s) on {path} without a valid {kind.DESCRIPTOR.name}")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:200])
            return await serve(request, context)

        return guarded

    def _guard_subscription(self, serve: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def guarded(request: SubscribeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            path = request.uri.path
            if path != "*" and path not in self._contract.publishes:
                self._count(REFUSED_SUBSCRIPTIONS, "refused %d subscription(s) to paths this service does not publish")
                await context.abort(grpc.StatusCode.NOT_FOUND, f"nothing is published on {shown(path)} here")
            address = address_of_peer(context.peer())
            if full := self._full(address):
                self._count(REFUSED_SUBSCRIPTIONS, f"refused %d subscription(s): {full}")
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, full)
            self._open(address, +1)
            try:
                async for reply in serve(request, context):
                    yield reply
            finally:
                self._open(address, -1)

        return guarded

    def _full(self, address: str) -> str | None:
        """Why a subscriber at ``address`` gets no slot now; None if it does."""
        if address in self._trusted:
            return f"{MAX_SUBSCRIBERS} subscribers already" if self._trusted_subscribers >= MAX_SUBSCRIBERS else None
        if sum(self._strangers.values()) >= STRANGER_SUBSCRIBERS:
            return f"{STRANGER_SUBSCRIBERS} subscribers from outside the config's hosts already"
        if self._strangers.get(address, 0) >= STRANGER_SUBSCRIBERS_EACH:
            return f"{STRANGER_SUBSCRIBERS_EACH} subscribers from one address outside the config's hosts already"
        return None

    def _open(self, address: str, change: int) -> None:
        if address in self._trusted:
            self._trusted_subscribers += change
        else:
            self._strangers[address] = self._strangers.get(address, 0) + change
            if not self._strangers[address]:
                del self._strangers[address]
        self._metrics.update_data(SUBSCRIBERS, self._trusted_subscribers + sum(self._strangers.values()))

    def _count(self, counter: str, kind: str) -> None:
        """Counts a refusal, and tallies its kind (a fixed text: not one log line per call)."""
        self._metrics.update_data(counter, int(self._metrics.get(counter)) + 1)
        self._tally.add(kind)
