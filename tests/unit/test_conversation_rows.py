"""The conversation data path of the LLaVA / VLM2Vec jobs, without Ray: ``decode_conversation_rows`` (pixels through
the checkpoint's CLIP processor after processor / pad / resize, zero pixels for text-only rows, an unreadable image
-> ``ok`` False, every turn as JSON), the modality-length step order (``step_rows``: single-modality mega-batches
whose union over ranks is the same for every world size), ``build_plan`` with lengths, ``modality_lengths`` and
``load_samples(keep_text_only=...)`` on the synthetic LLaVA data, and ``decode_rows`` over a prepared run layout."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceive_ray.config import ConfigError, load_config
from perceive_ray.data import llava_data
from perceive_ray.data.images import pad_to_square
from perceive_ray.data.synthetic import ensure_generated
from perceive_ray.models.llava import save_tiny_llava
from perceive_ray.run.training import decode_conversation_rows, decode_rows, split_rows
from perceive_ray.train.jobs.llava_common import image_spec, load_image_processor, preprocess_image
from perceive_ray.train.llava_labels import modality_length_groups
from perceive_ray.training import (
    LENGTHS_FILE,
    SAMPLES_FILE,
    build_plan,
    load_samples,
    modality_lengths,
    step_rows,
)

TRAIN = Path(__file__).resolve().parents[2] / "experiments" / "train"
LORA = TRAIN / "llava15_patch_lora.yaml"
VLM2VEC = TRAIN / "vlm2vec_llava15.yaml"
SIZE = (32, 32)  # the tiny llava's CLIP crop


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conversation_rows") / "synth"
    ensure_generated(root, seed=0, pairs=4)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny_llava(tmp_path_factory.mktemp("conversation_rows_llava") / "llava", seed=0))


def spec_of(tiny: str, preprocess: str) -> dict:
    spec = asdict(image_spec(tiny, preprocess))
    spec["size"] = list(spec["size"])  # as RankDataset passes it
    return spec


def mix_samples(synth: Path) -> list[llava_data.Sample]:
    return llava_data.load_llava_source(synth / "llava" / "synthetic_mix665k.json", synth / "llava" / "images",
                                        source_name="llava_665k", fmt="mix")


def as_rows(samples: list[llava_data.Sample], tmp_path: Path) -> list[dict]:
    """The samples as the decode tasks see them: rows of the run's Arrow sample table."""
    llava_data.write_sample_table(samples, tmp_path / SAMPLES_FILE)
    table = llava_data.open_sample_table(tmp_path / SAMPLES_FILE)
    return llava_data.take_samples(table, np.arange(len(samples)))


def decode(rows: list[dict], spec: dict) -> dict:
    n = len(rows)
    return decode_conversation_rows(rows, steps=np.full(n, 7), slots=np.arange(n), epochs=np.full(n, 1), spec=spec)


def processor_pixels(tiny: str, image: Image.Image) -> np.ndarray:
    processor = load_image_processor(tiny)
    return np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0], dtype=np.float32)


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory) -> str:
    """A 64 x 24 image whose left, middle and right thirds differ, so crop, pad and squash all disagree."""
    image = Image.new("RGB", (64, 24), (250, 20, 20))
    image.paste((20, 250, 20), (21, 0, 43, 24))
    image.paste((20, 20, 250), (43, 0, 64, 24))
    image.paste((255, 255, 0), (0, 0, 64, 4))
    path = tmp_path_factory.mktemp("wide") / "wide.png"
    image.save(path)
    return str(path)


# -- decode_conversation_rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preprocess", ["processor", "pad", "resize"])
def test_rows_of_the_synthetic_mix(synth, tiny, tmp_path, preprocess):
    samples = mix_samples(synth)
    assert any(s.image is None for s in samples) and any(s.image is not None for s in samples)
    rows = as_rows(samples, tmp_path)
    spec = spec_of(tiny, preprocess)
    assert spec["size"] == list(SIZE)
    out = decode(rows, spec)
    n = len(samples)
    assert out["pixels"].shape == (n, 3, *SIZE) and out["pixels"].dtype == np.float32
    assert out["ok"].all()
    assert out["has_image"].tolist() == [s.image is not None for s in samples]
    assert out["step"].tolist() == [7] * n and out["epoch"].tolist() == [1] * n
    assert out["slot"].tolist() == list(range(n))
    assert out["key"].tolist() == [s.key for s in samples]
    for i, sample in enumerate(samples):
        if sample.image is None:  # text-only: a zero image (LLaVA runs it through the tower)
            assert not out["pixels"][i].any()
        else:
            assert out["pixels"][i].any()
            np.testing.assert_array_equal(out["pixels"][i], preprocess_image(sample.image, spec))
        # every turn, as JSON, round-trips
        assert json.loads(out["humans"][i]) == list(sample.human_turns)
        assert json.loads(out["gpts"][i]) == list(sample.gpt_turns)


def test_turns_with_quotes_newlines_and_unicode_round_trip(synth, tiny, tmp_path):
    sample = mix_samples(synth)[0]
    odd = llava_data.Sample(key="odd:0", source="odd", row=0, id=None, image=None,
                            human_turns=('Say "hi"\nand \\n then', "ünïcødé ✓ 文字"), gpt_turns=("", "a\tb"))
    out = decode(as_rows([sample, odd], tmp_path), spec_of(tiny, "pad"))
    assert json.loads(out["humans"][1]) == list(odd.human_turns) and json.loads(out["gpts"][1]) == ["", "a\tb"]
    assert out["has_image"].tolist() == [True, False] and out["ok"].all()


def test_square_images_do_not_depend_on_the_preprocess(synth, tiny):
    path = next(s.image for s in mix_samples(synth) if s.image is not None)
    with Image.open(path) as image:
        assert image.size[0] == image.size[1]  # the synthetic images are square
    processed = {p: preprocess_image(path, spec_of(tiny, p)) for p in ("processor", "pad")}
    np.testing.assert_array_equal(processed["processor"], processed["pad"])  # nothing to pad


def test_pad_processor_and_resize_differ_on_a_wide_image(tiny, wide_image):
    pixels = {p: preprocess_image(wide_image, spec_of(tiny, p)) for p in ("processor", "pad", "resize")}
    for p in pixels.values():
        assert p.shape == (3, *SIZE) and p.dtype == np.float32
    assert not np.allclose(pixels["processor"], pixels["pad"], atol=1e-3)
    assert not np.allclose(pixels["processor"], pixels["resize"], atol=1e-3)
    assert not np.allclose(pixels["pad"], pixels["resize"], atol=1e-3)
    processor = load_image_processor(tiny)
    with Image.open(wide_image) as handle:
        image = handle.convert("RGB")
    # processor: the CLIP processor alone (shortest edge -> 32, centre crop: the side thirds are lost)
    np.testing.assert_array_equal(pixels["processor"], processor_pixels(tiny, image))
    # pad: LLaVA's expand2square with the processor's mean colour, then the processor
    mean = tuple(int(x * 255) for x in processor.image_mean)
    np.testing.assert_array_equal(pixels["pad"], processor_pixels(tiny, pad_to_square(image, mean)))
    # resize: squashed to the crop size (bicubic), then the processor
    np.testing.assert_array_equal(pixels["resize"], processor_pixels(tiny, image.resize((32, 32), Image.BICUBIC)))


def test_pad_bands_are_the_mean_colour(tiny, wide_image):
    pixels = preprocess_image(wide_image, spec_of(tiny, "pad"))
    processor = load_image_processor(tiny)
    mean = np.asarray([int(x * 255) for x in processor.image_mean], dtype=np.float64)
    expected = (mean / 255 - np.asarray(processor.image_mean)) / np.asarray(processor.image_std)
    # the 64 x 24 image padded to 64 x 64 (content rows 20-43) and shrunk to 32: rows 10-21 hold the content, and
    # the bicubic filter's reach aside (rows 8-9, 22-23), the rest is the mean colour
    for row in (*range(0, 7), *range(25, 32)):
        np.testing.assert_allclose(pixels[:, row, :], np.broadcast_to(expected[:, None], (3, 32)), atol=1e-4)
    assert np.abs(pixels[:, 16, :] - expected[:, None]).max() > 0.5  # the content band is not


def write_bomb_png(path: Path) -> None:
    """A PNG header claiming 20000 x 20000 pixels: PIL refuses it (DecompressionBombError) before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_unreadable_images_give_ok_false_without_raising(synth, tiny, tmp_path, capsys):
    samples = mix_samples(synth)
    good = next(s for s in samples if s.image is not None)
    text = next(s for s in samples if s.image is None)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image \x00\xff\x13" * 40)
    truncated = tmp_path / "truncated.jpg"
    raw = Path(good.image).read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    bad = [llava_data.Sample(key=f"bad:{i}", source="bad", row=i, id=None, image=str(path),
                             human_turns=("<image>\nWhat is it?",), gpt_turns=("Nothing.",))
           for i, path in enumerate([garbage, truncated, empty, tmp_path / "missing.jpg"])]
    rows = as_rows([good, *bad, text], tmp_path)
    out = decode(rows, spec_of(tiny, "pad"))
    assert out["ok"].tolist() == [True, False, False, False, False, True]
    assert out["has_image"].tolist() == [True, True, True, True, True, False]
    assert out["pixels"][0].any() and not out["pixels"][1:].any()
    assert "bad:0" in capsys.readouterr().err  # the unreadable row is named


def test_an_oversized_image_is_an_unreadable_row(synth, tiny, tmp_path):
    bomb = tmp_path / "bomb.png"
    write_bomb_png(bomb)
    good = next(s for s in mix_samples(synth) if s.image is not None)
    row = llava_data.Sample(key="bomb:0", source="bomb", row=0, id=None, image=str(bomb),
                            human_turns=("<image>\nWhat is it?",), gpt_turns=("Huge.",))
    out = decode(as_rows([good, row], tmp_path), spec_of(tiny, "processor"))
    assert out["ok"].tolist() == [True, False]


def test_a_shape_mismatch_is_not_an_unreadable_row(synth, tiny, tmp_path):
    # a spec whose size disagrees with the processor is a configuration error, raised, not a skipped row
    good = next(s for s in mix_samples(synth) if s.image is not None)
    spec = {**spec_of(tiny, "processor"), "size": [48, 48]}
    with pytest.raises(ValueError, match="expected"):
        decode(as_rows([good], tmp_path), spec)


@pytest.mark.parametrize(("n", "chunks", "sizes"), [(4, 2, [2, 2]), (4, 4, [1, 1, 1, 1]), (3, 2, [2, 1]),
                                                  (4, 1, [4]), (2, 4, [0, 1, 1, 0])])
def test_split_rows_cuts_every_column_at_the_same_bounds(synth, tiny, tmp_path, n, chunks, sizes):
    # e.g. 3 rows left after a dropped unreadable image, cut into the plan's 2 chunks
    rows = decode(as_rows(mix_samples(synth)[:n], tmp_path), spec_of(tiny, "pad"))
    parts = split_rows(rows, chunks)
    assert [len(p["step"]) for p in parts] == sizes
    for key, value in rows.items():
        assert all(len(p[key]) == size for p, size in zip(parts, sizes, strict=True))
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


# -- the modality-length order ---------------------------------------------------------------------------------------


def signed_lengths(n_image: int, n_text: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(1, 400, n_image), -rng.integers(1, 400, n_text)])
    return lengths[rng.permutation(len(lengths))]


def plan_dict(n: int, global_batch: int, world: int, per_epoch: int) -> dict:
    return {"num_samples": n, "steps_per_epoch": per_epoch, "total_steps": per_epoch * 2,
            "global_batch": global_batch, "world_size": world, "local_rows": global_batch // world, "chunks": 1}


@pytest.fixture(scope="module")
def lengths_file(tmp_path_factory) -> tuple[str, np.ndarray]:
    lengths = signed_lengths(45, 27)  # G 8: 5 image + 3 text mega-batches, 5 image and 3 text rows left over
    path = tmp_path_factory.mktemp("lengths") / LENGTHS_FILE
    np.save(path, lengths)
    return str(path), lengths


@pytest.mark.parametrize("epoch", [0, 1])
def test_modality_steps_are_the_same_mega_batches_for_every_world_size(lengths_file, epoch):
    path, lengths = lengths_file
    global_batch, per_epoch = 8, 45 // 8 + 27 // 8
    groups = modality_length_groups(lengths, global_batch=global_batch, seed=3, epoch=epoch)
    seen_by_world = {}
    for world in (1, 2, 4):
        plan = plan_dict(len(lengths), global_batch, world, per_epoch)
        seen = []
        for step in range(per_epoch):
            parts = [step_rows(plan, order="modality_length", lengths_path=path, seed=3, epoch=epoch, step=step,
                               rank=rank) for rank in range(world)]
            assert all(len(p) == global_batch // world for p in parts)
            union = np.concatenate(parts)
            np.testing.assert_array_equal(union, groups[step])  # rank slices, in rank order, are the mega-batch
            signs = np.sign(lengths[union])
            assert len(set(signs.tolist())) == 1  # single-modality
            seen.extend(union.tolist())
        assert len(seen) == len(set(seen)) == per_epoch * global_batch  # every index at most once per epoch
        seen_by_world[world] = seen
    assert seen_by_world[1] == seen_by_world[2] == seen_by_world[4]
    image_steps = sum(lengths[groups[s][0]] > 0 for s in range(per_epoch))
    assert image_steps == 45 // 8  # all full image mega-batches, and all full text ones, are used


def test_modality_order_changes_with_the_epoch_and_the_seed(lengths_file):
    path, lengths = lengths_file
    plan = plan_dict(len(lengths), 8, 2, 8)

    def epoch_rows(seed: int, epoch: int) -> list[int]:
        return [int(i) for step in range(8) for rank in range(2)
                for i in step_rows(plan, order="modality_length", lengths_path=path, seed=seed, epoch=epoch,
                                   step=step, rank=rank)]

    assert epoch_rows(3, 0) == epoch_rows(3, 0)
    assert epoch_rows(3, 0) != epoch_rows(3, 1)
    assert epoch_rows(3, 0) != epoch_rows(4, 0)


def test_a_partial_mega_batch_is_never_a_step(lengths_file):
    path, lengths = lengths_file
    plan = plan_dict(len(lengths), 8, 2, 8)
    with pytest.raises(RuntimeError, match="modality mega-batch 8 of epoch 0 has 5 rows, not 8"):
        step_rows(plan, order="modality_length", lengths_path=path, seed=3, epoch=0, step=8, rank=0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_random_order_is_rank_rows(world):
    plan = plan_dict(50, 8, world, 6)
    for step in (0, 5):
        for rank in range(world):
            got = step_rows(plan, order="random", lengths_path=None, seed=1, epoch=2, step=step, rank=rank)
            np.testing.assert_array_equal(got, llava_data.rank_rows(50, seed=1, epoch=2, step=step, global_batch=8,
                                                                    world_size=world, rank=rank))


# -- build_plan, modality_lengths, load_samples ------------------------------------------------------------------


def lora_config(overrides=None):
    return load_config(LORA, {"train.batch.global": 8, "train.batch.micro": 2, "resources.num_workers": 2,
                              **(overrides or {})})


@pytest.mark.parametrize(("n_image", "n_text"), [(45, 27), (12, 12), (8, 0), (0, 9), (17, 7)])
def test_build_plan_counts_full_single_modality_mega_batches(n_image, n_text):
    config = lora_config()
    lengths = signed_lengths(n_image, n_text, seed=n_image + n_text)
    n = len(lengths)
    plan = build_plan(config, n, lengths)
    assert plan.steps_per_epoch == n_image // 8 + n_text // 8
    assert build_plan(config, n).steps_per_epoch == n // 8  # without lengths: the random order's full batches
    assert plan.total_steps == plan.steps_per_epoch * config.train.epochs
    assert (plan.global_batch, plan.world_size, plan.local_rows, plan.chunks) == (8, 2, 4, 2)
    assert plan.num_samples == n
    capped = build_plan(lora_config({"train.max_steps": 1, "train.epochs": 3}), n, lengths)
    assert (capped.steps_per_epoch, capped.total_steps) == (plan.steps_per_epoch, 1)


def test_build_plan_without_a_full_mega_batch_is_a_config_error():
    # 12 samples make one random-order step of 8, but neither 7 image nor 5 text rows fill a mega-batch
    config = lora_config()
    lengths = signed_lengths(7, 5)
    assert build_plan(config, 12).steps_per_epoch == 1
    with pytest.raises(ConfigError, match=r"train\.batch\.global:") as info:
        build_plan(config, 12, lengths)
    assert "8" in str(info.value) and "no full step fits in an epoch" in str(info.value)


def synthetic_sources(synth: Path, *names: str) -> list[dict]:
    files = {"llava_558k": ("synthetic_558k.json", "pretrain"), "llava_665k": ("synthetic_mix665k.json", "mix")}
    return [{"name": name, "path": str(synth / "llava" / files[name][0]),
             "image_root": str(synth / "llava" / "images"), "format": files[name][1]} for name in names]


def test_modality_lengths_of_the_synthetic_mix(synth):
    samples = mix_samples(synth)
    lengths = modality_lengths(samples)
    assert lengths.dtype == np.int64 and lengths.shape == (len(samples),)
    for sample, length in zip(samples, lengths, strict=True):
        words = sum(len(t.split()) for t in (*sample.human_turns, *sample.gpt_turns))
        assert length == (words if sample.image is not None else -words)
    assert (lengths < 0).any() and (lengths > 0).any()


@pytest.mark.parametrize(("path", "sources"), [(LORA, ("llava_665k",)), (VLM2VEC, ("llava_558k", "llava_665k"))])
def test_load_samples_keeps_text_only_rows_when_asked(synth, path, sources):
    config = load_config(path, {"data.sources": synthetic_sources(synth, *sources)}, smoke=True)
    kept, kept_summary = load_samples(config, keep_text_only=True)
    dropped, dropped_summary = load_samples(config, keep_text_only=False)
    n_text = sum(s.image is None for s in kept)
    assert n_text > 0  # the synthetic mix has text-only rows
    assert all(s.image is not None for s in dropped)
    assert [s.key for s in dropped] == [s.key for s in kept if s.image is not None]  # order kept
    assert len(kept) - len(dropped) == n_text
    for name in sources:
        rows = len(json.loads(Path(synthetic_sources(synth, name)[0]["path"]).read_text()))
        assert kept_summary[name]["rows"] == dropped_summary[name]["rows"] == rows
        assert kept_summary[name]["text_only_dropped"] == 0
        assert kept_summary[name]["image_rows"] == dropped_summary[name]["image_rows"]
    assert sum(s["text_only_dropped"] for s in dropped_summary.values()) == n_text
    assert dropped_summary["llava_665k"]["text_only_dropped"] == n_text  # 558K has no text-only rows
    assert len({s.key for s in kept}) == len(kept)


# -- decode_rows over a prepared run layout (the Ray Data map function, called directly) -------------------------


@pytest.mark.parametrize("world", [1, 2])
def test_decode_rows_reads_the_modality_ordered_rows_of_each_rank(synth, tiny, tmp_path, world):
    config = load_config(LORA, {"data.sources": synthetic_sources(synth, "llava_665k"), "train.batch.global": 4,
                                "train.batch.micro": 1, "resources.num_workers": world}, smoke=True)
    samples, _ = load_samples(config, keep_text_only=True)
    lengths = modality_lengths(samples)
    plan = asdict(build_plan(config, len(samples), lengths))
    llava_data.write_sample_table(samples, tmp_path / SAMPLES_FILE)
    np.save(tmp_path / LENGTHS_FILE, lengths)
    spec = {"kind": "conversations", "order": "modality_length", "images": spec_of(tiny, "pad")}
    local = plan["local_rows"]
    for step in range(plan["steps_per_epoch"]):
        union = []
        for rank in range(world):
            out = decode_rows({"id": np.arange(step * local, (step + 1) * local)}, run_dir=str(tmp_path), plan=plan,
                              rank=rank, start=0, seed=config.seed, spec=spec)
            expected = step_rows(plan, order="modality_length", lengths_path=str(tmp_path / LENGTHS_FILE),
                                 seed=config.seed, epoch=0, step=step, rank=rank)
            assert out["key"].tolist() == [samples[i].key for i in expected]
            assert out["step"].tolist() == [step] * local and out["slot"].tolist() == list(range(local))
            assert out["ok"].all() and len(set(out["has_image"].tolist())) == 1
            union.extend(out["key"].tolist())
        assert len(union) == len(set(union)) == plan["global_batch"]
