"""The live mesh dashboard: a small Starlette app on 127.0.0.1 (plain HTTP).

Its backend scrapes every instance's ``/metrics`` every two seconds, presenting the
``dashboard`` certificate (the services are STRICT mTLS), and serves the graph as JSON at
``/api/graph``; the page (HTML, inline JS and SVG, nothing from the network) redraws it.

``python -m sample_services.shop.dashboard --run-dir .meshware/shop --port 8600``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from sample_services.shop import observe

SCRAPE_INTERVAL = 2.0
SERVICES = ("users", "catalog", "orders", "payments", "shipping")
EXPECTED_EDGES = (
    ("frontend", "orders"),
    ("frontend", "catalog"),
    ("orders", "users"),
    ("orders", "catalog"),
    ("orders", "shipping"),
    ("orders", "payments"),
)
"""The edges the shop's design has; drawn even before traffic flows over them."""


class Graph:
    """The latest scrape, and the rates since the one before (thread-safe)."""

    def __init__(self, run_dir: Path, clock: Any = time.monotonic) -> None:
        state = json.loads((run_dir / "state.json").read_text())
        self.instances: list[dict[str, Any]] = state["instances"]
        self.cert_dir = Path(state["cert_dir"])
        self.clock = clock
        self._lock = threading.Lock()
        self._previous: tuple[float, observe.MeshView] | None = None
        self._snapshot: dict[str, Any] = self._build(observe.MeshView(), None, 0.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot

    def refresh(self) -> None:
        with observe.scrape_client(self.cert_dir, "dashboard") as client:
            view = observe.scrape(client, self.instances)
        now = self.clock()
        with self._lock:
            previous = self._previous
            elapsed = now - previous[0] if previous else 0.0
            self._snapshot = self._build(view, previous[1] if previous else None, elapsed)
            self._previous = (now, view)

    def _build(
        self, view: observe.MeshView, before: observe.MeshView | None, elapsed: float
    ) -> dict[str, Any]:
        def rate(now: observe.Signals | None, then: observe.Signals | None) -> float:
            if now is None or not elapsed:
                return 0.0
            return max(0.0, (now.requests - (then.requests if then else 0.0)) / elapsed)

        nodes = []
        for service in SERVICES:
            signals = view.services.get(service)
            instances = [i for i in self.instances if i["service"] == service]
            up = all(view.reachable.get(i["name"], False) for i in instances)
            node = {
                "id": service,
                "framework": instances[0]["framework"] if instances else None,
                "versions": view.versions.get(service, {}),
                "up": up,
                "rps": round(rate(signals, before.services.get(service) if before else None), 2),
                **(signals or observe.Signals()).as_dict(),
            }
            node["health"] = _health(node)
            nodes.append(node)
        pairs = list(EXPECTED_EDGES)
        pairs += [p for p in sorted(view.edges) if p not in pairs and p[0] != "unknown"]
        edges = []
        for source, destination in pairs:
            signals = view.edges.get((source, destination))
            then = before.edges.get((source, destination)) if before else None
            edge = {
                "id": f"{source}->{destination}",
                "source": source,
                "destination": destination,
                "rps": round(rate(signals, then), 2),
                **(signals or observe.Signals()).as_dict(),
            }
            edge["health"] = _health(edge)
            edges.append(edge)
        return {"nodes": nodes, "edges": edges, "scraped_at": time.time()}


def _health(item: dict[str, Any]) -> str:
    if item.get("up") is False:
        return "down"
    if not item["requests"]:
        return "idle"
    bad = (item["errors"] + item["denied"]) / item["requests"]
    return "healthy" if bad < 0.01 else "degraded" if bad < 0.2 else "failing"


def create_app(graph: Graph, *, scrape: bool = True) -> Starlette:
    """The dashboard application over ``graph`` (scraping in the background unless told not)."""

    async def page(request: Request) -> HTMLResponse:
        initial = json.dumps(graph.snapshot()).replace("</", "<\\/")
        return HTMLResponse(PAGE.replace("__INITIAL__", initial))

    async def api_graph(request: Request) -> JSONResponse:
        return JSONResponse(graph.snapshot())

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                with contextlib.suppress(Exception):  # a service down is shown, not fatal
                    await asyncio.to_thread(graph.refresh)
                await asyncio.sleep(SCRAPE_INTERVAL)

        task = asyncio.create_task(loop()) if scrape else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Starlette(
        routes=[Route("/", page), Route("/api/graph", api_graph), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshware · shop mesh</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#0f172a;color:#e2e8f0}
header{padding:12px 20px;border-bottom:1px solid #1e293b;display:flex;gap:16px;align-items:baseline}
h1{font-size:18px;margin:0} #stamp{color:#94a3b8;font-size:13px}
main{display:grid;grid-template-columns:1fr 360px;gap:12px;padding:12px}
svg{background:#111827;border-radius:8px;width:100%;height:560px}
.node rect{rx:10;stroke-width:2} .node text{fill:#e2e8f0;font-size:13px}
.node .sub{fill:#94a3b8;font-size:11px}
.healthy{stroke:#22c55e} .degraded{stroke:#f59e0b} .failing{stroke:#ef4444}
.idle{stroke:#64748b} .down{stroke:#ef4444;stroke-dasharray:4 3}
.edge path{fill:none;stroke-width:2.5} .edge text{fill:#cbd5e1;font-size:11px}
table{width:100%;border-collapse:collapse;font-size:12px;background:#111827;border-radius:8px}
td,th{padding:6px;border-bottom:1px solid #1e293b;text-align:right} td:first-child,th:first-child{text-align:left}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px}
.bg-healthy{background:#22c55e}.bg-degraded{background:#f59e0b}.bg-failing{background:#ef4444}
.bg-idle{background:#64748b}.bg-down{background:#ef4444}
</style></head><body>
<header><h1>shop mesh</h1><span id="stamp">waiting for the first scrape</span></header>
<main><svg id="graph" viewBox="0 0 900 560" role="img" aria-label="service graph">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7"
orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#94a3b8"/></marker></defs>
<g id="edges"></g><g id="nodes"></g></svg>
<section><table id="signals"><thead><tr><th>service</th><th>rps</th><th>success</th>
<th>p50</th><th>p99</th><th>403</th><th>429</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
const POS = {frontend:[100,120], orders:[330,330], users:[680,70], catalog:[680,210],
  shipping:[680,350], payments:[680,490]};
const COLORS = {healthy:"#22c55e", degraded:"#f59e0b", failing:"#ef4444", idle:"#64748b",
  down:"#ef4444"};
const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function pct(v) { return v === null ? "-" : (100 * v).toFixed(1) + "%"; }
function ms(v) { return v === null ? "-" : v.toFixed(1) + " ms"; }
function position(id, i) { return POS[id] || [360, 80 + 60 * i]; }
function render(g) {
  const edges = document.getElementById("edges"), nodes = document.getElementById("nodes");
  edges.replaceChildren(); nodes.replaceChildren();
  g.edges.forEach((e, i) => {
    const [x1, y1] = position(e.source, i), [x2, y2] = position(e.destination, i);
    const sx = x1 + 75, tx = x2 - 75, mx = (sx + tx) / 2;
    const group = el("g", {"class": "edge", "data-edge": e.id, "data-health": e.health,
      "data-requests": e.requests});
    group.appendChild(el("path", {d: `M${sx},${y1} C${mx},${y1} ${mx},${y2} ${tx},${y2}`,
      stroke: COLORS[e.health], "marker-end": "url(#arrow)"}));
    const label = `${e.requests} req · ${pct(e.requests ? 1 - (e.errors + e.denied) / e.requests : null)} ok`;
    const t = 0.55, u = 1 - t;  // a point on the curve, past where edges fan out
    const lx = u*u*u*sx + 3*u*u*t*mx + 3*u*t*t*mx + t*t*t*tx;
    const ly = u*u*u*y1 + 3*u*u*t*y1 + 3*u*t*t*y2 + t*t*t*y2;
    group.appendChild(el("text", {x: lx - 60, y: ly - 6}, label));
    edges.appendChild(group);
  });
  const all = [{id: "frontend", health: "idle", requests: 0, rps: 0, framework: "edge client",
    p99_ms: null, success_rate: null, versions: {}}].concat(g.nodes);
  all.forEach((n, i) => {
    const [x, y] = position(n.id, i);
    const group = el("g", {"class": "node", "data-service": n.id, "data-health": n.health,
      transform: `translate(${x - 75},${y - 32})`});
    group.appendChild(el("rect", {width: 150, height: 64, fill: "#1e293b", "class": n.health}));
    group.appendChild(el("text", {x: 12, y: 22}, n.id));
    group.appendChild(el("text", {x: 12, y: 39, "class": "sub"}, n.framework || ""));
    const versions = Object.entries(n.versions || {}).map(([v, c]) => `${v}:${c}`).join(" ");
    const line = n.id === "frontend" ? "" : `${n.rps.toFixed(1)} rps · p99 ${ms(n.p99_ms)} ${versions}`;
    group.appendChild(el("text", {x: 12, y: 55, "class": "sub"}, line));
    nodes.appendChild(group);
  });
  const body = document.querySelector("#signals tbody");
  body.replaceChildren();
  g.nodes.forEach(n => {
    const row = document.createElement("tr");
    row.setAttribute("data-signals", n.id);
    [`<span class="dot bg-${n.health}"></span>${n.id}`, n.rps.toFixed(1), pct(n.success_rate),
     ms(n.p50_ms), ms(n.p99_ms), n.denied, n.rate_limited].forEach(v => {
      const td = document.createElement("td"); td.innerHTML = v; row.appendChild(td); });
    body.appendChild(row);
  });
  document.getElementById("stamp").textContent =
    "scraped " + new Date(g.scraped_at * 1000).toLocaleTimeString() + " · refreshes every 2 s";
}
render(__INITIAL__);
async function poll() {
  try { const r = await fetch("/api/graph", {cache: "no-store"}); render(await r.json()); }
  catch (err) { document.getElementById("stamp").textContent = "scrape failed: " + err; }
}
setInterval(poll, 2000);
</script></body></html>
"""


def main(argv: list[str] | None = None) -> None:
    """Serve the dashboard of the run in ``--run-dir`` on ``127.0.0.1:--port``."""
    parser = argparse.ArgumentParser(prog="python -m sample_services.shop.dashboard")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8600)
    args = parser.parse_args(argv)
    graph = Graph(args.run_dir)
    with contextlib.suppress(Exception):
        graph.refresh()
    uvicorn.run(create_app(graph), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
