"""Frozen CLIP features for the heads (PACL, SPARC) and their training: patch tokens, text states, head pixels.

The frozen open_clip encoder gives the N post-``ln_post`` patch tokens (576 x 1024 for ViT-L/14-336, before the
visual projection) and, per text, the pooled projected embedding (PACL) or all T ``ln_final`` token states (SPARC).
Head images are preprocessed as the reference's head evaluation does: ToTensor -> Resize((S, S)) (bilinear,
antialiased, aspect-distorting, no crop) -> ImageNet mean/std (PROTOCOLS §3.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from perceive_ray.config import ConfigError, ModelConfig
from perceive_ray.models.clip import ClipBundle, load_clip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
