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
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.models.clip import ClipBundle, load_clip
from perceive_ray.models.heads.pacl import (
    HeadLoadError,
    HeadSpec,
    PaclHead,
    compute_diagonal_scores,
    compute_pooled_visual,
    load_pacl_head,
)
from perceive_ray.models.heads.sparc import SparcHead, compute_sparc_scores, load_sparc_head
from perceive_ray.scoring.base import ScorerOptions, ScoreRows, iter_rows, parse_options
from perceive_ray.scoring.llm2clip import (
    Llm2ClipTextOptions,
    check_llm2clip_family,
    encode_llm_checked,
    load_llm2clip_for,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PaclOptions(ScorerOptions):
    """``scorer.options`` of ``pacl`` / ``pacl_rope``."""

    head_weights: str
    embed_dim: int = Field(default=768, gt=0)
    # None: the pooling stored with the weights, else ``uniform`` (the released forward); ``sigmoid`` = compat.
    pacl_pooling: Literal["uniform", "sigmoid"] | None = None


class SparcOptions(ScorerOptions):
    """``scorer.options`` of ``sparc`` / ``sparc_rope``."""

    head_weights: str
    embed_dim: int = Field(default=768, gt=0)
    # sigma for weights that store none (released .pth); default 1/num_patches. Must match a stored sigma.
    sparc_sigma: float | None = Field(default=None, ge=0.0, lt=1.0)
    # Compatibility override at eval only: 1/625 reproduces the reference's shipped SPARC evaluation.
    sparc_eval_sigma: float | None = Field(default=None, ge=0.0, lt=1.0)
    sparc_mask_padding: bool = False
    sparc_local: bool = True


def load_encoder(model: ModelConfig) -> ClipBundle:
    """The frozen open_clip encoder (the one CLIP loader, same path for real and tiny models)."""
    return load_clip(model)


def compute_pixels(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, S_h, S_w): ToTensor -> Resize((S, S)) bilinear antialiased -> ImageNet norm.

    Equal to torchvision's ``Compose([ToTensor(), Resize((S, S)), Normalize(...)])`` on the tensor path.
    """
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0
    resized = F.interpolate(tensor.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (resized[0] - mean) / std


class FrozenClipEncoder:
    """Patch tokens and text features of a frozen open_clip ``CLIP`` with a ViT image tower."""

    def __init__(self, bundle: ClipBundle) -> None:
        clip = bundle.model
        visual = getattr(clip, "visual", None)
        supported = (
            visual is not None
            and hasattr(visual, "ln_post")
            and hasattr(visual, "grid_size")
            and getattr(visual, "attn_pool", None) is None
            and not getattr(visual, "final_ln_after_pool", False)
            and getattr(visual, "pool_type", None) == "tok"
            and hasattr(clip, "ln_final")
            and hasattr(clip, "token_embedding")
        )
        if not supported:
            raise ConfigError(
                f"model.source: heads need an open_clip CLIP with a class-token ViT image tower and the built-in text "
                f"tower; {bundle.name!r} is not one"
            )
        self.bundle = bundle
        self.model = clip
        size = visual.image_size
        self.image_size = (int(size[0]), int(size[1]))
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        self.vision_dim = int(visual.ln_post.normalized_shape[0])
        self.text_width = int(clip.ln_final.normalized_shape[0])
        self.text_embed_dim = int(bundle.embed_dim)

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, S, S) float32 on CPU."""
        return torch.stack([compute_pixels(image, self.image_size) for image in images])

    @torch.inference_mode()
    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, Dv) fp32 post-``ln_post`` patch tokens (CLS dropped, before the projection)."""
        visual, bundle = self.model.visual, self.bundle
        previous = visual.output_tokens
        visual.output_tokens = True  # the tower then returns (pooled, tokens); restored below
        try:
            _, tokens = visual(pixels.to(bundle.device, bundle.dtype))
        finally:
            visual.output_tokens = previous
        if tokens.shape[1] != self.num_patches:
            raise RuntimeError(f"expected {self.num_patches} patch tokens, got {tokens.shape[1]}")
        return tokens.float()

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T texts -> token ids (T, L), pooled projected embedding (T, E_clip), ``ln_final`` states (T, L, W), fp32.

        Mirrors ``CLIP.encode_text`` step by step so the per-token states are the ones its pooling reads.
        """
        from open_clip.transformer import text_global_pool

        clip, bundle = self.model, self.bundle
        ids = bundle.tokenizer(texts).to(bundle.device)  # (T, L), truncated to the context length
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(ids).to(cast) + clip.positional_embedding.to(cast)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))  # (T, L, W)
        pooled = text_global_pool(x, ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            pooled = clip.text_projection(pooled) if isinstance(clip.text_projection, torch.nn.Linear) \
                else pooled @ clip.text_projection
        return ids, pooled.float(), x.float()


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


def score_diagonal_batch(score, batch: Mapping[str, Any]) -> dict[str, list]:
    """Run a head scorer's ``score(images, texts, image_of, text_of)`` over a batch of scoring rows."""
    rows = list(iter_rows(batch))
    if not rows:
        return ScoreRows().to_batch()
    texts, image_of, text_of = collect_pairs(rows)
    return write_rows(rows, score([row["image"] for row in rows], texts, image_of, text_of))


def check_family(model: ModelConfig, scorer: ScorerConfig) -> None:
    if model.family != "clip":
        raise ConfigError(f"model.family: scorer {scorer.name!r} needs a 'clip' model, got {model.family!r}")


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

class PaclLlmTextOptions(PaclOptions, Llm2ClipTextOptions):
    """``scorer.options`` of ``pacl_llm_text``: the PACL options plus where the LLM2Vec text vectors come from."""


class PaclLlmTextScorer:
    """PACL+RoPE head on frozen LLM2CLIP: its ViT patches and LLM2Vec text through its adapter (PROTOCOLS §5.5).

    Vision: ``vision_model(...).last_hidden_state[:, 1:]`` (N x D_v, before post-LN) of LLM2CLIP's finetuned ViT on
    Resize((S, S)) + ImageNet-normalised pixels -> RoPE -> the PACL visual head. Text: LLM2Vec vector (online or from
    ``text_embeddings``) -> frozen adapter ``get_text_features`` (D_proj = 1280) -> LN -> Dropout -> Linear(D_proj, E).
    RoPE is part of the scorer kind (``pacl_rope_llm_all.pth`` is the paper's row); a stored spec must agree.
    """

    ROPE = True

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_llm2clip_family(model, scorer)
        self.options = parse_options(PaclLlmTextOptions, scorer.options, scorer=scorer.name)
        self.bundle = load_llm2clip_for(model, self.options)
        bundle = self.bundle
        self.spec = HeadSpec(kind="pacl", vision_dim=bundle.vision_dim, text_dim=bundle.projection_dim,
                             embed_dim=self.options.embed_dim, rope=self.ROPE, num_patches=bundle.num_patches)
        try:
            head = load_pacl_head(self.options.head_weights, self.spec, pooling=self.options.pacl_pooling)
        except HeadLoadError as exc:
            raise ConfigError(f"scorer.options.head_weights: {exc}") from None
        self.head: PaclHead = head.to(bundle.device)

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
