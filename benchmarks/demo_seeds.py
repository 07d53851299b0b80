"""Aggregate `perceive-ray demo` runs of several seeds: mean +- sd per variant and column, verdicts per seed.

    .venv/bin/python benchmarks/demo_seeds.py runs/demo_s0 runs/demo_s1 runs/demo_s2 [--resources r0.json ...]

Each argument is a demo --workdir holding demo_summary.json. Prints a Markdown table (the README's) and the
verdict outcomes of every seed; with --resources, the wall time and peak memory that benchmarks/demo_resources.py
recorded for each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("A indiv", "A L/R pr", "A O/U pr", "B indiv", "B L/R pr", "B F/B pr", "pairs A+B")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--resources", nargs="*", default=[])
    args = parser.parse_args(argv)
    summaries = [json.loads((Path(w) / "demo_summary.json").read_text()) for w in args.workdirs]
    seeds = [s["seed"] for s in summaries]
    labels = [row["label"] for row in summaries[0]["table"]["rows"]]
    print(f"Seeds {seeds}; % (mean ± sd over seeds)\n")
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for label in labels:
        cells = []
        for column in COLUMNS:
            values = [100 * next(r for r in s["table"]["rows"] if r["label"] == label)["cells"][column]["value"]
                      for s in summaries]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    chance = summaries[0]["table"]["chance"]
    print("| chance | " + " | ".join(f"{100 * chance[c]:.1f}" for c in COLUMNS) + " |")
    print("\nVerdicts (seed: outcome per ordering)")
    claims = [v["claim"] for v in summaries[0]["verdicts"]]
    for index, claim in enumerate(claims):
        outcomes = ", ".join(f"seed {s['seed']}: {s['verdicts'][index]['outcome']}" for s in summaries)
        print(f"- {claim}: {outcomes}")
    for path in args.resources:
        data = json.loads(Path(path).read_text())
        print(f"\n{path}: wall {data['wall_s'] / 60:.1f} min, peak machine memory used +{data['peak_machine_used_delta_gb']}"
              f" GB (process-tree RSS sum {data['peak_tree_rss_gb']} GB), {data['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
