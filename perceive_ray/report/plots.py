"""Report plots as PNG bytes: What'sUp pair accuracy per relation group, and the effect of each swept factor.

Plain numbers in (render.py prepares them), PNG out. matplotlib is driven through its Agg canvas directly,
never pyplot: no global backend switch, no GUI, nothing left open in the process.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from typing import Any

BAR, WHISKER, CHANCE, PAPER = "#4C72B0", "#222222", "#777777", "#C44E52"


@dataclass(frozen=True)
class Bar:
    """One configuration's number in a panel; fractions in [0, 1] (None: missing, or no interval)."""

    label: str
    value: float | None
    low: float | None
    high: float | None
    paper: float | None = None  # the published number, in percent


@dataclass(frozen=True)
class Panel:
    title: str
    chance: float | None
    bars: list[Bar]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _errors(values: list[float | None], lows: list[float | None], highs: list[float | None],
            scale: float) -> tuple[Any, Any, Any]:
    """Points and (below, above) whisker lengths; a missing number is NaN, a missing interval no whisker."""
    import numpy as np

    points = np.array([scale * v if v is not None else np.nan for v in values])
    below = np.array([scale * (v - lo) if v is not None and lo is not None else 0.0
                      for v, lo in zip(values, lows, strict=True)])
    above = np.array([scale * (hi - v) if v is not None and hi is not None else 0.0
                      for v, hi in zip(values, highs, strict=True)])
    return points, below, above


def draw_relations(panels: list[Panel], *, title: str) -> bytes:
    """One panel per relation group, one horizontal bar per configuration (labels read once, on the left)."""
    import numpy as np

    labels = [textwrap.fill(bar.label, 34) for bar in panels[0].bars]
    height = 1.4 + sum(0.22 * label.count("\n") + 0.38 for label in labels)
    figure = _figure(2.5 * len(panels) + 3.0, max(2.6, height))
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y = np.arange(len(labels))
    for ax, panel in zip(axes, panels, strict=True):
        points, below, above = _errors([b.value for b in panel.bars], [b.low for b in panel.bars],
                                       [b.high for b in panel.bars], 100.0)
        ax.barh(y, points, height=0.62, color=BAR)
        ax.errorbar(points, y, xerr=[below, above], fmt="none", ecolor=WHISKER, elinewidth=1, capsize=3)
        for i, bar in enumerate(panel.bars):
            if bar.value is None:  # say so: an empty row would read as 0%
                ax.text(1.5, i, "not evaluated", va="center", fontsize=7, color=CHANCE, style="italic")
        if panel.chance is not None:
            ax.axvline(100 * panel.chance, color=CHANCE, linestyle="--", linewidth=1, label="chance")
        paper = [(bar.paper, i) for i, bar in enumerate(panel.bars) if bar.paper is not None]
        if paper:
            ax.plot([p for p, _ in paper], [i for _, i in paper], "D", color=PAPER, markersize=6,
                    label="paper (PROTOCOLS §6)")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_xlabel("pair accuracy (%)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=len(legend),
                      fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    return _png(figure)


def draw_factor(*, key: str, metric: str, values: list[str], runs: list[int], means: list[float | None],
                lows: list[float | None], highs: list[float | None], chance: float | None,
                percent: bool = True) -> bytes:
    """The mean of ``metric`` per value of the swept ``key``, with whiskers; ``runs``: configurations each."""
    import numpy as np

    scale = 100.0 if percent else 1.0
    figure = _figure(max(4.2, 1.4 * len(values) + 2.0), 3.6)
    ax = figure.subplots()
    x = np.arange(len(values))
    points, below, above = _errors(means, lows, highs, scale)
    ax.errorbar(x, points, yerr=[below, above], fmt="o", color=BAR, ecolor=WHISKER, elinewidth=1, capsize=4,
                markersize=7)
    for xi, point in zip(x, points, strict=True):
        if not np.isnan(point):
            ax.annotate(f"{point:.1f}" if percent else f"{point:.3f}", (xi, point),
                        textcoords="offset points", xytext=(9, 0), va="center", fontsize=8)
    if chance is not None:
        ax.axhline(scale * chance, color=CHANCE, linestyle="--", linewidth=1, label="chance")
        ax.legend(fontsize=8, frameon=False, loc="best")
    ticks = [f"{textwrap.fill(v, 18)}\n({n} run{'s' if n != 1 else ''})"
             for v, n in zip(values, runs, strict=True)]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_ylim(0, scale)
    ax.set_ylabel(f"mean {metric.split('/', 1)[-1]}" + (" (%)" if percent else ""), fontsize=9)
    ax.set_title(f"{key}  ·  {metric}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(figure)
