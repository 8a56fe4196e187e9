"""meshware.settings: one precedence, every source, errors that name the setting and source."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.retry import RetryPolicy
from meshware.policy.authz import AuthorizationPolicy, Operation, Rule
from meshware.policy.facts import RequestFacts
from meshware.policy.jwt import JwtRule
from meshware.policy.ratelimit import RateLimitPolicy, RateLimitRule
from meshware.settings import (
    SETTINGS,
    InvalidSetting,
    MeshSettings,
    SettingsSource,
    check_settings,
    load_settings,
    settings_table,
)
from meshware.telemetry.access_log import AccessLog
from tests.plugins import Pki, pki
from tests.servers import ROOT

__all__ = ["pki"]

DJANGO = 'MESHWARE["{}"]'


def django(mapping: dict[str, Any]) -> SettingsSource:
    return SettingsSource.keyed(mapping, name="settings.MESHWARE", template=DJANGO)


def flask(mapping: dict[str, Any]) -> SettingsSource:
    return SettingsSource.prefixed(mapping, name="app.config")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- precedence ---------------------------------------------------------------------------------


def test_code_beats_framework_beats_environment_beats_file_beats_defaults(tmp_path: Path) -> None:
    config = write(
        tmp_path / "mesh.yaml",
        "service: from-file\nnamespace: file-ns\nversion: file-v\ntrust_domain: file.td\n"
        "outbound_timeout: 4\n",
    )
    merged = load_settings(
        {"service": "from-code"},
        framework=django({"SERVICE": "from-django", "NAMESPACE": "django-ns"}),
        environ={
            "MESHWARE_SERVICE": "from-env",
            "MESHWARE_NAMESPACE": "env-ns",
            "MESHWARE_VERSION": "env-v",
            "MESHWARE_CONFIG_FILE": str(config),
        },
    )
    assert merged.service == "from-code"
    assert merged.namespace == "django-ns"
    assert merged.version == "env-v"
    assert merged.trust_domain == "file.td"
    assert merged.outbound_timeout == 4.0
    assert merged.metrics_path == "/metrics"  # a default
    assert dict(merged.sources) == {
        "service": "code",
        "namespace": "settings.MESHWARE",
        "version": "environment",
        "config_file": "environment",
        "trust_domain": f"config file {config}",
        "outbound_timeout": f"config file {config}",
    }


def test_the_config_file_is_named_by_the_highest_source(tmp_path: Path) -> None:
    low = write(tmp_path / "low.yaml", "service: low\n")
    high = write(tmp_path / "high.yml", "SERVICE: high\n")
    by_flask = load_settings(
        framework=flask({"MESHWARE_CONFIG_FILE": str(high)}),
        environ={"MESHWARE_CONFIG_FILE": str(low)},
    )
    by_argument = load_settings(config_file=low, environ={"MESHWARE_CONFIG_FILE": str(high)})
    assert by_flask.service == "high"
    assert by_argument.service == "low"
    assert by_argument.config_file == str(low)


def test_empty_environment_values_and_endpoint_variables_are_not_settings() -> None:
    merged = load_settings(
        environ={
            "MESHWARE_SERVICE": "orders",
            "MESHWARE_VERSION": "  ",
            "MESHWARE_SERVICE_PAYMENTS": "127.0.0.1:9000",
            "PATH": "/bin",
        }
    )
    assert merged.version is None
    assert "version" not in merged.sources
    # EnvResolver's variables still reach the outbound client.
    resolver = merged.outbound_config().resolver
    assert resolver is None  # the client's default EnvResolver reads them


# -- errors name the setting and its source -----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            SettingsSource.environment({"MESHWARE_SERVCE": "x"}),
            "MESHWARE_SERVCE: unknown setting; did you mean MESHWARE_SERVICE? (from environment)",
        ),
        (
            flask({"MESHWARE_RATELIMIT": "x"}),
            "MESHWARE_RATELIMIT: unknown setting; did you mean MESHWARE_RATE_LIMIT? "
            "(from app.config)",
        ),
        (
            django({"POLICY": []}),
            'MESHWARE["POLICY"]: unknown setting; did you mean MESHWARE["POLICIES"]? '
            "(from settings.MESHWARE)",
        ),
        (
            django({"zzz": 1}),
            'MESHWARE["zzz"]: unknown setting (from settings.MESHWARE)',
        ),
    ],
)
def test_unknown_settings_are_named_with_their_source(source: SettingsSource, message: str) -> None:
    with pytest.raises(InvalidSetting) as caught:
        load_settings({"service": "orders"}, framework=source, environ={})
    assert str(caught.value) == message
    assert caught.value.problem == "unknown"
    assert caught.value.key is None


def test_unknown_settings_in_code_and_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidSetting, match=r"^cert_dri: unknown setting; did you mean "):
        load_settings({"service": "orders", "cert_dri": "x"}, environ={})
    config = write(tmp_path / "c.yaml", "service: a\nmetrcs: false\n")
    with pytest.raises(InvalidSetting) as caught:
        load_settings(config_file=config, environ={})
    assert str(caught.value) == (
        f"metrcs: unknown setting; did you mean metrics? (from config file {config})"
    )


def test_a_missing_service_is_reported() -> None:
    with pytest.raises(InvalidSetting) as caught:
        load_settings(environ={})
    assert caught.value.problem == "missing"
    assert caught.value.key == "service"
    assert caught.value.source == "defaults"
    assert "MESHWARE_SERVICE" in str(caught.value)


@pytest.mark.parametrize(
    ("values", "field", "fragment"),
    [
        ({"MESHWARE_HEALTH": "maybe"}, "MESHWARE_HEALTH", "expected true or false"),
        ({"MESHWARE_TRACE_SAMPLE": "1.5"}, "MESHWARE_TRACE_SAMPLE", "expected a ratio"),
        ({"MESHWARE_TRACE_EXPORTER": "jaeger"}, "MESHWARE_TRACE_EXPORTER", '"otlp"'),
        ({"MESHWARE_OUTBOUND_TIMEOUT": "-1"}, "MESHWARE_OUTBOUND_TIMEOUT", "positive"),
        ({"MESHWARE_METRICS_PATH": "/readyz"}, "MESHWARE_METRICS_PATH", "health path"),
        ({"MESHWARE_RATE_LIMIT": "5 per minute"}, "MESHWARE_RATE_LIMIT", "invalid rate"),
        (
            {"MESHWARE_RATE_LIMIT": '{"rate": "5/minute", "key": "sideways"}'},
            "MESHWARE_RATE_LIMIT.key",
            "unknown key kind",
        ),
        (
            {
                "MESHWARE_POLICIES": '[{"name": "p", "rules": [{"from": [{"source": '
                '{"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}]}]'
            },
            "MESHWARE_POLICIES[0].rules[0].from[0].source.principals[0]",
            "without the spiffe:// scheme",
        ),
        ({"MESHWARE_POLICIES": '[{"rules": []}]'}, "MESHWARE_POLICIES[0].name", "policy's name"),
        ({"MESHWARE_POLICIES": "{not yaml"}, "MESHWARE_POLICIES", "expected YAML or JSON"),
        (
            {"MESHWARE_JWT_RULES": '[{"issuer": "https://id", "jwksUri": "https://id/k", "x": 1}]'},
            "MESHWARE_JWT_RULES[0].x",
            "unknown field",
        ),
        (
            {"MESHWARE_SERVICES": '{"payments": ["nowhere"]}'},
            "MESHWARE_SERVICES.payments[0]",
            "",
        ),
        ({"MESHWARE_RETRY": '{"attempts": -2}'}, "MESHWARE_RETRY.attempts", ""),
        ({"MESHWARE_TRUSTED_PROXIES": "10.0.0.0/33"}, "MESHWARE_TRUSTED_PROXIES[0]", ""),
    ],
)
def test_invalid_values_name_the_variable(
    values: dict[str, str], field: str, fragment: str
) -> None:
    with pytest.raises(InvalidSetting) as caught:
        load_settings({"service": "orders"}, environ=values)
    error = caught.value
    assert error.field == field
    assert error.source == "environment"
    assert error.problem == "invalid"
    assert str(error).startswith(f"{field}: ")
    assert str(error).endswith("(from environment)")
    assert fragment in str(error)


def test_combined_checks_blame_the_setting_and_its_source(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "max_timeout: 2\n")
    with pytest.raises(InvalidSetting) as caught:
        load_settings(
            framework=django({"SERVICE": "orders", "DEFAULT_TIMEOUT": 5}),
            environ={},
            config_file=config,
        )
    assert str(caught.value) == (
        'MESHWARE["DEFAULT_TIMEOUT"]: expected at most max_timeout (2 s) (from settings.MESHWARE)'
    )


def test_check_settings_reports_every_problem(tmp_path: Path) -> None:
    problems = check_settings(
        framework=django({"RATE_LIMIT": "fast", "TYPO": 1}),
        environ={"MESHWARE_HEALTH": "perhaps"},
        config_file=tmp_path / "missing.yaml",
    )
    assert sorted((p.problem, p.key, p.source) for p in problems) == sorted(
        [
            ("invalid", "config_file", f"config file {tmp_path / 'missing.yaml'}"),
            ("unknown", None, "settings.MESHWARE"),
            ("invalid", "rate_limit", "settings.MESHWARE"),
            ("invalid", "health", "environment"),
            ("missing", "service", "defaults"),
        ]
    )
    assert check_settings({"service": "orders"}, environ={}) == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("service: [unclosed", "not valid YAML"),
        ("- a list\n", "expected a mapping of settings in the file, got list"),
        ("service: a\nconfig_file: other.yaml\n", "cannot name another config file"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, fragment: str) -> None:
    config = write(tmp_path / "c.yaml", text)
    with pytest.raises(InvalidSetting) as caught:
        load_settings(environ={"MESHWARE_CONFIG_FILE": str(config)})
    assert fragment in str(caught.value)
    assert caught.value.key == "config_file"


def test_an_unreadable_config_file_names_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InvalidSetting) as caught:
        load_settings({"service": "a"}, environ={"MESHWARE_CONFIG_FILE": str(missing)})
    assert caught.value.field == "MESHWARE_CONFIG_FILE"
    assert str(caught.value).startswith("MESHWARE_CONFIG_FILE: cannot read the config file: ")


def test_a_django_setting_that_is_not_a_dict() -> None:
    with pytest.raises(InvalidSetting) as caught:
        django("orders")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "MESHWARE: expected a mapping of settings, got str (from settings.MESHWARE)"
    )


# -- values -------------------------------------------------------------------------------------


def test_text_forms_from_the_environment(pki: Pki) -> None:
    merged = load_settings(
        environ={
            "MESHWARE_SERVICE": "orders",
            "MESHWARE_REQUIRE_IDENTITY": "yes",
            "MESHWARE_BUNDLE": str(pki.bundle),
            "MESHWARE_VERSION": "",
            "MESHWARE_TRUSTED_PROXIES": "10.0.0.0/8, spiffe://cluster.local/ns/a/sa/gw",
            "MESHWARE_ACCESS_LOG": "off",
            "MESHWARE_TRACE_SAMPLE": "0.5",
            "MESHWARE_TRACE_PROPAGATORS": '["tracecontext"]',
            "MESHWARE_DEFAULT_TIMEOUT": "2.5",
            "MESHWARE_MAX_TIMEOUT": "none",
            "MESHWARE_RATE_LIMIT": "100/second burst 20",
        },
    )
    assert merged.require_identity is True
    assert merged.version is None
    assert merged.trusted_proxies == ("10.0.0.0/8", "spiffe://cluster.local/ns/a/sa/gw")
    assert merged.access_log is False
    assert merged.trace_sample == 0.5
    assert merged.trace_propagators == ("tracecontext",)
    assert merged.default_timeout == 2.5
    assert merged.max_timeout is None
    assert merged.rate_limit == RateLimitPolicy(
        rules=(RateLimitRule(name="default", rate="100/second burst 20"),)
    )
    # require_identity needs a bundle: the settings refuse the combination by name.
    with pytest.raises(InvalidSetting, match=r"^MESHWARE_REQUIRE_IDENTITY: needs a trust bundle"):
        load_settings(environ={"MESHWARE_SERVICE": "o", "MESHWARE_REQUIRE_IDENTITY": "1"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (False, None),
        ("off", None),
        ("5/minute", RateLimitPolicy(rules=(RateLimitRule(name="default", rate="5/minute"),))),
        (
            {
                "rate": "5/minute",
                "key": ["client_ip", "header:x-tenant"],
                "name": "per-tenant",
                "backend": "memory://?max_keys=10",
            },
            RateLimitPolicy(
                rules=(
                    RateLimitRule(
                        name="per-tenant", rate="5/minute", key=("client_ip", "header:x-tenant")
                    ),
                ),
                backend="memory://?max_keys=10",
            ),
        ),
        (
            {
                "rules": [
                    {"name": "writes", "rate": "10/s", "match": {"methods": ["POST"]}},
                    {"name": "try", "rate": "1/s", "shadow": True},
                ],
                "headers": "ietf+legacy",
                "failure_mode": "closed",
            },
            RateLimitPolicy(
                rules=(
                    RateLimitRule(name="writes", rate="10/s", match=None).__class__(
                        name="writes",
                        rate="10/s",
                        match=__import__(
                            "meshware.policy.ratelimit"
                        ).policy.ratelimit.RateLimitMatch(methods=("POST",)),
                    ),
                    RateLimitRule(name="try", rate="1/s", shadow=True),
                ),
                headers="ietf+legacy",
                failure_mode="closed",
            ),
        ),
    ],
)
def test_rate_limit_forms(value: object, expected: RateLimitPolicy | None) -> None:
    assert load_settings({"service": "o", "rate_limit": value}, environ={}).rate_limit == expected


def test_rate_limit_mapping_errors_name_the_field() -> None:
    with pytest.raises(InvalidSetting) as caught:
        load_settings(
            {"service": "o", "rate_limit": {"rules": [{"name": "a", "rat": "1/s"}]}}, environ={}
        )
    assert caught.value.field == "rate_limit.rules[0].rat"
    policy = RateLimitPolicy(rules=(RateLimitRule(name="x", rate="1/s"),))
    assert load_settings({"service": "o", "rate_limit": policy}, environ={}).rate_limit is policy


def test_policies_as_objects_mappings_and_manifests() -> None:
    obj = AuthorizationPolicy(name="obj", action="DENY", rules=[Rule(to=[Operation(paths=["/x"])])])
    manifest = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "manifest", "annotations": {"istio.io/dry-run": "true"}},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]},
    }
    mapping = {
        "name": "mapping",
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}],
        "dryRun": False,
    }
    merged = load_settings({"service": "o", "policies": [obj, manifest, mapping]}, environ={})
    assert [(p.name, p.action, p.dry_run) for p in merged.policies] == [
        ("obj", "DENY", False),
        ("manifest", "DENY", True),
        ("mapping", "ALLOW", False),
    ]
    authorizer = merged.inbound_config().authorizer()
    assert authorizer.decide(RequestFacts(method="GET", path="/x")).code == "denied-by-policy"
    assert authorizer.decide(RequestFacts(method="GET", path="/y", source_namespace="shop")).allowed
    with pytest.raises(InvalidSetting) as caught:
        load_settings({"service": "o", "policies": [mapping, mapping]}, environ={})
    assert caught.value.field == "policies[1].name"


def test_jwt_rules_services_retry_and_routes(pki: Pki) -> None:
    merged = load_settings(
        {
            "service": "orders",
            "jwt_rules": [{"issuer": "https://id.example", "jwksUri": "https://id.example/k"}],
            "services": {"payments": "127.0.0.1:9001, 127.0.0.1:9002"},
            "retry": {"attempts": 5, "perTryTimeout": "2s", "retryOn": "5xx"},
            "virtual_services": [
                {
                    "hosts": ["payments"],
                    "http": [{"route": [{"destination": {"host": "payments"}}]}],
                }
            ],
            "destination_rules": [
                {"host": "payments", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}
            ],
            "outbound_timeout": "3",
        },
        environ={},
    )
    assert merged.jwt_rules == (
        JwtRule(issuer="https://id.example", jwks_uri="https://id.example/k"),
    )
    outbound = merged.outbound_config()
    assert outbound.resolver is not None
    assert list(outbound.resolver.resolve("payments") or ()) == [
        Endpoint("127.0.0.1", 9001),
        Endpoint("127.0.0.1", 9002),
    ]
    assert outbound.resolver.resolve("elsewhere") is None
    assert outbound.retry == RetryPolicy.from_mapping(
        {"attempts": 5, "perTryTimeout": "2s", "retryOn": "5xx"}
    )
    assert outbound.routes is not None and outbound.destinations[0].host == "payments"
    assert outbound.timeout == 3.0
    assert merged.inbound_config().layers() == ("telemetry", "health", "deadline", "jwt")


# -- certificates and the configurations --------------------------------------------------------


def test_cert_dir_turns_on_identity_and_outbound_mtls(pki: Pki) -> None:
    merged = load_settings({"service": "orders"}, environ={"MESHWARE_CERT_DIR": str(pki.root)})
    expected_bundle = pki.paths("orders").bundle
    assert merged.bundle_path() == str(expected_bundle)
    inbound = merged.inbound_config()
    assert "identity" in inbound.layers()
    assert inbound.bundle == str(expected_bundle)
    assert merged.outbound_config().cert_dir == str(pki.root)
    with pytest.raises(InvalidSetting) as caught:
        load_settings({"service": "stranger"}, environ={"MESHWARE_CERT_DIR": str(pki.root)})
    assert caught.value.field == "MESHWARE_CERT_DIR"
    assert "no credentials for default/stranger" in str(caught.value)
    assert "meshware cert issue stranger" in str(caught.value)


def test_tracing_and_metrics_switches() -> None:
    merged = load_settings(
        {"service": "orders", "metrics": False, "tracing": False, "health": False}, environ={}
    )
    inbound = merged.inbound_config()
    assert inbound.metrics is None and inbound.metrics_path is None
    assert inbound.health is None and inbound.tracing is None
    traced = load_settings(
        {
            "service": "orders",
            "trace_exporter": "OTLP",
            "otlp_endpoint": "http://collector:4318",
            "trace_sample": 1,
        },
        environ={},
    )
    tracing = traced.tracing_config()
    assert tracing is not None
    assert (tracing.service_name, tracing.exporter, tracing.sampler_ratio) == (
        "orders",
        "otlp",
        1.0,
    )
    with pytest.raises(InvalidSetting) as caught:
        load_settings({"service": "o", "otlp_endpoint": "http://c:4318"}, environ={})
    assert caught.value.field == "otlp_endpoint"


def test_access_log_file_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    merged = load_settings({"service": "orders"}, environ={"MESHWARE_ACCESS_LOG_FILE": str(path)})
    log = merged.inbound_config().access_log
    assert isinstance(log, AccessLog) and log.file is not None
    assert log.file.path == str(path)
    log.close()
    off = load_settings(
        {"service": "orders", "access_log": False, "access_log_file": str(path)}, environ={}
    )
    assert off.inbound_config().access_log is False
    with pytest.raises(InvalidSetting) as caught:
        load_settings(
            {"service": "orders", "access_log_file": str(tmp_path / "no" / "a.log")}, environ={}
        )
    assert caught.value.field == "access_log_file"
    assert str(caught.value) == (
        f"access_log_file: cannot open {tmp_path / 'no' / 'a.log'} for appending: "
        f"{tmp_path / 'no'} is not a directory (from code)"
    )
    with pytest.raises(InvalidSetting) as caught:
        load_settings({"service": "orders", "access_log_file": str(tmp_path)}, environ={})
    assert "not a writable file" in str(caught.value)
    # Loading settings checks the path but creates nothing.
    later = tmp_path / "later.log"
    load_settings({"service": "orders", "access_log_file": str(later)}, environ={})
    assert not later.exists()


def test_mesh_settings_built_directly_are_validated_the_same_way() -> None:
    direct = MeshSettings(service="orders", trace_propagators="tracecontext,b3", access_log="0")
    assert direct.trace_propagators == ("tracecontext", "b3")
    assert direct.access_log is False
    with pytest.raises(ConfigurationError) as caught:
        MeshSettings(service="orders", rate_limit={"rules": "many"})
    assert caught.value.field == "rate_limit.rules"
    changed = dataclasses.replace(direct, namespace="shop")
    assert changed.namespace == "shop"


def test_every_setting_is_a_field_and_documented() -> None:
    names = [f.name for f in dataclasses.fields(MeshSettings) if f.name != "sources"]
    assert names == list(SETTINGS)
    docs = (ROOT / "docs" / "settings.md").read_text()
    for key, env, _default, _help in settings_table():
        assert re.search(rf"`{key}`", docs), key
        assert env in docs, env


# -- properties ---------------------------------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(SETTINGS)), text=_TEXT)
def test_any_environment_text_loads_or_raises_invalid_setting(key: str, text: str) -> None:
    environ = {"MESHWARE_SERVICE": "orders", f"MESHWARE_{key.upper()}": text}
    try:
        merged = load_settings(environ=environ)
    except InvalidSetting as exc:
        assert exc.source in ("environment", "defaults") or exc.source.startswith("config file")
        assert exc.field is not None
    else:
        assert merged.service in ("orders", text.strip())


@settings(max_examples=200, deadline=None)
@given(
    document=st.dictionaries(
        st.sampled_from([*sorted(SETTINGS), "unknown", "SERVICE"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | _TEXT,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
            max_leaves=6,
        ),
        max_size=4,
    )
)
def test_any_framework_mapping_loads_or_raises_invalid_setting(document: dict[str, Any]) -> None:
    try:
        load_settings(framework=django(document), environ={})
    except InvalidSetting as exc:
        assert exc.problem in ("unknown", "missing", "invalid")
