"""What a server refuses before farm-ng-core sees it: calls off the contract, and subscriptions beyond a fair share.

``EventServiceGrpc`` answers whatever arrives: it decodes a request by the type its URI
names (importing the module the sender chooses), keeps a queue for every path anyone
subscribes to (forever), and serves any number of subscribers for as long as they stay
connected, read or not. ``PathGuard`` is a gRPC server interceptor (grpc's public
mechanism) that lets through only:

- a request/reply on a path the role serves, naming and carrying that path's message;
- a subscription to a path the role publishes (or ``*``), within its share of the slots:
  ``MAX_SUBSCRIBERS`` for subscribers on the hosts of the config's services (and on this
  machine's loopback), ``STRANGER_SUBSCRIBERS`` for everyone else together, and at most
  ``STRANGER_SUBSCRIBERS_EACH`` for any one other address. Strangers never take a slot of
  the config's services.

Anything else ends with a gRPC status that says why (``UNIMPLEMENTED``,
``INVALID_ARGUMENT``, ``NOT_FOUND``, ``RESOURCE_EXHAUSTED``), is counted in ``/health``
and ``/stats``, and is logged once per interval, not once per call. A method the service
does not have at all is refused by gRPC (``UNIMPLEMENTED``) and counted here too.

A subscriber that stops reading keeps its slot, at a bounded cost: farm-ng-core's queue
of 10 events (later ones are dropped and counted, ``<path>/dropped`` in ``/health``) and
one event waiting for HTTP/2 flow-control window. It is not ended: while an event waits
for window, gRPC can neither send the stream's status nor reset it, so the subscriber of
a stream ended then would be left reading a silent stream that never closes.
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
# From any other address: a monitor or a watcher on a laptop, say; and any stranger.
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
                check_request(path, decode(request.event, request.payload, self._contract.requests[path]))
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
            address = address_of_peer(context.peer())
            full = self._full(address)
            if full:
                await self._refuse(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    full,
                    f"refused %d subscription(s): {full}",
                    REFUSED_SUBSCRIPTIONS,
                )
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
            if self._trusted_subscribers >= MAX_SUBSCRIBERS:
                return f"{MAX_SUBSCRIBERS} subscribers already"
            return None
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

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        why: str,
        kind: str,
        counter: str = REFUSED_REQUESTS,
    ) -> None:
        """Counts a refusal, tallies its kind (a fixed text: not one line per path) and aborts."""
        self._count(counter, kind)
        await context.abort(code, why)

    def _count(self, counter: str, kind: str) -> None:
        self._metrics.update_data(counter, int(self._metrics.get(counter)) + 1)
        self._tally.add(kind)
