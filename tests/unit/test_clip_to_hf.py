"""open_clip ViT tower -> transformers CLIPVisionModel (models/clip_to_hf.py) and its use as a LLaVA vision tower.

Equivalence: for two tower shapes (the tests' tiny CLIP with QuickGELU; a 3-layer, 2-head one with exact GELU) the
converted HF model reproduces open_clip's forward state by state: HF ``hidden_states[0]`` = open_clip's ``ln_pre``
output, ``hidden_states[i + 1]`` = resblock i's output, ``pooler_output`` = ``ln_post(x[:, 0])`` and
``pooler_output @ visual.proj`` = ``encode_image`` (float32, 1e-5).

Preprocessing: ``hf_image_processor`` equals the scorer's open_clip eval transform (``load_clip(...).preprocess_val``)
exactly -- same PIL bicubic resize, same truncated long edge -- except for one convention: torchvision's CenterCrop
places the crop at ``round((h - size) / 2)`` (half to even), transformers at ``(h - size) // 2``. The two then differ
by a one-pixel shift, only for non-square images whose resized long edge exceeds the size by 4k + 3 pixels.

LLaVA: ``llava_common`` reads an open_clip directory as the vision tower (V, image spec, processor, assembly) and the
projector job's export writes the open_clip-matching processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from perceive_ray.config import ModelConfig, load_config
from perceive_ray.models import clip_to_hf
from perceive_ray.models.clip import CONFIG_FILE, load_clip, save_tiny_clip
from perceive_ray.models.llava import compute_num_visual_tokens, save_tiny_llava_parts
from perceive_ray.models.tiny import save_clip
from perceive_ray.train.jobs import llava_common

PROJECTOR = Path(__file__).resolve().parents[2] / "experiments" / "train" / "llava15_patch_projector.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_to_hf")
    return {
        "tiny": save_tiny_clip(root / "tiny", seed=0, image_size=32),  # width 64, 2 x 32-wide heads, QuickGELU
        "other": save_clip(root / "other", seed=1, image_size=48, patch_size=8, width=48, head_width=24, layers=3,
                           text_width=32, text_layers=1, text_heads=2, embed_dim=16, quick_gelu=False),
    }


def open_clip_model(path: Path) -> torch.nn.Module:
    return load_clip(ModelConfig(family="clip", source=str(path)), device="cpu").model


def open_clip_states(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(ln_pre output, [resblock i output]) of open_clip's visual tower, batch first."""
    visual = model.visual
    batch_first = getattr(visual.transformer, "batch_first", True)
    seen: dict[str, object] = {"blocks": []}
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("pre", o))]
    for block in visual.transformer.resblocks:
        hooks.append(block.register_forward_hook(
            lambda m, i, o: seen["blocks"].append(o if batch_first else o.transpose(0, 1))))
    try:
        with torch.no_grad():
            visual(pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["pre"], seen["blocks"]


@pytest.mark.parametrize("name", ["tiny", "other"])
def test_converted_tower_reproduces_every_open_clip_state(towers, name):
    path = towers[name]
    model = open_clip_model(path)
    config, state = clip_to_hf.convert_open_clip_vision(path)
    hf = clip_to_hf.load_hf_vision_model(path)  # strict=True load inside
    assert set(state) == set(hf.state_dict())  # every HF weight comes from open_clip, nothing left over
    for key, value in state.items():
        assert torch.equal(hf.state_dict()[key], value), key
    assert config.hidden_act == ("quick_gelu" if name == "tiny" else "gelu")

    size = config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    pre, blocks = open_clip_states(model, pixels)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        encoded = model.encode_image(pixels)
        normalized = model.encode_image(pixels, normalize=True)
    assert len(out.hidden_states) == len(blocks) + 1 == config.num_hidden_layers + 1
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.hidden_states[0], pre, **tol)
    for i, block in enumerate(blocks):
        torch.testing.assert_close(out.hidden_states[i + 1], block, **tol, msg=lambda m, i=i: f"layer {i}: {m}")
    torch.testing.assert_close(out.last_hidden_state, blocks[-1], **tol)
    torch.testing.assert_close(out.pooler_output, model.visual.ln_post(blocks[-1][:, 0]), **tol)
    projected = out.pooler_output @ model.visual.proj
    torch.testing.assert_close(projected, encoded, **tol)
    torch.testing.assert_close(torch.nn.functional.normalize(projected, dim=-1), normalized, **tol)


def test_saved_tower_loads_with_transformers(towers, tmp_path):
    from transformers import AutoImageProcessor, CLIPVisionModel

    out = clip_to_hf.save_hf_vision_tower(towers["other"], tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    loaded = CLIPVisionModel.from_pretrained(out, use_safetensors=True)
    _, state = clip_to_hf.convert_open_clip_vision(towers["other"])
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    assert processor.to_dict() == clip_to_hf.hf_image_processor(towers["other"]).to_dict()
    assert not clip_to_hf.is_open_clip_dir(out) and clip_to_hf.is_open_clip_dir(towers["other"])


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["tiny", "other"])
@pytest.mark.parametrize("shape", [(80, 80), (97, 61), (20, 17), (33, 100), (1000, 333)])
def test_processor_equals_the_open_clip_eval_transform(towers, name, shape):
    bundle = load_clip(ModelConfig(family="clip", source=str(towers[name])), device="cpu")
    processor = clip_to_hf.hf_image_processor(towers[name])
    image = random_image(*shape)
    got = processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, bundle.preprocess_val(image)[None], atol=1e-5, rtol=1e-5)


def test_processor_centre_crop_rounds_down_where_torchvision_rounds_half_to_even(towers):
    """50 x 131 -> 32 x 83 (truncated, in both): torchvision crops rows from round(25.5) = 26, transformers from 25."""
    import torchvision.transforms.functional as F

    bundle = load_clip(ModelConfig(family="clip", source=str(towers["tiny"])), device="cpu")
    processor = clip_to_hf.hf_image_processor(towers["tiny"])
    image = random_image(50, 131)
    got = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    want = bundle.preprocess_val(image)
    resized = F.resize(image, 32, interpolation=F.InterpolationMode.BICUBIC)
    assert resized.size == (32, 83)
    floor = F.normalize(F.to_tensor(F.crop(resized, 25, 0, 32, 32)), bundle.mean, bundle.std)
    torch.testing.assert_close(got, floor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 1:], want[:, :-1], atol=1e-5, rtol=1e-5)  # the same pixels, one row apart


def edited(path: Path, tmp_path: Path, edit) -> Path:
    data = json.loads((path / CONFIG_FILE).read_text())
    edit(data)
    out = tmp_path / "edited"
    out.mkdir()
    (out / CONFIG_FILE).write_text(json.dumps(data))
    return out


@pytest.mark.parametrize(("key", "value"), [
    ("attentional_pool", True), ("no_ln_pre", True), ("final_ln_after_pool", True), ("pool_type", "avg"),
    ("ls_init_value", 0.1), ("timm_model_name", "vit_base_patch16_224"), ("qk_norm", True),
    ("pos_embed_type", "sin_cos_2d"), ("block_type", "custom"), ("act_kwargs", {"approximate": "tanh"}),
    ("layers", [2, 2, 2, 2]), ("not_an_option", 1),
])
def test_unsupported_vision_options_are_refused_naming_file_and_key(towers, tmp_path, key, value):
    path = edited(towers["tiny"], tmp_path, lambda d: d["model_cfg"]["vision_cfg"].__setitem__(key, value))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*vision_cfg\.{key}"):
        clip_to_hf.hf_vision_config(path)


def test_processor_refuses_a_resize_mode_it_cannot_represent(towers, tmp_path):
    path = edited(towers["tiny"], tmp_path, lambda d: d["preprocess_cfg"].__setitem__("resize_mode", "longest"))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*preprocess_cfg\.resize_mode"):
        clip_to_hf.hf_image_processor(path)


def test_processor_uses_the_config_mean_and_std(towers, tmp_path):
    def edit(data):
        data["preprocess_cfg"].update({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})

    path = edited(towers["tiny"], tmp_path, edit)
    processor = clip_to_hf.hf_image_processor(path)
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.25] * 3


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> Path:
    return save_tiny_llava_parts(tmp_path_factory.mktemp("parts")) / "llm"


def test_assemble_llava_with_an_open_clip_tower(towers, llm):
    tower = str(towers["tiny"])
    config = SimpleNamespace(job="llava", model=SimpleNamespace(source=str(llm)),
                             train=SimpleNamespace(llava=SimpleNamespace(vision_tower=tower, select_feature="patch")))
    assert llava_common.num_visual_tokens_for(config) == (32 // 8) ** 2
    assert llava_common.vision_tower_config(tower).to_dict() == clip_to_hf.hf_vision_config(tower).to_dict()
    spec = llava_common.image_spec(tower, "processor")
    assert spec.size == (32, 32) and spec.processor_source == tower
    assert llava_common.load_image_processor(tower).to_dict() == clip_to_hf.hf_image_processor(tower).to_dict()

    tokenizer = llava_common.load_tokenizer(str(llm))
    model = llava_common.assemble_llava(str(llm), tower, tokenizer=tokenizer, select_feature="patch", seed=0,
                                        dtype=torch.float32)
    assert compute_num_visual_tokens(model.config) == 16
    _, state = clip_to_hf.convert_open_clip_vision(tower)
    got = model.model.vision_tower.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key
    # LLaVA's features (layer -2) are open_clip's second-to-last resblock output
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _, blocks = open_clip_states(open_clip_model(towers["tiny"]), pixels)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[model.config.vision_feature_layer], blocks[-2], atol=1e-5, rtol=1e-5)


def test_projector_job_exports_the_open_clip_processor(towers, llm, tmp_path):
    from perceive_ray import registry
    from perceive_ray.models.llava import load_llava

    tower = str(towers["tiny"])
    config = load_config(PROJECTOR, {"model.source": str(llm), "train.llava.vision_tower": tower}, smoke=True)
    job = registry.resolve("jobs", "llava")(config, device=CPU)
    assert job.parts.assembled and job.parts.image_processor_source == tower
    out_dir = tmp_path / "export"
    job.export(job.module, out_dir)
    bundle = load_llava(ModelConfig(family="llava", source=str(out_dir)), device="cpu")
    assert bundle.image_processor.to_dict() == clip_to_hf.hf_image_processor(tower).to_dict()
    _, state = clip_to_hf.convert_open_clip_vision(tower)
    exported = bundle.model.model.vision_tower.state_dict()
    for key, value in state.items():
        assert torch.equal(exported[key], value), key
