"""PACL, PACL+RoPE and SPARC scorers: a trained head on a frozen open_clip encoder, diagonal scores (PROTOCOLS §3.5).

The frozen encoder gives the N post-``ln_post`` patch tokens (576 x 1024 for ViT-L/14-336, before the visual
projection) and, per text, the pooled projected embedding (PACL) or all T ``ln_final`` token states (SPARC). Images
are preprocessed as the reference's head evaluation does: ToTensor -> Resize((S, S)) (bilinear, antialiased,
aspect-distorting, no crop) -> ImageNet mean/std, with S the encoder's image size. For option j the head returns a
text-conditioned pair (v_j, t_j), both unit-norm, and score_j = <v_j, t_j>.

Options (``scorer.options``): ``head_weights`` (a ``.safetensors`` file written by ``save_head`` or a released
DataParallel ``.pth``) and ``embed_dim`` (head width, 768 for the released heads); PACL: ``pacl_pooling``; SPARC:
``sparc_sigma``, ``sparc_eval_sigma``, ``sparc_mask_padding``, ``sparc_local``. RoPE is the scorer kind
(``pacl`` vs ``pacl_rope``, ``sparc`` vs ``sparc_rope``), never inferred from the weights' file name.

``pacl_llm_text`` (``PaclLlmTextScorer``, PROTOCOLS §5.5) runs the PACL+RoPE head on LLM2CLIP's towers instead: its
ViT patches and LLM2Vec text through its frozen adapter (options as ``pacl`` plus ``text_embeddings`` etc.).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.models.clip_features import FrozenClipEncoder, compute_pixels, load_encoder
from perceive_ray.models.heads.pacl import (
    HeadLoadError,
    HeadSpec,
    PaclHead,
    compute_diagonal_scores,
    compute_pooled_visual,
    load_pacl_head,
)
from perceive_ray.models.heads.sparc import SparcHead, compute_sparc_scores, load_sparc_head
from perceive_ray.models.llm2clip import encode_llm_checked, load_llm2clip
from perceive_ray.scoring.base import ScoreRows, check_family, device_name, iter_rows
from perceive_ray.scoring.options import PaclLlmTextOptions, PaclOptions, SparcOptions, parse_options


def collect_pairs(rows: list[dict[str, Any]]) -> tuple[list[str], list[int], list[int]]:
    """Distinct texts of the batch and, per (row, text) in row order, the row index and the distinct-text index."""
    distinct: dict[str, int] = {}
    image_of, text_of = [], []
    for b, row in enumerate(rows):
        for text in row["texts"]:
            image_of.append(b)
            text_of.append(distinct.setdefault(text, len(distinct)))
    return list(distinct), image_of, text_of


def write_rows(rows: list[dict[str, Any]], scores: torch.Tensor) -> dict[str, list]:
    """Scores (M,) in (row, text) order -> the output batch."""
    out = ScoreRows()
    values = scores.double().cpu().tolist()
    m = 0
    for row in rows:
        for t in range(len(row["texts"])):
            out.add(row["item_id"], row["image_index"], t, values[m])
            m += 1
    return out.to_batch()


def describe_head(scorer: Any, **extra: Any) -> dict[str, Any]:
    """The shared part of a head scorer's describe() (PACL / SPARC on a frozen open_clip encoder)."""
    enc, spec = scorer.encoder, scorer.spec
    return {"scorer": spec.kind + ("_rope" if spec.rope else ""), "head": spec.kind, "rope": spec.rope,
            "encoder": enc.bundle.name, "embed_dim": spec.embed_dim, "num_patches": spec.num_patches,
            "image_size": list(enc.image_size), "transform": "ToTensor -> Resize((S, S)) -> ImageNet mean/std",
            "dtype": str(enc.bundle.dtype).removeprefix("torch."), "device": device_name(enc.bundle.device),
            "score": "<v_j, t_j> of unit vectors", **extra}


def score_diagonal_batch(score, batch: Mapping[str, Any]) -> dict[str, list]:
    """Run a head scorer's ``score(images, texts, image_of, text_of)`` over a batch of scoring rows."""
    rows = list(iter_rows(batch))
    if not rows:
        return ScoreRows().to_batch()
    texts, image_of, text_of = collect_pairs(rows)
    return write_rows(rows, score([row["image"] for row in rows], texts, image_of, text_of))


class PaclScorer:
    """PACL head (patch tokens, pooled) on a frozen CLIP; score = <L2norm(sum_p a_p P_p), t> per option."""

    ROPE = False

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_family(model, scorer)
        self.options = parse_options(PaclOptions, scorer.options, scorer=scorer.name)
        self.encoder = FrozenClipEncoder(load_encoder(model))
        enc = self.encoder
        self.spec = HeadSpec(kind="pacl", vision_dim=enc.vision_dim, text_dim=enc.text_embed_dim,
                             embed_dim=self.options.embed_dim, rope=self.ROPE, num_patches=enc.num_patches)
        try:
            head = load_pacl_head(self.options.head_weights, self.spec, pooling=self.options.pacl_pooling)
        except HeadLoadError as exc:
            raise ConfigError(f"scorer.options.head_weights: {exc}") from None
        self.head: PaclHead = head.to(enc.bundle.device)

    def describe(self) -> dict[str, Any]:
        """What decides these scores besides the weights."""
        return describe_head(self, pooling=self.head.pooling)

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], texts: list[str], image_of: list[int], text_of: list[int]):
        """Diagonal scores (M,) for pairs (images[image_of[m]], texts[text_of[m]])."""
        device = self.encoder.bundle.device
        patches = self.head.project_patches(self.encoder.patch_tokens(self.encoder.pixels(images)))  # (B, N, E)
        _, pooled, _ = self.encoder.text_features(texts)
        text = self.head.project_text(pooled)  # (U, E)
        image_idx = torch.tensor(image_of, device=device)
        text_idx = torch.tensor(text_of, device=device)
        v = compute_pooled_visual(patches[image_idx], text[text_idx], self.head.pooling)  # (M, E)
        return compute_diagonal_scores(v, F.normalize(text[text_idx], dim=-1))

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        return score_diagonal_batch(self.score, batch)


class PaclRopeScorer(PaclScorer):
    """PACL head with 1-D RoPE on the frozen patch features (PROTOCOLS §5.3)."""

    ROPE = True


class SparcScorer:
    """SPARC head on a frozen CLIP; ``--local`` score <L2norm(mean_t e_t), g_t> per option (PROTOCOLS §3.5)."""

    ROPE = False

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_family(model, scorer)
        self.options = parse_options(SparcOptions, scorer.options, scorer=scorer.name)
        self.encoder = FrozenClipEncoder(load_encoder(model))
        enc = self.encoder
        self.spec = HeadSpec(kind="sparc", vision_dim=enc.vision_dim, text_dim=enc.text_width,
                             embed_dim=self.options.embed_dim, rope=self.ROPE, num_patches=enc.num_patches,
                             sigma=self.options.sparc_sigma)
        try:
            head = load_sparc_head(self.options.head_weights, self.spec)
        except HeadLoadError as exc:
            raise ConfigError(f"scorer.options.head_weights: {exc}") from None
        self.head: SparcHead = head.to(enc.bundle.device)
        eval_sigma = self.options.sparc_eval_sigma
        self.sigma = self.head.sigma if eval_sigma is None else eval_sigma

    def describe(self) -> dict[str, Any]:
        """What decides these scores besides the weights: the stored and the evaluated sigma among them."""
        opts = self.options
        return describe_head(self, sigma_stored=self.head.sigma, sigma_eval=self.sigma, local=opts.sparc_local,
                             mask_padding=opts.sparc_mask_padding)

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], texts: list[str], image_of: list[int], text_of: list[int]):
        """Diagonal scores (M,) for pairs (images[image_of[m]], texts[text_of[m]])."""
        device = self.encoder.bundle.device
        patches = self.head.project_patches(self.encoder.patch_tokens(self.encoder.pixels(images)))  # (B, N, E)
        ids, _, states = self.encoder.text_features(texts)  # (U, L), (U, L, W)
        image_idx = torch.tensor(image_of, device=device)
        text_idx = torch.tensor(text_of, device=device)
        out = self.head(None, states[text_idx], ids[text_idx], sigma=self.sigma, projected_patches=patches[image_idx])
        return compute_sparc_scores(out, local=self.options.sparc_local, mask_padding=self.options.sparc_mask_padding)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        return score_diagonal_batch(self.score, batch)


class SparcRopeScorer(SparcScorer):
    """SPARC head with 1-D RoPE on the frozen patch features (``sparc_rope.pth``; register as ``sparc_rope``)."""

    ROPE = True


# ---------------------------------------------------------------------------------------------------------------
# "+ stronger text encoder" (PROTOCOLS §5.5): the PACL head on LLM2CLIP's towers instead of the open_clip ones.

class PaclLlmTextScorer:
    """PACL+RoPE head on frozen LLM2CLIP: its ViT patches and LLM2Vec text through its adapter (PROTOCOLS §5.5).

    Vision: ``vision_model(...).last_hidden_state[:, 1:]`` (N x D_v, before post-LN) of LLM2CLIP's finetuned ViT on
    Resize((S, S)) + ImageNet-normalised pixels -> RoPE -> the PACL visual head. Text: LLM2Vec vector (online or from
    ``text_embeddings``) -> frozen adapter ``get_text_features`` (D_proj = 1280) -> LN -> Dropout -> Linear(D_proj, E).
    RoPE is part of the scorer kind (``pacl_rope_llm_all.pth`` is the paper's row); a stored spec must agree.
    """

    ROPE = True

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_family(model, scorer)
        self.options = parse_options(PaclLlmTextOptions, scorer.options, scorer=scorer.name)
        self.bundle = load_llm2clip(model, text_embeddings=self.options.text_embeddings,
                                    text_model=self.options.text_model, text_revision=self.options.text_revision)
        bundle = self.bundle
        self.spec = HeadSpec(kind="pacl", vision_dim=bundle.vision_dim, text_dim=bundle.projection_dim,
                             embed_dim=self.options.embed_dim, rope=self.ROPE, num_patches=bundle.num_patches)
        try:
            head = load_pacl_head(self.options.head_weights, self.spec, pooling=self.options.pacl_pooling)
        except HeadLoadError as exc:
            raise ConfigError(f"scorer.options.head_weights: {exc}") from None
        self.head: PaclHead = head.to(bundle.device)

    def describe(self) -> dict[str, Any]:
        """What decides these scores besides the weights."""
        return {"scorer": "pacl_llm_text", "head": "pacl", "rope": self.ROPE, "pooling": self.head.pooling,
                "embed_dim": self.spec.embed_dim, "image_size": list(self.bundle.image_size),
                "num_patches": self.spec.num_patches, "text_meta": self.bundle.text_meta,
                "text_store": self.bundle.text_store is not None,
                "transform": "ToTensor -> Resize((S, S)) -> ImageNet mean/std",
                "device": device_name(self.bundle.device), "score": "<v_j, t_j> of unit vectors"}

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, S, S): ToTensor -> Resize((S, S)) -> ImageNet mean/std (the head evaluation's transform)."""
        return torch.stack([compute_pixels(image, self.bundle.image_size) for image in images])

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], texts: list[str], image_of: list[int], text_of: list[int]):
        """Diagonal scores (M,) for pairs (images[image_of[m]], texts[text_of[m]])."""
        bundle = self.bundle
        patches = self.head.project_patches(bundle.vision_patches(self.pixels(images)))  # (B, N, E)
        vectors = encode_llm_checked(bundle, texts, self.options.text_batch_size)  # (U, D_llm)
        text = self.head.project_text(bundle.adapt_text(vectors).to(bundle.device))  # (U, E)
        image_idx = torch.tensor(image_of, device=bundle.device)
        text_idx = torch.tensor(text_of, device=bundle.device)
        v = compute_pooled_visual(patches[image_idx], text[text_idx], self.head.pooling)  # (M, E)
        return compute_diagonal_scores(v, F.normalize(text[text_idx], dim=-1))

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        return score_diagonal_batch(self.score, batch)
