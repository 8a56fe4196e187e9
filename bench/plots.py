"""matplotlib PNGs of one benchmark run, for docs/benchmarks.md (written into ``docs/img/``).

From the sidecar comparison's results (:func:`bench.sidecar.run`):

- ``sidecar-latency.png``: latency added over plain HTTP per call, p50 and p99, with ranges;
- ``sidecar-distribution.png``: the latency distribution of each setup at the fixed rate;
- ``sidecar-throughput.png``: the maximum throughput of each setup;
- ``sidecar-cpu.png``: CPU per 1000 requests, stacked by process;
- ``sidecar-memory.png``: resident memory, stacked by process.

From the Markdown tables another benchmark prints (``bench.inbound_stack``,
``bench.outbound_client``): bars of their throughput columns, ``<name>.png``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["parse_markdown_tables", "sidecar_plots", "table_plot"]

_ROLES = ("A", "B", "A's sidecar", "B's sidecar")
_COLORS = {"plain": "#9e9e9e", "meshware": "#1f77b4", "haproxy": "#d62728", "peer": "#2ca02c"}
_ROLE_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # No timestamps in the file, so that an unchanged figure is an unchanged file.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def _label(results: Mapping[str, Any], setup: str) -> str:
    description = str(results["setups"][setup]["description"])
    return description.replace(" on both sides", "").replace(", no mesh", "")


def _errors(values: Sequence[Sequence[float]]) -> list[list[float]]:
    """matplotlib's asymmetric error bars from [median, min, max] triples."""
    return [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]


def _subtitle(results: Mapping[str, Any]) -> str:
    return f"{results['date']} - {str(results['machine']).split(';')[0]}"


def sidecar_plots(results: Mapping[str, Any], directory: Path) -> list[Path]:
    """Write the sidecar comparison's PNGs into ``directory``; return their paths."""
    plt = _pyplot()
    summary = results["summary"]
    setups = list(results["setups"])
    rate = results["options"]["rate"]
    written = []

    others = [s for s in setups if s != "plain"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.38
    for offset, q in ((-width / 2, "p50"), (width / 2, "p99")):
        values = [summary[s][f"added_{q}_ms"] for s in others]
        ax.bar(
            [i + offset for i in range(len(others))],
            [v[0] for v in values],
            width,
            yerr=_errors(values),
            capsize=3,
            label=f"added {q}",
            color=[_COLORS.get(s, "#777777") for s in others],
            alpha=1.0 if q == "p50" else 0.55,
            edgecolor="black",
            linewidth=0.5,
        )
    ax.set_xticks(range(len(others)), [_label(results, s) for s in others])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("ms added per call over plain HTTP")
    ax.set_title(f"Latency added per call at {rate:g} req/s (p50 solid, p99 light)\n"
                 f"{_subtitle(results)}", fontsize=9)  # fmt: skip
    written.append(_save(fig, directory / "sidecar-latency.png"))

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for setup in setups:
        runs = results["setups"][setup]["fixed_rate"]
        middle = sorted(runs, key=lambda r: r["p50_ms"])[len(runs) // 2]
        points = [(q, ms) for q, ms in middle["percentiles_ms"] if q < 100.0]
        xs = [1.0 / (1.0 - q / 100.0) for q, _ in points]
        ax.plot(
            xs,
            [ms for _, ms in points],
            marker="o",
            markersize=3,
            label=_label(results, setup),
            color=_COLORS.get(setup, "#777777"),
        )
        ticks = [q for q, _ in points]
    ax.set_xscale("log")
    ax.set_xticks([1.0 / (1.0 - q / 100.0) for q in ticks], [f"{q:g}" for q in ticks])
    ax.minorticks_off()
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms (from scheduled send)")
    ax.legend(fontsize=8)
    ax.set_title(f"Latency distribution at {rate:g} req/s (median run)\n{_subtitle(results)}",
                 fontsize=9)  # fmt: skip
    written.append(_save(fig, directory / "sidecar-distribution.png"))

    fig, ax = plt.subplots(figsize=(7, 3.6))
    values = [summary[s]["max_rps"] for s in setups]
    ax.bar(
        range(len(setups)),
        [v[0] for v in values],
        yerr=_errors(values),
        capsize=3,
        color=[_COLORS.get(s, "#777777") for s in setups],
        edgecolor="black",
        linewidth=0.5,
    )
    ax.set_xticks(range(len(setups)), [_label(results, s) for s in setups])
    ax.set_ylabel("requests/s (each one call A -> B)")
    ax.set_title(f"Maximum throughput (wrk, closed loop)\n{_subtitle(results)}", fontsize=9)
    written.append(_save(fig, directory / "sidecar-throughput.png"))

    for metric, name, ylabel, title in (
        ("cpu", "sidecar-cpu.png", "CPU ms per 1000 requests", "CPU per 1000 requests"),
        ("rss", "sidecar-memory.png", "resident memory, MB", "Resident memory per process"),
    ):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        bottoms = [0.0] * len(setups)
        for role, color in zip(_ROLES, _ROLE_COLORS, strict=True):
            heights = []
            for setup in setups:
                row = summary[setup]
                if metric == "cpu":
                    cell = row["cpu_ms_per_1000"].get(role)
                    heights.append(cell[0] if cell else 0.0)
                else:
                    heights.append(row["rss_mb"].get(role, 0.0))
            if any(heights):
                ax.bar(range(len(setups)), heights, bottom=bottoms, label=role, color=color,
                       edgecolor="black", linewidth=0.5)  # fmt: skip
                bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        ax.set_xticks(range(len(setups)), [_label(results, s) for s in setups])
        # Zero-height segments leave sticky edges at the stack tops, which defeat margins.
        ax.set_ylim(0, max(bottoms) * 1.15 or 1.0)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.set_title(f"{title}\n{_subtitle(results)}", fontsize=9)
        written.append(_save(fig, directory / name))
    return written


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_markdown_tables(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Every Markdown table in ``text``, each as ``(title, rows)``: the title is the line just
    above the table when it is bold (without ``**`` and a trailing colon), the rows are dicts
    keyed by the header cells. Rows whose cell count differs from the header's are dropped."""
    tables: list[tuple[str, list[dict[str, str]]]] = []
    title, last_text = "", ""
    cells: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            if not cells:
                title = last_text
            cells.append([cell.strip() for cell in stripped.strip("|").split("|")])
            continue
        if len(cells) >= 3:
            header = cells[0]
            rows = [dict(zip(header, r, strict=True)) for r in cells[2:] if len(r) == len(header)]
            if rows:
                tables.append((title, rows))
        cells = []
        if stripped:
            # Only a bold line names a table; a plain one is prose (the command, the machine).
            bold = stripped.startswith("**")
            last_text = stripped.replace("**", "").rstrip(":").strip() if bold else ""
    return tables


def _value_columns(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """The columns to plot: those naming a rate (``req/s``), else the first numeric one."""
    columns = list(rows[0])[1:]
    numeric = [c for c in columns if all(_NUMBER.match(row[c]) for row in rows)]
    rates = [c for c in numeric if "/s" in c]
    return rates or numeric[:1]


def table_plot(
    name: str, title: str, text: str, directory: Path, *, subtitle: str = ""
) -> Path | None:
    """Grouped horizontal bars of every table in ``text`` (as a benchmark prints its
    results): one panel per table, one bar group per row, one bar per rate column (``req/s``;
    the first numeric column when none names a rate). Written to ``<directory>/<name>.png``;
    ``None`` when ``text`` holds no table with a numeric column."""
    tables = [(t, rows) for t, rows in parse_markdown_tables(text) if _value_columns(rows)]
    if not tables:
        return None
    plt = _pyplot()
    height = max(len(rows) * (0.35 + 0.25 * len(_value_columns(rows))) for _, rows in tables)
    fig, axes = plt.subplots(
        1,
        len(tables),
        figsize=(max(7.0, min(14.0, 5.5 * len(tables))), height + 1.8),
        squeeze=False,
    )
    for ax, (table_title, rows) in zip(axes[0], tables, strict=True):
        columns = _value_columns(rows)
        label_column = next(iter(rows[0]))
        width = 0.8 / len(columns)
        for index, column in enumerate(columns):
            values = [float(_NUMBER.match(row[column]).group(0)) for row in rows]  # type: ignore[union-attr]
            ax.barh(
                [i + index * width - 0.4 + width / 2 for i in range(len(rows))],
                values,
                width,
                label=column,
                color=_ROLE_COLORS[index % len(_ROLE_COLORS)],
                edgecolor="black",
                linewidth=0.5,
            )
        labels = [row[label_column] for row in rows]
        if all(_NUMBER.fullmatch(label) for label in labels):
            labels = [f"{label_column} {label}" for label in labels]
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(table_title[:70], fontsize=9)
        if len(columns) > 1:
            ax.legend(fontsize=7)
        else:
            ax.set_xlabel(columns[0])
    fig.suptitle(f"{title} - {subtitle}" if subtitle else title, fontsize=10)
    return _save(fig, directory / f"{name}.png")
