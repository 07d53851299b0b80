"""VQAScore on tiny random LLaVA checkpoints loaded through load_llava: definition, shared == naive, accounting."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from perceive_ray import registry
from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.synthetic import generate
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.models.llava import (
    LlavaClsForConditionalGeneration,
    load_llava,
    resolve_template,
    save_tiny_llava,
)
from perceive_ray.randomness import keyed_rng
from perceive_ray.scoring.local import run_local
from perceive_ray.scoring.prompts import get_template, render_answer_part, render_question_part
from perceive_ray.scoring.vqascore import (
    AnswerSpanError,
    VQAScoreScorer,
    build_compat_sequence,
    compute_prefix_length,
    pad_to_square,
)
from tests.component.tiny_llava import build_tiny_llava_dir, tiny_torch_offline

MODES = ("t2v", "p_yes", "yes_no")
WORDS = "red blue mug plate cat dog on under left right of to the a an big small".split()


@pytest.fixture(scope="module", autouse=True)
def _offline():
    yield from tiny_torch_offline()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llava")
    dirs = {name: build_tiny_llava_dir(root / name, template=name) for name in ("chat", "phi3_instruct", "llama3")}
    dirs["cls"] = build_tiny_llava_dir(root / "cls", template="chat", select_feature="cls")
    return dirs


_SCORERS: dict = {}


def make_scorer(path, **options) -> VQAScoreScorer:
    key = (str(path), tuple(sorted(options.items())))
    if key not in _SCORERS:
        _SCORERS[key] = VQAScoreScorer(ModelConfig(family="llava", source=str(path)),
                                       ScorerConfig(name="vqascore", options=options))
    return _SCORERS[key]


def random_rows(seed: int, n: int, ks=(1, 2, 4)) -> list[dict]:
    """Rows with K candidates each: shared leading words, leading punctuation / quotes, duplicates, odd shapes."""
    rows = []
    for i in range(n):
        rng = keyed_rng(seed, "vqascore-rows", i)
        k = int(ks[i % len(ks)])
        stem = " ".join(rng.choice(WORDS, size=int(rng.integers(0, 4))))
        texts = []
        for j in range(k):
            tail = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
            lead = ["", '"', "'", ", ", "?! ", "(", " "][int(rng.integers(0, 7))]
            texts.append(f"{lead}{stem} {tail}".strip(" ") if j % 3 else f"{stem} {tail}")
        if k >= 2 and rng.random() < 0.5:
            texts[-1] = texts[0]  # duplicate candidate
        h, w = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        rows.append({"item_id": f"r{i}", "image_index": 0, "texts": texts,
                     "image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)})
    return rows


def score_rows(scorer, rows, batch_size: int) -> dict[str, np.ndarray]:
    columns: dict[str, list] = {}
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        out = scorer({name: [row[name] for row in chunk] for name in chunk[0]})
        for name, values in out.items():
            columns.setdefault(name, []).extend(values)
    return {name: np.asarray(values) for name, values in columns.items()}


def reference_scores(bundle, template_name: str, image: np.ndarray, text: str,
                     vocab_limit: int | None = None, double_bos: bool = True) -> dict[str, float]:
    """Independent t2v_metrics-style computation: LLaVA's tokenizer_image_token, label masking, full-logit
    forward of the model on the naive sequence and CrossEntropy over the unmasked positions.

    ``double_bos=False``: a sequence that starts with two BOS (llama3: the tokenizer's + the template's literal
    one) keeps only one, in the question-length count as well."""
    tok, img_id, v = bundle.tokenizer, bundle.image_token_id, bundle.num_visual_tokens

    def tokenizer_image_token(prompt):
        chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
        seps = [ele for sub in zip(chunks, [[img_id] * 2] * len(chunks), strict=True) for ele in sub][:-1]
        ids = [chunks[0][0]]  # the tiny tokenizers always add BOS
        for x in seps:
            ids.extend(x[1:])
        if not double_bos and ids[:2] == [tok.bos_token_id] * 2:
            ids = ids[1:]
        return ids

    q = render_question_part(template_name, text)
    ids = tokenizer_image_token(q + render_answer_part(template_name, "Yes"))
    labels = list(ids)
    masked = len(tokenizer_image_token(q)) - (1 if q[-1] == " " else 0)
    labels[:masked] = [-100] * masked
    at = ids.index(img_id)  # expand the single placeholder to V positions, as the HF Llava forward expects
    ids = ids[:at] + [img_id] * v + ids[at + 1 :]
    labels = labels[:at] + [-100] * v + labels[at + 1 :]
    no_ids = tokenizer_image_token(q + render_answer_part(template_name, "No"))
    no_id = no_ids[masked]

    square = pad_reference(image)
    pixels = bundle.image_processor(images=[square], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = bundle.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()
    logits = logits[:, :vocab_limit]
    target = torch.tensor(labels[1:])
    losses = torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="none")
    keep = target != -100
    assert int(keep.sum()) == 2
    first = int(torch.nonzero(keep)[0])  # logit row predicting the first answer token
    p = logits[first].softmax(-1).double()
    yes_id = int(target[first])
    return {"t2v": float(torch.exp(-losses[keep].mean())), "p_yes": float(p[yes_id]),
            "yes_no": float(p[yes_id] / (p[yes_id] + p[no_id]))}


def pad_reference(image: np.ndarray):
    """LLaVA's expand2square with background tuple(int(255 * m) for m in CLIP mean)."""
    pil = Image.fromarray(image)
    w, h = pil.size
    bg = tuple(int(255 * m) for m in (0.48145466, 0.4578275, 0.40821073))
    if w == h:
        return pil
    if w > h:
        out = Image.new(pil.mode, (w, w), bg)
        out.paste(pil, (0, (w - h) // 2))
    else:
        out = Image.new(pil.mode, (h, h), bg)
        out.paste(pil, ((h - w) // 2, 0))
    return out


# -- loader ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "name", "target"), [("scorers", "vqascore", VQAScoreScorer),
                                                      ("models", "llava", load_llava),
                                                      ("tiny", "llava", save_tiny_llava)])
def test_registry_points_at_the_implementations(kind, name, target):
    assert registry.resolve(kind, name) is target


def test_load_llava_reads_template_and_feature(tiny_dirs, tmp_path):
    bundle = load_llava(ModelConfig(family="llava", source=str(tiny_dirs["phi3_instruct"])))
    assert (bundle.template, bundle.select_feature, bundle.num_visual_tokens) == ("phi3_instruct", "patch", 64)
    assert not bundle.model.training and type(bundle.model).__name__ == "LlavaForConditionalGeneration"
    assert type(bundle.image_processor).__name__ == "CLIPImageProcessorPil"
    assert bundle.tokenizer.convert_tokens_to_ids("<image>") == bundle.image_token_id
    assert bundle.reference_vocab_size is None
    assert resolve_template("llava-hf/llava-1.5-7b-hf") == "chat"
    no_sidecar = build_tiny_llava_dir(tmp_path / "x")
    (no_sidecar / "perceive_ray.json").unlink()
    with pytest.raises(ConfigError, match="no conversation template known"):
        load_llava(ModelConfig(family="llava", source=str(no_sidecar)))
    assert make_scorer(no_sidecar, template="chat").template.name == "chat"  # an explicit template is enough


def test_llava_cls_gives_one_visual_token_from_layer_minus_2_cls(tiny_dirs):
    scorer = make_scorer(tiny_dirs["cls"])
    bundle = scorer.bundle
    assert isinstance(bundle.model, LlavaClsForConditionalGeneration)
    assert (bundle.select_feature, bundle.num_visual_tokens) == ("cls", 1)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = bundle.model.model.get_image_features(pixel_values=pixels).pooler_output
        hidden = bundle.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        expected = bundle.model.model.multi_modal_projector(hidden[-2][:, :1])  # CLS, pre-final-LN
    assert [tuple(f.shape) for f in feats] == [(1, 32), (1, 32)]
    torch.testing.assert_close(torch.stack(feats), expected, rtol=0, atol=0)
    rows = random_rows(7, 4)
    shared = score_rows(scorer, rows, 4)
    naive = score_rows(make_scorer(tiny_dirs["cls"], sharing="none"), rows, 4)
    for mode in MODES:
        np.testing.assert_allclose(np.log(shared[f"score_{mode}"]), np.log(naive[f"score_{mode}"]), atol=1e-5)


# -- score definition -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chat", "phi3_instruct", "llama3"])
def test_scores_equal_independent_teacher_forced_computation(tiny_dirs, name):
    scorer = make_scorer(tiny_dirs[name])
    rows = random_rows(11, 2, ks=(2,))
    rows[0]["texts"] = ["A red mug to the left of a plate", '"quoted" start']
    out = score_rows(scorer, rows, 2)
    got = {(r["item_id"], k): i for i, (r, k) in enumerate((r, k) for r in rows for k in range(len(r["texts"])))}
    for row in rows:
        for k, text in enumerate(row["texts"]):
            ref = reference_scores(scorer.bundle, name, row["image"], text)
            i = got[(row["item_id"], k)]
            for mode in MODES:
                assert abs(np.log(out[f"score_{mode}"][i]) - np.log(ref[mode])) < 1e-5, (mode, text)
    assert np.array_equal(out["score"], out["score_t2v"])


@pytest.mark.parametrize("double_bos", [True, False])
def test_llama3_double_bos_switch(tiny_dirs, double_bos):
    """llama3_double_bos (PROTOCOLS §3.2 step 3): the reference's two BOS by default, exactly one when False."""
    scorer = make_scorer(tiny_dirs["llama3"], llama3_double_bos=double_bos)
    tok = scorer.bundle.tokenizer
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.bos_token_id == bos
    text = "A red mug to the left of a plate"
    seq = scorer.build_candidate(text).yes
    n_bos = 2 if double_bos else 1
    assert list(seq.ids[:n_bos]) == [bos] * n_bos and seq.ids[n_bos] != bos and seq.ids.count(bos) == n_bos
    assert tok.convert_ids_to_tokens(list(seq.answer_ids)) == ["Yes", "<|eot_id|>"]  # the span still holds
    other = make_scorer(tiny_dirs["llama3"], llama3_double_bos=not double_bos).build_candidate(text).yes
    assert seq.ids[n_bos:] == other.ids[3 - n_bos:]  # only the extra BOS differs
    assert seq.answer_start - other.answer_start == (1 if double_bos else -1)
    assert scorer.describe()["llama3_double_bos"] is double_bos
    rows = random_rows(17, 2, ks=(2,))
    rows[0]["texts"] = [text, '"quoted" start']
    for sharing in ("shared", "none"):
        out = score_rows(make_scorer(tiny_dirs["llama3"], llama3_double_bos=double_bos, sharing=sharing), rows, 2)
        i = 0
        for row in rows:
            for text_k in row["texts"]:
                ref = reference_scores(scorer.bundle, "llama3", row["image"], text_k, double_bos=double_bos)
                other_ref = reference_scores(scorer.bundle, "llama3", row["image"], text_k,
                                             double_bos=not double_bos)
                for mode in MODES:
                    assert abs(np.log(out[f"score_{mode}"][i]) - np.log(ref[mode])) < 1e-5, (mode, text_k)
                # the switch really changes the score (beyond the tolerance), so the comparison can tell them apart
                assert abs(np.log(ref["t2v"]) - np.log(other_ref["t2v"])) > 1e-3
                i += 1


def test_llama3_double_bos_leaves_other_templates_alone(tiny_dirs):
    for name in ("chat", "phi3_instruct"):
        one, two = (make_scorer(tiny_dirs[name], llama3_double_bos=flag) for flag in (False, True))
        assert one.build_candidate("a red mug").yes == two.build_candidate("a red mug").yes
        assert one.describe()["llama3_double_bos"] is None


def test_softmax_over_the_reference_vocabulary(tiny_dirs, tmp_path):
    """A sidecar's reference_vocab_size (rows added after the original model) narrows the softmax by default."""
    path = build_tiny_llava_dir(tmp_path / "narrow")
    sidecar = path / "perceive_ray.json"
    limit = 480
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "reference_vocab_size": limit}))
    narrow, full = make_scorer(path), make_scorer(path, softmax_vocab="full")
    assert (narrow.vocab_size, full.vocab_size) == (limit, len(full.bundle.tokenizer))
    rows = random_rows(41, 1, ks=(2,))
    out_narrow, out_full = score_rows(narrow, rows, 1), score_rows(full, rows, 1)
    assert (out_narrow["score_p_yes"] > out_full["score_p_yes"]).all()
    for k, text in enumerate(rows[0]["texts"]):
        for got, vocab in ((out_narrow, limit), (out_full, None)):
            ref = reference_scores(narrow.bundle, "chat", rows[0]["image"], text, vocab_limit=vocab)
            for mode in MODES:
                assert abs(np.log(got[f"score_{mode}"][k]) - np.log(ref[mode])) < 1e-5


def test_mode_selects_the_primary_column_and_all_modes_are_emitted(tiny_dirs):
    rows = random_rows(3, 2)
    for mode in MODES:
        out = score_rows(make_scorer(tiny_dirs["chat"], mode=mode), rows, 2)
        assert {"score_t2v", "score_p_yes", "score_yes_no", "lm_tokens"} <= set(out)
        assert np.array_equal(out["score"], out[f"score_{mode}"])
    with pytest.raises(ConfigError, match="scorer.options.sharing"):
        make_scorer(tiny_dirs["chat"], sharing="sometimes")


def test_answer_span_assertion_fires_on_broken_templates(tiny_dirs):
    tok = make_scorer(tiny_dirs["chat"]).bundle.tokenizer
    chat = get_template("chat")
    kwargs = {"answer": "Yes", "image_token_id": tok.convert_tokens_to_ids("<image>"), "num_visual": 1}
    assert build_compat_sequence(tok, chat, "a cat", **kwargs).answer_start > 0  # the real template passes
    broken = {
        "end-of-turn is not one token": dataclasses.replace(chat, eot="<end>"),
        "no end-of-turn": dataclasses.replace(chat, eot=""),
    }
    for why, template in broken.items():
        with pytest.raises(AnswerSpanError, match="is not a token"):
            build_compat_sequence(tok, template, "a cat", **kwargs)
            pytest.fail(why)
    with pytest.raises(AnswerSpanError, match="unmasked answer tokens"):
        build_compat_sequence(tok, chat, "a cat", **{**kwargs, "answer": "Yes please"})
    with pytest.raises(AnswerSpanError):  # the scorer settles its answer ids at construction
        make_scorer(tiny_dirs["chat"], answer="Yes please")


def test_unclean_negative_answer_only_blanks_yes_no(tiny_dirs):
    rows = random_rows(13, 1, ks=(2,))
    with pytest.warns(UserWarning, match="score_yes_no will be NaN"):
        out = score_rows(make_scorer(tiny_dirs["chat"], negative_answer="Nope never"), rows, 1)
    assert np.isnan(out["score_yes_no"]).all() and np.isfinite(out["score"]).all()
    np.testing.assert_array_equal(out["score"], score_rows(make_scorer(tiny_dirs["chat"]), rows, 1)["score"])
    with pytest.raises(AnswerSpanError):
        score_rows(make_scorer(tiny_dirs["chat"], negative_answer="Nope never", mode="yes_no"), rows, 1)


def test_pad_to_square_centres_with_floor_offset():
    image = np.full((3, 6, 3), 255, dtype=np.uint8)  # H=3, W=6: offset floor(3/2) = 1 row on top
    square = np.asarray(pad_to_square(Image.fromarray(image)))
    assert square.shape == (6, 6, 3)
    assert (square[0] == (122, 116, 104)).all() and (square[4:] == (122, 116, 104)).all()
    assert (square[1:4] == 255).all()
    np.testing.assert_array_equal(square, np.asarray(pad_reference(image)))


# -- shared prefix ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chat", "phi3_instruct", "llama3"])
def test_shared_prefix_equals_naive(tiny_dirs, name):
    rows = random_rows(100 + len(name), 9)
    shared_scorer, naive_scorer = make_scorer(tiny_dirs[name]), make_scorer(tiny_dirs[name], sharing="none")
    for batch_size in (3, 9):
        shared = score_rows(shared_scorer, rows, batch_size)
        naive = score_rows(naive_scorer, rows, batch_size)
        for column in ("item_id", "image_index", "text_index"):
            assert np.array_equal(shared[column], naive[column])
        for mode in MODES:
            delta = np.abs(np.log(shared[f"score_{mode}"]) - np.log(naive[f"score_{mode}"]))
            assert delta.max() <= 1e-5, (mode, delta.max())
        # identical decisions: the best candidate per image agrees wherever the naive margin is not a tie
        start = 0
        for row in rows:
            k = len(row["texts"])
            a, b = shared["score"][start : start + k], naive["score"][start : start + k]
            if k > 1 and np.sort(b)[-1] - np.sort(b)[-2] > 1e-6:
                assert np.argmax(a) == np.argmax(b)
            start += k
        # the model is not degenerate: different texts and images really get different scores
        assert np.ptp(naive["score"]) > 1e-3
        assert shared["lm_tokens"].sum() < naive["lm_tokens"].sum()


def test_duplicates_are_scored_once_and_get_equal_scores(tiny_dirs):
    scorer = make_scorer(tiny_dirs["chat"])
    rows = random_rows(5, 1, ks=(1,))
    rows[0]["texts"] = ["a red mug", "a blue mug", "a red mug", "a red mug"]
    out = score_rows(scorer, rows, 1)
    assert out["score"][0] == out["score"][2] == out["score"][3] != out["score"][1]
    assert out["lm_tokens"][2] == out["lm_tokens"][3] == 0 and out["lm_tokens"][0] > out["lm_tokens"][1] > 0


def test_tiny_model_is_position_sensitive(tiny_dirs):
    """Guards the parity tests: suffix positions off by one against the prefix move the log-probs far beyond 1e-5."""
    scorer = make_scorer(tiny_dirs["chat"])
    cand = scorer.build_candidate("a red mug on a plate")
    pixels = scorer.load_pixels([np.zeros((10, 20, 3), dtype=np.uint8)])
    lm = scorer.bundle.model.model.language_model
    with torch.no_grad():
        feats = scorer.bundle.model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        embeds = scorer._embed(cand.yes.ids, feats)[None]
        a0 = cand.yes.answer_start
        outs = []
        for shift in (0, 1):  # RoPE is relative: only a shift of the suffix against the prefix can show
            pos = torch.arange(embeds.shape[1])[None]
            pos[:, a0 - 5 :] += shift
            hidden = lm(inputs_embeds=embeds, position_ids=pos).last_hidden_state
            outs.append(scorer.bundle.model.lm_head(hidden[0, a0 - 1]).log_softmax(-1)[cand.yes.ids[a0]])
    assert abs(float(outs[0] - outs[1])) > 1e-3


def test_pad_preprocessing_changes_only_non_square_images(tiny_dirs):
    rows = random_rows(31, 2, ks=(2,))
    rows[0]["image"] = rows[0]["image"][:20, :20]  # square
    rows[1]["image"] = np.random.default_rng(0).integers(0, 256, size=(12, 30, 3), dtype=np.uint8)
    pad = score_rows(make_scorer(tiny_dirs["chat"]), rows, 2)["score"]
    none = score_rows(make_scorer(tiny_dirs["chat"], image_preprocess="none"), rows, 2)["score"]
    assert np.array_equal(pad[:2], none[:2]) and not np.allclose(pad[2:], none[2:], rtol=0, atol=1e-6)


def test_rows_without_texts_and_run_description(tiny_dirs):
    scorer = make_scorer(tiny_dirs["chat"])
    rows = random_rows(2, 2, ks=(2,))
    rows[1]["texts"] = []
    for sharing in ("shared", "none"):
        out = score_rows(make_scorer(tiny_dirs["chat"], sharing=sharing), rows, 2)
        assert list(out["item_id"]) == ["r0", "r0"]
        empty = score_rows(make_scorer(tiny_dirs["chat"], sharing=sharing), rows[1:], 1)
        assert set(empty) == {"item_id", "image_index", "text_index", "score"}
        assert all(len(values) == 0 for values in empty.values())
    record = scorer.describe()
    assert record["template"] == "chat" and record["prompts_version"] == "1"
    assert record["tokens"]["yes"][1] == "▁Yes" and record["tokens"]["eot"][1] == "</s>"
    assert record["tokens"]["no"][1] == "▁No" and record["num_visual_tokens"] == 64


def test_batch_invariance(tiny_dirs):
    rows = random_rows(23, 8)
    for sharing in ("shared", "none"):
        scorer = make_scorer(tiny_dirs["chat"], sharing=sharing)
        one, eight = score_rows(scorer, rows, 1), score_rows(scorer, rows, 8)
        for mode in MODES:
            np.testing.assert_allclose(np.log(one[f"score_{mode}"]), np.log(eight[f"score_{mode}"]), atol=1e-5)
        assert np.array_equal(one["lm_tokens"], eight["lm_tokens"])


def test_prefix_length_is_token_lcp_capped_before_the_answer(tiny_dirs):
    scorer = make_scorer(tiny_dirs["chat"])
    a, b = scorer.build_candidate('"x" a red mug'), scorer.build_candidate('"y" a red mug')
    lcp = compute_prefix_length([a.yes, b.yes])
    assert a.yes.ids[:lcp] == b.yes.ids[:lcp] and a.yes.ids[lcp] != b.yes.ids[lcp]
    assert compute_prefix_length([a.yes]) == a.yes.answer_start - 1  # K = 1: capped at a0 - 1


def test_whatsup_shared_path_saves_3_5x_lm_tokens_and_feeds_metrics(tmp_path):
    generate(tmp_path / "synth", seed=0, pairs=2)
    manifest = load_benchmark("whatsup_controlled_a", tmp_path / "synth" / "whatsup")
    real_v = build_tiny_llava_dir(tmp_path / "v576", image_size=48, patch_size=2)  # V = 576 as in LLaVA-1.5
    results, scorers = {}, {}
    for sharing in ("shared", "none"):
        scorers[sharing] = make_scorer(real_v, sharing=sharing)
        assert scorers[sharing].bundle.num_visual_tokens == 576
        results[sharing] = run_local(manifest, scorers[sharing], batch_size=4).scores
    shared_tokens = sum(results["shared"].column("lm_tokens").to_pylist())
    naive_tokens = sum(results["none"].column("lm_tokens").to_pylist())
    assert scorers["shared"].lm_tokens_total == shared_tokens and scorers["none"].lm_tokens_total == naive_tokens
    assert naive_tokens / shared_tokens >= 3.5, (naive_tokens, shared_tokens)
    # naive - shared = sum over images of (K - 1) * L_i (no duplicate captions in What'sUp)
    scorer = scorers["shared"]
    saved = sum(3 * compute_prefix_length([scorer.build_candidate(t).yes for t in item.texts])
                for item in manifest.items)
    assert naive_tokens - shared_tokens == saved
    n_images = len(manifest.items)
    assert (scorers["shared"].vision_encodes_total, scorers["none"].vision_encodes_total) == (n_images, 4 * n_images)
    for mode in MODES:
        np.testing.assert_allclose(np.log(results["shared"].column(f"score_{mode}").to_numpy()),
                                   np.log(results["none"].column(f"score_{mode}").to_numpy()), atol=1e-5)
    report = compute_metrics(manifest, results["shared"])
    assert report.benchmark == "whatsup_controlled_a" and report.metrics
    assert all(0.0 <= value <= 1.0 or value != value for value in report.metrics.values()), report.metrics
