"""VLM2Vec training job (train/jobs/vlm2vec.py): the §5.6 (query, target) pair rules, tokenisation (V image ids,
truncation that never cuts the image span, right padding), and GradCache exactness through the real tiny LLaVA +
DoRA adapter with dropout on.

GradCache and dropout. A dropout mask is drawn per forward call for the whole (rows, T, D) activation, so a forward
of 4 rows and four forwards of 1 row draw different masks: with dropout on, no chunking can reproduce the gradient of
the one-chunk step literally. What GradCache promises is the gradient of the global loss under the masks its chunks
draw: the reference here (``reference_grads``) forwards every chunk with autograd under its own seed, concatenates the
embeddings and differentiates the global loss in ONE backward -- for one chunk that is exactly the one-chunk step.
With the adapter dropout at 0, every chunking equals the one-chunk step itself (``test_every_chunking_...``).

Precision. The model runs in float64 (``module.double()``); ``compute_last_token_embeddings`` casts the pooled states
to float32 (the production fp32 loss), so the loss itself is float32. Same-shape forwards (GradCache pass 1, pass 3
and the reference) are bit-identical, so those gradients agree to ~1e-14 (atol 1e-8 asserted). Different chunkings
pad to different widths: float64 rows agree to ~1e-16 relative before the float32 cast, which rounds them the same
way except rarely at a rounding boundary (6e-8 relative, times the 1/0.02 logit scale); atol 1e-5 covers that with
a wide margin against the ~10-60 differences a wrong replay produces.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from perceive_ray.config import ConfigError, load_config
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER
from perceive_ray.models.llava import save_tiny_llava
from perceive_ray.train.gradcache import chunk_seed, run_step
from perceive_ray.train.jobs.vlm2vec import (
    IMAGE_QUERY,
    TEXT_QUERY,
    PairError,
    Vlm2VecJob,
    check_samples,
    vlm2vec_pair,
)
from perceive_ray.training_config import compute_accumulation

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "train" / "vlm2vec_llava15.yaml"
CPU = torch.device("cpu")
V = 64  # image tokens of the tiny llava (32 px / 4 px patches)
SAME_SHAPE_ATOL = 1e-8
CROSS_SHAPE_ATOL = 1e-5

# (train.batch.micro, train.batch.micro_target) over the 4 rows each worker holds in the smoke config (global 8, 2
# workers): 1 chunk (no chunking), 2, 4, and uneven query / target chunks (4 query chunks of 1, 2 target chunks of 2).
CHUNKINGS = {"1": (4, 4), "2": (2, 2), "4": (1, 1), "q1_t2": (1, 2)}


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
def tiny_llava(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("vlm2vec_job") / "llava", seed=0))


_JOBS: dict = {}


def make_job(source: str, *, double: bool = False, **overrides) -> Vlm2VecJob:
    """A job from the smoke config over the tiny llava; ``double``: float64 module with seeded non-zero lora_B (the
    gaussian init leaves B = 0, which would zero every lora_A gradient). Cached per arguments: a test that mutates
    the job must build its own."""
    key = (source, double, tuple(sorted(overrides.items())))
    if key not in _JOBS:
        config = load_config(CONFIG, {"model.source": source, **overrides}, smoke=True)
        job = Vlm2VecJob(config, device=CPU)
        if double:
            job.module.double()
            generator = torch.Generator().manual_seed(123)
            with torch.no_grad():
                for name, param in sorted(job.module.named_parameters()):
                    if "lora_B" in name:
                        param.copy_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        _JOBS[key] = job
    return _JOBS[key]


def sample(key: str, humans: list[str], gpts: list[str], *, image: bool = True) -> SimpleNamespace:
    return SimpleNamespace(key=key, image="img.jpg" if image else None, human_turns=humans, gpt_turns=gpts)


# (key, has_image, human turns, gpt turns): the rows a worker gets for one step (558K and 665K, one text-only).
ROWS = [
    ("llava_558k:0", True, ["<image>\nDescribe the image briefly."], ["a red cat sleeping on a mat"]),
    ("llava_665k:1", True, ["<image>\nWhat is the cat doing?", "What colour is it?"], ["It sleeps.", "Red."]),
    ("llava_665k:2", True, ["What is shown here?\n<image>"], ["a small blue car"]),
    ("llava_665k:3", False, ["Write one sentence about a dog."], ["The dog ran home before dinner."]),
]


def make_rows(specs=ROWS, *, epoch: int = 0) -> dict[str, np.ndarray]:
    """Rows as the worker's dataset shard yields them (numpy batch format)."""
    pixels = np.random.default_rng(0).standard_normal((len(specs), 3, 32, 32)).astype(np.float32)
    for i, spec in enumerate(specs):
        if not spec[1]:
            pixels[i] = 0.0  # text-only rows carry a zero image
    return {"key": np.array([s[0] for s in specs]), "has_image": np.array([s[1] for s in specs]),
            "humans": np.array([json.dumps(s[2]) for s in specs]), "gpts": np.array([json.dumps(s[3]) for s in specs]),
            "epoch": np.full(len(specs), epoch), "pixels": pixels, "step": np.zeros(len(specs), dtype=np.int64),
            "slot": np.arange(len(specs))}


def split_rows(rows: dict[str, np.ndarray], chunks: int) -> list[dict[str, np.ndarray]]:
    """As the worker splits a step's rows before ``collate_chunks`` (run/training.py::split_rows)."""
    n = len(rows["step"])
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    return [{k: v[bounds[i]: bounds[i + 1]] for k, v in rows.items()} for i in range(chunks)]


# ---------------------------------------------------------------------------------------------------------------
# Pairs (§5.6)


def test_558k_query_is_the_first_human_turn_and_target_the_first_gpt_turn():
    humans, gpts = ["<image>\nRender a clear and concise summary of the photo.", "Unused?"], ["a dog on grass", "x"]
    for seed, epoch in [(0, 0), (1, 3), (7, 11)]:
        query, target = vlm2vec_pair(sample("llava_558k:5", humans, gpts), fmt="pretrain", seed=seed, epoch=epoch)
        assert (query, target) == (humans[0], gpts[0])  # verbatim: the turn already holds <image>


@pytest.mark.parametrize("humans", [["Describe the photo."], ["<image> <image> Describe."]])
def test_558k_query_needs_exactly_one_image_placeholder(humans):
    with pytest.raises(PairError, match="llava_558k:9"):
        vlm2vec_pair(sample("llava_558k:9", humans, ["a dog"]), fmt="pretrain", seed=0, epoch=0)


MIX_HUMANS = ["<image>\nWhat is the cat doing?", "What colour is it?", "Where is it lying?"]
MIX_GPTS = ["sleeping", "red", "on a mat"]


def expected_mix_pair(index: int, *, image: bool) -> tuple[str, str]:
    human = MIX_HUMANS[index]
    if IMAGE_PLACEHOLDER in human:
        return human, MIX_GPTS[index]
    return (IMAGE_QUERY if image else TEXT_QUERY).format(human), MIX_GPTS[index]


def drawn_turn(key: str, *, seed: int = 0, epoch: int = 0) -> int:
    """The turn drawn for an image 665K row, read back from its target (the gpt turns are distinct)."""
    query, target = vlm2vec_pair(sample(key, MIX_HUMANS, MIX_GPTS), fmt="mix", seed=seed, epoch=epoch)
    index = MIX_GPTS.index(target)
    assert (query, target) == expected_mix_pair(index, image=True)  # query and target come from the same round
    return index


def test_665k_turn_draw_is_keyed_by_seed_epoch_and_key():
    keys = [f"llava_665k:{i}" for i in range(200)]
    first = [drawn_turn(k) for k in keys]
    assert first == [drawn_turn(k) for k in keys]  # same (seed, epoch, key) -> same turn
    assert set(first) == {0, 1, 2}  # over many keys every turn is drawn
    counts = np.bincount(first, minlength=3)
    assert counts.min() > 30, counts  # roughly uniform, not a rare fallback
    per_epoch = [[drawn_turn(k, epoch=e) for k in keys[:20]] for e in range(6)]
    assert any(len({per_epoch[e][i] for e in range(6)}) > 1 for i in range(20))  # epochs redraw
    assert per_epoch[1] != per_epoch[0]
    assert [drawn_turn(k, seed=1) for k in keys] != first  # the run seed enters the draw


def test_665k_image_row_prefixes_a_turn_without_placeholder():
    seen = {}
    for i in range(60):
        key = f"llava_665k:{i}"
        seen.setdefault(drawn_turn(key), key)
    assert set(seen) == {0, 1, 2}
    query, target = vlm2vec_pair(sample(seen[0], MIX_HUMANS, MIX_GPTS), fmt="mix", seed=0, epoch=0)
    assert (query, target) == ("<image>\nWhat is the cat doing?", "sleeping")  # holds <image>: used as is
    query, target = vlm2vec_pair(sample(seen[1], MIX_HUMANS, MIX_GPTS), fmt="mix", seed=0, epoch=0)
    assert query == "<image> Represent the given image with the following question: What colour is it?"
    assert target == "red"


def test_665k_text_only_row_gets_the_text_query_prefix():
    humans, gpts = ["Write a haiku about rain.", "Now about snow."], ["Rain falls.", "Snow falls."]
    for i in range(20):
        query, target = vlm2vec_pair(sample(f"llava_665k:{i}", humans, gpts, image=False), fmt="mix", seed=0,
                                     epoch=0)
        index = gpts.index(target)
        assert query == f"Find the text that can answer the given query: {humans[index]}"
        assert IMAGE_PLACEHOLDER not in query


def test_placeholder_in_a_text_only_row_is_a_pair_error():
    with pytest.raises(PairError, match="llava_665k:4"):
        vlm2vec_pair(sample("llava_665k:4", ["<image>\nWhat is this?"], ["a cat"], image=False), fmt="mix", seed=0,
                     epoch=0)


def test_placeholder_in_a_target_is_a_pair_error():
    with pytest.raises(PairError, match="llava_665k:5.*target"):
        vlm2vec_pair(sample("llava_665k:5", ["<image>\nWhat is this?"], ["see <image>"]), fmt="mix", seed=0, epoch=0)
    with pytest.raises(PairError, match="llava_558k:5"):
        vlm2vec_pair(sample("llava_558k:5", ["<image>\nDescribe."], ["<image> a cat"]), fmt="pretrain", seed=0,
                     epoch=0)


def test_two_placeholders_in_an_image_turn_is_a_pair_error():
    with pytest.raises(PairError, match="llava_665k:6"):
        vlm2vec_pair(sample("llava_665k:6", ["<image> and <image>?"], ["two"]), fmt="mix", seed=0, epoch=0)


def test_a_row_without_turns_is_a_pair_error():
    with pytest.raises(PairError, match="llava_665k:8"):
        vlm2vec_pair(sample("llava_665k:8", [], []), fmt="mix", seed=0, epoch=0)


def test_preflight_checks_every_turn_a_later_epoch_can_draw(tiny_llava):
    """A bad later turn fails the driver's check even for a key whose epoch-0 draw is a good turn."""
    config = make_job(tiny_llava).config
    humans, gpts = ["<image>\nWhat is it?", "And this?"], ["a cat", "see <image>"]
    good_at_epoch_0 = next(i for i in range(50) if drawn_index(f"llava_665k:{i}", humans) == 0)
    bad = SimpleNamespace(key=f"llava_665k:{good_at_epoch_0}", image="x", human_turns=humans, gpt_turns=gpts,
                          source="llava_665k", row=good_at_epoch_0)
    vlm2vec_pair(bad, fmt="mix", seed=config.seed, epoch=0)  # epoch 0 alone would pass
    with pytest.raises(ConfigError, match=rf"llava_665k\].*row {good_at_epoch_0}:.*target turn 1"):
        check_samples(config, [bad])
    fine = SimpleNamespace(key="llava_665k:1", image="x", human_turns=MIX_HUMANS, gpt_turns=MIX_GPTS,
                           source="llava_665k", row=1)
    check_samples(config, [fine])


def drawn_index(key: str, humans: list[str]) -> int:
    probe = sample(key, humans, [f"answer {i}" for i in range(len(humans))])
    return int(vlm2vec_pair(probe, fmt="mix", seed=0, epoch=0)[1].split()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def test_image_query_holds_exactly_v_image_ids_after_bos(tiny_llava):
    job = make_job(tiny_llava)
    tokenizer, image_id = job.parts.tokenizer, job.parts.image_token_id
    assert job.parts.num_visual_tokens == V
    query = IMAGE_QUERY.format("What is on the table?")
    ids = job.tokenize(query, key="llava_665k:1", image=True)
    assert ids.count(image_id) == V
    assert ids[0] == tokenizer.bos_token_id
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert positions == list(range(1, 1 + V))  # one contiguous span right after BOS
    expected = tokenizer(query.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * V))["input_ids"]
    assert ids == list(expected)
    target = job.tokenize("a cat", key="llava_665k:1", image=False)
    assert image_id not in target and target[0] == tokenizer.bos_token_id


def test_truncation_that_cuts_the_image_span_names_the_sample(tiny_llava, monkeypatch):
    job = make_job(tiny_llava)
    monkeypatch.setattr(job, "options", job.options.model_copy(update={"max_length": 40}))
    with pytest.raises(PairError, match=r"llava_665k:17.*max_length=40"):
        job.tokenize(IMAGE_QUERY.format("What is it?"), key="llava_665k:17", image=True)
    # the image at the end of a long turn: truncating the text before it would drop the image
    monkeypatch.setattr(job, "options", job.options.model_copy(update={"max_length": V + 5}))
    with pytest.raises(PairError, match="llava_665k:18"):
        job.tokenize("Please look very carefully at the following picture and then answer: <image>",
                     key="llava_665k:18", image=True)
    # through collate_chunks, the worker's path
    rows = make_rows([("llava_665k:19", True, ["Look at this picture closely, what is here? <image>"], ["a cat"])])
    with pytest.raises(PairError, match="llava_665k:19"):
        job.collate_chunks([rows], CPU)


def test_text_is_truncated_on_the_right(tiny_llava, monkeypatch):
    job = make_job(tiny_llava)
    tokenizer, image_id = job.parts.tokenizer, job.parts.image_token_id
    query = IMAGE_QUERY.format("What is the small animal on the left of the red table doing?")
    full = list(tokenizer(query.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * V))["input_ids"])
    limit = V + 8
    assert len(full) > limit
    monkeypatch.setattr(job, "options", job.options.model_copy(update={"max_length": limit}))
    ids = job.tokenize(query, key="llava_665k:1", image=True)
    assert ids == full[:limit] and ids.count(image_id) == V
    target = "The small animal is a cat and it is sleeping on a mat."
    full_target = list(tokenizer(target)["input_ids"])
    monkeypatch.setattr(job, "options", job.options.model_copy(update={"max_length": 6}))
    assert job.tokenize(target, key="llava_665k:1", image=False) == full_target[:6]


def test_collated_chunks_are_right_padded_and_cut_by_micro_and_micro_target(tiny_llava):
    job = make_job(tiny_llava, **{"train.batch.micro": 1, "train.batch.micro_target": 2})
    assert (job.micro, job.micro_target) == (1, 2)
    chunks = compute_accumulation(job.config)[1]
    assert chunks == 4
    rows = make_rows()
    batches = job.collate_chunks(split_rows(rows, chunks), CPU)
    assert len(batches) == 4
    assert [b["query"]["input_ids"].shape[0] for b in batches] == [1, 1, 1, 1]
    assert [None if b["target"] is None else b["target"]["input_ids"].shape[0] for b in batches] == [2, 2, None, None]
    pairs = [vlm2vec_pair(sample(k, h, g, image=im), fmt="pretrain" if k.startswith("llava_558k") else "mix",
                          seed=job.config.seed, epoch=0) for k, im, h, g in ROWS]
    queries = [job.tokenize(q, key="k", image=IMAGE_PLACEHOLDER in q) for q, _ in pairs]
    targets = [job.tokenize(t, key="k", image=False) for _, t in pairs]
    sides = [(b["query"], [queries[i]]) for i, b in enumerate(batches)] + \
        [(batches[0]["target"], targets[:2]), (batches[1]["target"], targets[2:])]
    for side, wanted in sides:
        ids, mask = side["input_ids"], side["attention_mask"]
        for r, want in enumerate(wanted):
            n = len(want)
            assert ids[r, :n].tolist() == want
            assert mask[r].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padding
            assert (ids[r, n:] == job.pad_id).all()
    assert len(targets[2]) != len(targets[3])  # the second target chunk really pads one row
    assert [bool(b["query"]["has_image"][0]) for b in batches] == [True, True, True, False]
    assert "pixels" in batches[0]["query"] and "pixels" not in batches[3]["query"]  # text-only: no image at all
    assert all("pixels" not in b["target"] for b in batches[:2])  # targets are text alone
    # one chunk of all rows: the widest row fixes the width, the others are padded on the right
    whole = make_job(tiny_llava, **{"train.batch.micro": 4, "train.batch.micro_target": 4})
    side = whole.collate_chunks([rows], CPU)[0]["query"]
    lengths = side["attention_mask"].sum(dim=1).tolist()
    assert lengths == [len(q) for q in queries] and len(set(lengths)) > 1
    for r, n in enumerate(lengths):
        assert side["attention_mask"][r, :n].all() and not side["attention_mask"][r, n:].any()


# ---------------------------------------------------------------------------------------------------------------
# GradCache exactness through the real model


class Engine:
    """What ``run_step`` drives: forward = the module, backward recorded then ``loss.backward()``, step counted."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.scales: list[bool] = []
        self.steps = 0

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        assert loss.ndim == 0 and loss.requires_grad
        self.scales.append(scale_wrt_gas)
        loss.backward()

    def step(self) -> None:
        self.steps += 1


class OtherReplaySeedEngine(Engine):
    """The second (autograd) pass runs under other seeds than the first: the replayed masks no longer match."""

    def __call__(self, batch):
        if torch.is_grad_enabled():
            torch.manual_seed(torch.initial_seed() + 1)
        return self.module(batch)


def trainable_grads(job: Vlm2VecJob) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in job.module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            out[name] = param.grad.detach().clone()
    return out


def chunked(job: Vlm2VecJob, *, step: int = 0) -> tuple[list[dict], list[int]]:
    chunks = compute_accumulation(job.config)[1]
    batches = job.collate_chunks(split_rows(make_rows(), chunks), CPU)
    return batches, [chunk_seed(job.config.seed, step, 0, c) for c in range(chunks)]


def reference_grads(job: Vlm2VecJob, batches, seeds) -> tuple[float, dict[str, torch.Tensor]]:
    """The global loss over all chunks differentiated in ONE backward, each chunk's forward under its own seed (the
    masks GradCache draws): the un-chunked gradient of the objective the chunked step optimises."""
    job.module.zero_grad(set_to_none=True)
    reps = []
    for batch, seed in zip(batches, seeds, strict=True):
        torch.manual_seed(seed)
        reps.append(job.module(batch))
    merged = {side: torch.cat([r[side] for r in reps]) for side in ("query", "target")}
    loss, _ = job.compute_loss(merged)
    loss.backward()
    return loss.item(), trainable_grads(job)


def gradcache_grads(job: Vlm2VecJob, batches, seeds, engine_cls=Engine):
    job.module.zero_grad(set_to_none=True)
    engine = engine_cls(job.module)
    loss, logs = run_step(engine, job.compute_loss, batches, seeds)
    return engine, loss.item(), trainable_grads(job)


def assert_same_grads(got, want, atol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def max_difference(got, want) -> float:
    return max((got[n] - want[n]).abs().max().item() for n in want)


def chunking_overrides(name: str, **extra) -> dict:
    micro, micro_target = CHUNKINGS[name]
    return {"train.batch.micro": micro, "train.batch.micro_target": micro_target, **extra}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_gradcache_equals_one_backward_with_dropout_on(tiny_llava, chunking, checkpointing):
    job = make_job(tiny_llava, double=True,
                   **chunking_overrides(chunking, **{"train.vlm2vec.grad_checkpointing": checkpointing}))
    assert job.options.adapter.dropout == pytest.approx(0.1) and job.module.training
    dropouts = [m for n, m in job.module.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Dropout) and m.p == pytest.approx(0.1) and m.training
                            for m in dropouts)
    assert next(job.module.parameters()).dtype == torch.float64
    assert job.parts.model.model.language_model.gradient_checkpointing is checkpointing
    batches, seeds = chunked(job)
    assert len(batches) == {"1": 1, "2": 2, "4": 4, "q1_t2": 4}[chunking]
    want_loss, want = reference_grads(job, batches, seeds)
    engine, loss, got = gradcache_grads(job, batches, seeds)
    assert loss == pytest.approx(want_loss, abs=1e-10)
    assert_same_grads(got, want, SAME_SHAPE_ATOL)
    assert engine.scales == [False] * len(batches) and engine.steps == len(batches)
    names = {"lora_A", "lora_B", "lora_magnitude_vector"}
    for kind in names:  # every kind of adapter tensor gets a real gradient
        assert max(g.abs().max().item() for n, g in got.items() if kind in n) > 1e-3, kind


@pytest.mark.parametrize("chunking", ["2", "4", "q1_t2"])
def test_gradcache_needs_the_replayed_seeds(tiny_llava, chunking):
    """The test can fail: replaying under other seeds (or another step's seeds) gives another gradient."""
    job = make_job(tiny_llava, double=True, **chunking_overrides(chunking))
    batches, seeds = chunked(job)
    _, want = reference_grads(job, batches, seeds)
    scale = max(g.abs().max().item() for g in want.values())
    _, _, broken = gradcache_grads(job, batches, seeds, engine_cls=OtherReplaySeedEngine)
    assert max_difference(broken, want) > 1e-2 * scale
    _, other_seeds = chunked(job, step=1)
    _, _, other = gradcache_grads(job, batches, other_seeds)
    assert max_difference(other, want) > 1e-2 * scale
    _, _, again = gradcache_grads(job, batches, seeds)
    assert_same_grads(again, want, SAME_SHAPE_ATOL)  # deterministic under the step's own seeds


def test_every_chunking_equals_the_one_chunk_step_without_dropout(tiny_llava):
    """Adapter dropout 0 (masks cannot differ): 2, 4 and uneven chunks give the one-chunk step's loss and gradient,
    which is also a plain forward + backward of the whole batch."""
    no_dropout = {"train.vlm2vec.adapter.dropout": 0.0}
    jobs = {name: make_job(tiny_llava, double=True, **chunking_overrides(name, **no_dropout)) for name in CHUNKINGS}
    base = jobs["1"]
    params = {n: p.detach().clone() for n, p in base.module.named_parameters() if p.requires_grad}
    for job in jobs.values():  # the same adapter (seeded init + seeded lora_B) in every job
        assert_same_grads({n: p.detach() for n, p in job.module.named_parameters() if p.requires_grad}, params, 0)
    base.module.zero_grad(set_to_none=True)
    batch = base.collate_chunks([make_rows()], CPU)[0]
    plain_loss, _ = base.compute_loss(base.module(batch))
    plain_loss.backward()
    plain = trainable_grads(base)
    _, one_loss, one = gradcache_grads(base, *chunked(base))
    assert one_loss == pytest.approx(plain_loss.item(), abs=1e-10)
    assert_same_grads(one, plain, SAME_SHAPE_ATOL)
    for name in ("2", "4", "q1_t2"):
        engine, loss, got = gradcache_grads(jobs[name], *chunked(jobs[name]))
        assert engine.steps == {"2": 2, "4": 4, "q1_t2": 4}[name]
        assert loss == pytest.approx(one_loss, abs=1e-5)
        assert_same_grads(got, one, CROSS_SHAPE_ATOL)


def test_a_chunk_emptied_by_a_dropped_row_still_steps(tiny_llava):
    """The worker drops rows with unreadable images (up to data.max_missing_fraction) and still splits the rest into
    the planned number of chunks: with micro 1 / micro_target 1 (the reference config) the last chunk is empty."""
    job = make_job(tiny_llava, double=True, **chunking_overrides("4"))
    rows = make_rows()
    rows = {k: v[[True, True, False, True]] for k, v in rows.items()}  # row 2's image was unreadable
    batches = job.collate_chunks(split_rows(rows, 4), CPU)
    assert batches[3]["query"] is None and batches[3]["target"] is None
    seeds = [chunk_seed(job.config.seed, 0, 0, c) for c in range(4)]
    _, want = reference_grads(job, batches[:3], seeds[:3])

    class PlainEngine(Engine):
        def backward(self, loss, scale_wrt_gas=True):
            loss.backward()

    job.module.zero_grad(set_to_none=True)
    engine = PlainEngine(job.module)
    run_step(engine, job.compute_loss, batches, seeds)
    assert engine.steps == 4  # one backward + step per planned chunk: DeepSpeed's accumulation boundary
    assert_same_grads(trainable_grads(job), want, SAME_SHAPE_ATOL)
