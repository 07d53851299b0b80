"""Shared pieces of every metric: tie policies, the errata switch, tallies and the metric report.

Metrics are pure functions ``(manifest, score grids, tie_policy, label_errata) -> MetricReport``. Values are
fractions in [0, 1]; every value has a chance level under the same key and its numerator/denominator in counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from perceive_ray.metrics.policies import LABEL_ERRATA, TIE_POLICIES  # noqa: F401 (re-exported)


class MetricError(ValueError):
    """A metric cannot be computed as asked (unknown policy, policy not valid for this benchmark, ...)."""


def check_policy(tie_policy: str, label_errata: str, *, benchmark: str, allow_mmvp: bool = False) -> None:
    if tie_policy not in TIE_POLICIES:
        raise MetricError(f"unknown tie_policy {tie_policy!r}; choose one of {', '.join(TIE_POLICIES)}")
    if tie_policy == "mmvp_reference" and not allow_mmvp:
        raise MetricError(f"tie_policy 'mmvp_reference' applies to MMVP only, not to {benchmark!r}")
    if label_errata not in LABEL_ERRATA:
        raise MetricError(f"unknown label_errata {label_errata!r}; choose one of {', '.join(LABEL_ERRATA)}")


def wins(values: Sequence[float], correct: int, tie_policy: str) -> tuple[bool, bool]:
    """Whether option ``correct`` is chosen among ``values``, and whether it tied exactly with another option.

    strict: it must beat every other option (ties are wrong). argmax_first: numpy-argmax semantics, a tie goes to
    the lowest index. ``mmvp_reference`` is decided by the MMVP metric itself.
    """
    best = values[correct]
    tied = any(v == best for j, v in enumerate(values) if j != correct)
    if tie_policy == "strict":
        ok = all(best > v for j, v in enumerate(values) if j != correct)
    elif tie_policy == "argmax_first":
        ok = all((best > v) if j < correct else (best >= v) for j, v in enumerate(values) if j != correct)
    else:
        raise MetricError(f"tie_policy {tie_policy!r} is not a generic choice rule")
    return ok, tied


@dataclass
class Tally:
    """Numerators and denominators per metric key, with the chance level of each key."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)  # incomplete groups left out of a grouped metric
    ties: int = 0
    # Per-unit outcomes of the keys that are plain means of 0/1 outcomes, one (unit id, correct) per add(unit=...):
    # what bootstrap intervals and paired tests between configurations resample (reports). A key that also got an
    # add without a unit, or a weighted one, has no outcomes.
    units: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    no_units: set[str] = field(default_factory=set)

    def declare(self, key: str, chance: float) -> None:
        self.correct.setdefault(key, 0)
        self.total.setdefault(key, 0)
        self.chance[key] = chance

    def add(self, key: str, ok: bool, chance: float, weight: int = 1, unit: str | None = None) -> None:
        if key not in self.chance:
            self.declare(key, chance)
        self.correct[key] += int(bool(ok)) * weight
        self.total[key] += weight
        if unit is None or weight != 1:
            self.no_units.add(key)
        else:
            self.units.setdefault(key, []).append((str(unit), bool(ok)))

    def exclude(self, key: str, chance: float, n: int = 1) -> None:
        """Leave ``n`` incomplete groups out of ``key`` (neither numerator nor denominator), and count them."""
        if key not in self.chance:
            self.declare(key, chance)
        self.excluded[key] = self.excluded.get(key, 0) + n

    def add_fraction(self, key: str, numerator: int, denominator: int, chance: float) -> None:
        if key not in self.chance:
            self.declare(key, chance)
        self.no_units.add(key)
        self.correct[key] += numerator
        self.total[key] += denominator

    def report(self, benchmark: str, tie_policy: str, label_errata: str, **extra_counts: int) -> MetricReport:
        metrics = {k: self.correct[k] / self.total[k] for k in self.total if self.total[k] > 0}
        chance = {k: self.chance[k] for k in metrics}
        counts: dict[str, int] = {}
        for key in self.total:
            counts[f"{key}/correct"] = self.correct[key]
            counts[f"{key}/total"] = self.total[key]
            if self.excluded.get(key):
                counts[f"{key}/excluded"] = self.excluded[key]
        counts["ties"] = self.ties
        counts.update(extra_counts)
        outcomes = {k: list(v) for k, v in self.units.items() if k in metrics and k not in self.no_units}
        return MetricReport(benchmark, metrics, chance, counts, tie_policy, label_errata, outcomes=outcomes)


@dataclass
class MetricReport:
    benchmark: str
    metrics: dict[str, float]
    chance: dict[str, float]
    counts: dict[str, int]
    tie_policy: str
    label_errata: str
    notes: list[str] = field(default_factory=list)
    # Which scores-table column produced which metric keys ({"*": "score"} unless a score view was used).
    score_columns: dict[str, str] = field(default_factory=lambda: {"*": "score"})
    # key -> [(unit id, correct)] for the keys that are means of per-unit 0/1 outcomes (see Tally.units); written
    # to outcomes.parquet, not to metrics.json.
    outcomes: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)

    def outcomes_table(self) -> Any:
        """``metric``, ``unit``, ``correct`` (int8): one row per (metric key, unit)."""
        import pyarrow as pa

        metric, unit, correct = [], [], []
        for key in sorted(self.outcomes):
            for u, ok in self.outcomes[key]:
                metric.append(key)
                unit.append(u)
                correct.append(int(ok))
        return pa.table({"metric": pa.array(metric, pa.string()), "unit": pa.array(unit, pa.string()),
                         "correct": pa.array(correct, pa.int8())})

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "metrics": dict(sorted(self.metrics.items())),
            "chance": dict(sorted(self.chance.items())),
            "counts": dict(sorted(self.counts.items())),
            "tie_policy": self.tie_policy,
            "label_errata": self.label_errata,
            "notes": list(self.notes),
            "score_columns": dict(self.score_columns),
        }
