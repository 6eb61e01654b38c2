"""Turning runs into results: medians per target, ratios to nginx, targets met, and the three outputs
(a text table for the terminal, Markdown, a PNG chart) plus the JSON everything is kept in."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

from bench.configs import TARGETS
from bench.scenarios import METRICS, Metric

BASELINE = "nginx"        # every ratio is to nginx's stream module, as issue 4 states its targets


@dataclass
class Run:
    """One measurement: a scenario, in a round, against a target; its measures, or why it failed."""

    scenario: str
    round: int
    target: str
    measures: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Row:
    """One line of the results table."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    values: dict[str, float | None]           # target → median (None: not measured or failed)
    runs: dict[str, list[float]]                 # target → each round's value
    ratio_to_nginx: dict[str, float | None]
    pyproxy_to_direct: float | None = None
    target: str = ""                             # issue 4's goal, in words
    verdict: str | None = None                # PASS, FAIL, NO DATA, or None when there is no goal
    overhead_of: str | None = None            # set on "− direct" rows: the metric they derive from


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _median_values(runs: list[Run], metric: Metric) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    per_target: dict[str, list[float]] = {target: [] for target in TARGETS}
    for run in runs:
        if run.scenario == metric.scenario and run.error is None and metric.measure in run.measures:
            per_target[run.target].append(run.measures[metric.measure])
    medians = {target: (statistics.median(values) if values else None)
               for target, values in per_target.items()}
    return medians, per_target


def build_rows(runs: list[Run]) -> list[Row]:
    """The results table of `runs`: one row per metric measured (plus latency-overhead rows)."""
    rows = []
    measured = {run.scenario for run in runs}
    for metric in METRICS:
        if metric.scenario not in measured:
            continue
        values, per_run = _median_values(runs, metric)
        ratios = {target: _ratio(values[target], values[BASELINE]) for target in TARGETS}
        to_direct = _ratio(values["pyproxy"], values["direct"])
        row = Row(metric.key, metric.title, metric.unit, metric.higher_is_better, values, per_run, ratios,
                  to_direct)
        if metric.target is not None:
            row.target = metric.target.describe()
            met = metric.target.met(ratios["pyproxy"], to_direct, values["pyproxy"])
            row.verdict = "NO DATA" if met is None else ("PASS" if met else "FAIL")
        rows.append(row)
        if metric.overhead_row and values["direct"] is not None:
            overhead = {target: (None if values[target] is None or target == "direct"
                                 else values[target] - values["direct"]) for target in TARGETS}
            # No ratio: an overhead near zero (or below, within noise) makes a ratio meaningless.
            rows.append(Row(metric.key + "-overhead", "  added to direct", metric.unit, False, overhead, {},
                            {target: None for target in TARGETS}, overhead_of=metric.key))
    return rows


def fmt(value: float | None) -> str:
    """A figure with as many digits as it deserves."""
    if value is None:
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


COLUMNS = ("metric", "unit", *TARGETS, "pyproxy/nginx", "target", "result")


def _cells(row: Row) -> list[str]:
    better = "" if row.overhead_of else (" ↑" if row.higher_is_better else " ↓")
    return [row.title + better, row.unit, *(fmt(row.values[target]) for target in TARGETS),
            fmt_ratio(row.ratio_to_nginx["pyproxy"]), row.target, row.verdict or ""]


def text_table(rows: list[Row]) -> str:
    """The results as an aligned text table (↑: higher is better, ↓: lower is better)."""
    table = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(COLUMNS))]
    lines = []
    for index, line in enumerate(table):
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(line[2:-2], widths[2:-2], strict=True)]
        cells += [line[-2].ljust(widths[-2]), line[-1]]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(TARGETS) + 1) + ["---", "---"]) + "|"]
    for row in rows:
        cells = _cells(row)
        if row.verdict:
            cells[-1] = f"**{row.verdict}**"
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: list[Row], machine: dict, settings: dict, notes: list[str]) -> str:
    """The whole Markdown report: table, verdicts, machine and how the figures were taken."""
    verdicts = [row for row in rows if row.verdict]
    passed = sum(row.verdict == "PASS" for row in verdicts)
    parts = [
        "# pyproxy vs nginx stream vs HAProxy",
        "",
        f"Run {settings['started']}; {passed} of {len(verdicts)} targets met. Each figure is the median of "
        f"{settings['rounds']} interleaved round(s); ratios are pyproxy / nginx in the same run "
        "(↑ higher is better, ↓ lower is better; *added to direct* rows are the latency the proxy adds).",
        "",
        markdown_table(rows),
        "",
        "## Machine",
        "",
        *(f"- {name}: {value}" for name, value in machine.items()),
        "",
        "## Settings",
        "",
        *(f"- {name}: {value}" for name, value in settings.items()),
    ]
    if notes:
        parts += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    parts += ["", "Reproduce with `make bench` (about 16 minutes; `make bench-smoke` for a quick check)."]
    return "\n".join(parts) + "\n"


def write_json(path: str, rows: list[Row], runs: list[Run], machine: dict, settings: dict,
               notes: list[str]) -> None:
    document = {"machine": machine, "settings": settings, "notes": notes,
                "results": [asdict(row) for row in rows], "runs": [asdict(run) for run in runs]}
    with open(path, "w") as out:
        json.dump(document, out, indent=2, ensure_ascii=False)
        out.write("\n")


RATIO_AXIS_MAX = 3.0   # the chart's x axis stops here; a longer bar is cut and labelled with its value
COLORS = {"direct": "#9e9e9e", "haproxy": "#5b8def", "PASS": "#2e9e4f", "FAIL": "#d64545", "none": "#f0a030"}


def chart(rows: list[Row], path: str, subtitle: str) -> None:
    """A horizontal bar chart of each metric as a ratio to nginx (the dashed line at 1): direct and
    HAProxy for reference, pyproxy green where it meets its target, red where it misses it, orange
    where there is none; the target itself is a black tick on pyproxy's bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    goals = {metric.key: metric.target for metric in METRICS}
    # Rows whose target is pyproxy's own figure (reload times) are written under the chart: a ratio
    # to nginx would not say whether they meet it.
    absolute = [row for row in rows if getattr(goals.get(row.key), "value_max", None) is not None]
    shown = [row for row in rows if not row.overhead_of and row.values.get(BASELINE) and row not in absolute]
    bar = 0.26                                   # bar thickness; a metric's group spans 3 bars
    offsets = {"direct": bar, "haproxy": 0.0, "pyproxy": -bar}
    fig, ax = plt.subplots(figsize=(11, 0.8 * len(shown) + 2.2))
    for index, row in enumerate(reversed(shown)):
        for name, offset in offsets.items():
            ratio = row.ratio_to_nginx.get(name)
            if ratio is None:
                continue
            color = COLORS[row.verdict if row.verdict in ("PASS", "FAIL") else "none"] \
                if name == "pyproxy" else COLORS[name]
            shown_ratio = min(ratio, RATIO_AXIS_MAX)
            ax.barh(index + offset, shown_ratio, height=bar * 0.9, color=color)
            label = f" {ratio:.2f}" if ratio <= RATIO_AXIS_MAX else f" {ratio:.2f} (cut) "
            ax.text(shown_ratio, index + offset, label, va="center", fontsize=8,
                    ha="left" if ratio <= RATIO_AXIS_MAX else "right", color="black")
        goal = goals.get(row.key)
        level = None if goal is None else (goal.ratio_min if goal.ratio_min is not None else goal.ratio_max)
        if level is not None:
            ax.plot([level, level], [index - 1.5 * bar, index - 0.5 * bar], color="black", linewidth=2.5)
    labels = []
    for row in reversed(shown):
        label = f"{row.title}\n({row.unit}, {'higher' if row.higher_is_better else 'lower'} is better)"
        if row.target:
            label += f"\ntarget {row.target}: {row.verdict}"
        labels.append(label)
    ax.set_yticks(range(len(shown)), labels, fontsize=9)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.text(1.0, len(shown) - 0.45, " nginx = 1", fontsize=9)
    ratios = [ratio for row in shown for ratio in row.ratio_to_nginx.values() if ratio is not None]
    ax.set_xlim(0, min(max([2.0, *ratios]), RATIO_AXIS_MAX) * 1.1)
    ax.set_ylim(-0.7, len(shown) - 0.2)
    ax.set_xlabel("ratio to nginx stream (same run, same worker count)")
    notes = "".join(f"\n{row.title}: pyproxy {fmt(row.values['pyproxy'])} {row.unit} "
                    f"(nginx {fmt(row.values[BASELINE])}), target {row.target}: {row.verdict}"
                    for row in absolute)
    ax.set_title(f"pyproxy and HAProxy relative to nginx stream\n{subtitle}{notes}",
                 fontsize=9 if notes else 11)
    legend = [Patch(color=COLORS["direct"], label="direct (no proxy)"),
              Patch(color=COLORS["haproxy"], label="HAProxy"),
              Patch(color=COLORS["PASS"], label="pyproxy: target met"),
              Patch(color=COLORS["FAIL"], label="pyproxy: target missed"),
              Patch(color=COLORS["none"], label="pyproxy: no target"),
              Line2D([], [], color="black", linewidth=2.5, label="pyproxy's target (ratio)")]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.5 / len(shown) - 0.02), ncol=3,
              fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rerender(json_path: str) -> None:
    """Rebuild the table, Markdown and chart beside `json_path` from its runs (after changing how
    results are presented, without measuring again)."""
    import os
    with open(json_path) as source:
        document = json.load(source)
    runs = [Run(**run) for run in document["runs"]]
    rows = build_rows(runs)
    machine, settings = document["machine"], document["settings"]
    stem = os.path.splitext(json_path)[0]
    write_json(json_path, rows, runs, machine, settings, document.get("notes", []))
    with open(stem + ".md", "w") as out:
        out.write(markdown_report(rows, machine, settings, document.get("notes", [])))
    chart(rows, stem + ".png", chart_subtitle(machine, settings))
    print(text_table(rows))


def chart_subtitle(machine: dict, settings: dict) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores, {settings['workers per proxy']} workers each, "
            f"median of {settings['rounds']} round(s) — {settings['started']}")


if __name__ == "__main__":
    import sys
    for path in sys.argv[1:] or ["bench/results/latest.json"]:
        rerender(path)
