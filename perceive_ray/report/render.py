"""Report tables and pages: the paper-style pivot (configurations x benchmark metrics) with 95% intervals,
chance and the published numbers, paired tests and factor effects, written as index.md, a self-contained
index.html, plots/*.png and report.json (every number, interval and test).

report.json holds no timestamp, so the same runs give the same file from MLflow or from the run folders.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from perceive_ray.report.data import ReportError, RunData
from perceive_ray.report.stats import (
    CONFIDENCE,
    Interval,
    holm,
    mcnemar_exact,
    mean_interval,
    metric_interval,
)

_WINOGROUND = ("text_score", "image_score", "group_score")
# Default columns per benchmark, in the paper's order (those a run has; else all of the benchmark's metrics).
HEADLINE: dict[str, tuple[str, ...]] = {
    "whatsup_controlled_a": ("2way/individual_acc", "2way/pair_acc", "2way/lr/pair_acc", "2way/ou/pair_acc"),
    "whatsup_controlled_b": ("2way/individual_acc", "2way/pair_acc", "2way/lr/pair_acc", "2way/fb/pair_acc"),
    "mmvp": ("pair_acc", "individual_acc"),
    "mmvp_vlm": ("pair_acc", "individual_acc"),
    "winoground": _WINOGROUND,
    "eqben_mini": _WINOGROUND,
    "naturalbench": _WINOGROUND,
    "coco_cf": _WINOGROUND,
    "sugarcrepe": ("acc",),
    "seetrue": ("roc_auc",),  # SeeTRUE has per-source AUCs only (PROTOCOLS §2.5): all of those are shown
}

LR_A, OU_A = ("whatsup_controlled_a", "2way/lr/pair_acc"), ("whatsup_controlled_a", "2way/ou/pair_acc")
LR_B, FB_B = ("whatsup_controlled_b", "2way/lr/pair_acc"), ("whatsup_controlled_b", "2way/fb/pair_acc")
# PROTOCOLS §6.2 (VQAScore for the MLLMs; LR read as Controlled A alone, §6.2's weak evidence) and §6.3 (LR
# pairs on A and B), in percent. A run tagged perceive.published_row=<row> shows these beside its numbers.
PUBLISHED: dict[str, dict[tuple[str, str], float]] = {
    "CLIP-ViT-L/14-336px": {LR_A: 1.9, OU_A: 23.3, FB_B: 7.8},
    "LLaVA-1.5-7B": {LR_A: 93.2, OU_A: 52.4, FB_B: 52.9},
    "Phi-3-V-3.8B": {LR_A: 95.1, OU_A: 58.3, FB_B: 26.5},
    "LLaMA-3-V-8B": {LR_A: 96.1, OU_A: 64.1, FB_B: 47.1},
    "CLIP original": {LR_A: 1.9, LR_B: 10.8},
    "+ patch tokens": {LR_A: 9.7, LR_B: 9.8},
    "+ patch tokens + RoPE": {LR_A: 22.3, LR_B: 20.6},
    "+ PT + RoPE + multiple text tokens (SPARC)": {LR_A: 0.0, LR_B: 6.9},
    "+ PT + RoPE + stronger text encoder": {LR_A: 10.7, LR_B: 15.7},
}
RELATIONS = ((LR_A, "A · left/right"), (OU_A, "A · on/under"), (LR_B, "B · left/right"),
             (FB_B, "B · front/behind"))
UNSET = "(unset)"


def select_columns(runs: list[RunData], metrics: list[str] | None = None) -> list[tuple[str, str]]:
    """(benchmark, metric) columns: ``metrics`` ("benchmark/metric") as given, else every benchmark's
    headline."""
    present: dict[str, set[str]] = {}
    for run in runs:
        for name, bench in run.benchmarks.items():
            present.setdefault(name, set()).update(bench.metrics)
    if metrics:
        columns = []
        for spec in metrics:
            benchmark, _, metric = spec.partition("/")
            if metric not in present.get(benchmark, set()):
                known = ", ".join(sorted(f"{b}/{m}" for b, ms in present.items() for m in ms)[:12])
                raise ReportError(f"metric {spec!r}: no run has it (benchmark/metric; e.g. {known})")
            columns.append((benchmark, metric))
        return columns
    order = [b for b in HEADLINE if b in present] + sorted(b for b in present if b not in HEADLINE)
    columns = []
    for benchmark in order:
        chosen = [m for m in HEADLINE.get(benchmark, ()) if m in present[benchmark]]
        columns += [(benchmark, m) for m in chosen or sorted(present[benchmark])]
    return columns


def _unique_labels(runs: list[RunData]) -> list[str]:
    counts = Counter(r.label for r in runs)
    return [f"{r.label} #{i + 1}" if counts[r.label] > 1 else r.label for i, r in enumerate(runs)]


def _is_auc(metric: str) -> bool:
    return metric.endswith("roc_auc")


def format_value(metric: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.3f}" if _is_auc(metric) else f"{100 * value:.1f}%"


def format_interval(metric: str, low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "[no interval]"
    return f"[{low:.3f}, {high:.3f}]" if _is_auc(metric) else f"[{100 * low:.1f}, {100 * high:.1f}]"


def format_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class _Intervals:
    """Per (run, benchmark, metric) intervals, computed once (the tables and plots read the same ones)."""

    def __init__(self, runs: list[RunData], n_resamples: int, seed: int) -> None:
        self.runs, self.n_resamples, self.seed = runs, n_resamples, seed
        self.memo: dict[tuple[int, str, str], Interval] = {}

    def get(self, index: int, benchmark: str, metric: str) -> Interval | None:
        bench = self.runs[index].benchmarks.get(benchmark)
        if bench is None or metric not in bench.metrics:
            return None
        key = (index, benchmark, metric)
        if key not in self.memo:
            self.memo[key] = metric_interval(bench, metric, n_resamples=self.n_resamples, seed=self.seed)
        return self.memo[key]


def _chance(runs: list[RunData], benchmark: str, metric: str, notes: list[str]) -> float | None:
    levels = [run.benchmarks[benchmark].chance[metric] for run in runs
              if benchmark in run.benchmarks and metric in run.benchmarks[benchmark].chance]
    if len(set(levels)) > 1:
        notes.append(f"{benchmark}/{metric}: runs disagree on the chance level ({sorted(set(levels))}); the "
                     "first run's is shown")
    return levels[0] if levels else None


def _paired_tests(runs: list[RunData], labels: list[str], columns: list[tuple[str, str]],
                  notes: list[str]) -> list[dict[str, Any]]:
    """Every two configurations on every column with outcomes; Holm's adjustment within a column."""
    tests = []
    for benchmark, metric in columns:
        key = f"{benchmark}/{metric}"
        units = [run.benchmarks[benchmark].units(metric) if benchmark in run.benchmarks else None
                 for run in runs]
        lacking = [labels[i] for i, run in enumerate(runs) if units[i] is None
                   and benchmark in run.benchmarks and metric in run.benchmarks[benchmark].metrics]
        if lacking and len(runs) > 1 and not _is_auc(metric):  # an AUC never has units: nothing to say
            notes.append(f"{key}: no per-unit outcomes for {', '.join(lacking)}: no paired test with them")
        family = []
        for i in range(len(runs)):
            for j in range(i + 1, len(runs)):
                if units[i] is None or units[j] is None:
                    continue
                test = mcnemar_exact(units[i], units[j])
                if test.n == 0:
                    notes.append(f"{key}: {labels[i]} and {labels[j]} share no unit: not compared")
                    continue
                family.append({"column": key, "config_a": labels[i], "config_b": labels[j], "n": test.n,
                               "b": test.b, "c": test.c, "accuracy_a": test.accuracy_a,
                               "accuracy_b": test.accuracy_b, "difference": test.difference, "p": test.p})
        for entry, adjusted in zip(family, holm([t["p"] for t in family]), strict=True):
            entry["p_holm"] = adjusted
        tests += family
    return tests


def _natural(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order before everything else in text order (so 1e-5 < 3e-5 < 1e-4)."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _factors(runs: list[RunData], labels: list[str], column: tuple[str, str] | None, n_resamples: int,
             seed: int) -> list[dict[str, Any]]:
    """For each swept dotted key (two or more values over the runs): the first column's mean per value."""
    if column is None:
        return []
    benchmark, metric = column
    factors = []
    for key in sorted({key for run in runs for key in run.overrides}):
        by_value: dict[str, list[int]] = {}
        for i, run in enumerate(runs):
            value = _value_text(run.overrides[key]) if key in run.overrides else UNSET
            by_value.setdefault(value, []).append(i)
        if len(by_value) < 2:
            continue
        levels = []
        for value in sorted(by_value, key=_natural):
            members = [i for i in by_value[value]
                       if benchmark in runs[i].benchmarks and metric in runs[i].benchmarks[benchmark].metrics]
            if not members:
                continue
            units = [runs[i].benchmarks[benchmark].units(metric) for i in members]
            if all(u is not None for u in units):
                interval = mean_interval(units, n_resamples=n_resamples, seed=seed)
            else:  # no outcomes: the mean of the runs' numbers, without an interval
                mean = sum(runs[i].benchmarks[benchmark].metrics[metric] for i in members) / len(members)
                interval = Interval(mean, None, None, None, "none")
            levels.append({"value": value, "runs": [labels[i] for i in members], "mean": interval.value,
                           "low": interval.low, "high": interval.high, "n_units": interval.n})
        factors.append({"key": key, "column": f"{benchmark}/{metric}", "levels": levels})
    return factors


def compute_report(runs: list[RunData], *, title: str, metrics: list[str] | None = None,
                   n_resamples: int = 10_000, seed: int = 0,
                   notes: tuple[str, ...] | list[str] = ()) -> tuple[dict[str, Any], _Intervals]:
    """Every number of the report (report.json's content) and the interval cache the plots reuse."""
    if not runs:
        raise ReportError("no runs to report")
    notes = list(notes)
    labels = _unique_labels(runs)
    columns = select_columns(runs, metrics)
    intervals = _Intervals(runs, n_resamples, seed)
    column_entries = [{"key": f"{b}/{m}", "benchmark": b, "metric": m, "chance": _chance(runs, b, m, notes)}
                      for b, m in columns]
    run_entries = []
    for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
        published = PUBLISHED.get(run.published_row or "", {})
        if run.published_row and run.published_row not in PUBLISHED:
            notes.append(f"{label}: published row {run.published_row!r} is not one of PROTOCOLS §6.2/§6.3's "
                         f"({', '.join(PUBLISHED)})")
        cells: dict[str, Any] = {}
        for benchmark, metric in columns:
            interval = intervals.get(index, benchmark, metric)
            cells[f"{benchmark}/{metric}"] = None if interval is None else {
                "value": interval.value, "low": interval.low, "high": interval.high, "n": interval.n,
                "interval_from": interval.source, "published": published.get((benchmark, metric))}
            if interval is not None and interval.source == "counts":
                notes.append(f"{label}: intervals from metrics.json counts (no outcomes.parquet: a run made "
                             "before it existed)")
        run_entries.append({"label": label, "run_id": run.run_id, "overrides": run.overrides,
                            "published_row": run.published_row, "source": run.source, "cells": cells})
    return {
        "title": title, "confidence": CONFIDENCE, "n_resamples": n_resamples, "seed": seed,
        "columns": column_entries, "runs": run_entries,
        "paired_tests": _paired_tests(runs, labels, columns, notes),
        "factors": _factors(runs, labels, columns[0] if columns else None, n_resamples, seed),
        "plots": [], "notes": list(dict.fromkeys(notes)),
    }, intervals


# ------------------------------------------------------------------------------------------- plots and pages


def draw_plots(report: dict[str, Any], runs: list[RunData],
               intervals: _Intervals) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG bytes) of every plot the runs allow."""
    from perceive_ray.report.plots import Bar, Panel, draw_factor, draw_relations

    percent = int(CONFIDENCE * 100)
    labels = [entry["label"] for entry in report["runs"]]
    panels = []
    for (benchmark, metric), title in RELATIONS:
        found = [intervals.get(i, benchmark, metric) for i in range(len(runs))]
        if not any(found):
            continue
        bars = [Bar(label, iv.value if iv else None, iv.low if iv else None, iv.high if iv else None,
                    PUBLISHED.get(run.published_row or "", {}).get((benchmark, metric)))
                for label, iv, run in zip(labels, found, runs, strict=True)]
        panels.append(Panel(title, _chance(runs, benchmark, metric, []), bars))
    plots = []
    if panels:
        png = draw_relations(panels, title=f"What'sUp pair accuracy, {percent}% bootstrap intervals")
        plots.append(("whatsup_relations.png", "What'sUp 2-way pair accuracy per relation group and "
                      f"configuration; whiskers: {percent}% bootstrap intervals; dashed: chance; diamonds: "
                      "published.", png))
    by_key = {c["key"]: c for c in report["columns"]}
    for factor in report["factors"]:
        column, levels = by_key[factor["column"]], factor["levels"]
        if not levels:
            continue
        png = draw_factor(key=factor["key"], metric=factor["column"], values=[lv["value"] for lv in levels],
                          runs=[len(lv["runs"]) for lv in levels], means=[lv["mean"] for lv in levels],
                          lows=[lv["low"] for lv in levels], highs=[lv["high"] for lv in levels],
                          chance=column["chance"], percent=not _is_auc(column["metric"]))
        name = "factor_" + re.sub(r"[^A-Za-z0-9._-]+", "_", factor["key"]) + ".png"
        plots.append((name, f"Effect of {factor['key']}: mean {factor['column']} over the configurations "
                      f"with each value; whiskers: {percent}% intervals from resampling units "
                      "(configurations held fixed).", png))
    return plots


def _view(report: dict[str, Any]) -> dict[str, Any]:
    """The report's strings, shared by the Markdown and the HTML."""
    columns = report["columns"]
    groups: list[dict[str, Any]] = []
    for column in columns:
        if groups and groups[-1]["benchmark"] == column["benchmark"]:
            groups[-1]["span"] += 1
        else:
            groups.append({"benchmark": column["benchmark"], "span": 1})
    rows = []
    for entry in report["runs"]:
        cells = []
        for column in columns:
            cell, metric = entry["cells"][column["key"]], column["metric"]
            paper = None if cell is None or cell["published"] is None else f"paper: {cell['published']:.1f}%"
            cells.append(None if cell is None else {
                "value": format_value(metric, cell["value"]), "n": cell["n"], "paper": paper,
                "ci": format_interval(metric, cell["low"], cell["high"])})
        overrides = ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(entry["overrides"].items()))
        rows.append({"label": entry["label"], "run_id": entry["run_id"], "cells": cells,
                     "overrides": overrides, "published_row": entry["published_row"] or "",
                     "source": entry["source"]})
    metric_of = {c["key"]: c["metric"] for c in columns}
    tests = [{"column": t["column"], "a": t["config_a"], "b": t["config_b"], "n": t["n"], "b_count": t["b"],
              "c_count": t["c"], "p": format_p(t["p"]), "p_holm": format_p(t["p_holm"]),
              "difference": f"{(1 if _is_auc(metric_of[t['column']]) else 100) * t['difference']:+.1f}",
              "significant": t["p_holm"] < 0.05}
             for t in report["paired_tests"]]
    factors = []
    for factor in report["factors"]:
        metric = metric_of[factor["column"]]
        factors.append({"key": factor["key"], "column": factor["column"], "levels": [
            {"value": lv["value"], "runs": len(lv["runs"]), "mean": format_value(metric, lv["mean"]),
             "ci": format_interval(metric, lv["low"], lv["high"]), "n_units": lv["n_units"] or "–"}
            for lv in factor["levels"]]})
    return {
        "title": report["title"], "groups": groups, "rows": rows, "tests": tests, "factors": factors,
        "columns": [{"benchmark": c["benchmark"], "metric": c["metric"],
                     "chance": format_value(c["metric"], c["chance"])} for c in columns],
        "notes": report["notes"], "percent": int(report["confidence"] * 100),
        "n_resamples": report["n_resamples"], "seed": report["seed"],
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def write_markdown(view: dict[str, Any], plots: list[tuple[str, str, bytes]]) -> str:
    lines = [f"# {view['title']}", "",
             f"Each number: value [{view['percent']}% percentile-bootstrap interval over units; "
             f"{view['n_resamples']} resamples, seed {view['seed']}]. Paired tests: exact McNemar on the "
             f"units both configurations share. Generated {view['generated']}.", "", "## Results", ""]
    header = ["Configuration"] + [f"{c['benchmark']} {c['metric']}" for c in view["columns"]]
    lines += [_md_row(header), "|" + "---|" * len(header)]
    for row in view["rows"]:
        lines.append(_md_row([row["label"]] + [
            "–" if c is None else f"{c['value']} {c['ci']}" + (f" ({c['paper']})" if c["paper"] else "")
            for c in row["cells"]]))
    lines.append(_md_row(["*chance*", *(c["chance"] for c in view["columns"])]))
    lines += ["", "## Configurations", "",
              _md_row(["Configuration", "Run", "Overrides", "Paper row", "Source"]), "|---" * 5 + "|"]
    lines += [_md_row([r[k] for k in ("label", "run_id", "overrides", "published_row", "source")])
              for r in view["rows"]]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{caption}](plots/{name})\n\n*{caption}*\n" for name, caption, _ in plots]
    lines += ["", "## Paired tests (exact McNemar)", ""]
    if view["tests"]:
        lines += ["b: units A got right and B wrong; c: the reverse; A − B in points on the shared units; "
                  "Holm's adjustment within each metric.", "",
                  _md_row(["Metric", "A", "B", "n", "b", "c", "A − B", "p", "p (Holm)"]), "|---" * 9 + "|"]
        keys = ("column", "a", "b", "n", "b_count", "c_count", "difference", "p", "p_holm")
        lines += [_md_row([t[k] for k in keys]) for t in view["tests"]]
    else:
        lines.append("No pair of configurations with per-unit outcomes on the same metric.")
    for factor in view["factors"]:
        lines += ["", f"## Factor: {factor['key']} ({factor['column']})", "",
                  _md_row(["Value", "Configurations", "Mean", "Interval", "Units"]), "|---" * 5 + "|"]
        lines += [_md_row([lv["value"], lv["runs"], lv["mean"], lv["ci"], lv["n_units"]])
                  for lv in factor["levels"]]
    if view["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in view["notes"]]
    return "\n".join(lines) + "\n"


HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       max-width: 1280px; margin: 2rem auto; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; }
h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.meta, .legend { color: #555; font-size: .9rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .88rem; margin: .6rem 0 1rem; }
caption { caption-side: bottom; text-align: left; color: #666; font-size: .82rem; padding-top: .3rem; }
th, td { border: 1px solid #d4d4d4; padding: .3rem .55rem; vertical-align: top; }
thead th { background: #eef1f5; text-align: center; font-weight: 600; }
tbody th { text-align: left; font-weight: 600; background: #fafafa; max-width: 28rem; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ci { color: #666; font-size: .86em; margin-left: .3em; }
.paper { display: block; color: #a8323e; font-size: .8em; }
.missing { color: #999; text-align: center; }
tr.chance th, tr.chance td { font-style: italic; color: #555; background: #f7f7ea; }
tr.significant td { background: #fff6e0; }
figure { margin: 1.2rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .85rem; }
ul.notes li { color: #6a4a00; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ rows|length }} configuration(s) · generated {{ generated }} · {{ n_resamples }} bootstrap
resamples, seed {{ seed }}</p>

<h2>Results</h2>
<p class="legend">Each cell: value <span class="ci">[{{ percent }}% interval]</span>, a percentile bootstrap
over the metric's units (items, pairs or texts). <span class="paper" style="display:inline">paper: X%</span>
is the number PROTOCOLS §6 publishes for the run's row.</p>
<div class="scroll">
<table class="results">
<caption>Rows: configurations; columns: benchmark × metric; last row: chance level.</caption>
<thead>
<tr><th scope="col" rowspan="2">Configuration</th>
{%- for g in groups %}<th scope="colgroup" colspan="{{ g.span }}">{{ g.benchmark }}</th>{% endfor %}</tr>
<tr>{% for c in columns %}<th scope="col">{{ c.metric }}</th>{% endfor %}</tr>
</thead>
<tbody>
{%- for row in rows %}
<tr><th scope="row">{{ row.label }}</th>
{%- for cell in row.cells %}
{%- if cell %}<td class="num"{% if cell.n %} title="{{ cell.n }} units"{% endif %}>{{ cell.value }}
{#- #}<span class="ci">{{ cell.ci }}</span>
{%- if cell.paper %}<span class="paper">{{ cell.paper }}</span>{% endif %}</td>
{%- else %}<td class="missing">–</td>{% endif %}
{%- endfor %}</tr>
{%- endfor %}
<tr class="chance"><th scope="row">chance</th>
{%- for c in columns %}<td class="num">{{ c.chance }}</td>{% endfor %}</tr>
</tbody>
</table>
</div>

<h2>Configurations</h2>
<div class="scroll">
<table class="runs">
<thead><tr><th scope="col">Configuration</th><th scope="col">Run</th><th scope="col">Overrides</th>
<th scope="col">Paper row</th><th scope="col">Source</th></tr></thead>
<tbody>
{%- for row in rows %}
<tr><th scope="row">{{ row.label }}</th><td><code>{{ row.run_id }}</code></td>
<td><code>{{ row.overrides }}</code></td><td>{{ row.published_row }}</td>
<td><code>{{ row.source }}</code></td></tr>
{%- endfor %}
</tbody>
</table>
</div>
{% if plots %}
<h2>Plots</h2>
{%- for plot in plots %}
<figure><img src="data:image/png;base64,{{ plot.data }}" alt="{{ plot.caption }}">
<figcaption>{{ plot.caption }}</figcaption></figure>
{%- endfor %}
{% endif %}
<h2>Paired tests (exact McNemar)</h2>
{% if tests %}
<p class="legend">b: units A got right and B wrong; c: the reverse; A − B in points on the shared units;
Holm's adjustment within each metric; shaded: Holm-adjusted p &lt; 0.05.</p>
<div class="scroll">
<table class="tests">
<thead><tr><th scope="col">Metric</th><th scope="col">A</th><th scope="col">B</th><th scope="col">n</th>
<th scope="col">b</th><th scope="col">c</th><th scope="col">A − B</th><th scope="col">p</th>
<th scope="col">p (Holm)</th></tr></thead>
<tbody>
{%- for t in tests %}
<tr{% if t.significant %} class="significant"{% endif %}><th scope="row">{{ t.column }}</th>
<td>{{ t.a }}</td><td>{{ t.b }}</td><td class="num">{{ t.n }}</td><td class="num">{{ t.b_count }}</td>
<td class="num">{{ t.c_count }}</td><td class="num">{{ t.difference }}</td><td class="num">{{ t.p }}</td>
<td class="num">{{ t.p_holm }}</td></tr>
{%- endfor %}
</tbody>
</table>
</div>
{% else %}
<p>No pair of configurations with per-unit outcomes on the same metric.</p>
{% endif %}
{%- for f in factors %}
<h2>Factor: {{ f.key }} <small>({{ f.column }})</small></h2>
<table class="factor">
<thead><tr><th scope="col">Value</th><th scope="col">Configurations</th><th scope="col">Mean</th>
<th scope="col">Units</th></tr></thead>
<tbody>
{%- for lv in f.levels %}
<tr><th scope="row">{{ lv.value }}</th><td class="num">{{ lv.runs }}</td>
<td class="num">{{ lv.mean }}<span class="ci">{{ lv.ci }}</span></td>
<td class="num">{{ lv.n_units }}</td></tr>
{%- endfor %}
</tbody>
</table>
{%- endfor %}
{% if notes %}
<h2>Notes</h2>
<ul class="notes">{% for note in notes %}<li>{{ note }}</li>{% endfor %}</ul>
{% endif %}
</body>
</html>
"""


def write_html(view: dict[str, Any], plots: list[tuple[str, str, bytes]]) -> str:
    """One self-contained page: CSS inline, plots as data: URIs (opens anywhere, as an MLflow artifact)."""
    import jinja2

    embedded = [{"data": base64.b64encode(png).decode("ascii"), "caption": caption}
                for _, caption, png in plots]
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(HTML)
    return template.render(**view, plots=embedded)


def build_report(runs: list[RunData], out_dir: str | Path, *, title: str, metrics: list[str] | None = None,
                 n_resamples: int = 10_000, seed: int = 0, notes: tuple[str, ...] | list[str] = ()) -> Path:
    """Write OUT/index.md, OUT/index.html, OUT/plots/*.png and OUT/report.json; returns index.html's path."""
    out = Path(out_dir)
    report, intervals = compute_report(runs, title=title, metrics=metrics, n_resamples=n_resamples, seed=seed,
                                       notes=notes)
    plots = draw_plots(report, runs, intervals)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    for stale in plots_dir.glob("*.png"):  # an earlier report's plot would be logged with this one
        stale.unlink()
    for name, _, png in plots:
        (plots_dir / name).write_bytes(png)
    report["plots"] = [f"plots/{name}" for name, _, _ in plots]
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    view = _view(report)
    (out / "index.md").write_text(write_markdown(view, plots), encoding="utf-8")
    index = out / "index.html"
    index.write_text(write_html(view, plots), encoding="utf-8")
    return index
