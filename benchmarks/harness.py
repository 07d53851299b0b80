"""Shared pieces of the benchmark scripts: random-init scorer models of a chosen size, experiment configs, a local
Ray owned by the script, and time stamps on the blocks an executor yields / the calls a scorer serves.

Models are written with the library's own sized builders (``perceive_ray.models.tiny``) and loaded back through the
production loaders (``load_clip`` / ``load_llava``), so a benchmark times exactly what ``perceive-ray eval`` runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

SCORERS = ("clip", "vqascore")
# Per scorer: a random-init model whose work is realistic for a CPU (tens of ms per (item, image) row on 2 cores).
MODEL_DEFAULTS = {
    # open_clip ViT with 64-wide heads at 224 px / patch 16 (197 tokens); OpenAI-style text tower (49,408 tokens,
    # context 77).
    "clip": {"width": 768, "layers": 2, "image_size": 224, "patch_size": 16, "text_width": 512, "text_layers": 2},
    # LLaVA layout: CLIP vision tower at 336 px / patch 14 -> V = 576 visual tokens like LLaVA-1.5; LLaMA LM. The LM
    # dominates the model time (~90% here) as in LLaVA-1.5-7B, whose 6.7B-parameter LM over ~620 tokens is ~96% of
    # the FLOPs next to the 0.3B vision tower over 577 tokens.
    "vqascore": {"width": 128, "layers": 1, "image_size": 336, "patch_size": 14, "text_width": 384,
                 "text_layers": 2},
}


def add_model_args(parser: argparse.ArgumentParser, *, defaults: dict[str, dict[str, int]] = MODEL_DEFAULTS) -> None:
    group = parser.add_argument_group("random-init scorer models (defaults depend on the scorer)")
    for name, help_ in (("width", "vision width"), ("layers", "vision layers"), ("image-size", "vision input px"),
                        ("patch-size", "vision patch px"), ("text-width", "text tower / LM width"),
                        ("text-layers", "text tower / LM layers")):
        shown = ", ".join(f"{s} {d[name.replace('-', '_')]}" for s, d in defaults.items())
        group.add_argument(f"--{name}", type=int, default=None, help=f"{help_} (default: {shown})")
    parser.set_defaults(_model_defaults=defaults)


def resolve_model_args(args: argparse.Namespace, scorer: str) -> dict[str, int]:
    """The model sizes of ``scorer``: explicit options over its defaults."""
    sizes = dict(args._model_defaults[scorer])
    for key in sizes:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    return sizes


def save_model(path: Path, scorer: str, sizes: Mapping[str, int], *, seed: int) -> Path:
    """A random-init scorer model of ``sizes`` written where the production loader reads it."""
    from perceive_ray.models.tiny import save_clip, save_llava

    if scorer == "clip":
        return save_clip(path, seed=seed, image_size=sizes["image_size"], patch_size=sizes["patch_size"],
                         width=sizes["width"], layers=sizes["layers"], head_width=64,
                         text_width=sizes["text_width"], text_layers=sizes["text_layers"],
                         text_heads=max(1, sizes["text_width"] // 64), embed_dim=512)
    width, text_width = sizes["width"], sizes["text_width"]
    return save_llava(path, seed=seed, template="chat", image_size=sizes["image_size"],
                      patch_size=sizes["patch_size"], vision_width=width, vision_layers=sizes["layers"],
                      vision_heads=max(1, width // 64), vision_intermediate=4 * width, text_width=text_width,
                      text_layers=sizes["text_layers"], text_heads=max(1, text_width // 64),
                      text_intermediate=(text_width * 8 // 3) // 16 * 16)


def describe_model(scorer: str, sizes: Mapping[str, int]) -> str:
    vision = f"vision {sizes['width']}w x {sizes['layers']}L @ {sizes['image_size']}px/{sizes['patch_size']}"
    if scorer == "clip":
        return (f"clip_cosine on a random-init open_clip ({vision}, text {sizes['text_width']}w x "
                f"{sizes['text_layers']}L)")
    visual = (sizes["image_size"] // sizes["patch_size"]) ** 2
    return (f"vqascore (t2v, chat, pad) on a random-init LLaVA ({vision} -> V={visual}, LM {sizes['text_width']}w x "
            f"{sizes['text_layers']}L)")


def experiment(*, data: Path, benchmarks: list[str], model_dir: Path, out: Path, batch_size: int, seed: int,
               scorer: str = "clip", sharing: str = "shared", name: str = "benchmark", limit: int | None = None,
               actor_cpus: float | None = None, object_store_mb: int | None = None):
    """An ExperimentConfig over ``benchmarks`` under ``data``. Resources are the repository defaults (automatic
    actor CPUs and threads) unless ``actor_cpus`` / ``object_store_mb`` are given."""
    from perceive_ray.config import validate

    if scorer == "clip":
        model = {"family": "clip", "source": str(model_dir), "dtype": "float32"}
        scoring = {"name": "clip_cosine", "batch_size": batch_size, "options": {"clip_transform": "val"}}
    else:
        model = {"family": "llava", "source": str(model_dir), "dtype": "float32"}
        scoring = {"name": "vqascore", "batch_size": batch_size,
                   "options": {"mode": "t2v", "template": "chat", "image_preprocess": "pad", "sharing": sharing,
                               "device": "cpu"}}
    resources: dict[str, Any] = {"num_actors": 1, "num_gpus_per_actor": 0}
    if actor_cpus is not None:
        resources["num_cpus_per_actor"] = actor_cpus
    if object_store_mb is not None:
        resources["object_store_mb"] = object_store_mb
    return validate({
        "name": name, "seed": seed,
        "benchmarks": [{"name": b, "root": str(data), "limit": limit} for b in benchmarks],
        "model": model, "scorer": scoring, "resources": resources,
        "output_dir": str(out), "on_error": "fail",
    }, source="benchmarks")


def start_ray(num_cpus: int | None = None) -> float:
    """A fresh local Ray owned by this process (never an existing cluster), started the way ``run_eval`` starts
    one (``address="local"``, no dashboard); returns the ``ray.init`` seconds."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    seconds = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    return seconds


class StampedExecutor:
    """Wraps an executor (``RayDataExecutor``): records (perf_counter, score rows) for every block it yields to the
    evaluation core, and otherwise changes nothing (the core calls ``stream``, ``describe``, ``loads``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.runner = inner.runner
        self.stamps: list[tuple[float, int]] = []

    def stream(self, config: Any, rows: list[dict[str, Any]], roots: Mapping[str, str],
               on_error: str) -> Iterator[Any]:
        for block in self.inner.stream(config, rows, roots, on_error):
            self.stamps.append((time.perf_counter(), block.num_rows))
            yield block

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def loads(self) -> list[dict[str, Any]]:
        return self.inner.loads()


class StampedScorer:
    """Wraps a scorer callable: records (perf_counter at return, score rows returned) per call, and the seconds
    spent inside the scorer."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stamps: list[tuple[float, int]] = []
        self.inside_s = 0.0

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        start = time.perf_counter()
        out = self.inner(batch)
        end = time.perf_counter()
        self.inside_s += end - start
        self.stamps.append((end, len(out["score"])))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def first_to_last(stamps: list[tuple[float, int]]) -> dict[str, float]:
    """Steady rate from time stamps: the units delivered after the first stamp over the time from the first stamp to
    the last (start-up and the first batch fall before the first stamp, the driver's final metrics after the last)."""
    if len(stamps) < 2:
        return {"units": float(sum(n for _, n in stamps)), "seconds": float("nan"), "rate": float("nan")}
    units = sum(n for _, n in stamps[1:])
    seconds = stamps[-1][0] - stamps[0][0]
    return {"units": float(units), "seconds": seconds, "rate": units / seconds if seconds > 0 else float("nan")}


def host_load() -> float:
    """The 1-minute load average (a quiet 2-core host reads below ~0.5)."""
    return os.getloadavg()[0]


def busy_cores(window: float = 3.0) -> float:
    """CPU cores in use on the whole host over the next ``window`` seconds (from /proc/stat via psutil)."""
    import psutil

    return psutil.cpu_percent(interval=window) / 100.0 * (psutil.cpu_count() or 1)


def wait_for_quiet(threshold: float, max_wait: float, *, window: float = 3.0) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until the host's busy cores over ``window`` s drop below ``threshold`` (call it
    while nothing of ours runs, so everything busy is someone else's); returns (waited s, last busy cores)."""
    start = time.monotonic()
    busy = busy_cores(window)
    while busy >= threshold and time.monotonic() - start < max_wait:
        busy = busy_cores(window)
    return time.monotonic() - start, busy


class ForeignLoad:
    """Samples, in a thread, the CPU used by processes OUTSIDE this process's tree (the host's busy time from
    /proc/stat minus the CPU time of this process and its descendants, e.g. a benchmark child and the Ray it
    starts): ``cores()`` is their mean number of busy cores while the monitor ran. Other developers' test suites
    show up here; a quiet host reads ~0."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        import psutil

        self._psutil = psutil
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds, foreign busy core-seconds) per interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_cpu(self) -> dict[int, float]:
        psutil = self._psutil
        me = psutil.Process()
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                out[proc.pid] = times.user + times.system
            except psutil.Error:
                continue
        return out

    def _host_busy(self) -> float:
        times = self._psutil.cpu_times()
        return times.user + times.system + times.nice + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)

    def _run(self) -> None:
        last_t, last_busy, last_tree = time.perf_counter(), self._host_busy(), self._tree_cpu()
        while not self._stop.wait(self.interval):
            now_t, busy, tree = time.perf_counter(), self._host_busy(), self._tree_cpu()
            ours = sum(cpu - last_tree.get(pid, 0.0) for pid, cpu in tree.items())  # new processes: all their CPU
            self.samples.append((now_t - last_t, max(0.0, (busy - last_busy) - ours)))
            last_t, last_busy, last_tree = now_t, busy, tree

    def __enter__(self) -> ForeignLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def cores(self) -> float:
        seconds = sum(s for s, _ in self.samples)
        return sum(b for _, b in self.samples) / seconds if seconds else float("nan")
