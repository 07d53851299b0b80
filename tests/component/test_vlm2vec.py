"""VLM2Vec LLaVA on a tiny base + tiny random DoRA adapter: loading (merged / unmerged / legacy keys), the score
definition against an independent computation, batch invariance, §3.4 prompts, the COCO/VG coin, end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import load_rgb
from perceive_ray.data.synthetic import generate
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.models.vlm2vec import (
    ADAPTER_TARGETS,
    build_vlm2vec_adapter,
    build_vlm2vec_adapter_config,
    load_vlm2vec,
    save_merged_vlm2vec,
    save_tiny_vlm2vec,
)
from perceive_ray.randomness import keyed_rng
from perceive_ray.scoring.local import run_local
from perceive_ray.scoring.options import Vlm2VecOptions
from perceive_ray.scoring.vlm2vec import (
    ImageTokenError,
    Vlm2VecScorer,
    build_coco_vg_prompt,
    build_controlled_prompt,
    build_query_prompt,
    draw_coco_vg_coin,
    render_query,
)
from tests.component.tiny_llava import tiny_torch_offline

OPTS = Vlm2VecOptions()


@pytest.fixture(scope="module", autouse=True)
def _offline():
    yield from tiny_torch_offline()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm2vec")
    adapter = save_tiny_vlm2vec(root / "tiny", seed=0)
    merged = save_merged_vlm2vec(ModelConfig(family="vlm2vec", source=str(adapter)), root / "merged")
    return {"adapter": adapter, "merged": merged, "base": adapter / "base", "root": root}


_SCORERS: dict = {}


def make_scorer(source, **options) -> Vlm2VecScorer:
    key = (str(source), tuple(sorted(options.items())))
    if key not in _SCORERS:
        _SCORERS[key] = Vlm2VecScorer(ModelConfig(family="vlm2vec", source=str(source)),
                                      ScorerConfig(name="vlm2vec", options=options))
    return _SCORERS[key]


def random_rows(seed: int, n: int) -> list[dict]:
    """What'sUp-shaped rows with object names of different lengths (different query lengths -> right padding)."""
    objs = ["mug", "plate", "beer-bottle", "armchair", "cat", "red-toy-car", "dog"]
    rows = []
    for i in range(n):
        rng = keyed_rng(seed, "vlm2vec-rows", i)
        o1, o2 = rng.choice(objs, size=2, replace=False)
        gold = ["left", "right", "on", "under"][i % 4]
        texts = [f"A {o1} {r} a {o2}" for r in ("to the left of", "on", "under", "to the right of")[: 2 + i % 3]]
        h, w = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        rows.append({"benchmark": "whatsup_controlled_a", "item_id": f"r{i}", "image_index": 0, "texts": texts,
                     "subset": "controlled_a", "group": "", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                     "meta": json.dumps({"obj1": str(o1), "obj2": str(o2), "gold_word": gold})})
    return rows


def score_rows(scorer, rows, batch_size: int) -> dict[str, list]:
    columns: dict[str, list] = {}
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        for name, values in scorer({name: [row[name] for row in chunk] for name in chunk[0]}).items():
            columns.setdefault(name, []).extend(values)
    return columns


# -- adapter and loading --------------------------------------------------------------------------------------


def test_adapter_config_is_protocol_5_6(dirs):
    cfg = build_vlm2vec_adapter_config()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora, cfg.init_lora_weights) == (8, 64, 0.1, True,
                                                                                              "gaussian")
    saved = json.loads((dirs["adapter"] / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["r"] == 8 and sorted(saved["target_modules"]) == sorted(ADAPTER_TARGETS)
    keys = load_file(str(dirs["adapter"] / "adapter_model.safetensors"))
    adapted = {k.split(".lora_")[0] for k in keys}
    assert adapted and all(".language_model." in k for k in adapted)
    assert {k.rsplit(".", 1)[-1] for k in adapted} == set(ADAPTER_TARGETS)  # no gate_proj / up_proj / vision
    assert any("lora_magnitude_vector" in k for k in keys)  # DoRA
    from transformers import LlavaForConditionalGeneration

    peft_model = build_vlm2vec_adapter(LlavaForConditionalGeneration.from_pretrained(dirs["base"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)


def embed_pair(bundle, scorer_like):
    image = keyed_rng(1, "img").integers(0, 256, (24, 30, 3), dtype=np.uint8)
    with torch.inference_mode():
        q = scorer_like.encode_queries([image], ["Is the mug on the plate?"])
        t = scorer_like.encode_targets(["A mug on a plate", "a cat"])
    return torch.cat([q, t])


def test_merged_unmerged_and_premerged_agree(dirs):
    merged = make_scorer(dirs["adapter"])
    unmerged = make_scorer(dirs["adapter"], merge=False)
    premerged = make_scorer(dirs["merged"])
    base = make_scorer(dirs["base"])
    assert merged.bundle.merged and not unmerged.bundle.merged and unmerged.bundle.peft_model is not None
    assert premerged.bundle.adapter_source is None
    e = {name: embed_pair(s.bundle, s) for name, s in
         (("merged", merged), ("unmerged", unmerged), ("premerged", premerged), ("base", base))}
    torch.testing.assert_close(e["merged"], e["unmerged"], atol=1e-5, rtol=0)
    torch.testing.assert_close(e["merged"], e["premerged"], atol=1e-5, rtol=0)
    assert float((e["merged"] - e["base"]).abs().max()) > 1e-2  # the adapter does change the embeddings


def test_base_from_pretrained_and_legacy_adapter_keys(dirs, tmp_path):
    """Adapter keys in the transformers 4.4x layout (``language_model.model.layers``) load to the same model;
    a key that fits nothing is an error, not a silent skip; ModelConfig.pretrained overrides the base."""
    keys = load_file(str(dirs["adapter"] / "adapter_model.safetensors"))
    legacy = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
              for k, v in keys.items()}
    assert legacy.keys() != keys.keys()
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "adapter_model.safetensors"))
    config = json.loads((dirs["adapter"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "llava-hf/llava-1.5-7b-hf"  # overridden by pretrained below
    (tmp_path / "legacy" / "adapter_config.json").write_text(json.dumps(config))
    cfg = ModelConfig(family="vlm2vec", source=str(tmp_path / "legacy"), pretrained=str(dirs["base"]))
    legacy_bundle = load_vlm2vec(cfg)
    reference = make_scorer(dirs["adapter"]).bundle
    for (name, a), b in zip(reference.model.state_dict().items(), legacy_bundle.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name

    bad = dict(keys)
    bad["base_model.model.model.language_model.layers.9.mlp.down_proj.lora_A.weight"] = torch.zeros(8, 64)
    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "adapter_model.safetensors"))
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="do not fit"):
        load_vlm2vec(cfg.model_copy(update={"source": str(tmp_path / "bad")}))


# -- score definition -----------------------------------------------------------------------------------------


def independent_scores(bundle, image: np.ndarray, prompt: str, texts: list[str]) -> np.ndarray:
    """Batch-1 forwards of the full Llava model (hidden_states[-1], as the reference's encode_input), the string
    expanded by hand, last token, float64 normalisation and dot."""
    tok, model, v = bundle.llava.tokenizer, bundle.model, bundle.num_visual_tokens
    query = "<image> Represent the given image with the following question: " + prompt
    ids = tok(query.replace("<image>", "<image>" * v)).input_ids
    pixels = bundle.llava.image_processor(images=[image], return_tensors="pt")["pixel_values"]

    def last(input_ids, pixel_values=None):
        out = model(input_ids=torch.tensor([input_ids]), pixel_values=pixel_values, output_hidden_states=True)
        rep = out.hidden_states[-1][0, -1].double()
        return rep / rep.norm()

    with torch.no_grad():
        q = last(ids, pixels)
        return np.array([float(q @ last(tok(t).input_ids)) for t in texts])


def test_scores_equal_independent_computation(dirs):
    scorer = make_scorer(dirs["adapter"])
    rows = random_rows(3, 5)
    out = score_rows(scorer, rows, batch_size=5)
    got = np.asarray(out["score"])
    expected = []
    for row in rows:
        prompt = build_query_prompt(row, OPTS)
        expected.extend(independent_scores(scorer.bundle, row["image"], prompt, row["texts"]))
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5, rtol=0)
    assert np.ptp(got) > 1e-3  # not a degenerate constant
    assert out["query_prompt"][0] == build_query_prompt(rows[0], OPTS)


def test_batch_invariance_and_dedup(dirs):
    scorer = make_scorer(dirs["adapter"])
    rows = random_rows(4, 8)
    rows[5] = dict(rows[1], item_id="dup")  # same image and prompt: encoded once
    before = scorer.queries_encoded, scorer.targets_encoded
    eight = score_rows(scorer, rows, batch_size=8)
    encoded = scorer.queries_encoded - before[0], scorer.targets_encoded - before[1]
    # 7 distinct (image, prompt) pairs, each asked the 4-way and the 2-way question (per_view, Controlled rows).
    assert encoded == (2 * 7, len({t for r in rows for t in r["texts"]}))
    one = score_rows(scorer, rows, batch_size=1)
    assert eight["item_id"] == one["item_id"] and eight["text_index"] == one["text_index"]
    np.testing.assert_allclose(eight["score"], one["score"], atol=1e-5, rtol=0)


def test_per_view_prompts_decide_their_own_metric_keys(dirs, tmp_path):
    """What'sUp Controlled under per_view: 4way/* from the 4-way question, 2way/* from the 2-way question (the
    reference's eval_4 and eval), each checked against batch-1 forwards of the full model."""
    generate(tmp_path / "synth", seed=3, pairs=2)
    manifest = load_benchmark("whatsup_controlled_a", tmp_path / "synth" / "whatsup")
    scorer = make_scorer(dirs["adapter"])
    scores = run_local(manifest, scorer, batch_size=3).scores
    report = compute_metrics(manifest, scores)
    assert report.score_columns == {"*": "score", "2way/*": "score_two_way"}
    correct = {"2way": 0, "4way": 0}
    differ = 0
    for item in manifest.items:
        image = load_rgb(manifest.root, item.images[0])
        names = {"obj1": item.meta["obj1"], "obj2": item.meta["obj2"], "gold_word": item.meta["gold_word"],
                 "benchmark": "whatsup_controlled_a"}
        four = independent_scores(scorer.bundle, image, build_controlled_prompt(**names, whatsup_prompt="four_way"),
                                  list(item.texts))
        two = independent_scores(scorer.bundle, image, build_controlled_prompt(**names, whatsup_prompt="two_way"),
                                 [item.texts[i] for i in item.two_way])
        correct["4way"] += all(four[0] > four[j] for j in range(1, 4))
        correct["2way"] += two[0] > two[1]
        differ += not np.allclose(two, four[list(item.two_way)], atol=1e-4)
    assert report.counts["4way/individual_acc/correct"] == correct["4way"]
    assert report.counts["2way/individual_acc/correct"] == correct["2way"]
    assert differ > 0  # the two questions really give different scores
    # One question for both views (two_way): both keys read `score`, and they come from the 2-way question.
    single = make_scorer(dirs["adapter"], whatsup_prompt="two_way")
    one = run_local(manifest, single, batch_size=3).scores
    assert "score_two_way" not in one.column_names
    assert compute_metrics(manifest, one).counts["2way/individual_acc/correct"] == correct["2way"]


# -- prompts --------------------------------------------------------------------------------------------------


def test_prompt_snapshots_whatsup_controlled():
    two = {g: build_controlled_prompt("beer-bottle", "armchair", gold_word=g, benchmark="whatsup_controlled_a")
           for g in ("left", "right", "on", "under")}
    assert two["left"] == two["right"] == "Is the beer bottle to the left of or to the right of the armchair?"
    assert two["on"] == two["under"] == "Is the beer bottle at the bottom of the armchair or at the top of the armchair?"
    assert build_controlled_prompt("mug", "plate", gold_word="front", benchmark="whatsup_controlled_b") == (
        "Is the mug in the back of the plate or in the front of the plate?")
    assert build_controlled_prompt("mug", "plate", gold_word="behind", benchmark="whatsup_controlled_b") == (
        "Is the mug in the back of the plate or in the front of the plate?")
    assert build_controlled_prompt("mug", "plate", gold_word="on", benchmark="whatsup_controlled_a",
                                   whatsup_prompt="four_way") == (
        "Is the mug to the left of, to the right of, on, or under the plate?")
    assert build_controlled_prompt("mug", "plate", gold_word="left", benchmark="whatsup_controlled_b",
                                   whatsup_prompt="four_way") == (
        "Is the mug to the left of, to the right of, in front of, or behind the plate?")
    assert render_query("Is it?") == "<image> Represent the given image with the following question: Is it?"


def test_prompt_snapshots_coco_vg():
    def both(caption, benchmark):
        return tuple(build_coco_vg_prompt(caption, benchmark=benchmark, flip_part2=f) for f in (True, False))

    assert both("A photo of a dog on the left", "whatsup_coco_one") == (
        "Is the dog on the left or on the right?", "Is the dog on the right or on the left?")
    assert both("A photo of a cup on the top", "whatsup_vg_one") == (
        "Is the cup on the top or on the bottom?", "Is the cup on the bottom or on the top?")
    assert both("A photo of a cat above a sofa", "whatsup_coco_two") == (
        "Is the cat above a sofa or below a sofa?", "Is the cat below a sofa or above a sofa?")
    assert both("A photo of a cat below a sofa", "whatsup_coco_two")[0] == "Is the cat below a sofa or above a sofa?"
    assert both("A photo of a cat to the left of a sofa", "whatsup_coco_two") == (
        "Is the cat to the left of a sofa or to the right of a sofa?",
        "Is the cat to the right of a sofa or to the left of a sofa?")
    assert both("A photo of a man to the behind of a car", "whatsup_vg_two") == (
        "Is the man to the behind of a car or to the front of a car?",
        "Is the man to the front of a car or to the behind of a car?")
    # Substring replacement of every occurrence, as the reference's str.replace.
    assert both("A photo of a leftover on the left", "whatsup_coco_one")[1] == (
        "Is the rightover on the right or on the left?")


def test_prompt_snapshots_mmvp_and_generic():
    def row(benchmark, meta):
        return {"benchmark": benchmark, "item_id": "1", "texts": ["a photo of x", "a photo of y"],
                "meta": json.dumps(meta)}

    mmvp = row("mmvp", {"questions": ["Is the elderly person standing or sitting in the picture?"] * 2})
    assert build_query_prompt(mmvp, OPTS) == "Is the elderly person standing or sitting in the picture?"
    vlm = row("mmvp_vlm", {"questions": ["Are the butterfly's wings open or closed?", "ignored"]})
    assert build_query_prompt(vlm, OPTS) == "Are the butterfly's wings open or closed?"
    with pytest.raises(ValueError, match="Questions-llava.csv"):
        build_query_prompt(row("mmvp_vlm", {}), OPTS)
    assert build_query_prompt(row("mmvp_vlm", {}), Vlm2VecOptions(missing_question="generic")) == (
        "What is shown in the image?")
    assert build_query_prompt(row("winoground", {}), Vlm2VecOptions(generic_prompt="Describe it.")) == "Describe it."
    controlled = {"benchmark": "whatsup_controlled_b", "item_id": "mug_in-front_of_plate", "texts": ["x"],
                  "meta": json.dumps({"obj1": "mug", "obj2": "red-plate", "relation": "in-front",
                                      "gold_word": "front"})}
    assert build_query_prompt(controlled, OPTS, view="two_way") == (
        "Is the mug in the back of the red plate or in the front of the red plate?")
    assert build_query_prompt(controlled, OPTS) == build_query_prompt(controlled, OPTS, view="four_way") == (
        "Is the mug to the left of, to the right of, in front of, or behind the red plate?")
    # One question for both views when asked for: the view no longer matters.
    for mode in ("two_way", "four_way"):
        options = Vlm2VecOptions(whatsup_prompt=mode)
        assert build_query_prompt(controlled, options, view="two_way") == \
            build_query_prompt(controlled, options, view="four_way")


def test_exactly_one_image_token(dirs):
    with pytest.raises(ImageTokenError, match="exactly one"):
        render_query("What is <image> here?")
    scorer = make_scorer(dirs["adapter"])
    row = {"benchmark": "mmvp", "item_id": "1", "image_index": 0, "texts": ["a photo of x"], "subset": "",
           "group": "", "image": np.zeros((8, 8, 3), np.uint8),
           "meta": json.dumps({"questions": ["Is <image> a cat?", "Is <image> a cat?"]})}
    with pytest.raises(ImageTokenError):
        scorer({name: [row[name]] for name in row})


def test_coco_vg_coin_is_keyed_and_batch_independent(dirs):
    flips = [draw_coco_vg_coin(0, "whatsup_coco_one", i) for i in range(200)]
    assert flips == [draw_coco_vg_coin(0, "whatsup_coco_one", i) for i in range(200)]
    assert 70 < sum(flips) < 130
    assert flips != [draw_coco_vg_coin(1, "whatsup_coco_one", i) for i in range(200)]
    assert flips != [draw_coco_vg_coin(0, "whatsup_vg_one", i) for i in range(200)]

    scorer = make_scorer(dirs["adapter"])
    rng = keyed_rng(5, "coco-images")
    rows = [{"benchmark": "whatsup_coco_one", "item_id": str(i), "image_index": 0, "subset": "coco_one",
             "group": "lr", "texts": [f"A photo of a dog on the {s}", f"A photo of a dog on the {o}"],
             "image": rng.integers(0, 256, (16, 20, 3), dtype=np.uint8),
             "meta": json.dumps({"image_id": i, "gold_word": s})}
            for i, (s, o) in enumerate([("left", "right"), ("right", "left")] * 5)]
    together = score_rows(scorer, rows, batch_size=10)
    alone = score_rows(scorer, rows[::-1], batch_size=1)
    by_item = dict(zip(alone["item_id"][::2], alone["query_prompt"][::2], strict=True))
    assert dict(zip(together["item_id"][::2], together["query_prompt"][::2], strict=True)) == by_item
    for i, row in enumerate(rows):
        flip = draw_coco_vg_coin(0, "whatsup_coco_one", i)
        assert by_item[str(i)] == build_coco_vg_prompt(row["texts"][0], benchmark="whatsup_coco_one",
                                                       flip_part2=flip)
    assert {draw_coco_vg_coin(0, "whatsup_coco_one", i) for i in range(len(rows))} == {True, False}
    seeded = score_rows(make_scorer(dirs["adapter"], seed=7), rows, batch_size=10)
    assert seeded["query_prompt"] != together["query_prompt"]


# -- end to end -----------------------------------------------------------------------------------------------


def test_run_local_whatsup_and_mmvp_vlm_pass_metrics(dirs, tmp_path):
    generate(tmp_path / "synth", seed=0, pairs=2)
    scorer = make_scorer(dirs["adapter"])
    manifest = load_benchmark("whatsup_controlled_a", tmp_path / "synth" / "whatsup")
    scores = run_local(manifest, scorer, batch_size=4).scores
    assert scores.num_rows == sum(len(i.texts) for i in manifest.items)
    report = compute_metrics(manifest, scores)
    assert report.metrics
    item = manifest.items[0]
    prompts = dict(zip(scores.column("item_id").to_pylist(), scores.column("query_prompt").to_pylist(),
                       strict=True))
    prompts_2 = dict(zip(scores.column("item_id").to_pylist(), scores.column("query_prompt_two_way").to_pylist(),
                         strict=True))
    names = {"obj1": item.meta["obj1"], "obj2": item.meta["obj2"], "gold_word": item.meta["gold_word"],
             "benchmark": "whatsup_controlled_a"}
    # per_view (the default): the 4-way question for `score`, the 2-way question for `score_two_way`.
    assert prompts[item.item_id] == build_controlled_prompt(**names, whatsup_prompt="four_way")
    assert prompts_2[item.item_id] == build_controlled_prompt(**names, whatsup_prompt="two_way")

    root = tmp_path / "synth" / "MMVP_VLM"
    with open(root / "Questions.csv", newline="", encoding="utf-8") as f:
        statements = list(csv.DictReader(f))
    with open(root / "Questions-llava.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["lndex", "Question", "Options", "Correct Answer"])
        for n, row in enumerate(statements, start=1):
            pair = (n + 1) // 2
            writer.writerow([n, f"Question {pair} about {row['Type']}?", "(a) yes (b) no", "(a)" if n % 2 else "(b)"])
    vlm = load_benchmark("mmvp_vlm", root)
    vlm_scores = run_local(vlm, scorer, batch_size=3).scores
    assert compute_metrics(vlm, vlm_scores).metrics
    first = vlm_scores.filter(vlm_scores.column("item_id").to_numpy(zero_copy_only=False) == "1")
    assert set(first.column("query_prompt").to_pylist()) == {f"Question 1 about {vlm.items[0].meta['type']}?"}
