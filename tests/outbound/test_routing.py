from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound.faults import FaultAbort, FaultDelay, FaultInjection
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.routing import (
    HttpMatch,
    HttpRoute,
    RouteDestination,
    RouteTable,
    StringMatch,
    VirtualService,
)


class NoRandom:
    """A random source that fails the test if it is asked: the decision needs no draw."""

    def random(self) -> float:
        raise AssertionError("no random draw expected")


class Fixed:
    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def select(
    table: RouteTable,
    host: str = "reviews",
    *,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: dict[str, str] | None = None,
    rng: Any = None,
) -> Any:
    return table.select(host, method, path, query, headers or {}, rng or NoRandom())


def vs_table(spec: dict[str, Any]) -> RouteTable:
    return RouteTable([VirtualService.from_mapping(spec)])


def dest(host: str = "reviews", subset: str | None = None, weight: int | None = None) -> Any:
    return RouteDestination(host=host, subset=subset, weight=weight)


# --- StringMatch -----------------------------------------------------------------------------


def test_exact_prefix_regex_and_presence() -> None:
    assert StringMatch(exact="v2").matches("v2")
    assert not StringMatch(exact="v2").matches("v22")
    assert StringMatch(prefix="/api/").matches("/api/users")
    assert not StringMatch(prefix="/api/").matches("/ap")
    assert StringMatch(prefix="").matches("anything")
    presence = StringMatch()
    assert presence.is_presence and presence.matches("") and presence.matches("x")


def test_regex_must_match_the_whole_value_as_re2_does() -> None:
    match = StringMatch(regex="v[0-9]+")
    assert match.matches("v12")
    assert not match.matches("xv12")  # re.search would accept these two
    assert not match.matches("v12x")


def test_string_match_refuses_two_kinds() -> None:
    with pytest.raises(ConfigurationError) as info:
        StringMatch(exact="a", prefix="b")
    assert info.value.field == "prefix"
    assert str(info.value) == "prefix: expected one of exact, prefix or regex, not several"


def test_string_match_refuses_bad_regex_and_non_strings() -> None:
    with pytest.raises(ConfigurationError) as info:
        StringMatch(regex="v[0-9")
    assert info.value.field == "regex"
    assert "expected a regular expression" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        StringMatch(exact=3)  # type: ignore[arg-type]
    assert (info.value.field, info.value.value) == ("exact", 3)


def test_string_match_from_mapping_names_the_path() -> None:
    assert StringMatch.from_mapping({"exact": "x"}) == StringMatch(exact="x")
    assert StringMatch.from_mapping(None).is_presence
    assert StringMatch.from_mapping({}).is_presence
    with pytest.raises(ConfigurationError) as info:
        StringMatch.from_mapping({"regex": "("}, field="http[0].match[0].uri")
    assert info.value.field == "http[0].match[0].uri.regex"
    with pytest.raises(ConfigurationError) as info:
        StringMatch.from_mapping({"suffix": ".js"}, field="http[0].match[0].uri")
    assert info.value.field == "http[0].match[0].uri.suffix"
    assert "expected one of exact, prefix, regex" in str(info.value)


# --- HttpMatch: every field ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "path", "expected"),
    [
        ({"exact": "/login"}, "/login", True),
        ({"exact": "/login"}, "/login/", False),
        ({"prefix": "/api/v1"}, "/api/v1/users", True),
        ({"prefix": "/api/v1"}, "/api/v2", False),
        ({"regex": "/users/[0-9]+"}, "/users/42", True),
        ({"regex": "/users/[0-9]+"}, "/users/42/orders", False),
        ({"exact": "/a%20b"}, "/a%20b", True),  # paths are compared percent-encoded
    ],
)
def test_uri_match(uri: dict[str, str], path: str, expected: bool) -> None:
    assert HttpMatch.from_mapping({"uri": uri}).matches(method="GET", path=path) is expected


def test_ignore_uri_case_applies_to_exact_and_prefix_only() -> None:
    exact = HttpMatch.from_mapping({"uri": {"exact": "/Login"}, "ignoreUriCase": True})
    prefix = HttpMatch.from_mapping({"uri": {"prefix": "/API/"}, "ignoreUriCase": True})
    regex = HttpMatch.from_mapping({"uri": {"regex": "/login"}, "ignoreUriCase": True})
    assert exact.matches(method="GET", path="/LOGIN")
    assert prefix.matches(method="GET", path="/api/x")
    assert not regex.matches(method="GET", path="/LOGIN")
    assert not HttpMatch.from_mapping({"uri": {"exact": "/Login"}}).matches(
        method="GET", path="/login"
    )


def test_method_match() -> None:
    match = HttpMatch.from_mapping({"method": {"exact": "POST"}})
    assert match.matches(method="POST", path="/")
    assert not match.matches(method="GET", path="/")
    assert HttpMatch.from_mapping({"method": {"regex": "GET|HEAD"}}).matches(
        method="HEAD", path="/"
    )


def test_header_matches() -> None:
    match = HttpMatch.from_mapping(
        {
            "headers": {
                "end-user": {"exact": "jason"},
                "x-canary": {},  # presence
                "user-agent": {"prefix": "Mozilla/"},
                "x-version": {"regex": "v[23]"},
            }
        }
    )
    good = {"end-user": "jason", "x-canary": "", "user-agent": "Mozilla/5.0", "x-version": "v3"}
    assert match.matches(method="GET", path="/", headers=good)
    for name, bad in [
        ("end-user", "Jason"),  # values are case-sensitive
        ("user-agent", "curl/8"),
        ("x-version", "v4"),
    ]:
        assert not match.matches(method="GET", path="/", headers={**good, name: bad})
    for name in good:
        headers = {k: v for k, v in good.items() if k != name}
        assert not match.matches(method="GET", path="/", headers=headers), name


def test_header_names_are_lower_cased() -> None:
    match = HttpMatch.from_mapping({"headers": {"End-User": {"exact": "jason"}}})
    assert match.matches(method="GET", path="/", headers={"end-user": "jason"})


def test_without_headers() -> None:
    match = HttpMatch.from_mapping(
        {"withoutHeaders": {"x-debug": {}, "end-user": {"exact": "jason"}}}
    )
    assert match.matches(method="GET", path="/", headers={})
    assert match.matches(method="GET", path="/", headers={"end-user": "mary"})
    assert not match.matches(method="GET", path="/", headers={"end-user": "jason"})
    assert not match.matches(method="GET", path="/", headers={"x-debug": "0"})


def test_query_params() -> None:
    match = HttpMatch.from_mapping(
        {"queryParams": {"lang": {"exact": "en"}, "id": {"regex": "[0-9]+"}, "debug": {}}}
    )
    assert match.matches(method="GET", path="/", query="lang=en&id=42&debug")
    assert match.matches(method="GET", path="/", query="debug=&id=7&lang=en")
    assert not match.matches(method="GET", path="/", query="lang=en&id=42")  # no debug
    assert not match.matches(method="GET", path="/", query="lang=de&id=42&debug")
    assert not match.matches(method="GET", path="/", query="lang=en&id=4x&debug")


def test_query_params_first_value_wins_and_is_compared_raw() -> None:
    match = HttpMatch.from_mapping({"queryParams": {"q": {"exact": "a b"}}})
    assert not match.matches(method="GET", path="/", query="q=a%20b")
    raw = HttpMatch.from_mapping({"queryParams": {"q": {"exact": "a%20b"}}})
    assert raw.matches(method="GET", path="/", query="q=a%20b&q=other")
    assert not raw.matches(method="GET", path="/", query="q=other&q=a%20b")
    empty = HttpMatch.from_mapping({"queryParams": {"flag": {"exact": ""}}})
    assert empty.matches(method="GET", path="/", query="flag")


def test_query_param_prefix_is_refused_as_in_istio() -> None:
    with pytest.raises(ConfigurationError) as info:
        HttpMatch.from_mapping({"queryParams": {"lang": {"prefix": "e"}}}, field="m")
    assert info.value.field == "m.queryParams.lang.prefix"
    assert "prefix is not supported for query parameters" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        HttpMatch(query_params={"lang": StringMatch(prefix="e")})
    assert info.value.field == "query_params.lang.prefix"


def test_all_fields_of_a_match_must_hold() -> None:
    match = HttpMatch.from_mapping(
        {
            "uri": {"prefix": "/api"},
            "method": {"exact": "GET"},
            "headers": {"end-user": {"exact": "jason"}},
            "queryParams": {"v": {"exact": "2"}},
        }
    )
    call = {"method": "GET", "path": "/api/x", "query": "v=2", "headers": {"end-user": "jason"}}
    assert match.matches(**call)
    for key, bad in [
        ("method", "PUT"),
        ("path", "/web"),
        ("query", "v=1"),
        ("headers", {"end-user": "mary"}),
    ]:
        assert not match.matches(**{**call, key: bad}), key


def test_an_empty_match_accepts_everything() -> None:
    assert HttpMatch().matches(method="DELETE", path="/x", query="a=1", headers={"h": "v"})


# --- routes, weights, first match wins -------------------------------------------------------


def test_first_matching_route_wins_and_matches_are_any_of() -> None:
    table = vs_table(
        {
            "hosts": ["reviews"],
            "http": [
                {
                    "name": "api",
                    "match": [{"uri": {"prefix": "/api"}}, {"uri": {"prefix": "/v2"}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                },
                {
                    "name": "also-api",
                    "match": [{"uri": {"prefix": "/api/admin"}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v3"}}],
                },
                {"name": "rest", "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            ],
        }
    )
    assert (select(table, path="/api/admin").name, select(table, path="/api/admin").subset) == (
        "api",
        "v2",
    )
    assert select(table, path="/v2/x").subset == "v2"
    assert select(table, path="/web").name == "rest"
    assert select(table, path="/web").subset == "v1"
    assert not select(table, path="/web").default


def test_match_name_is_appended_to_the_route_name() -> None:
    table = vs_table(
        {
            "hosts": ["reviews"],
            "http": [
                {
                    "name": "reviews-v2",
                    "match": [{"name": "jason", "headers": {"end-user": {"exact": "jason"}}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                },
                {
                    "match": [{"name": "only-match", "uri": {"prefix": "/x"}}],
                    "route": [{"destination": {"host": "reviews"}}],
                },
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            ],
        }
    )
    assert select(table, headers={"end-user": "jason"}).name == "reviews-v2.jason"
    assert select(table, path="/x").name == "only-match"
    assert select(table, path="/y").name is None


def test_no_match_takes_the_default_route_to_the_host() -> None:
    table = vs_table(
        {
            "hosts": ["reviews"],
            "http": [
                {
                    "match": [{"uri": {"prefix": "/api"}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                }
            ],
        }
    )
    selection = select(table, path="/web")
    assert selection.default
    assert (selection.name, selection.host, selection.subset) == (None, "reviews", None)
    assert selection.http_route.retries is None  # the retry layer's default applies
    assert selection.http_route.timeout is None
    assert selection.http_route.fault is None and selection.http_route.mirror is None


def test_hosts_without_a_virtual_service_take_the_default_route() -> None:
    table = RouteTable([])
    selection = select(table, "Payments.")
    assert selection.default
    assert selection.host == "payments"
    assert selection.http_route.retries is None
    assert table.virtual_service_for("payments") is None


def test_selections_are_prebuilt() -> None:
    table = vs_table(
        {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}
    )
    assert select(table) is select(table)
    assert select(table, "other") is select(table, "other")


def test_weighted_split_holds_over_many_calls() -> None:
    table = vs_table(
        {
            "hosts": ["reviews"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10},
                    ]
                }
            ],
        }
    )
    rng = random.Random(20240601)
    counts = Counter(select(table, rng=rng).subset for _ in range(10_000))
    assert abs(counts["v1"] / 10_000 - 0.90) <= 0.015
    assert abs(counts["v2"] / 10_000 - 0.10) <= 0.015
    assert counts["v1"] + counts["v2"] == 10_000


def test_weighted_choice_uses_one_draw_on_cumulative_weights() -> None:
    route = HttpRoute(
        route=(dest(subset="a", weight=20), dest(subset="b", weight=0), dest(subset="c", weight=80))
    )
    assert route.choose(Fixed(0.0)).subset == "a"
    assert route.choose(Fixed(0.1999)).subset == "a"
    assert route.choose(Fixed(0.2)).subset == "c"  # weight 0 never wins
    assert route.choose(Fixed(0.9999)).subset == "c"


def test_traffic_shifting_to_another_service() -> None:
    table = vs_table(
        {
            "hosts": ["reviews"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "reviews"}, "weight": 75},
                        {"destination": {"host": "reviews-next", "subset": "v2"}, "weight": 25},
                    ]
                }
            ],
        }
    )
    assert select(table, rng=Fixed(0.5)).host == "reviews"
    shifted = select(table, rng=Fixed(0.8))
    assert (shifted.host, shifted.subset) == ("reviews-next", "v2")


def test_wildcard_hosts_most_specific_first() -> None:
    table = RouteTable(
        [
            VirtualService(
                hosts=("*.example.com",), http=(HttpRoute(route=(dest("wide"),)),), name="wide"
            ),
            VirtualService(
                hosts=("*.eu.example.com",), http=(HttpRoute(route=(dest("eu"),)),), name="eu"
            ),
            VirtualService(hosts=("api.eu.example.com",), http=(HttpRoute(route=(dest("api"),)),)),
        ]
    )
    assert select(table, "api.eu.example.com").host == "api"
    assert select(table, "web.eu.example.com").host == "eu"
    assert select(table, "web.example.com").host == "wide"
    default = select(table, "example.com")
    assert default.default and default.host == "example.com"


# --- route validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ((90, 20), "expected the weights of the destinations to add up to 100, not 110"),
        ((None, None), "expected the weights of the destinations to add up to 100, not 0"),
        ((50, None), "expected the weights of the destinations to add up to 100, not 50"),
    ],
)
def test_weights_must_add_up_to_100(weights: tuple[int | None, ...], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        HttpRoute(route=tuple(dest(subset=f"v{i}", weight=w) for i, w in enumerate(weights)))
    assert str(info.value) == f"route: {message}"


def test_single_destination_weight() -> None:
    for weight in (None, 0, 100):
        assert HttpRoute(route=(dest(weight=weight),)).choose(NoRandom()).host == "reviews"
    with pytest.raises(ConfigurationError) as info:
        HttpRoute(route=(dest(weight=60),))
    assert info.value.field == "route[0].weight"
    with pytest.raises(ConfigurationError) as info:
        HttpRoute(route=())
    assert info.value.field == "route"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"retries": {"attempts": 3}}, "retries"),
        ({"fault": "abort"}, "fault"),
        ({"mirror": dest(weight=10)}, "mirror.weight"),
        ({"mirror": dest(), "mirror_percentage": 101}, "mirror_percentage"),
        ({"retryable": "yes"}, "retryable"),
        ({"name": ""}, "name"),
        ({"match": (StringMatch(),)}, "match[0]"),
    ],
)
def test_route_fields_are_validated(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        HttpRoute(route=(dest(),), **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"host": "Bad Host"}, "host"),
        ({"host": ""}, "host"),
        ({"host": "*.example.com"}, "host"),
        ({"subset": "v 2"}, "subset"),
        ({"port": 0}, "port"),
        ({"weight": 101}, "weight"),
        ({"weight": True}, "weight"),
    ],
)
def test_destination_fields_are_validated(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RouteDestination(**{"host": "reviews", **kwargs})
    assert info.value.field == field


def test_virtual_service_and_table_validation() -> None:
    with pytest.raises(ConfigurationError) as info:
        VirtualService(hosts=())
    assert info.value.field == "hosts"
    with pytest.raises(ConfigurationError) as info:
        VirtualService(hosts=("*",))
    assert info.value.field == "hosts[0]"
    assert "'*' alone is not allowed" in str(info.value)
    one = VirtualService(hosts=("reviews",))
    with pytest.raises(ConfigurationError) as info:
        RouteTable([one, VirtualService(hosts=("ratings", "REVIEWS"))])
    assert info.value.field == "virtual_services[1].hosts"
    assert "host 'reviews' is named by two virtual services" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        RouteTable([one, "reviews"])  # type: ignore[list-item]
    assert info.value.field == "virtual_services[1]"


# --- Istio's YAML ----------------------------------------------------------------------------

BOOKINFO_REVIEWS_90_10 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 90
    - destination:
        host: reviews
        subset: v2
      weight: 10
"""

BOOKINFO_REVIEWS_TEST_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"""

RATINGS_TEST_DELAY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"""

RATINGS_TEST_ABORT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"""

HTTPBIN_MIRROR = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
    - httpbin
  http:
  - route:
    - destination:
        host: httpbin
        subset: v1
      weight: 100
    mirror:
      host: httpbin
      subset: v2
    mirrorPercentage:
      value: 100.0
"""

REVIEWS_TIMEOUT_AND_RETRIES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream
"""


def load(text: str) -> VirtualService:
    return VirtualService.from_mapping(yaml.safe_load(text))


def test_bookinfo_weights() -> None:
    vs = load(BOOKINFO_REVIEWS_90_10)
    assert vs.name == "reviews" and vs.hosts == ("reviews",)
    (route,) = vs.http
    assert [(d.host, d.subset, d.weight) for d in route.route] == [
        ("reviews", "v1", 90),
        ("reviews", "v2", 10),
    ]
    assert route.retries is None


def test_bookinfo_header_routing() -> None:
    table = RouteTable([load(BOOKINFO_REVIEWS_TEST_V2)])
    assert select(table, headers={"end-user": "jason"}).subset == "v2"
    assert select(table, headers={"end-user": "mary"}).subset == "v1"
    assert select(table).subset == "v1"


def test_bookinfo_fault_examples() -> None:
    delay = load(RATINGS_TEST_DELAY).http[0].fault
    assert delay == FaultInjection(delay=FaultDelay(fixed_delay=7.0, percentage=100.0))
    abort = load(RATINGS_TEST_ABORT).http[0].fault
    assert abort == FaultInjection(abort=FaultAbort(http_status=500, percentage=100.0))
    assert load(RATINGS_TEST_ABORT).http[1].fault is None


def test_mirroring_example() -> None:
    (route,) = load(HTTPBIN_MIRROR).http
    assert route.mirror == RouteDestination(host="httpbin", subset="v2")
    assert route.mirror_percentage == 100.0
    assert route.should_mirror(NoRandom())


def test_timeout_and_retries_example() -> None:
    (route,) = load(REVIEWS_TIMEOUT_AND_RETRIES).http
    assert route.timeout == 0.5
    assert route.retries == RetryPolicy.from_mapping(
        {
            "attempts": 3,
            "perTryTimeout": "2s",
            "retryOn": "gateway-error,connect-failure,refused-stream",
        }
    )


def test_bare_spec_and_table_from_yaml() -> None:
    bare = VirtualService.from_mapping(yaml.safe_load(BOOKINFO_REVIEWS_90_10)["spec"])
    assert bare.name is None and bare.hosts == ("reviews",)
    table = RouteTable.from_yaml(RATINGS_TEST_DELAY + "\n---\n" + HTTPBIN_MIRROR + "\n---\n")
    assert [vs.name for vs in table.virtual_services] == ["ratings", "httpbin"]
    assert select(table, "httpbin").subset == "v1"


def test_table_errors_name_the_document() -> None:
    with pytest.raises(ConfigurationError) as info:
        RouteTable.from_yaml(
            BOOKINFO_REVIEWS_90_10
            + "---\n"
            + BOOKINFO_REVIEWS_90_10.replace("subset: v2", "subsett: v2")
        )
    assert info.value.field == "[1].spec.http[0].route[1].destination.subsett"
    with pytest.raises(ConfigurationError) as info:
        RouteTable.from_yaml("hosts: [a\n")
    assert str(info.value).startswith("invalid YAML")


def test_mirror_percent_forms() -> None:
    base = {"route": [{"destination": {"host": "a"}}], "mirror": {"host": "b"}}
    assert HttpRoute.from_mapping({**base, "mirror_percent": 30}).mirror_percentage == 30.0
    assert HttpRoute.from_mapping({**base, "mirrorPercent": 0}).mirror_percentage == 0.0
    assert HttpRoute.from_mapping(base).mirror_percentage == 100.0
    with pytest.raises(ConfigurationError) as info:
        HttpRoute.from_mapping({**base, "mirror_percent": 5, "mirrorPercentage": {"value": 5}})
    assert info.value.field == "http[0].mirror_percent"
    with pytest.raises(ConfigurationError) as info:
        HttpRoute.from_mapping({"route": base["route"], "mirrorPercentage": {"value": 5}})
    assert info.value.field == "http[0].mirrorPercentage"
    assert "needs 'mirror'" in str(info.value)


def test_timeout_forms() -> None:
    base = {"route": [{"destination": {"host": "a"}}]}
    assert HttpRoute.from_mapping({**base, "timeout": "0s"}).timeout is None
    assert HttpRoute.from_mapping({**base, "timeout": "1m"}).timeout == 60.0
    with pytest.raises(ConfigurationError) as info:
        HttpRoute.from_mapping({**base, "timeout": "10us"})
    assert info.value.field == "http[0].timeout"


def test_retries_absent_default_or_disabled() -> None:
    base = {"route": [{"destination": {"host": "a"}}]}
    assert HttpRoute.from_mapping(base).retries is None
    assert HttpRoute.from_mapping({**base, "retries": {"attempts": 0}}).retries == RetryPolicy(
        attempts=0
    )
    assert HttpRoute.from_mapping({**base, "retryable": True}).retryable


SPEC = {
    "hosts": ["reviews"],
    "http": [
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
        {
            "name": "second",
            "match": [{"uri": {"prefix": "/"}}],
            "route": [
                {
                    "destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}},
                    "weight": 50,
                },
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 50},
            ],
        },
    ],
}


def with_key(path: tuple[Any, ...], key: str, value: Any) -> dict[str, Any]:
    spec = yaml.safe_load(yaml.safe_dump(SPEC))
    node = spec
    for step in path:
        node = node[step]
    node[key] = value
    return spec  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("path", "key", "value", "field", "message"),
    [
        ((), "gateways", ["mesh"], "gateways", "is not supported"),
        ((), "tcp", [], "tcp", "only HTTP routes"),
        ((), "tls", [], "tls", "only HTTP routes"),
        ((), "exportTo", ["."], "exportTo", "is not supported"),
        ((), "host", "x", "host", "unknown field"),
        (("http", 1), "rewrite", {"uri": "/"}, "http[1].rewrite", "does not rewrite"),
        (("http", 1), "redirect", {"uri": "/"}, "http[1].redirect", "is not supported"),
        (("http", 1), "directResponse", {"status": 503}, "http[1].directResponse", "not supported"),
        (("http", 1), "delegate", {"name": "x"}, "http[1].delegate", "not supported"),
        (("http", 1), "corsPolicy", {}, "http[1].corsPolicy", "inbound side"),
        (("http", 1), "headers", {"request": {}}, "http[1].headers", "header manipulation"),
        (("http", 1), "mirrors", [], "http[1].mirrors", "one mirror"),
        (("http", 1), "retry", {}, "http[1].retry", "unknown field"),
        (
            ("http", 1, "match", 0),
            "sourceLabels",
            {"app": "x"},
            "http[1].match[0].sourceLabels",
            "",
        ),
        (("http", 1, "match", 0), "sourceNamespace", "x", "http[1].match[0].sourceNamespace", ""),
        (("http", 1, "match", 0), "gateways", ["mesh"], "http[1].match[0].gateways", ""),
        (("http", 1, "match", 0), "port", 80, "http[1].match[0].port", ""),
        (("http", 1, "match", 0), "scheme", {"exact": "http"}, "http[1].match[0].scheme", ""),
        (("http", 1, "match", 0), "authority", {"exact": "a"}, "http[1].match[0].authority", ""),
        (("http", 1, "match", 0), "statPrefix", "x", "http[1].match[0].statPrefix", ""),
        (("http", 1, "match", 0), "url", {}, "http[1].match[0].url", "unknown field"),
        (("http", 1, "match", 0, "uri"), "suffix", "x", "http[1].match[0].uri.suffix", ""),
        (("http", 1, "route", 0), "headers", {}, "http[1].route[0].headers", "header manip"),
        (("http", 1, "route", 0), "wieght", 50, "http[1].route[0].wieght", "unknown field"),
        (
            ("http", 1, "route", 0, "destination"),
            "subsett",
            "v1",
            "http[1].route[0].destination.subsett",
            "unknown field",
        ),
        (
            ("http", 1, "route", 0, "destination", "port"),
            "name",
            "http",
            "http[1].route[0].destination.port.name",
            "unknown field",
        ),
    ],
)
def test_unsupported_and_unknown_fields_are_refused_with_their_path(
    path: tuple[Any, ...], key: str, value: Any, field: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        VirtualService.from_mapping(with_key(path, key, value))
    assert info.value.field == field
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("path", "key", "value", "field"),
    [
        (("http", 1), "timeout", "soon", "http[1].timeout"),
        (("http", 1), "retries", {"attempts": -1}, "http[1].retries.attempts"),
        (("http", 1), "retries", {"retryOn": "sometimes"}, "http[1].retries.retryOn"),
        (
            ("http", 1),
            "fault",
            {"abort": {"grpcStatus": "UNAVAILABLE"}},
            "http[1].fault.abort.grpcStatus",
        ),
        (("http", 1), "retryable", "yes", "http[1].retryable"),
        (("http", 1), "name", 7, "http[1].name"),
        (("http", 1), "match", {"uri": {}}, "http[1].match"),
        (("http", 1), "route", [], "http[1].route"),
        (("http", 1), "mirror", {"host": "x", "weight": 5}, "http[1].mirror.weight"),
        (("http", 1, "route", 0), "weight", 150, "http[1].route[0].weight"),
        (("http", 1, "route", 0, "destination"), "host", 5, "http[1].route[0].destination.host"),
        (
            ("http", 1, "route", 0, "destination"),
            "subset",
            "",
            "http[1].route[0].destination.subset",
        ),
        (
            ("http", 1, "route", 0, "destination"),
            "port",
            {"number": 0},
            "http[1].route[0].destination.port.number",
        ),
        (("http", 1, "match", 0), "ignoreUriCase", "yes", "http[1].match[0].ignoreUriCase"),
        (
            ("http", 1, "match", 0),
            "headers",
            {"x": {"regex": "("}},
            "http[1].match[0].headers.x.regex",
        ),
        (("http", 1, "match", 0), "method", "GET", "http[1].match[0].method"),
    ],
)
def test_invalid_values_name_their_path(
    path: tuple[Any, ...], key: str, value: Any, field: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        VirtualService.from_mapping(with_key(path, key, value))
    assert info.value.field == field


def test_weight_sum_error_names_the_route() -> None:
    spec = with_key(("http", 1, "route", 1), "weight", 40)
    with pytest.raises(ConfigurationError) as info:
        VirtualService.from_mapping(spec)
    assert info.value.field == "http[1].route"
    assert "add up to 100, not 90" in str(info.value)


def test_resource_shape_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        VirtualService.from_mapping({"kind": "DestinationRule", "spec": {}})
    assert info.value.field == "kind"
    with pytest.raises(ConfigurationError) as info:
        VirtualService.from_mapping({"kind": "VirtualService", "spec": {"http": []}})
    assert info.value.field == "spec.hosts"
    with pytest.raises(ConfigurationError) as info:
        VirtualService.from_mapping({"kind": "VirtualService", "status": {}, "spec": {}})
    assert info.value.field == "status"


# --- property tests: the parser raises ConfigurationError and nothing else --------------------

_KEYS = st.sampled_from(
    [
        "hosts",
        "http",
        "name",
        "match",
        "route",
        "destination",
        "host",
        "subset",
        "port",
        "number",
        "weight",
        "uri",
        "method",
        "headers",
        "withoutHeaders",
        "queryParams",
        "ignoreUriCase",
        "exact",
        "prefix",
        "regex",
        "timeout",
        "retries",
        "attempts",
        "perTryTimeout",
        "retryOn",
        "fault",
        "delay",
        "abort",
        "fixedDelay",
        "percentage",
        "percent",
        "value",
        "httpStatus",
        "mirror",
        "mirrorPercentage",
        "mirror_percent",
        "retryable",
        "kind",
        "spec",
        "metadata",
        "apiVersion",
        "rewrite",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-10, max_value=700),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["reviews", "v1", "/api", "5s", "0s", "[", "*", "*.x.com", "VirtualService"]),
    st.text(max_size=8),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(_KEYS, children, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_from_mapping_raises_only_configuration_errors(spec: dict[str, Any]) -> None:
    try:
        vs = VirtualService.from_mapping(spec)
    except ConfigurationError:
        return
    table = RouteTable([vs])
    selection = table.select(vs.hosts[0].lstrip("*."), "GET", "/", "", {}, random.Random(0))
    assert selection.host


@settings(max_examples=200, deadline=None)
@given(_VALUES)
def test_match_parser_raises_only_configuration_errors(spec: Any) -> None:
    try:
        match = HttpMatch.from_mapping(spec)
    except ConfigurationError:
        return
    assert match.matches(method="GET", path="/", query="a=1", headers={"x": "y"}) in (True, False)


def test_destination_port_is_kept() -> None:
    vs = VirtualService.from_mapping(SPEC)
    assert vs.http[1].route[0] == RouteDestination(
        host="reviews", subset="v1", port=9080, weight=50
    )
    assert vs.http[1].name == "second"
