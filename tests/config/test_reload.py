"""ConfigWatcher: swaps a changed configuration in, refuses a broken one, counts, reports."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshware.config import MeshConfig, MeshConfigError
from meshware.config.reload import ConfigWatcher, problems_of
from meshware.exceptions import ConfigurationError
from meshware.telemetry.metrics import MeshMetrics

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}}}
spec:
  selector:
    matchLabels: {{app: catalog}}
  rules:
  - from:
    - source: {{principals: [{principals}]}}
"""

USERS = POLICY.format(name="allow-users", principals='"cluster.local/ns/default/sa/users"')
BOTH = POLICY.format(
    name="allow-both",
    principals='"cluster.local/ns/default/sa/users", "cluster.local/ns/default/sa/shipping"',
)
BROKEN = USERS.replace("principals:", "principalz:")


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    # Bump the modification time explicitly: two writes within one clock tick must still differ.
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    write(path, USERS)
    return path


def watcher_for(path: Path, **kwargs: object) -> ConfigWatcher:
    kwargs.setdefault("clock", FakeClock())
    kwargs.setdefault("wall_clock", FakeClock(1_700_000_000.0))
    return ConfigWatcher(path, service="catalog", **kwargs)  # type: ignore[arg-type]


def reload_counts(metrics: MeshMetrics) -> dict[str, float]:
    text = metrics.exposition()[0].decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "meshware_config_reloads":
            for sample in family.samples:
                counts[sample.labels["outcome"]] = sample.value
    return counts


def test_first_load_is_in_force(mesh_file: Path) -> None:
    watcher = watcher_for(mesh_file)
    assert [p.name for p in watcher.config.policies] == ["allow-users"]
    assert watcher.generation == 1
    assert watcher.loaded_at == 1_700_000_000.0
    assert watcher.last_outcome is None
    assert watcher.last_error is None
    assert watcher.reloads == {"ok": 0, "error": 0}


def test_broken_file_at_start_up_raises(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, BROKEN)
    with pytest.raises(MeshConfigError) as info:
        ConfigWatcher(path, service="catalog")
    assert info.value.problems[0].field == "spec.rules[0].from[0].source.principalz"


def test_a_changed_file_is_swapped_in(mesh_file: Path) -> None:
    wall = FakeClock(1_700_000_000.0)
    watcher = watcher_for(mesh_file, wall_clock=wall)
    old = watcher.config
    write(mesh_file, BOTH)
    wall.now += 30
    assert watcher.reload_if_changed() == "ok"
    assert watcher.config is not old
    assert [p.name for p in watcher.config.policies] == ["allow-both"]
    assert watcher.generation == 2
    assert watcher.loaded_at == 1_700_000_030.0
    assert watcher.last_outcome == "ok"
    assert watcher.reloads == {"ok": 1, "error": 0}
    # Nothing changed since: nothing to do.
    assert watcher.reload_if_changed() is None


def test_digest_follows_the_content(mesh_file: Path) -> None:
    watcher = watcher_for(mesh_file)
    sha = hashlib.sha256(USERS.encode()).hexdigest()
    expected = hashlib.sha256(f"{mesh_file}\0{sha}\n".encode()).hexdigest()
    assert watcher.config.source.digest == expected
    write(mesh_file, BOTH)
    watcher.reload()
    assert watcher.config.source.digest != expected
    write(mesh_file, USERS)
    watcher.reload()
    assert watcher.config.source.digest == expected


def test_touched_but_identical_is_unchanged(mesh_file: Path) -> None:
    watcher = watcher_for(mesh_file)
    write(mesh_file, USERS)
    assert watcher.reload_if_changed() == "unchanged"
    assert watcher.generation == 1
    assert watcher.reloads == {"ok": 0, "error": 0}
    assert watcher.reload_if_changed() is None


def test_a_broken_file_keeps_the_last_good_config(
    mesh_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = MeshMetrics()
    wall = FakeClock(1_700_000_000.0)
    watcher = watcher_for(mesh_file, metrics=metrics, wall_clock=wall)
    good = watcher.config
    write(mesh_file, BROKEN)
    wall.now += 5
    with caplog.at_level(logging.ERROR, logger="meshware.config"):
        assert watcher.reload_if_changed() == "error"
    assert watcher.config is good
    assert watcher.generation == 1
    assert watcher.last_outcome == "error"
    assert isinstance(watcher.last_error, MeshConfigError)
    assert watcher.last_error_at == 1_700_000_005.0
    [problem] = problems_of(watcher.last_error)
    assert "spec.rules[0].from[0].source.principalz: unknown field" in problem
    assert problem.startswith(f"{mesh_file}: document 1 (AuthorizationPolicy allow-users), line 9")
    [record] = caplog.records
    assert "the last good configuration (generation 1" in record.getMessage()
    assert problem in record.getMessage()
    assert reload_counts(metrics) == {"error": 1.0}
    # The same broken content is not tried again until the file changes.
    assert watcher.reload_if_changed() is None
    assert watcher.reloads == {"ok": 0, "error": 1}


def test_the_same_failure_is_logged_once(mesh_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher = watcher_for(mesh_file)
    with caplog.at_level(logging.ERROR, logger="meshware.config"):
        write(mesh_file, BROKEN)
        assert watcher.reload_if_changed() == "error"
        write(mesh_file, BROKEN + "\n")  # changed bytes, the same problem
        assert watcher.reload_if_changed() == "error"
    assert watcher.reloads == {"ok": 0, "error": 2}
    assert len(caplog.records) == 1


def test_recovery_after_a_broken_file(mesh_file: Path) -> None:
    metrics = MeshMetrics()
    watcher = watcher_for(mesh_file, metrics=metrics)
    write(mesh_file, BROKEN)
    assert watcher.reload_if_changed() == "error"
    write(mesh_file, BOTH)
    assert watcher.reload_if_changed() == "ok"
    assert watcher.last_error is None
    assert watcher.last_error_at is None
    assert [p.name for p in watcher.config.policies] == ["allow-both"]
    assert reload_counts(metrics) == {"error": 1.0, "ok": 1.0}


def test_poll_checks_at_most_once_per_interval(mesh_file: Path) -> None:
    clock = FakeClock(100.0)
    watcher = watcher_for(mesh_file, clock=clock, interval=1.0)
    write(mesh_file, BOTH)
    assert watcher.poll() is None  # the first check is due one interval after start
    clock.now = 100.5
    assert watcher.poll() is None
    clock.now = 101.0
    assert watcher.poll() is None  # changed: wait one more check for the writer to finish
    clock.now = 101.9
    assert watcher.poll() is None
    clock.now = 102.0
    assert watcher.poll() == "ok"
    write(mesh_file, USERS)
    clock.now = 103.0
    assert watcher.poll() is None
    write(mesh_file, USERS + "\n")  # still being written: settle again
    clock.now = 104.0
    assert watcher.poll() is None
    clock.now = 105.0
    assert watcher.poll() == "ok"
    assert [p.name for p in watcher.config.policies] == ["allow-users"]
    assert watcher.generation == 3


def test_listeners_prepare_then_commit_all_or_nothing(mesh_file: Path) -> None:
    watcher = watcher_for(mesh_file)
    committed: list[str] = []

    def good(config: MeshConfig) -> Callable[[], None]:
        return lambda: committed.append("good")

    refuse = {"now": False}

    def picky(config: MeshConfig) -> Callable[[], None]:
        if refuse["now"]:
            raise ConfigurationError("not this one", field="policies", value=1)
        return lambda: committed.append("picky")

    watcher.subscribe(good)
    watcher.subscribe(picky)
    watcher.subscribe(lambda config: None)
    write(mesh_file, BOTH)
    assert watcher.reload() == "ok"
    assert committed == ["good", "picky"]
    refuse["now"] = True
    write(mesh_file, USERS)
    before = watcher.config
    assert watcher.reload() == "error"
    assert committed == ["good", "picky"]  # nobody committed
    assert watcher.config is before
    assert str(watcher.last_error) == "policies: not this one"


def test_a_listener_bug_is_reported_not_raised(mesh_file: Path) -> None:
    watcher = watcher_for(mesh_file)

    def buggy(config: MeshConfig) -> None:
        raise KeyError("oops")

    watcher.subscribe(buggy)
    write(mesh_file, BOTH)
    assert watcher.reload() == "error"
    assert isinstance(watcher.last_error, ConfigurationError)
    assert str(watcher.last_error) == "KeyError: 'oops'"
    assert isinstance(watcher.last_error.__cause__, KeyError)


def test_a_file_added_to_a_directory_is_a_change(tmp_path: Path) -> None:
    directory = tmp_path / "mesh"
    directory.mkdir()
    write(directory / "a.yaml", USERS)
    watcher = ConfigWatcher(directory, service="catalog")
    assert watcher.reload_if_changed() is None
    write(
        directory / "b.yaml",
        "apiVersion: meshware.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: rl}\n"
        "spec:\n  rules:\n  - {name: per-caller, rate: 5/minute}\n",
    )
    assert watcher.reload_if_changed() == "ok"
    assert watcher.config.rate_limit is not None
    assert [r.name for r in watcher.config.rate_limit.rules] == ["per-caller"]
    assert [f.path for f in watcher.config.source.files] == [
        str(directory / "a.yaml"),
        str(directory / "b.yaml"),
    ]


def test_a_deleted_file_is_refused(mesh_file: Path) -> None:
    watcher = watcher_for(mesh_file)
    mesh_file.unlink()
    assert watcher.reload_if_changed() == "error"
    assert problems_of(watcher.last_error) == [
        f"{mesh_file}: cannot read: No such file or directory"
    ]
    assert [p.name for p in watcher.config.policies] == ["allow-users"]


def test_thread_start_stop(mesh_file: Path) -> None:
    watcher = watcher_for(mesh_file, interval=0.05)
    watcher.start()
    watcher.start()  # idempotent
    assert watcher.running
    watcher.stop()
    assert not watcher.running


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"interval": 0}, "interval", "expected a positive, finite number of seconds"),
        ({"interval": float("inf")}, "interval", "expected a positive, finite number of seconds"),
        ({"interval": True}, "interval", "expected a positive, finite number of seconds"),
    ],
)
def test_bad_arguments(
    mesh_file: Path, kwargs: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        ConfigWatcher(mesh_file, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_no_sources() -> None:
    with pytest.raises(ConfigurationError, match="sources: expected at least one file"):
        ConfigWatcher([])


def test_subscribe_refuses_a_non_callable(mesh_file: Path) -> None:
    with pytest.raises(ConfigurationError, match="listener: expected a callable"):
        watcher_for(mesh_file).subscribe(42)  # type: ignore[arg-type]
