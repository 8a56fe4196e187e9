"""One instance of a replicated service SIGKILLed under steady load (``make test``'s version;
the soak runs it longer).

Three ``meshware serve`` instances of ``catalog``; the edge's ``mesh_client`` (retries on
``5xx,reset,connect-failure``, outlier detection ejecting on the first gateway error) sends
GETs and POSTs, some with an ``Idempotency-Key``, from eight concurrent callers; one instance
is killed mid-load; the client's circuit breaker is the default one. Counted at the servers,
by ``x-request-id``, from each instance's own request log (the killed one's included): what
was executed, and how many times.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest

from meshware.outbound.client import OutboundConfig, mesh_client
from tests.reliability.mesh_instances import (
    OUTLIER_RULE,
    RETRY,
    KillOutcome,
    kill,
    kill_under_load,
    registry,
    start,
)
from tests.servers import issue_pki

pytestmark = pytest.mark.integration

REQUESTS, WORKERS, KILL_AFTER = 800, 8, 250


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), "catalog", "frontend")


@pytest.fixture(scope="module")
def outcome(pki: Path) -> KillOutcome:
    """One run, shared by the tests below (each checks one promise)."""
    result = asyncio.run(
        kill_under_load(pki, requests=REQUESTS, workers=WORKERS, kill_after=KILL_AFTER)
    )
    print(
        f"\nkilled {result.victim} after {result.killed_at} calls: sent {dict(result.sent)}, "
        f"failed { {k: len(v) for k, v in result.failures.items()} }, "
        f"duplicated without a key {len(result.repeated('unkeyed'))}, "
        f"repeated with a key {len(result.repeated('keyed'))}, retries {result.retries}, "
        f"{result.seconds:.1f} s"
    )
    return result


def test_every_call_was_made(outcome: KillOutcome) -> None:
    assert sum(outcome.sent.values()) == REQUESTS
    assert outcome.sent["get"] == REQUESTS // 2
    assert outcome.sent["keyed"] == outcome.sent["unkeyed"] == REQUESTS // 4
    assert KILL_AFTER <= outcome.killed_at < REQUESTS
    assert outcome.victim_served > 0  # the victim was in rotation before it died


def test_no_idempotent_call_fails(outcome: KillOutcome) -> None:
    # GETs and keyed POSTs in flight on the victim, or sent to it before its ejection, were
    # retried on another instance.
    assert outcome.failures["get"] == []
    assert outcome.failures["keyed"] == []


def test_no_post_without_a_key_is_executed_twice(outcome: KillOutcome) -> None:
    assert outcome.repeated("unkeyed") == []
    # A POST without a key cut by the kill may fail (it is not repeated: the victim may have
    # executed it); one that never reached a server was retried elsewhere. So each failed
    # one was executed at most once, and few failed: at most the calls in flight at the kill.
    failed = [line.split(":")[0] for line in outcome.failures["unkeyed"]]
    assert all(outcome.executions[rid] <= 1 for rid in failed)
    assert len(failed) <= WORKERS


def test_every_answered_call_was_executed(outcome: KillOutcome) -> None:
    assert outcome.lost() == []
    assert all(rid in outcome.executions for rid in outcome.answered)


def test_the_killed_endpoint_is_ejected(outcome: KillOutcome) -> None:
    assert outcome.ejected == [outcome.victim]
    assert outcome.ejections == 1.0
    # What reached the dead endpoint was retried: connect failures, and resets of the calls
    # in flight at the kill.
    assert outcome.retries
    assert set(outcome.retries) <= {"connect-failure", "reset", "5xx"}


async def _burst_on_a_dying_instance(pki: Path) -> tuple[Counter[str], Counter[str]]:
    with contextlib.ExitStack() as stack:
        instances = [
            start(stack, pki, "catalog", f"b{n}", args=["--no-access-log"]) for n in (1, 2, 3)
        ]
        config = OutboundConfig(
            service="frontend",
            cert_dir=pki,
            resolver=registry(instances),
            destinations=(OUTLIER_RULE,),
            retry=RETRY,
        )
        async with mesh_client(config, rng=random.Random(1)) as client:

            async def get(path: str) -> str:
                try:
                    return str((await client.get(f"http://catalog{path}")).status_code)
                except httpx.TransportError as exc:
                    return type(exc).__name__

            slow = [asyncio.create_task(get("/items?sleep=1")) for _ in range(15)]
            await asyncio.sleep(0.5)  # about 5 of the 15 are in flight on the victim
            await asyncio.to_thread(kill, instances[1])
            in_flight = Counter(await asyncio.gather(*slow))
            after = Counter(await asyncio.gather(*(get("/items") for _ in range(20))))
    return in_flight, after


def test_the_default_breaker_leaves_one_dead_instance_to_outlier_detection(pki: Path) -> None:
    # The calls that were in flight on the killed instance fail together; the destination's
    # breaker must not take them for the whole destination failing.
    in_flight, after = asyncio.run(_burst_on_a_dying_instance(pki))
    assert after == Counter({"200": 20}), after
    assert "CircuitOpen" not in in_flight, in_flight
