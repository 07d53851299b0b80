"""`perceive-ray` command line: parse -> config -> call one library function.

Exit codes: 0 success, 2 bad input (config, dataset files, scores, too many unreadable images), 3 scored and written
but tracking failed mid-run (log it later with ``perceive-ray track RUN_DIR``), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from perceive_ray import registry
from perceive_ray.config import redact_uri
from perceive_ray.metrics.policies import LABEL_ERRATA, TIE_POLICIES
from perceive_ray.tracking.tracker import TrackingFailedError

EXIT_BAD_INPUT = 2
EXIT_TRACKING_FAILED = 3


class CliError(Exception):
    """Bad input reported to the user as one message and exit code 2."""


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from perceive_ray.config import ConfigError
    from perceive_ray.data.images import ImageError
    from perceive_ray.data.manifest import ManifestError
    from perceive_ray.data.scores import ScoresError
    from perceive_ray.metrics.base import MetricError
    from perceive_ray.run_directory import RunLockedError, RunMismatchError
    from perceive_ray.tracking.tracker import TrackingError

    return (CliError, TrackingError, ConfigError, ImageError, ManifestError, ScoresError, MetricError,
            registry.RegistryError, RunMismatchError, RunLockedError)


def _split_overrides(args: argparse.Namespace, extra: Sequence[str]) -> None:
    """``validate`` takes files and dotted overrides in any order: the ones with '=' are overrides."""
    args.overrides = [a for a in args.files if "=" in a] + list(extra)
    args.files = [a for a in args.files if "=" not in a]
    if not args.files:
        raise CliError("validate: name at least one experiment file")


def cmd_validate(args: argparse.Namespace) -> int:
    from perceive_ray.config import ConfigError, validate_file
    from perceive_ray.data.manifest import ManifestError

    failed = 0
    for path in args.files:
        try:
            if _is_sweep(path):
                _validate_sweep(path, smoke=args.smoke)
                continue
            config = validate_file(path, args.overrides, smoke=True if args.smoke else None)
            if not args.schema_only and config.kind == "train":
                _check_train_files(config, smoke=args.smoke)
            elif not args.schema_only:
                _check_files(config, smoke=args.smoke)
        except (ConfigError, ManifestError) as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
        else:
            mode = " (smoke)" if args.smoke else ""
            what = f"train job {config.job}" if config.kind == "train" else ", ".join(b.name for b in config.benchmarks)
            print(f"ok  {path}{mode}  ({config.name}: {what})")
    return EXIT_BAD_INPUT if failed else 0


def _is_sweep(path: str) -> bool:
    from perceive_ray.config import read_yaml

    try:
        return read_yaml(path).get("kind") == "sweep"
    except Exception:  # noqa: BLE001 (validate_file reports unreadable files with its own message)
        return False


def _validate_sweep(path: str, *, smoke: bool) -> None:
    """A sweep file: its schema, then every trial's configs (as written and in smoke mode), no filesystem checks."""
    from perceive_ray.config import read_yaml
    from perceive_ray.sweep_config import check_sweep, load_sweep

    modes = [True] if smoke else [False, True] if read_yaml(path).get("smoke") else [False]
    for mode in modes:
        sweep = load_sweep(path, smoke=mode)
        points = len(check_sweep(sweep))
        print(f"ok  {path}{' (smoke)' if mode else ''}  ({sweep.config.name}: sweep, {points} validated "
              f"point(s) over {', '.join(sweep.config.search)})")


def _check_files(config, *, smoke: bool) -> None:
    """The filesystem half of validation: model source, weight files, datasets (what --smoke prepares is skipped)."""
    from perceive_ray.preflight import check_inputs
    from perceive_ray.smoke import preparable

    skip = preparable(config) if smoke else []
    check_inputs(config, skip=skip)
    if skip:
        print(f"    --smoke prepares {', '.join(skip)} when missing", file=sys.stderr)


def _local_path(value: str) -> bool:
    """A local path (to check), not a hub id: absolute, ./ or ../, or a first component that exists here."""
    import re

    if Path(value).is_absolute() or value.startswith(("./", "../")):
        return True
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not Path(value.split("/", 1)[0]).exists():
        return False  # owner/name on the Hugging Face hub
    return "/" in value


def _check_train_files(config, *, smoke: bool) -> None:
    """A training experiment's files: model source and data sources (what --smoke prepares is skipped)."""
    from perceive_ray.smoke import preparable

    skip = [Path(p) for p in (preparable(config) if smoke else [])]

    def skipped(path: Path) -> bool:
        return any(path == s or s in path.parents for s in skip)

    for index, source in enumerate(config.data.sources):
        for key, path in (("path", source.path), ("image_root", source.image_root)):
            if not skipped(Path(path)) and not Path(path).exists():
                raise CliError(f"data.sources.{index}.{key}: {path} does not exist")
    source = Path(config.model.source)
    if not skipped(source) and _local_path(config.model.source) and not source.exists():
        raise CliError(f"model.source: {source} does not exist")
    tower = config.train.llava.vision_tower if config.job == "llava" else None
    if tower and _local_path(tower) and not skipped(Path(tower)) and not Path(tower).exists():
        raise CliError(f"train.llava.vision_tower: {tower} does not exist")


def cmd_ls(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(registry.KINDS)
    for kind in kinds:
        print(f"{kind}:")
        entries = registry.names(kind)
        if not entries:
            print("  (none registered yet)")
        for name in entries:
            line = f"  {name:<24} {registry.target(kind, name)}"
            if args.verbose:
                line += f"\n      {registry.summary(kind, name)}"
            print(line)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from perceive_ray.data.synthetic import generate

    if args.pairs < 1:
        raise CliError(f"--pairs must be >= 1, got {args.pairs}")
    try:
        summary = generate(Path(args.out), seed=args.seed, pairs=args.pairs, overwrite=args.overwrite)
    except ValueError as exc:  # argument and output-folder problems, raised before anything is written
        raise CliError(str(exc)) from exc
    print(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
    return 0


def cmd_data_manifest(args: argparse.Namespace) -> int:
    from perceive_ray.data.catalog import load_benchmark

    manifest = load_benchmark(args.benchmark, args.data_root, strict_sizes=args.strict_sizes)
    for warning in manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    path = manifest.write_parquet(args.out)
    print(json.dumps({"benchmark": manifest.benchmark, "items": len(manifest), "manifest": str(path),
                      "source_hashes": dict(manifest.source_hashes)}, indent=2))
    return 0


def _load_for_run(args: argparse.Namespace):
    """Config (+ smoke preparation) for eval / score: every check that needs no model runs before Ray or MLflow."""
    from perceive_ray.config import load_config

    config = load_config(args.experiment, args.overrides, smoke=args.smoke)
    if args.smoke:
        from perceive_ray.smoke import prepare_smoke

        prepare_smoke(config)
    return config


def _run_errors() -> tuple[type[BaseException], ...]:
    from perceive_ray.run_directory import RunLockedError, RunMismatchError

    return (RunMismatchError, RunLockedError)


def cmd_eval(args: argparse.Namespace) -> int:
    config = _load_for_run(args)
    from perceive_ray.run.inference import quiet_ray_data, run_eval

    quiet_ray_data()
    try:
        run_eval(config, run_id=args.run_id, address=args.address, track=not args.no_track, on_error=args.on_error)
    except _run_errors() as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from perceive_ray.config import ConfigError

    config = _load_for_run(args)
    if config.kind != "train":
        raise ConfigError(f"{args.experiment}: kind: {config.kind!r}; perceive-ray train runs kind: train "
                          "experiments (use eval for evaluations)")
    from perceive_ray.run.inference import quiet_ray_data
    from perceive_ray.run.training import run_train

    quiet_ray_data()
    try:
        run_train(config, run_id=args.run_id, address=args.address, track=not args.no_track)
    except _run_errors() as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from perceive_ray.sweep_config import load_sweep

    sweep = load_sweep(args.sweep, smoke=args.smoke)
    from perceive_ray.run.inference import quiet_ray_data
    from perceive_ray.run.sweep import run_sweep

    quiet_ray_data()
    summary = run_sweep(sweep, resume=args.resume, storage=args.storage, address=args.address,
                        track=not args.no_track)
    name = sweep.config.name
    if summary["parent_run_id"]:
        from perceive_ray.tracking.tracker import resolve_tracking_uri

        uri = resolve_tracking_uri(sweep.config.tracking.uri)
        print(f"[sweep] MLflow: parent run {summary['parent_run_id']}, one child per trial; open them with:\n"
              f"  mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri {redact_uri(uri)}"
              if uri.startswith("sqlite") else f"[sweep] MLflow runs at {redact_uri(uri)}")
        print(f"[sweep] report: perceive-ray report --sweep {name} --out report/{name}")
    else:
        print(f"[sweep] report: perceive-ray report --sweep-dir {summary['folder']} --out report/{name}")
    return 1 if summary["errored"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from perceive_ray.report.command import run_report
    from perceive_ray.report.data import ReportError

    try:
        run_report(sweep=args.sweep, runs=args.runs, sweep_dir=args.sweep_dir, run_dirs=args.run_dirs,
                   out=args.out, tracking_uri=args.tracking_uri, metrics=args.metric, n_resamples=args.resamples,
                   seed=args.seed, title=args.title, log_to_parent=not args.no_log)
    except ReportError as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from perceive_ray.tracking.replay import track_run_dir

    run_id = track_run_dir(Path(args.run_dir), uri=args.tracking_uri, experiment=args.experiment)
    print(f"tracked: {args.run_dir} -> run {run_id}")
    return 0


def cmd_convert_llava(args: argparse.Namespace) -> int:
    from perceive_ray.models.convert import convert_llava

    path = convert_llava(Path(args.src), Path(args.dst), template=args.template,
                         vision_tower_dir=Path(args.vision_tower) if args.vision_tower else None, dtype=args.dtype,
                         llama3_pad_row=args.llama3_pad_row)
    print(f"converted {args.src} -> {path}; load it with model.family=llava model.source={path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from perceive_ray.run.demo import SWEEP_FILE, run_demo

    experiments = Path(args.experiments_dir)
    if not (experiments / "sweeps" / SWEEP_FILE).is_file():
        raise CliError(f"{experiments}: no sweeps/{SWEEP_FILE} here; run from the repository root or pass "
                       "--experiments-dir")
    if args.seed < 0:
        raise CliError(f"--seed must be a non-negative integer, got {args.seed}")
    run_demo(Path(args.workdir), experiments_dir=experiments, seed=args.seed, quick=args.quick, resume=args.resume,
             tracking_uri=args.tracking_uri, address=args.address)
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    save = registry.resolve("tiny", args.family)
    path = save(Path(args.out), seed=args.seed)
    print(f"tiny {args.family} model written to {path}; load it with model.family={args.family} model.source={path}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from perceive_ray.data.catalog import load_benchmark
    from perceive_ray.data.scores import read_scores
    from perceive_ray.metrics.compute import compute_metrics

    scores = read_scores(args.scores, keep_extra=True)  # cheap checks first: the scores file, then the dataset
    manifest = load_benchmark(args.benchmark, args.data_root, strict_sizes=args.strict_sizes)
    errors_path = Path(args.errors) if args.errors else Path(args.scores).with_name("errors.parquet")
    excluded = 0
    if errors_path.is_file():  # items of unreadable images (an evaluation's errors.parquet): complete items only
        import pyarrow.parquet as pq

        bad = set(pq.read_table(errors_path, columns=["item_id"]).column("item_id").to_pylist())
        kept = manifest.restrict(item.item_id for item in manifest.items if item.item_id not in bad)
        excluded = len(manifest) - len(kept)
        manifest = kept
    report = compute_metrics(
        manifest,
        scores,
        tie_policy=args.tie_policy,
        label_errata=args.errata,
        max_nan_fraction=args.max_nan_fraction,
        source=str(args.scores),
        mmvp_logit_scale=_mmvp_scale(args),
    )
    report.counts["items_excluded"] = excluded
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from perceive_ray.evaluation import format_report

        print(format_report(report.to_dict()))
        if excluded:
            print(f"{excluded} item(s) with unreadable images excluded ({errors_path})")
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def _mmvp_scale(args: argparse.Namespace) -> float:
    if args.mmvp_logit_scale is not None:
        return args.mmvp_logit_scale
    return registry.scorer(args.scorer).mmvp_logit_scale if args.scorer else 1.0


def cmd_score(args: argparse.Namespace) -> int:
    config = _load_for_run(args)
    from perceive_ray.evaluation import run_evaluation
    from perceive_ray.scoring.local import LocalExecutor

    try:
        run_evaluation(config, LocalExecutor(), run_id=args.run_id, run_dir=Path(args.out) if args.out else None,
                       track=not args.no_track, on_error=args.on_error)
    except _run_errors() as exc:
        raise CliError(str(exc)) from exc
    return 0


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The arguments eval and score share (one evaluation core, two executors)."""
    p.add_argument("experiment", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. scorer.batch_size=8 benchmarks.0.root=DIR")
    p.add_argument("--smoke", action="store_true",
                   help="apply the experiment's smoke block (tiny model, CPU); prepares missing synthetic data and "
                   "tiny models")
    p.add_argument("--run-id", help="run directory name under output_dir (default: the experiment name)")
    p.add_argument("--on-error", choices=("record", "fail"), default=None,
                   help="unreadable images: error rows or stop the run (default: the config's on_error)")
    p.add_argument("--no-track", action="store_true",
                   help="do not log to MLflow (default: tracking.uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perceive-ray",
        description="Reproduce and scale 'How Generative MLLMs Perceive More Than CLIP with the Same Vision "
        "Encoder': benchmarks in their published formats, exact metrics, Ray-scaled scoring and training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate", help="check experiment files: schema, scorer options, model families, model/weight/data paths",
        description="Validate experiment files as eval/score would load them: unknown keys and wrong types, scorer "
        "options against the scorer's typed options (typos included), model family vs scorer, tie policy vs "
        "benchmark, then the model source, weight files and datasets on disk. Dotted overrides apply to every "
        "file. Each problem names the file and key; exit code 2 if any file is invalid.")
    p.add_argument("files", nargs="+", metavar="FILE", help="experiment YAML files (and dotted.key=value overrides)")
    p.add_argument("--smoke", action="store_true",
                   help="validate the smoke mode only (paths --smoke would prepare are not required)")
    p.add_argument("--schema-only", action="store_true",
                   help="skip the filesystem checks (model source, weights, datasets)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("ls", help="list registered names (benchmarks, metrics, scorers, models, jobs)",
                       description="List what the registry knows, by kind. Config files refer to these names.")
    p.add_argument("kind", nargs="?", choices=registry.KINDS)
    p.add_argument("-v", "--verbose", action="store_true", help="also show each entry's one-line description")
    p.set_defaults(func=cmd_ls)

    data = sub.add_parser("data", help="dataset tools: synthetic benchmark, manifests",
                          description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser(
        "synth", help="render the synthetic benchmark: every benchmark's real layout + LLaVA-format training data",
        description="Render seeded synthetic scenes and write them in every benchmark's real layout (What'sUp "
        "Controlled A/B and COCO/VG-QA, MMVP, MMVP-VLM, Winoground, EqBen_Mini, NaturalBench, COCO-CF, SugarCrepe, "
        "SeeTRUE) plus a LLaVA-1.5-format caption split. The same seed gives byte-identical files.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=8, help="object pairs per What'sUp subset (default 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a tree this command wrote before (refused otherwise, so stale files never mix in)")
    p.set_defaults(func=cmd_data_synth)
    p = data_sub.add_parser("manifest", help="read a benchmark folder and write its manifest (Parquet)",
                            description="Run a benchmark adapter over a dataset folder and write the manifest.")
    p.add_argument("--benchmark", required=True, choices=registry.names("benchmarks"), metavar="NAME")
    p.add_argument("--data-root", required=True, help="the benchmark's folder in its published layout")
    p.add_argument("--out", required=True, help="manifest .parquet to write")
    p.add_argument("--strict-sizes", action="store_true", help="make a size that differs from the published one an error")
    p.set_defaults(func=cmd_data_manifest)

    model = sub.add_parser("model", help="model tools: tiny random-init models for smoke runs",
                           description="Model tools.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = model_sub.add_parser(
        "tiny", help="write a tiny random-init model in the layout its family's loader reads",
        description="Write a tiny random-init model (seconds on a CPU) to --out; smoke runs point model.source at "
        "it. The loader that reads it is the one that reads real checkpoints.",
    )
    p.add_argument("family", choices=registry.names("tiny"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_model_tiny)

    convert = sub.add_parser("convert", help="convert checkpoints to the layouts the loaders read",
                             description="Checkpoint conversion.")
    convert_sub = convert.add_subparsers(dest="convert_command", required=True, metavar="FAMILY")
    p = convert_sub.add_parser(
        "llava", help="original LLaVA / LLaVA++ checkpoint -> transformers Llava layout",
        description="Convert a checkpoint in the original haotian-liu/LLaVA or LLaVA++ layout (LLaVA-1.5, the "
        "MBZUAI Phi-3-V / LLaMA-3-V models, the LLaVA patch/cls LoRA-merged releases) into the transformers "
        "Llava layout (safetensors) with a perceive_ray.json sidecar (template, select feature).",
    )
    p.add_argument("src", help="folder with the original config.json, weights and tokenizer")
    p.add_argument("dst", help="output folder (must not exist or be empty)")
    p.add_argument("--template", choices=("chat", "phi3_instruct", "llama3"),
                   help="conversation template (default: inferred from the language model)")
    p.add_argument("--vision-tower", help="local folder of the CLIP vision tower (default: mm_vision_tower)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: as stored)")
    p.add_argument("--llama3-pad-row", choices=("mean", "none"), default="mean",
                   help="LLaMA-3 tokenizer without a pad token: add <pad> with input/output rows set to the mean of "
                   "the existing rows, which enters the VQAScore softmax as in the reference (mean, default), or "
                   "add nothing (none)")
    p.set_defaults(func=cmd_convert_llava)

    p = sub.add_parser(
        "demo", help="the main job on embedded defaults: the paper's controlled study in miniature on 2 CPU cores",
        description="Write a synthetic world (relation-free web captions, LLaVA-format relation data, held-out "
        "What'sUp A/B), pretrain a tiny CLIP on it (Ray Train), then read its frozen encoder six ways as one sweep "
        "(experiments/sweeps/demo_study.yaml: [CLS] cosine, NegCLIP lock-image, PACL, PACL + RoPE, tiny LLaVA by "
        "VQAScore, LLaVA-cls), log everything to MLflow, write the report and print the What'sUp table with the "
        "paper's rows, 95% intervals and one verdict per ordering of the paper decided by a paired test.",
    )
    p.add_argument("--workdir", default="runs/demo", help="where the world, models, sweep, report and mlflow.db go")
    p.add_argument("--quick", action="store_true", help="smaller world, 40 steps per training run (what make test runs)")
    p.add_argument("--seed", type=int, default=0, help="world, model init and training seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --workdir")
    p.add_argument("--experiments-dir", default="experiments", help="the repository's experiments/ folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local instance)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "eval", help="evaluate an experiment through the Ray Data pipeline (local Ray or a cluster); resumable",
        description="Score every benchmark of the experiment in ONE Ray Data pipeline (images decoded in CPU tasks, "
        "the scorer in one actor pool sized by resources.*: one model load per actor for the whole experiment), "
        "streaming shards to <output_dir>/<run id>/<benchmark>/; re-running the same run id skips rows already "
        "scored and refuses a changed model, scorer, dataset, weights or seed. One MLflow run per evaluation. "
        "Without --address / RAY_ADDRESS a local Ray instance is started. Same results, files and resume as score.",
    )
    add_run_args(p)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local instance)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "train", help="train a model on Ray Train + DeepSpeed (CLIP fine-tuning, PACL/SPARC heads); resumable",
        description="Run a training experiment (kind: train) on Ray Train + DeepSpeed: every input (config keys, "
        "data rows, images, model source) is checked before any worker starts; images stream through Ray Data CPU "
        "tasks; every rank checkpoints to <output_dir>/train/<run id>/ray; re-running the same --run-id resumes "
        "from the newest checkpoint (same data order); the finished model is exported to <run id>/export, which an "
        "eval experiment names as train:<run id> (and a later training stage as model.source: train:<run id>, e.g. "
        "LLaVA stage 2 from stage 1). Rank 0 logs the loss curve to MLflow.",
    )
    p.add_argument("experiment", help="training experiment YAML (kind: train)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optim.lr=1e-5 train.clip.lock_image=false")
    p.add_argument("--smoke", action="store_true", help="apply the experiment's smoke block (tiny model, synthetic "
                   "data, CPU); prepares missing synthetic data and tiny models")
    p.add_argument("--run-id", help="run directory name under <output_dir>/train (default: <name>-<timestamp>); "
                   "an existing one resumes")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep", help="run a sweep file (Ray Tune over dotted overrides; trials train, then evaluate); resumable",
        description="Run a sweep (kind: sweep): a base experiment and a search space of the same dotted keys as "
        "overrides (grid, choice, uniform, loguniform, randint, quniform), spanning training and evaluation "
        "factors. Every trial's configs are validated before any trial starts. Each trial is a Ray Tune trial that "
        "trains (Ray Train + DeepSpeed, when the base experiment is kind: train) and evaluates (Ray Data); MLflow "
        "gets one parent run per sweep and one child per trial. State lives in <storage>/<name> (shared storage "
        "on a cluster): --resume after a killed driver continues the unfinished trials from their checkpoints, "
        "with the same MLflow runs.",
    )
    p.add_argument("sweep", help="sweep YAML (kind: sweep), e.g. experiments/sweeps/token_usage.yaml")
    p.add_argument("--smoke", action="store_true", help="apply the sweep's smoke block and the experiments' own "
                   "(tiny models, synthetic data, CPU); prepares missing synthetic data and tiny models")
    p.add_argument("--resume", action="store_true", help="continue the sweep in its storage folder (Tuner.restore)")
    p.add_argument("--storage", help="storage folder (default: the file's storage_path, runs/sweeps)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow (trial records stay in the folder)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "report", help="paper-style tables with 95%% bootstrap intervals and paired tests (Markdown, HTML, PNG)",
        description="Build the report of a sweep or of evaluation runs, from MLflow or from folders: rows = "
        "configurations, columns = benchmark x metric, the chance row and the paper's number where PROTOCOLS §6 "
        "has one; a 95% bootstrap interval (resampling items / pairs) per number and an exact McNemar test between "
        "every two configurations on the same items. Writes OUT/index.md, OUT/index.html (self-contained), "
        "OUT/plots/*.png, OUT/report.json; a sweep's report is also logged to its MLflow parent run.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", help="sweep name (its newest parent run in MLflow)")
    source.add_argument("--runs", nargs="+", metavar="RUN_ID", help="MLflow run ids of evaluations")
    source.add_argument("--sweep-dir", help="a sweep folder (<storage>/<name>), offline")
    source.add_argument("--run-dirs", nargs="+", metavar="DIR", help="evaluation run folders, offline")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                   "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--metric", action="extend", nargs="+", metavar="BENCH/METRIC",
                   help="the table's columns, e.g. whatsup_controlled_a/2way/lr/pair_acc (default: each benchmark's "
                   "headline metrics)")
    p.add_argument("--resamples", type=int, default=10_000, metavar="N",
                   help="bootstrap resamples per number (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--title", help="the report's title (default: from the source)")
    p.add_argument("--no-log", action="store_true", help="--sweep: do not log the report to the parent run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "score", help="score an experiment's benchmarks in one process (the reference path, no Ray)",
        description="The same evaluation as eval (same files, resume, checks and tracking) with the scorer in "
        "this process instead of a Ray actor pool: loads the model once, scores every benchmark, writes "
        "<run dir>/<benchmark>/scores.parquet and metrics.json. Every input is checked before the model loads.",
    )
    add_run_args(p)
    p.add_argument("--out", help="run directory (default: <output_dir>/<run id>)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "track", help="log a finished run directory to MLflow (after a tracking outage, or a --no-track run)",
        description="Log RUN_DIR to a tracker: params from config.yaml, tags from run_record.json (provenance and "
        "the scorer's describe()), metrics from each benchmark's metrics.json, the tables as artifacts. A run that "
        "an earlier invocation opened on the same URI (tracking.json) is reopened and finished, so a run id has "
        "one MLflow run.",
    )
    p.add_argument("run_dir", help="the run directory (<output_dir>/<run id>)")
    p.add_argument("--tracking-uri", help="tracker URI (default: the run's tracking.uri, else MLFLOW_TRACKING_URI, "
                   "else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the run's tracking.experiment)")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser(
        "metrics", help="compute a benchmark's metrics from a scores table",
        description="Compute metrics (PROTOCOLS §2) from a scores Parquet (item_id, image_index, text_index, "
        "score). Exits 2 with a clear message when the scores do not cover the benchmark's items.",
    )
    p.add_argument("--benchmark", required=True, choices=registry.names("benchmarks"), metavar="NAME")
    p.add_argument("--data-root", required=True, help="the benchmark's folder in its published layout")
    p.add_argument("--scores", required=True, help="scores table (.parquet)")
    p.add_argument("--tie-policy", default="strict", choices=TIE_POLICIES)
    p.add_argument("--errata", default="original", choices=LABEL_ERRATA, help="label errata mode")
    p.add_argument("--strict-sizes", action="store_true", help="make a size that differs from the published one an error")
    p.add_argument("--max-nan-fraction", type=float, default=0.0,
                   help="SeeTRUE only: largest fraction of NaN-scored items to exclude before failing (default 0)")
    p.add_argument("--errors", help="error rows of unreadable images (default: errors.parquet beside --scores); "
                   "their items are left out and counted, as in eval")
    p.add_argument("--scorer", choices=registry.names("scorers"), metavar="NAME",
                   help="the scorer that made the scores (sets the mmvp_reference softmax factor)")
    p.add_argument("--mmvp-logit-scale", type=float,
                   help="mmvp_reference only: factor before the reference's float32 softmax over the two images "
                   "(default: the --scorer's registry value, else 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_metrics)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Dotted overrides may come after options (`score exp.yaml --smoke a.b=1`); argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if extra and (any(arg.startswith("-") or "=" not in arg for arg in extra)
                  or not (hasattr(args, "overrides") or args.func is cmd_validate)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.func is cmd_validate:
            _split_overrides(args, extra)
        elif extra:
            args.overrides = [*args.overrides, *extra]
        return args.func(args)
    except _bad_input_errors() as exc:
        print(f"perceive-ray: error: {redact_uri(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrackingFailedError as exc:
        print(f"perceive-ray: error: {redact_uri(exc)}", file=sys.stderr)
        return EXIT_TRACKING_FAILED


if __name__ == "__main__":
    sys.exit(main())
