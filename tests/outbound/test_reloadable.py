"""ReloadableRouteTable, apply_destination_rules and OutboundReloader."""

from __future__ import annotations

import random

import pytest

from meshware.config import load_config
from meshware.exceptions import ConfigurationError
from meshware.outbound.destination import DestinationRule, TrafficPolicy
from meshware.outbound.outlier import OutlierDetection
from meshware.outbound.reloadable import (
    OutboundReloader,
    ReloadableRouteTable,
    apply_destination_rules,
)
from meshware.outbound.routing import RouteTable
from meshware.outbound.transports import OutboundState

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: {subset}}}
"""

DR = """\
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: {errors}}}
"""


def table(subset: str) -> RouteTable:
    return load_config(text=VS.format(subset=subset)).routes


def subset_of(routes: RouteTable) -> str | None:
    selection = routes.select("reviews", "GET", "/", "", {}, random.Random(1))
    return selection.destination.subset


def test_a_route_table_that_delegates_to_the_one_in_force() -> None:
    routes = ReloadableRouteTable(table("v1"))
    assert isinstance(routes, RouteTable)
    assert subset_of(routes) == "v1"
    old = routes.swap(table("v2"))
    assert subset_of(old) == "v1"
    assert subset_of(routes) == "v2"
    assert routes.virtual_service_for("reviews") is routes.current.virtual_services[0]
    assert [vs.name for vs in routes.virtual_services] == ["reviews"]
    assert repr(routes) == "<ReloadableRouteTable: 1 virtual services, 1 hosts>"
    # Unknown hosts get their default route from the table in force.
    assert routes.select("other", "GET", "/", "", {}, random.Random(1)).default is True


def test_swap_accepts_virtual_services_and_reloadable_tables() -> None:
    routes = ReloadableRouteTable()
    assert routes.virtual_services == ()
    routes.swap(table("v2").virtual_services)
    assert subset_of(routes) == "v2"
    routes.swap(ReloadableRouteTable(table("v3")))
    assert subset_of(routes) == "v3"
    with pytest.raises(ConfigurationError, match="table: expected a RouteTable"):
        routes.swap("reviews")  # type: ignore[arg-type]
    assert subset_of(routes) == "v3"


def rules(text: str) -> tuple[DestinationRule, ...]:
    return load_config(text=text).destination_rules


def test_apply_destination_rules_rebuilds_only_changed_clusters() -> None:
    first = rules(DR.format(host="reviews", errors=5) + DR.format(host="ratings", errors=5))
    state = OutboundState(rules=first, tls_mode="DISABLE")
    reviews = state.cluster("reviews")
    ratings = state.cluster("ratings")
    changed = rules(DR.format(host="reviews", errors=2) + DR.format(host="ratings", errors=5))
    assert apply_destination_rules(state, changed) == ("reviews",)
    assert state.cluster("ratings") is ratings
    rebuilt = state.cluster("reviews")
    assert rebuilt is not reviews
    assert rebuilt.policy.outlier_detection == OutlierDetection(consecutive_5xx_errors=2)


def test_apply_destination_rules_drops_clusters_whose_rule_went_away() -> None:
    state = OutboundState(rules=rules(DR.format(host="reviews", errors=5)), tls_mode="DISABLE")
    state.cluster("reviews")
    state.cluster("other")
    assert apply_destination_rules(state, ()) == ("reviews",)
    assert state.cluster("reviews").rule is None
    assert state.cluster("reviews").policy == TrafficPolicy()


def test_apply_destination_rules_refuses_a_non_state() -> None:
    with pytest.raises(ConfigurationError, match="state: expected an OutboundState"):
        apply_destination_rules(object(), ())  # type: ignore[arg-type]


def test_reloader_commits_routes_and_rules_together() -> None:
    routes = ReloadableRouteTable(table("v1"))
    state = OutboundState(rules=rules(DR.format(host="reviews", errors=5)), tls_mode="DISABLE")
    reloader = OutboundReloader(routes=routes, states=[state])
    config = load_config(text=VS.format(subset="v2") + DR.format(host="reviews", errors=3))
    commit = reloader.prepare(config)
    assert subset_of(routes) == "v1"  # nothing changes before the commit
    commit()
    assert subset_of(routes) == "v2"
    assert state.rules.get("reviews") == config.destination_rules[0]
    assert reloader.states == (state,)


def test_reloader_arguments() -> None:
    with pytest.raises(ConfigurationError, match="routes: expected a ReloadableRouteTable"):
        OutboundReloader(routes=RouteTable())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="state: expected an OutboundState"):
        OutboundReloader(states=[object()])  # type: ignore[list-item]
