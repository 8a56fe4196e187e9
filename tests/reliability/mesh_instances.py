"""Replicated services on real ``meshware serve`` processes, and one instance killed under load.

The instances run :mod:`tests.integration.apps`'s ``backend`` (uvicorn, STRICT mTLS), which
appends every request it executes to its own log file before doing anything else: the file
outlives a SIGKILL, so what a killed instance had executed is still counted, by
``x-request-id``. The caller is meshware's own ``mesh_client``.

:func:`kill_under_load` is the scenario shared by ``test_kill_instance.py`` and the soak:
steady concurrent load of idempotent GETs and of POSTs with and without an
``Idempotency-Key`` against three instances, one of them SIGKILLed mid-load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshware.exceptions import MeshwareError
from meshware.introspection import Introspection, outbound_state_of
from meshware.outbound.client import OutboundConfig, mesh_client
from meshware.outbound.destination import DestinationRule
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.retry import RetryPolicy
from meshware.telemetry.metrics import MeshMetrics
from tests.servers import PROCESSES, kill_server, meshware_serve

BACKEND = "tests.integration.apps:backend"
KINDS = ("get", "keyed", "unkeyed")
"""The calls of the load: idempotent GETs, POSTs with an ``Idempotency-Key``, POSTs without."""


@dataclass(frozen=True)
class Instance:
    """One running server process of a service."""

    service: str
    name: str
    port: int
    log: Path
    version: str = "v1"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port, labels={"version": self.version})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self, prefix: str = "") -> list[dict[str, Any]]:
        """The requests this instance executed whose ``x-request-id`` starts with ``prefix``."""
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [line for line in lines if line["request_id"].startswith(prefix)]


def start(
    stack: contextlib.ExitStack,
    pki: Path,
    service: str,
    name: str,
    *,
    version: str = "v1",
    app: str = BACKEND,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> Instance:
    """Start one instance of ``service`` inside ``stack`` (stopped when the stack closes):
    ``app`` served by ``meshware serve`` with ``args``, labelled ``version``, with ``env``
    added to its environment."""
    log = pki.parent / f"{name}-{os.urandom(4).hex()}.jsonl"
    settings = {
        "MESH_TEST_SERVICE": service,
        "MESH_TEST_INSTANCE": name,
        "MESH_TEST_VERSION": version,
        "MESH_TEST_LOG": str(log),
        **(env or {}),
    }
    port = stack.enter_context(
        meshware_serve(
            app,
            service=service,
            cert_dir=pki,
            env=settings,
            args=args,
            log=pki.parent / f"serve-{name}-{log.stem}.log",
        )
    )
    return Instance(service, name, port, log, version)


def registry(instances: Iterable[Instance]) -> StaticRegistry:
    services: dict[str, list[Endpoint]] = {}
    for instance in instances:
        services.setdefault(instance.service, []).append(instance.endpoint)
    return StaticRegistry(services)


def kill(instance: Instance) -> None:
    """SIGKILL the instance; return once its port refuses connections."""
    kill_server(PROCESSES[instance.port].pid, instance.port)


def samples(metrics: MeshMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric, by their sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def executed(instances: Iterable[Instance], prefix: str) -> Counter[str]:
    """How many times the instances executed each request id starting with ``prefix``."""
    return Counter(
        line["request_id"] for instance in instances for line in instance.requests(prefix)
    )


OUTLIER_RULE = DestinationRule.from_mapping(
    {
        "host": "catalog",
        "trafficPolicy": {
            "outlierDetection": {
                # A connect failure or a reset counts as a gateway error (local-origin errors
                # are not split off): the first one ejects the dead endpoint.
                "consecutiveGatewayErrors": 1,
                "consecutive5xxErrors": 2,
                "interval": "1s",
                # Longer than any run: the dead endpoint stays out.
                "baseEjectionTime": "300s",
                # One of three (33 %) may be ejected; Envoy's default of 10 % ejects none.
                "maxEjectionPercent": 34,
            }
        },
    }
)
RETRY = RetryPolicy(attempts=2, retry_on="5xx,reset,connect-failure")
"""The edge's retry policy: a reset (a call in flight on the killed instance) is retried
when the call is safe to repeat; a connect failure is retried for any method."""


@dataclass
class KillOutcome:
    """What the clients saw and the servers executed in one :func:`kill_under_load` run."""

    sent: Counter[str] = field(default_factory=Counter)
    """Calls made, by kind (``get``, ``keyed``, ``unkeyed``)."""
    failures: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    """The calls that did not end in a 200, by kind: ``"<request id>: <what happened>"``."""
    answered: set[str] = field(default_factory=set)
    """The request ids answered 200."""
    executions: Counter[str] = field(default_factory=Counter)
    """How many times the servers executed each request id (the killed one included)."""
    killed_at: int = 0
    """Calls completed when the SIGKILL was sent."""
    victim: str = ""
    """The killed instance's address."""
    victim_served: int = 0
    """Requests the killed instance had executed (it was in rotation)."""
    ejected: list[str] = field(default_factory=list)
    """The addresses outlier detection had ejected at the end (the client's ``/meshz``)."""
    ejections: float = 0.0
    """``meshware_outbound_outlier_ejections_total`` at the end."""
    retries: dict[str, float] = field(default_factory=dict)
    """``meshware_outbound_retries_total`` at the end, by condition."""
    seconds: float = 0.0

    def repeated(self, kind: str) -> list[str]:
        """The request ids of ``kind`` the servers executed more than once."""
        return sorted(
            rid for rid, n in self.executions.items() if n > 1 and rid.split("-")[1] == kind
        )

    def lost(self) -> list[str]:
        """The request ids answered 200 that no server executed."""
        return sorted(rid for rid in self.answered if self.executions[rid] == 0)


async def kill_under_load(
    pki: Path, *, requests: int, workers: int, kill_after: int, service: str = "catalog"
) -> KillOutcome:
    """Three instances of ``service``; ``workers`` concurrent callers make ``requests`` calls
    (half GETs, a quarter POSTs with an ``Idempotency-Key``, a quarter without); once
    ``kill_after`` calls have completed, one instance is SIGKILLed while the load goes on.

    The certificates of ``service`` and ``frontend`` (the caller) must be in ``pki``.
    """
    if not 0 < kill_after < requests:
        raise ValueError(
            f"kill_after: expected 0 < kill_after < requests ({requests}), got {kill_after}"
        )
    outcome = KillOutcome()
    metrics = MeshMetrics()
    with contextlib.ExitStack() as stack:
        instances = [
            start(stack, pki, service, f"k{n}", args=["--no-access-log"]) for n in (1, 2, 3)
        ]
        victim = instances[1]
        outcome.victim = victim.address
        resolver = registry(instances)
        config = OutboundConfig(
            service="frontend",
            cert_dir=pki,
            resolver=resolver,
            destinations=(OUTLIER_RULE,),
            retry=RETRY,  # the default circuit breaker: it must not open for one dead instance
            metrics=metrics,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=workers),
        )
        numbers = iter(range(requests))
        done = 0

        async with mesh_client(config, rng=random.Random(7)) as client:

            async def call(n: int) -> None:
                nonlocal done
                kind = KINDS[0] if n % 4 < 2 else KINDS[n % 4 - 1]
                rid = f"kill-{kind}-{n}"
                outcome.sent[kind] += 1
                headers = {"x-request-id": rid}
                # ?sleep: every call stays in flight a little, so that some are on the victim
                # when it dies.
                url = f"http://{service}/{'items' if kind == 'get' else 'orders'}?sleep=0.005"
                if kind == "keyed":
                    headers["idempotency-key"] = rid
                try:
                    if kind == "get":
                        response = await client.get(url, headers=headers)
                    else:
                        response = await client.post(url, json={"n": n}, headers=headers)
                except (httpx.HTTPError, MeshwareError) as exc:
                    outcome.failures[kind].append(f"{rid}: {type(exc).__name__}: {exc}")
                else:
                    if response.status_code == 200:
                        outcome.answered.add(rid)
                    else:
                        outcome.failures[kind].append(f"{rid}: HTTP {response.status_code}")
                done += 1

            async def worker() -> None:
                for n in numbers:
                    await call(n)

            async def killer() -> None:
                while done < kill_after:
                    await asyncio.sleep(0.005)
                outcome.killed_at = done
                # The load goes on while the process dies and its port closes.
                await asyncio.to_thread(kill, victim)

            started = time.monotonic()
            await asyncio.gather(killer(), *(worker() for _ in range(workers)))
            outcome.seconds = time.monotonic() - started

            meshz = Introspection(service="frontend")
            state = outbound_state_of(client)
            if state is None:
                raise RuntimeError("the mesh client has no outbound state")
            meshz.add_outbound(state, resolver=resolver)
            outcome.ejected = [
                endpoint["address"]
                for section in meshz.snapshot()["outbound"]
                for cluster in section["clusters"]
                for endpoint in cluster["endpoints"]
                if not endpoint["healthy"]
            ]

        outcome.executions = executed(instances, "kill-")
        outcome.victim_served = len(victim.requests("kill-"))
    outcome.ejections = sum(samples(metrics, "meshware_outbound_outlier_ejections_total").values())
    outcome.retries = {
        dict(labels)["condition"]: value
        for labels, value in samples(metrics, "meshware_outbound_retries_total").items()
    }
    return outcome
