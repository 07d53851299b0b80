"""LLaVA-1.5 training data (perceive_ray.data.llava_data): validation, sample table, keyed draws, epoch plan, images."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceive_ray import randomness
from perceive_ray.config import ConfigError
from perceive_ray.data import llava_data as ld
from perceive_ray.data.synthetic.writers import (
    LLAVA_IMAGES,
    LLAVA_MIX,
    LLAVA_PRETRAIN,
    TreeWriter,
    write_llava,
)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_llava(TreeWriter(root), "llava", seed=0, pairs=2)
    return root / "llava"


def write_rows(tmp_path: Path, rows, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


def image_file(root: Path, rel: str, size=(40, 30), colour=(200, 30, 60)) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(root / rel)


def turns(*values: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def load(path: Path, root: Path, fmt: str = "mix", **kw):
    return ld.load_llava_source(path, root, source_name="src", fmt=fmt, **kw)


# --- loading the synthetic files ------------------------------------------------------------------------------


def test_loads_the_synthetic_558k_and_665k(llava):
    images = llava / LLAVA_IMAGES
    pre = ld.load_llava_source(llava / LLAVA_PRETRAIN, images, source_name="lcs558k", fmt="pretrain")
    mix = ld.load_llava_source(llava / LLAVA_MIX, images, source_name="mix665k", fmt="mix")
    assert len(pre) == 8 and len(mix) == 9
    assert [s.key for s in pre] == [f"lcs558k:{i}" for i in range(8)]
    assert all(len(s.gpt_turns) == 1 and len(s.human_turns) == 1 and Path(s.image).is_file() for s in pre)
    assert pre[0].id == "synthetic-pretrain-000001" and Path(pre[0].image).is_absolute()
    text_only = [s for s in mix if s.text_only]
    assert len(text_only) == 1 and text_only[0].id.startswith("synthetic-text-") and text_only[0].image is None
    assert all(len(s.gpt_turns) == 2 for s in mix if not s.text_only)
    assert mix[0].conversations[0][0] == "human" and [r for r, _ in mix[0].conversations] == ["human", "gpt"] * 2

    kept, dropped = ld.drop_text_only(mix)
    assert (len(kept), dropped) == (8, 1)
    loaded = ld.load_llava_sources([ld.LlavaSource("lcs558k", llava / LLAVA_PRETRAIN, images, "pretrain"),
                                    ld.LlavaSource("mix665k", llava / LLAVA_MIX, images, "mix")])
    assert len(loaded.samples) == 16 and len({s.key for s in loaded.samples}) == 16
    assert loaded.counts["mix665k"] == {"rows": 9, "kept": 8, "text_only_dropped": 1}
    everything = ld.load_llava_sources([ld.LlavaSource("mix665k", llava / LLAVA_MIX, images, "mix", limit=4)],
                                       require_image=False)
    assert len(everything.samples) == 4 and everything.counts["mix665k"]["text_only_dropped"] == 0
    assert ld.load_llava_source(llava / LLAVA_MIX, images, source_name="m", fmt="mix", limit=3)[-1].row == 2
    with pytest.raises(ld.LlavaDataError, match="distinct"):
        ld.load_llava_sources([ld.LlavaSource("a", llava / LLAVA_MIX, images, "mix")] * 2)


# --- validation ---------------------------------------------------------------------------------------------


def test_malformed_json_names_file_and_position(tmp_path):
    path = write_rows(tmp_path, '[{"id": "a", "conversations": [}]')
    with pytest.raises(ld.LlavaDataError, match=r"data\.json: malformed JSON at line 1 column 3\d \(char 3\d\)") as e:
        load(path, tmp_path)
    assert isinstance(e.value, ConfigError)
    with pytest.raises(ld.LlavaDataError, match="top level must be a JSON array"):
        load(write_rows(tmp_path, {"a": 1}), tmp_path)
    with pytest.raises(ld.LlavaDataError, match="not found"):
        load(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["not", "an", "object"], "must be a JSON object"),
        ({"id": "x"}, "'conversations' must be a non-empty list.*missing"),
        ({"id": "x", "conversations": "hi"}, "'conversations' must be a non-empty list"),
        ({"id": "x", "conversations": [{"from": "human", "value": 3}]}, r"conversations\[0\]\['value'\]"),
        ({"id": "x", "conversations": [{"from": "system", "value": "s"}]}, r"\['from'\] must be 'human' or 'gpt'"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}]}, "alternate human/gpt starting with human"),
        ({"id": "x", "conversations": turns("q", "a") + [{"from": "gpt", "value": "b"}]}, r"conversations\[2\]"),
        ({"id": "x", "image": "a.jpg", "conversations": turns("q")}, "image row has no gpt turn"),
        ({"id": "x", "image": 7, "conversations": turns("q", "a")}, "'image' must be a string"),
        ({"id": "x", "image": "/etc/passwd", "conversations": turns("q", "a")}, "absolute path"),
        ({"id": "x", "image": "../outside.jpg", "conversations": turns("q", "a")}, r"escapes the image root"),
        ({"id": "x", "image": "coco/../../x.jpg", "conversations": turns("q", "a")}, r"escapes the image root"),
        ({"id": ["x"], "conversations": turns("q", "a")}, "'id' must be a string or an integer"),
    ],
)
def test_each_row_error_names_file_row_and_id(tmp_path, row, message):
    image_file(tmp_path, "a.jpg")
    good = {"id": "ok", "image": "a.jpg", "conversations": turns("q", "a")}
    path = write_rows(tmp_path, [good, good, row])
    with pytest.raises(ld.LlavaDataError, match=message) as e:
        load(path, tmp_path)
    text = str(e.value)
    assert f"{path}: row 2" in text and "1 malformed row(s) of 3" in text
    if isinstance(row, dict) and isinstance(row.get("id"), str):
        assert "(id 'x')" in text


def test_pretrain_format_rules(tmp_path):
    image_file(tmp_path, "a.jpg")
    text_only = write_rows(tmp_path, [{"id": 5, "conversations": turns("q", "a")}])
    with pytest.raises(ld.LlavaDataError, match=r"row 0 \(id 5\): no 'image'"):
        load(text_only, tmp_path, fmt="pretrain")
    assert load(text_only, tmp_path, fmt="mix")[0].id == "5"  # integer ids kept, as str
    multi = write_rows(tmp_path, [{"image": "a.jpg", "conversations": turns("q", "a", "q2", "a2")}])
    with pytest.raises(ld.LlavaDataError, match="exactly one human and one gpt turn"):
        load(multi, tmp_path, fmt="pretrain")
    with pytest.raises(ld.LlavaDataError, match="unknown LLaVA format"):
        load(multi, tmp_path, fmt="sft")


def test_many_bad_rows_are_listed_in_one_error(tmp_path):
    path = write_rows(tmp_path, [{"id": f"r{i}"} for i in range(8)])
    with pytest.raises(ld.LlavaDataError) as e:
        load(path, tmp_path)
    text = str(e.value)
    assert "8 malformed row(s) of 8" in text and "row 4 (id 'r4')" in text and "... and 3 more" in text


def test_missing_images_are_listed_in_one_error(tmp_path):
    image_file(tmp_path, "imgs/present.jpg")
    rows = [{"id": "p", "image": "present.jpg", "conversations": turns("q", "a")}]
    rows += [{"id": f"m{i}", "image": f"missing/{i}.jpg", "conversations": turns("q", "a")} for i in range(7)]
    path = write_rows(tmp_path, rows)
    with pytest.raises(ld.LlavaDataError) as e:
        load(path, tmp_path / "imgs")
    text = str(e.value)
    assert f"{path}: 7 of 8 image file(s) missing" in text
    assert f"{path}: row 1 (id 'm0'): {tmp_path / 'imgs' / 'missing' / '0.jpg'}" in text
    assert "row 5 (id 'm4')" in text and "row 6" not in text and "... and 2 more" in text
    assert len(load(path, tmp_path / "imgs", check_images=False)) == 8


# --- sample table ---------------------------------------------------------------------------------------------


def test_sample_table_round_trip_and_take(llava, tmp_path):
    images = llava / LLAVA_IMAGES
    samples = ld.load_llava_source(llava / LLAVA_MIX, images, source_name="mix", fmt="mix")
    path = tmp_path / "t" / "samples.arrow"
    sha = ld.write_sample_table(samples, path)
    table = ld.open_sample_table(path, verify=True)
    assert table.column_names == list(ld.TABLE_COLUMNS) and table.num_rows == len(samples)
    assert ld.table_sha256(table) == sha == ld.sample_table_sha256(table)
    rows = ld.take_samples(table, [3, 0, 3])
    for row, s in zip(rows, [samples[3], samples[0], samples[3]], strict=True):
        assert row == {"key": s.key, "source": s.source, "row": s.row, "id": s.id, "image": s.image,
                       "human_turns": list(s.human_turns), "gpt_turns": list(s.gpt_turns)}
    text_only = next(i for i, s in enumerate(samples) if s.text_only)
    assert ld.take_samples(table, np.array([text_only]))[0]["image"] is None
    with pytest.raises(IndexError):
        ld.take_samples(table, [len(samples)])
    # the hash follows content (and order), not the file
    assert ld.write_sample_table(samples, tmp_path / "again.arrow") == sha
    assert ld.write_sample_table(samples[::-1], tmp_path / "rev.arrow") != sha
    with pytest.raises(ld.LlavaDataError, match="duplicate sample key"):
        ld.write_sample_table([samples[0], samples[0]], tmp_path / "dup.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(ld.LlavaDataError, match="not a readable Arrow IPC"):
        ld.open_sample_table(tmp_path / "junk.arrow")


# --- keyed draws ----------------------------------------------------------------------------------------------


def test_keyed_randomness_matches_the_package_generator():
    for keys in [(), (0, "mix:3", "caption"), ("order", 7)]:
        assert ld._keyed_seed(11, *keys) == randomness.keyed_seed(11, *keys)
        assert ld._keyed_rng(11, *keys).random() == randomness.keyed_rng(11, *keys).random()


def test_caption_draw_is_keyed_and_redrawn_each_epoch():
    turns_ = ("a", "b", "c", "d")
    draws = [ld.draw_caption(turns_, seed=3, epoch=e, key="mix:5") for e in range(400)]
    assert draws == [ld.draw_caption(turns_, seed=3, epoch=e, key="mix:5") for e in range(400)]
    counts = Counter(draws)
    assert set(counts) == set(turns_) and min(counts.values()) > 70  # ~100 each
    assert [ld.draw_caption(turns_, seed=3, epoch=0, key=f"mix:{k}") for k in range(50)] != [draws[0]] * 50
    assert ld.draw_caption(turns_, seed=3, epoch=0, key="x", mode="first") == "a"
    assert ld.draw_caption(("only",), seed=3, epoch=9, key="x") == "only"
    with pytest.raises(ValueError):
        ld.draw_caption((), seed=0, epoch=0, key="x")
    with pytest.raises(ValueError):
        ld.draw_caption(turns_, seed=0, epoch=0, key="x", mode="last")


@pytest.mark.parametrize(
    ("caption", "negative"),
    [
        ("the cup is on the left of the plate", "the cup is on the right of the plate"),
        ("on the left here, on the right there", "on the right here, on the right there"),  # only the first key
        ("on the right and to the left", "on the left and to the left"),
        ("a on the left, b on the left", "a on the right, b on the right"),  # all occurrences
        ("to the right of x, to the right of y", "to the left of x, to the left of y"),
        ("x at the left", "x at the right"),
        ("x at the right", "x at the left"),
        ("On the left is a cup", None),  # case-sensitive
        ("a cup left of a plate", None),
        ("", None),
    ],
)
def test_hard_negative_exact_cases(caption, negative):
    assert ld.make_hard_negative(caption) == negative


def fake_chunker(calls):
    def chunker(text: str) -> list[str]:
        calls.append(text)
        return [] if "nothing" in text else ["The Red Cube", "A Blue Ball"]

    return chunker


def test_pacl_augmentation():
    calls: list[str] = []
    chunker = fake_chunker(calls)
    out = [ld.augment_pacl_caption("The Red Cube near A Blue Ball", seed=1, epoch=0, key=f"k{i}", chunker=chunker)
           for i in range(1000)]
    again = [ld.augment_pacl_caption("The Red Cube near A Blue Ball", seed=1, epoch=0, key=f"k{i}", chunker=chunker)
             for i in range(1000)]
    assert out == again
    changed = [o for o in out if o != "The Red Cube near A Blue Ball"]
    assert 430 < len(changed) < 570 and len(calls) == 2 * len(changed)  # the chunker runs only on the coin
    allowed = {t.format(c) for t in ld.PACL_TEMPLATES for c in ("the red cube", "a blue ball")}
    assert set(changed) == allowed
    assert {ld.augment_pacl_caption("c", seed=1, epoch=e, key="k0", chunker=lambda _: ["X"])
            for e in range(60)} == {"c"} | {t.format("x") for t in ld.PACL_TEMPLATES}
    assert {ld.augment_pacl_caption("nothing", seed=1, epoch=0, key=f"k{i}", chunker=chunker)
            for i in range(50)} == {"nothing"}


def test_spacy_missing_package_and_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(ld.LlavaDataError) as e:
        ld.load_spacy_chunker()
    text = str(e.value)
    assert "spaCy" in text and ld.SPACY_INSTALL in text and "data.pacl_augment" in text

    def no_model(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=no_model))
    with pytest.raises(ld.LlavaDataError, match="model 'en_core_web_sm' is not installed.*python -m spacy download"):
        ld.load_spacy_chunker()

    class Doc:
        noun_chunks = [types.SimpleNamespace(text="a cat")]

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=lambda name: lambda text: Doc()))
    assert ld.load_spacy_chunker()("a cat sat") == ["a cat"]


# --- epoch plan -----------------------------------------------------------------------------------------------


def test_epoch_plan_is_independent_of_world_size():
    n, g = 103, 12
    order = ld.epoch_order(n, seed=5, epoch=2)
    assert sorted(order.tolist()) == list(range(n)) and not order.flags.writeable
    assert np.array_equal(order, randomness.keyed_rng(5, "order", 2).permutation(n))
    assert not np.array_equal(order, ld.epoch_order(n, seed=5, epoch=3))
    steps = ld.steps_per_epoch(n, g)
    assert steps == 8
    seen = []
    for step in range(steps):
        single = ld.rank_rows(n, seed=5, epoch=2, step=step, global_batch=g, world_size=1, rank=0)
        assert np.array_equal(single, order[step * g:(step + 1) * g])
        for world in (2, 3, 4, 6):
            parts = [ld.rank_rows(n, seed=5, epoch=2, step=step, global_batch=g, world_size=world, rank=r)
                     for r in range(world)]
            assert all(len(p) == g // world for p in parts)
            assert np.array_equal(np.concatenate(parts), single)
        seen.extend(single.tolist())
    assert len(set(seen)) == steps * g  # each sample at most once per epoch; the last partial batch is dropped
    with pytest.raises(ValueError, match="not divisible"):
        ld.rank_rows(n, seed=5, epoch=2, step=0, global_batch=g, world_size=5, rank=0)
    with pytest.raises(ValueError, match="out of range"):
        ld.rank_rows(n, seed=5, epoch=2, step=steps, global_batch=g, world_size=1, rank=0)
    with pytest.raises(ValueError, match="out of range"):
        ld.rank_rows(n, seed=5, epoch=2, step=0, global_batch=g, world_size=2, rank=2)


# --- images ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(64, 48), (50, 70)]):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("name", ["clip_train", "pacl_train"])
def test_decode_train_images_is_keyed(photos, tmp_path, name):
    kw = {"transform": name, "image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths = [photos[0], photos[1], str(tmp_path / "missing.jpg"), str(tmp_path / "bad.jpg"), None]
    keys = ["s:0", "s:1", "s:2", "s:3", "s:4"]
    pixels, ok = ld.decode_train_images(paths, keys=keys, seed=0, epoch=0, **kw)
    assert pixels.shape == (5, 3, 32, 32) and pixels.dtype == np.float32
    assert ok.tolist() == [True, True, False, False, False] and not pixels[2:].any()
    again, _ = ld.decode_train_images(paths, keys=keys, seed=0, epoch=0, **kw)
    assert np.array_equal(pixels, again)
    # a row's draw depends on its key only, not on its batch neighbours
    alone, _ = ld.decode_train_images(paths[1:2], keys=keys[1:2], seed=0, epoch=0, **kw)
    assert np.array_equal(alone[0], pixels[1])
    other_epoch, _ = ld.decode_train_images(paths, keys=keys, seed=0, epoch=1, **kw)
    assert not np.array_equal(other_epoch[0], pixels[0])


def test_clip_train_matches_open_clip_crop_and_the_models_implementation(photos):
    import torch
    from torchvision import transforms as T

    from perceive_ray.models.clip import SeededRandomResizedCrop

    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    ours = ld.ClipTrainTransform(32, mean, std)
    theirs = SeededRandomResizedCrop(32, mean, std, scale=(0.9, 1.0))
    reference = T.Compose([T.RandomResizedCrop(32, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(mean, std)])
    for seed in (1, 2, 3):
        image = Image.open(photos[seed % 2])
        a = ours(image, torch.Generator().manual_seed(seed))
        assert torch.equal(a, theirs(image, torch.Generator().manual_seed(seed)))
        torch.manual_seed(seed)
        assert torch.equal(a, reference(image))


def test_pacl_jitter_matches_torchvision_color_jitter(photos):
    import torch
    from torchvision import transforms as T

    ours = ld.PaclTrainTransform(24)
    reference = T.Compose([T.Resize((24, 24)), T.ToTensor(), T.ColorJitter(brightness=0.2, hue=0.1),
                           T.Normalize(ld.IMAGENET_MEAN, ld.IMAGENET_STD)])
    orders = set()
    for seed in range(6):
        image = Image.open(photos[seed % 2])
        a = ours(image, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        assert torch.allclose(a, reference(image), atol=1e-6)
        order, b, h = ours.jitter_params(torch.Generator().manual_seed(seed))
        assert 0.8 <= b <= 1.2 and -0.1 <= h <= 0.1
        orders.add(order.index(0) < order.index(3))
    assert orders == {True, False}  # both application orders occur


def test_rectangular_size_and_custom_transform(photos):
    pixels, ok = ld.decode_train_images(photos, keys=["a", "b"], seed=0, epoch=0, transform="pacl_train",
                                        image_size=(20, 28))
    assert pixels.shape == (2, 3, 20, 28) and ok.all()
    seeds = []

    def transform(image, generator):
        import torch

        seeds.append(generator.initial_seed())
        return torch.zeros(3, 8, 8)

    ld.decode_train_images(photos, keys=["a", "b"], seed=4, epoch=1, transform=transform, image_size=8)
    assert seeds == [ld.augment_seed(4, 1, "a", "augment"), ld.augment_seed(4, 1, "b", "augment")]
    assert ld.augment_seed(4, 1, "a", "crop") == randomness.keyed_seed(4, 1, "a", "crop")
    with pytest.raises(ValueError, match="expected"):
        ld.decode_train_images(photos, keys=["a", "b"], seed=4, epoch=1, transform=transform, image_size=9)
