"""Outbound routing that follows a changing mesh configuration.

::

    from meshware.outbound.reloadable import OutboundReloader, ReloadableRouteTable

    routes = ReloadableRouteTable(watcher.config.routes)
    client = mesh_client(watcher.config.outbound_config(routes=routes))
    reloader = OutboundReloader(routes=routes, states=[outbound_state_of(client)])
    watcher.subscribe(reloader.prepare)

:class:`ReloadableRouteTable` is a :class:`~meshware.outbound.routing.RouteTable` that
delegates every lookup to the table in force; a swap is one assignment, so a call routes
either by the old VirtualServices or by the new ones. :func:`apply_destination_rules` gives an
:class:`~meshware.outbound.transports.OutboundState` new DestinationRules: the clusters of
destinations whose rule changed are rebuilt on their next call (as Envoy rebuilds a changed
cluster), the others keep their endpoint health, breakers and balancer state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from meshware.exceptions import ConfigurationError
from meshware.outbound.destination import DestinationRule, DestinationRules
from meshware.outbound.routing import RouteSelection, RouteTable, VirtualService
from meshware.outbound.transports import OutboundState

if TYPE_CHECKING:
    from meshware.config.loader import MeshConfig
    from meshware.outbound.faults import RandomSource

__all__ = ["OutboundReloader", "ReloadableRouteTable", "apply_destination_rules"]


class ReloadableRouteTable(RouteTable):
    """A route table whose VirtualServices can be replaced while calls are routed.

    Pass it wherever a :class:`~meshware.outbound.routing.RouteTable` goes
    (``OutboundConfig(routes=...)``); :meth:`swap` replaces the table behind it.

    Args:
        table: the first table, or the virtual services to build it from.

    Raises:
        ConfigurationError: as :class:`~meshware.outbound.routing.RouteTable`.
    """

    __slots__ = ("_table",)

    def __init__(self, table: RouteTable | Iterable[VirtualService] = ()) -> None:
        # No RouteTable.__init__: every lookup goes to the table in force.
        self._table = _table(table)

    @property
    def current(self) -> RouteTable:
        """The table in force."""
        return self._table

    def swap(self, table: RouteTable | Iterable[VirtualService]) -> RouteTable:
        """Make ``table`` (or a table of these virtual services) the one in force.

        Returns:
            The table that was in force before.

        Raises:
            ConfigurationError: as :class:`~meshware.outbound.routing.RouteTable`; the table
                in force stays.
        """
        new = _table(table)
        old, self._table = self._table, new
        return old

    @property
    def virtual_services(self) -> tuple[VirtualService, ...]:
        """The virtual services of the table in force."""
        return self._table.virtual_services

    def virtual_service_for(self, host: str) -> VirtualService | None:
        """As :meth:`RouteTable.virtual_service_for`, in the table in force."""
        return self._table.virtual_service_for(host)

    def select(
        self,
        host: str,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        rng: RandomSource,
    ) -> RouteSelection:
        """As :meth:`RouteTable.select`, in the table in force."""
        return self._table.select(host, method, path, query, headers, rng)

    def __repr__(self) -> str:
        hosts = sum(len(vs.hosts) for vs in self._table.virtual_services)
        return (
            f"<ReloadableRouteTable: {len(self._table.virtual_services)} virtual services, "
            f"{hosts} hosts>"
        )


def _table(value: RouteTable | Iterable[VirtualService]) -> RouteTable:
    if isinstance(value, ReloadableRouteTable):
        return value.current
    if isinstance(value, RouteTable):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            "expected a RouteTable or a list of VirtualService", field="table", value=value
        )
    return RouteTable(value)


def apply_destination_rules(
    state: OutboundState, rules: DestinationRules | Iterable[DestinationRule]
) -> tuple[str, ...]:
    """Put ``rules`` in force in ``state``.

    Clusters whose destination's rule changed (or appeared, or went away) are dropped and
    built again, from the new rule, on their next call; calls in flight finish on the old
    cluster. The other clusters keep their state.

    Args:
        state: the outbound state of a mesh client.
        rules: the new DestinationRules.

    Returns:
        The destinations whose clusters were dropped, sorted.

    Raises:
        ConfigurationError: ``state`` is not an
            :class:`~meshware.outbound.transports.OutboundState`, or ``rules`` is invalid.
    """
    if not isinstance(state, OutboundState):
        raise ConfigurationError("expected an OutboundState", field="state", value=state)
    new = rules if isinstance(rules, DestinationRules) else DestinationRules(rules)
    dropped: set[str] = set()
    with state._lock:
        keep = {}
        for key, cluster in state._clusters.items():
            if new.get(cluster.destination) == cluster.rule:
                keep[key] = cluster
            else:
                dropped.add(cluster.destination)
        state.rules = new
        # A new dict, not edits in place: lock-free readers see the old or the new one.
        state._clusters = keep
    return tuple(sorted(dropped))


class OutboundReloader:
    """Subscribes outbound parts to a :class:`~meshware.config.reload.ConfigWatcher`: on a
    new configuration, the route table gets its VirtualServices and every state its
    DestinationRules, all at the commit of the reload.

    Args:
        routes: the reloadable route table of the mesh clients, or ``None``.
        states: the :class:`~meshware.outbound.transports.OutboundState` of each mesh client
            whose DestinationRules follow the configuration.

    Attributes:
        routes: the route table, or ``None``.
    """

    def __init__(
        self,
        *,
        routes: ReloadableRouteTable | None = None,
        states: Iterable[OutboundState] = (),
    ) -> None:
        if routes is not None and not isinstance(routes, ReloadableRouteTable):
            raise ConfigurationError(
                "expected a ReloadableRouteTable or None", field="routes", value=routes
            )
        self.routes = routes
        self._states: list[OutboundState] = []
        self._lock = threading.Lock()
        for state in states:
            self.add_state(state)

    @property
    def states(self) -> tuple[OutboundState, ...]:
        """The states whose DestinationRules follow the configuration."""
        return tuple(self._states)

    def add_state(self, state: OutboundState) -> None:
        """Make ``state``'s DestinationRules follow the configuration too."""
        if not isinstance(state, OutboundState):
            raise ConfigurationError("expected an OutboundState", field="state", value=state)
        with self._lock:
            self._states.append(state)

    def prepare(self, config: MeshConfig) -> Callable[[], None]:
        """Build the outbound parts of ``config``; return the commit that puts them in force
        (a :data:`~meshware.config.reload.ConfigListener`).

        Raises:
            ConfigurationError: the DestinationRules are invalid.
        """
        table = config.routes
        rules = DestinationRules(config.destination_rules)
        states = self.states

        def commit() -> None:
            if self.routes is not None:
                self.routes.swap(table)
            for state in states:
                apply_destination_rules(state, rules)

        return commit
