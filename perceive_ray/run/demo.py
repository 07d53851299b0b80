"""`make demo` / `perceive-ray demo`: the paper's controlled study in miniature, end to end, on a laptop's CPUs.

One tiny CLIP is pretrained from scratch on web-like alt-text that never states a spatial relation; its vision tower
is then frozen and read six ways, each a trial of ``experiments/sweeps/demo_study.yaml`` (Ray Tune over Ray Train
+ DeepSpeed; Ray Data scoring; one MLflow parent run, one child per variant, the pretraining as a shared child):

- CLIP [CLS] cosine (no further training);
- CLIP fine-tuned on the relation captions with NegCLIP left/right negatives, image tower locked (training data);
- a PACL head on the frozen patch tokens, and the same head with RoPE positions (token usage);
- a tiny LLaVA (patch tokens -> projector -> a small LLaMA trained on captions + spatial yes/no chats), scored by
  VQAScore (the generative reader), and the same LLaVA given the [CLS] token only (LLaVA-cls).

All variants share the encoder, the world (``data.synthetic.study``), the seed and the step budget; nothing is tuned
per variant. The demo then prints the What'sUp table (95% bootstrap intervals, the paper's rows beside), decides
each of the paper's orderings by an exact paired test (McNemar, Holm-adjusted), writes the HTML report and prints
the ``mlflow ui`` / report commands. ``--quick``: the sweep's smoke mode on a smaller world (what CI runs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceive_ray.config import ConfigError

SWEEP_FILE = "demo_study.yaml"
SWEEP_NAME = "demo_study"
WORLD_DIR, MODELS_DIR, SWEEPS_DIR, REPORT_DIR = "world", "models", "sweeps", "report"
SUMMARY_FILE = "demo_summary.json"
ALPHA = 0.05  # significance level of every verdict (after Holm's adjustment over the family)

# The demo encoder: a ViT at 48 px, patch 8 (a 6 x 6 grid), width 64, 3 layers; a 2-layer text tower; context 32.
CLIP_SIZES = {"image_size": 48, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "text_width": 64,
              "text_layers": 2, "text_heads": 2, "embed_dim": 64, "context_length": 32}
# The LLaVA's language model, trained from scratch (stage full): a LLaMA of width 64, 2 layers.
LLM_SIZES = {"width": 64, "layers": 2, "heads": 4, "intermediate": 128}

CLS, NEGCLIP, PACL, ROPE = ("CLIP [CLS] cosine", "CLIP + NegCLIP (lock image)", "+ patch tokens (PACL)",
                            "+ patch tokens + RoPE")
LLAVA, LLAVA_CLS = "LLaVA (patch tokens, VQAScore)", "LLaVA-cls ([CLS] token, VQAScore)"
VARIANTS = (CLS, NEGCLIP, PACL, ROPE, LLAVA, LLAVA_CLS)
# The paper's orderings the demo checks: (lower, higher, what the paper shows). CLS vs chance is checked apart.
ORDERINGS = (
    (CLS, PACL, "reading the patch tokens (PACL) beats the [CLS] cosine (§6.3: 1.9 -> 9.7 LR pairs on A)"),
    (PACL, ROPE, "adding RoPE positions to the patch tokens helps (§6.3: 9.7 -> 22.3)"),
    (ROPE, LLAVA, "the generative reader beats the best contrastive head (§6.2-6.3: 22.3 vs 93.2)"),
    (NEGCLIP, LLAVA, "relation-rich training data with hard negatives does not let CLIP catch up (§5.1)"),
    (LLAVA_CLS, LLAVA, "LLaVA given only the [CLS] token falls behind LLaVA on the patch tokens (§5.7)"),
)
# Table columns: (benchmark, metric, header). The verdicts use all pairs of A and B pooled ("pairs A+B").
BENCH_A, BENCH_B = "whatsup_controlled_a", "whatsup_controlled_b"
COLUMNS = ((BENCH_A, "2way/individual_acc", "A indiv"), (BENCH_A, "2way/lr/pair_acc", "A L/R pr"),
           (BENCH_A, "2way/ou/pair_acc", "A O/U pr"), (BENCH_B, "2way/individual_acc", "B indiv"),
           (BENCH_B, "2way/lr/pair_acc", "B L/R pr"), (BENCH_B, "2way/fb/pair_acc", "B F/B pr"))
POOLED = "2way/pair_acc"
PAPER_COLUMNS = {"A L/R pr": (BENCH_A, "2way/lr/pair_acc"), "A O/U pr": (BENCH_A, "2way/ou/pair_acc"),
                 "B L/R pr": (BENCH_B, "2way/lr/pair_acc"), "B F/B pr": (BENCH_B, "2way/fb/pair_acc")}


@dataclass
class Verdict:
    claim: str
    outcome: str  # "agrees", "disagrees", "not resolved"
    sentence: str


def prepare_workdir(workdir: Path, *, seed: int, quick: bool, resume: bool) -> dict[str, Any]:
    """The world and the random-init models in ``workdir`` (a fresh sweep folder unless ``resume``)."""
    from perceive_ray.data.synthetic.study import ensure_study
    from perceive_ray.models.llava import save_tiny_llm
    from perceive_ray.models.tiny import save_clip

    workdir.mkdir(parents=True, exist_ok=True)
    scale = "quick" if quick else "full"
    started = time.perf_counter()
    try:  # first: a world/ that is not ours stops the demo before the previous results below are cleared
        summary = ensure_study(workdir / WORLD_DIR, seed=seed, scale=scale)
    except ValueError as exc:
        raise ConfigError(f"--workdir {workdir}: {exc}") from None
    if not resume:
        for name in (SWEEPS_DIR, MODELS_DIR, REPORT_DIR):
            shutil.rmtree(workdir / name, ignore_errors=True)
    print(f"[demo] 1/4 world: {'reused' if summary.reused else 'wrote'} the synthetic world ({scale}, seed {seed}) "
          f"in {workdir / WORLD_DIR}: {json.dumps(summary.counts)} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    models = workdir / MODELS_DIR
    if not (models / "clip_init").is_dir():
        save_clip(models / "clip_init", seed=seed, **CLIP_SIZES)
    if not (models / "llm_init").is_dir():
        save_tiny_llm(models / "llm_init", seed=seed, **LLM_SIZES)
    print(f"[demo] 2/4 models: random-init tiny CLIP ({CLIP_SIZES['image_size']} px, patch "
          f"{CLIP_SIZES['patch_size']}, width {CLIP_SIZES['width']}, {CLIP_SIZES['layers']} layers) and LLaMA "
          f"(width {LLM_SIZES['width']}, {LLM_SIZES['layers']} layers) in {models}", flush=True)
    return summary.to_dict()


def run_demo(workdir: str | Path, *, experiments_dir: str | Path, seed: int = 0, quick: bool = False,
             resume: bool = False, tracking_uri: str | None = None, address: str | None = None,
             n_resamples: int = 10_000) -> dict[str, Any]:
    """Run the study in ``workdir``; print the table, the verdicts and the commands; returns the demo summary."""
    from perceive_ray.report.command import run_report
    from perceive_ray.report.data import load_sweep_dir
    from perceive_ray.run.inference import shutdown_ray
    from perceive_ray.run.sweep import init_sweep_ray, run_sweep
    from perceive_ray.sweep_config import load_sweep

    start = time.perf_counter()
    workdir = Path(workdir).resolve()
    sweep_path = (Path(experiments_dir) / "sweeps" / SWEEP_FILE).resolve()
    sweep = load_sweep(sweep_path, smoke=quick)  # a bad sweep file fails here, before anything is written
    uri = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    workdir.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(workdir)  # the demo's experiment files read world/ and models/ relative to the working folder
    started_ray = False
    try:
        # Ray starts (its processes' start-up mostly waits) while a thread writes the world and the models.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="perceive-demo-world") as pool:
            prepared = pool.submit(prepare_workdir, workdir, seed=seed, quick=quick, resume=resume)
            try:
                started_ray = init_sweep_ray(sweep.config, address)
            finally:
                world = prepared.result()  # (the world's error first: it names the --workdir)
        print(f"[demo] 3/4 study: {len(VARIANTS)} variants of one frozen encoder, {'--quick, ' if quick else ''}"
              f"seed {seed}; sweep {sweep_path} in {workdir / SWEEPS_DIR}", flush=True)
        run_sweep(sweep, resume=resume, address=address, tracking_uri=uri, extra={"seed": seed})
    finally:
        os.chdir(here)
        if started_ray:
            shutdown_ray()
    folder = workdir / SWEEPS_DIR / SWEEP_NAME
    runs = {run.label: run for run in load_sweep_dir(folder).runs}
    missing = [v for v in VARIANTS if v not in runs]
    if missing:
        raise RuntimeError(f"the demo sweep in {folder} did not finish {missing}; rerun with --resume")
    print(f"[demo] 4/4 report: tables, bootstrap intervals and paired tests -> {workdir / REPORT_DIR}", flush=True)
    report = run_report(sweep=SWEEP_NAME, tracking_uri=uri, out=workdir / REPORT_DIR, n_resamples=n_resamples,
                        seed=seed, title=f"perceive_ray demo: the controlled study in miniature (seed {seed})")
    table = build_table(runs, n_resamples=n_resamples, seed=seed)
    verdicts = decide(runs)
    wall = time.perf_counter() - start
    print()
    print(format_table(table, seed=seed, quick=quick))
    print()
    print(format_verdicts(verdicts))
    summary = {"seed": seed, "quick": quick, "wall_s": round(wall, 1), "world": world, "tracking_uri": uri,
               "sweep_folder": str(folder), "report": str(report), "table": table,
               "verdicts": [v.__dict__ for v in verdicts]}
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"\n[demo] done in {wall / 60:.1f} min. Summary: {workdir / SUMMARY_FILE}")
    print(f"[demo] report (tables, intervals, paired tests, plots): {report}")
    print("[demo] the runs (one parent, a child per variant, the shared pretraining) in MLflow:\n"
          f"  .venv/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri {uri}\n"
          "[demo] rebuild the report from MLflow:\n"
          f"  .venv/bin/perceive-ray report --sweep {SWEEP_NAME} --tracking-uri {uri} --out {workdir / REPORT_DIR}")
    return summary


# -- numbers --------------------------------------------------------------------------------------------------

def pooled_units(run: Any) -> Any:
    """All pair outcomes of What'sUp A and B (L/R + O/U + F/B), unit ids prefixed by the subset."""
    import pandas as pd

    parts = []
    for bench in (BENCH_A, BENCH_B):
        units = run.benchmarks[bench].units(POOLED)
        if units is None:
            raise RuntimeError(f"run {run.label}: {bench} has no per-unit outcomes for {POOLED}")
        parts.append(units.rename(lambda u, b=bench: f"{b}:{u}"))
    return pd.concat(parts)


def build_table(runs: dict[str, Any], *, n_resamples: int, seed: int) -> dict[str, Any]:
    """Per variant and column: value, 95% bootstrap interval (over the metric's units), the paper's number."""
    from perceive_ray.report.render import PUBLISHED
    from perceive_ray.report.stats import bootstrap_interval, metric_interval

    rows, chance = [], {}
    for label in VARIANTS:
        run = runs[label]
        published = PUBLISHED.get(run.published_row or "", {})
        cells = {}
        for bench, metric, header in COLUMNS:
            data = run.benchmarks[bench]
            interval = metric_interval(data, metric, n_resamples=n_resamples, seed=seed)
            cells[header] = {"value": interval.value, "low": interval.low, "high": interval.high, "n": interval.n}
            chance[header] = data.chance.get(metric)
        pooled = pooled_units(run).to_numpy()
        low, high = bootstrap_interval(pooled, n_resamples=n_resamples, seed=seed)
        cells["pairs A+B"] = {"value": float(pooled.mean()), "low": low, "high": high, "n": int(pooled.size)}
        chance["pairs A+B"] = runs[label].benchmarks[BENCH_A].chance.get(POOLED)
        paper = {header: published.get(key) for header, key in PAPER_COLUMNS.items() if key in published}
        rows.append({"label": label, "published_row": run.published_row, "cells": cells, "paper": paper})
    return {"rows": rows, "chance": chance}


def decide(runs: dict[str, Any]) -> list[Verdict]:
    """One verdict per ordering of the paper, decided by exact tests on the pooled A+B pair outcomes, Holm-adjusted
    over the family (the [CLS]-vs-chance binomial test and the five paired McNemar tests)."""
    from scipy import stats

    from perceive_ray.report.stats import holm, mcnemar_exact

    cls = pooled_units(runs[CLS])
    chance = runs[CLS].benchmarks[BENCH_A].chance.get(POOLED, 0.25)
    k, n = int(cls.sum()), len(cls)
    above = stats.binomtest(k, n, chance, alternative="greater").pvalue  # the paper: CLS at or below chance
    tests = [mcnemar_exact(pooled_units(runs[low]), pooled_units(runs[high])) for low, high, _ in ORDERINGS]
    adjusted = holm([float(above)] + [t.p for t in tests])
    verdicts = []
    p = adjusted[0]
    if p >= ALPHA:
        outcome = "agrees"
        how = f"not above chance: {100 * k / n:.1f}% of {n} pairs vs chance {100 * chance:.0f}%, " \
              f"one-sided binomial p = {fmt_p(float(above))} (Holm {fmt_p(p)})"
    else:
        outcome = "disagrees"
        how = f"ABOVE chance: {100 * k / n:.1f}% of {n} pairs vs {100 * chance:.0f}%, binomial p = " \
              f"{fmt_p(float(above))} (Holm {fmt_p(p)})"
    verdicts.append(Verdict("[CLS] cosine is at chance or below (§6.2: 1.9% L/R pairs, chance 25%)", outcome,
                            f"{outcome.upper()}: the [CLS] cosine is {how}."))
    for (low, high, claim), test, p in zip(ORDERINGS, tests, adjusted[1:], strict=True):
        a, b = 100 * test.accuracy_a, 100 * test.accuracy_b
        numbers = f"{a:.1f}% vs {b:.1f}% of {test.n} pairs, McNemar exact p = {fmt_p(test.p)} (Holm {fmt_p(p)}; " \
                  f"{test.c} pairs only the second got right, {test.b} only the first)"
        if p < ALPHA and b > a:
            outcome, said = "agrees", f"{high} > {low}"
        elif p < ALPHA:
            outcome, said = "disagrees", f"{high} < {low}, the opposite of the paper"
        else:
            outcome, said = "not resolved", f"no significant difference between {low} and {high}"
        verdicts.append(Verdict(claim, outcome, f"{outcome.upper()}: {said}: {numbers}."))
    return verdicts


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


# -- printing -------------------------------------------------------------------------------------------------

def _cell(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("value") is None or (isinstance(cell["value"], float) and math.isnan(cell["value"])):
        return f"{'-':>15}"
    value = 100 * cell["value"]
    if cell.get("low") is None:
        return f"{value:>6.1f}{'':>9}"
    return f"{value:>6.1f} [{100 * cell['low']:>2.0f},{100 * cell['high']:>3.0f}]"


def format_table(table: dict[str, Any], *, seed: int, quick: bool) -> str:
    headers = [h for _, _, h in COLUMNS] + ["pairs A+B"]
    width = max(len(v) for v in VARIANTS) + 2
    lines = [f"What'sUp, synthetic and held out (object pairs no training image shows), 2-way; % with 95% bootstrap "
             f"interval; seed {seed}{', --quick' if quick else ''}",
             f"{'variant':<{width}}" + "".join(f"{h:>16}" for h in headers)]
    lines.append("-" * len(lines[-1]))
    for row in table["rows"]:
        lines.append(f"{row['label']:<{width}}" + "".join(f" {_cell(row['cells'].get(h))}" for h in headers))
        if row["paper"]:
            paper = "".join(f"{row['paper'][h]:>16.1f}" if h in row["paper"] else f"{'':>16}" for h in headers)
            lines.append(f"{'  paper: ' + str(row['published_row']):<{width}}{paper}")
    chance = table["chance"]
    lines.append(f"{'chance':<{width}}" + "".join(
        f"{100 * chance[h]:>16.1f}" if chance.get(h) is not None else f"{'':>16}" for h in headers))
    return "\n".join(lines)


def format_verdicts(verdicts: list[Verdict]) -> str:
    lines = [f"Does the miniature agree with the paper? (exact tests on all pairs of A+B, Holm-adjusted, alpha {ALPHA})"]
    for number, verdict in enumerate(verdicts, 1):
        lines.append(f"{number}. {verdict.claim}\n   {verdict.sentence}")
    agree = sum(v.outcome == "agrees" for v in verdicts)
    lines.append(f"{agree} of {len(verdicts)} orderings reproduced"
                 + ("." if agree == len(verdicts) else "; the others are reported as they came out, not tuned away."))
    return "\n".join(lines)
