"""The balancing layer: discovery, subset selection, outlier filtering and the endpoint pick.

Per call to a mesh destination:

1. the :class:`~meshware.outbound.discovery.Resolver` gives the destination's endpoints (a
   host it does not know, without a destination in the plan, passes through untouched);
2. a subset (``CallPlan.subset``, chosen by the routing layer) keeps the endpoints that
   carry its labels, from the destination's DestinationRule;
3. the cluster's outlier detector drops the endpoints it has ejected (all of them come
   back in panic mode, below ``minHealthPercent``);
4. the cluster's balancer picks one, avoiding those a retry already tried
   (``CallPlan.tried``); its hash key is ``CallPlan.hash_key``, the call's ``HASH_KEY``, or
   the one the rule's ``consistentHash`` reads from the request;
5. the request URL is rewritten to the endpoint's address and port, with scheme ``https``
   when the cluster's TLS mode encrypts; the ``Host`` header keeps the service name. The
   pick is recorded in ``CallPlan.endpoint`` and the URL restored when the call returns.

No endpoint to pick ends the call with :class:`~meshware.outbound.errors.NoHealthyEndpoint`
saying which cluster and why (discovery found none, none carries the subset's labels, all
are ejected).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.balancing import PickContext, hash_key_for
from meshware.outbound.call import HASH_KEY, CallPlan, plan_of
from meshware.outbound.discovery import Resolver
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import NoHealthyEndpoint
from meshware.outbound.transports import (
    TLS_KEY,
    AttemptStamper,
    Cluster,
    OutboundState,
    endpoint_url,
    prepare_attempt,
    stamped_below,
)

__all__ = ["AsyncBalancingTransport", "BalancingTransport"]

_NO_KEYS: Final[frozenset[str]] = frozenset()


class _Pick:
    """One pick: what to undo and report when the call to the endpoint ends."""

    __slots__ = ("_clock", "_cluster", "_started", "_token", "original_url")

    def __init__(
        self,
        cluster: Cluster,
        token: object,
        started: float,
        clock: Callable[[], float],
        original_url: httpx.URL,
    ) -> None:
        self._cluster = cluster
        self._token = token
        self._started = started
        self._clock = clock
        self.original_url = original_url

    def done(self, *, failed: bool) -> None:
        self._cluster.balancer.on_complete(
            self._token, latency_s=self._clock() - self._started, failed=failed
        )


class _BalancingCore:
    __slots__ = ("_contexts", "resolver", "stamp", "state")

    def __init__(self, resolver: Resolver, state: OutboundState | None, stamp: bool) -> None:
        if not isinstance(resolver, Resolver):
            raise ConfigurationError(
                "expected a Resolver (resolve and resolve_async)", field="resolver", value=resolver
            )
        if state is not None and not isinstance(state, OutboundState):
            raise ConfigurationError("expected an OutboundState", field="state", value=state)
        self.resolver = resolver
        self.state = state if state is not None else OutboundState()
        self.stamp = stamp
        # The context of a first try without a hash key, per destination: immutable, reused.
        self._contexts: dict[str, PickContext] = {}

    def pick(
        self, request: httpx.Request, plan: CallPlan, found: Sequence[Endpoint] | None
    ) -> _Pick | None:
        destination = plan.destination
        if found is None:
            if destination is None:
                return None  # not a mesh service
            raise NoHealthyEndpoint(
                "discovery does not know this destination", destination=destination
            )
        if destination is None:
            destination = plan.destination = request.url.host
        state = self.state
        cluster = state.cluster(destination, plan.subset)
        selected = cluster.select(found)
        if not selected:
            if not found:
                why = "discovery found no endpoints"
            else:
                labels = cluster.selector.labels if cluster.selector is not None else {}
                why = f"none of its {len(found)} endpoints carries the labels {dict(labels)}"
            raise NoHealthyEndpoint(
                f"no endpoint for {cluster.describe()}: {why}", destination=destination
            )
        healthy = cluster.healthy(selected)
        if not healthy:
            raise NoHealthyEndpoint(
                f"no healthy endpoint for {cluster.describe()}: all {len(selected)} are "
                "ejected by outlier detection",
                destination=destination,
            )
        hash_key = plan.hash_key
        if hash_key is None:
            hash_key = request.extensions.get(HASH_KEY)
            if hash_key is not None and not isinstance(hash_key, str):
                raise ConfigurationError(
                    "expected a string", field=f"extensions[{HASH_KEY!r}]", value=hash_key
                )
            if hash_key is None and cluster.load_balancer.consistent_hash is not None:
                hash_key = hash_key_for(
                    cluster.load_balancer, request.headers, query_params=request.url.params
                )
        if hash_key is None and not plan.tried:
            ctx = self._contexts.get(destination)
            if ctx is None:
                ctx = self._contexts[destination] = PickContext(
                    destination=destination, local=state.locality
                )
        else:
            ctx = PickContext(
                destination=destination,
                hash_key=hash_key,
                exclude=frozenset(plan.tried) if plan.tried else _NO_KEYS,
                local=state.locality,
            )
        balancer = cluster.balancer
        endpoint = balancer.pick(healthy, ctx)
        plan.endpoint = endpoint
        plan.choices = len(healthy)
        tls = cluster.tls
        original = request.url
        request.url = endpoint_url(original, "https" if tls.encrypted else "http", endpoint)
        request.extensions[TLS_KEY] = tls
        if tls.sni is not None:
            request.extensions["sni_hostname"] = tls.sni
        if self.stamp:
            prepare_attempt(request, plan)
        clock = state.clock
        return _Pick(cluster, balancer.on_start(endpoint), clock(), clock, original)


class BalancingTransport(AttemptStamper, httpx.BaseTransport):
    """Sends each call to a mesh destination to one of its endpoints (see the module docs).

    Args:
        transport: the next transport (the breaker layer, or the connection).
        resolver: discovery: which hosts are mesh services and where their endpoints are.
        state: the client's :class:`~meshware.outbound.transports.OutboundState` (rules,
            balancers, outlier detectors); share it with the breaker layer. A new one when
            ``None``.

    Raises:
        ConfigurationError: an argument has the wrong type.
    """

    __slots__ = ("_core", "_transport")

    def __init__(
        self,
        transport: httpx.BaseTransport,
        *,
        resolver: Resolver,
        state: OutboundState | None = None,
    ) -> None:
        self._transport = transport
        self._core = _BalancingCore(resolver, state, not stamped_below(transport))

    @property
    def state(self) -> OutboundState:
        """The state this layer picks from."""
        return self._core.state

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to an endpoint of its destination.

        Raises:
            NoHealthyEndpoint: the destination (or subset) has no endpoint to pick.
        """
        plan = plan_of(request)
        found = self._core.resolver.resolve(plan.destination or request.url.host)
        pick = self._core.pick(request, plan, found)
        if pick is None:
            return self._transport.handle_request(request)
        try:
            response = self._transport.handle_request(request)
        except BaseException:
            pick.done(failed=True)
            raise
        finally:
            request.url = pick.original_url
        pick.done(failed=response.status_code >= 500)
        return response

    def close(self) -> None:
        """Close the next transport."""
        self._transport.close()


class AsyncBalancingTransport(AttemptStamper, httpx.AsyncBaseTransport):
    """The async twin of :class:`BalancingTransport`, with the same arguments."""

    __slots__ = ("_core", "_transport")

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        resolver: Resolver,
        state: OutboundState | None = None,
    ) -> None:
        self._transport = transport
        self._core = _BalancingCore(resolver, state, not stamped_below(transport))

    @property
    def state(self) -> OutboundState:
        """The state this layer picks from."""
        return self._core.state

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to an endpoint of its destination.

        Raises:
            NoHealthyEndpoint: the destination (or subset) has no endpoint to pick.
        """
        plan = plan_of(request)
        found = await self._core.resolver.resolve_async(plan.destination or request.url.host)
        pick = self._core.pick(request, plan, found)
        if pick is None:
            return await self._transport.handle_async_request(request)
        try:
            response = await self._transport.handle_async_request(request)
        except BaseException:
            pick.done(failed=True)
            raise
        finally:
            request.url = pick.original_url
        pick.done(failed=response.status_code >= 500)
        return response

    async def aclose(self) -> None:
        """Close the next transport."""
        await self._transport.aclose()
