"""SPARC head on frozen CLIP features: token-to-patch alignment, global + local losses, ``--local`` scores (§5.4, §3.5).

Text side: all T (77) ``ln_final`` token states (unprojected, Dt = 768) -> LN -> Dropout -> Linear -> E, valid tokens
are positions <= EOT (argmax of the token ids). Patch side: the PACL visual projection of the frozen patches (RoPE
first in the rope variant). Alignment: sim[t, p] = <T_t, P_p> (unnormalised), min-max normalised over p, entries
below sigma zeroed, renormalised to sum 1 over p -> w[t, p]; grouped e_t = L2norm(sum_p w[t, p] P_p).

sigma is part of the HeadSpec stored with the weights (default 1/num_patches = 1/576, the training script's value);
``sigma=`` at call time is the ``sparc_eval_sigma`` compatibility override (1/625 reproduces the shipped eval).
Padding: the global text embedding averages all T normalised tokens, padding included as in the reference, unless
``mask_padding`` (``sparc_mask_padding``) is set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ray.models.heads.pacl import (
    TEMPERATURE,
    HeadLoadError,
    HeadSpec,
    build_text_projection,
    build_visual_projection,
    check_spec,
    load_head_file,
    load_state_into,
)
from perceive_ray.models.heads.rope import compute_rope

GLOBAL_WEIGHT = 0.5
LOCAL_WEIGHT = 1.0
EPS = 1e-8  # the reference's epsilon in the min-max and renormalisation denominators
MASKED_LOGIT = -1e8  # the reference's additive mask for invalid token columns


@dataclass
class SparcOutput:
    """One forward pass over B (image, text) pairs; T text positions, N patches, E head width."""

    patch_embed: torch.Tensor  # (B, N, E) projected patches, not normalised
    token_embed: torch.Tensor  # (B, T, E) L2-normalised token embeddings
    grouped: torch.Tensor  # (B, T, E) L2-normalised language-grouped patch embeddings
    language_mask: torch.Tensor  # (B, T) float: 1 for positions <= EOT
    weights: torch.Tensor  # (B, T, N) alignment weights


class SparcLossTerms(NamedTuple):
    total: torch.Tensor
    global_loss: torch.Tensor
    local_loss: torch.Tensor


def resolve_sigma(spec: HeadSpec) -> float:
    """The stored sigma, or 1/num_patches when none was stored."""
    return spec.sigma if spec.sigma is not None else 1.0 / spec.num_patches


class SparcHead(nn.Module):
    """Trainable SPARC head: frozen patches (+ RoPE) and frozen text token states -> aligned embeddings."""

    def __init__(self, spec: HeadSpec, *, dropout: float = 0.1) -> None:
        super().__init__()
        if spec.kind != "sparc":
            raise ValueError(f"SparcHead needs a 'sparc' spec, got {spec.kind!r}")
        self.spec = replace(spec, sigma=resolve_sigma(spec))  # sigma made explicit so it is saved with the weights
        self.visual_projection = build_visual_projection(spec.vision_dim, spec.embed_dim, dropout)
        self.text_projection = build_text_projection(spec.text_dim, spec.embed_dim, dropout)

    @property
    def sigma(self) -> float:
        return float(self.spec.sigma)

    def project_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) frozen post-ln_post patches -> (B, N, E); RoPE first when the spec says so."""
        if self.spec.rope:
            patches = compute_rope(patches)
        return self.visual_projection(patches)

    def forward(
        self,
        patches: torch.Tensor | None,
        text_tokens: torch.Tensor,
        token_ids: torch.Tensor,
        *,
        sigma: float | None = None,
        projected_patches: torch.Tensor | None = None,
    ) -> SparcOutput:
        """Row b's image with row b's text. ``projected_patches`` (B, N, E) skips re-projecting shared images."""
        if projected_patches is None:
            if patches is None:
                raise ValueError("give patches (B, N, Dv) or projected_patches (B, N, E)")
            projected_patches = self.project_patches(patches)
        patch_embed = projected_patches
        return compute_sparc_alignment(
            patch_embed,
            self.text_projection(text_tokens),  # (B, T, E)
            compute_language_mask(token_ids),
            sigma=self.sigma if sigma is None else sigma,
        )


def compute_language_mask(token_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) float mask of positions <= EOT, EOT = argmax of the ids (the highest id in CLIP's vocabulary)."""
    eot = token_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
    positions = torch.arange(token_ids.shape[-1], device=token_ids.device).unsqueeze(0)  # (1, T)
    return (positions <= eot).float()


def compute_alignment_weights(similarity: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, T, N) raw similarities -> weights: min-max over N, zero below sigma, renormalise to sum 1 over N."""
    low = similarity.min(dim=-1, keepdim=True).values
    high = similarity.max(dim=-1, keepdim=True).values
    scaled = (similarity - low) / (high - low + EPS)
    scaled = torch.where(scaled < sigma, torch.zeros_like(scaled), scaled)
    return scaled / (scaled.sum(dim=-1, keepdim=True) + EPS)


def compute_sparc_alignment(
    patch_embed: torch.Tensor, token_embed: torch.Tensor, language_mask: torch.Tensor, *, sigma: float
) -> SparcOutput:
    """Grouped patch embeddings per text token from projected patches (B, N, E) and projected tokens (B, T, E)."""
    similarity = torch.einsum("btd,bpd->btp", token_embed, patch_embed)  # (B, T, N), unnormalised
    weights = compute_alignment_weights(similarity, sigma)
    grouped = F.normalize(torch.einsum("btp,bpd->btd", weights, patch_embed), dim=-1)  # (B, T, E)
    return SparcOutput(
        patch_embed=patch_embed,
        token_embed=F.normalize(token_embed, dim=-1),
        grouped=grouped,
        language_mask=language_mask,
        weights=weights,
    )


def compute_token_mean(values: torch.Tensor, language_mask: torch.Tensor, *, mask_padding: bool) -> torch.Tensor:
    """Mean over T of (B, T, E): all positions (reference) or only positions <= EOT (``mask_padding``)."""
    if not mask_padding:
        return values.mean(dim=1)
    mask = language_mask.unsqueeze(-1)  # (B, T, 1)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def compute_global_features(out: SparcOutput, *, mask_padding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """g_v = L2norm(mean_p P_p), g_t = L2norm(mean_t T^_t), each (B, E)."""
    image = F.normalize(out.patch_embed.mean(dim=1), dim=-1)
    text = F.normalize(compute_token_mean(out.token_embed, out.language_mask, mask_padding=mask_padding), dim=-1)
    return image, text


def compute_masked_pairwise_loss(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, *, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """Per sample: logits <a_m, b_n>/tau (B, T, T), invalid columns -1e8, CE to the diagonal, mean over valid rows."""
    batch, length, _ = a.shape
    logits = torch.einsum("bmd,bnd->bmn", a, b) / temperature + (1.0 - mask).unsqueeze(1) * MASKED_LOGIT
    targets = torch.arange(length, device=a.device).repeat(batch)  # (B*T,)
    loss = F.cross_entropy(logits.reshape(batch * length, length), targets, reduction="none")
    flat = mask.reshape(-1)
    return (loss * flat).sum() / flat.sum()


def compute_sparc_loss(
    out: SparcOutput,
    *,
    temperature: float = TEMPERATURE,
    global_weight: float = GLOBAL_WEIGHT,
    local_weight: float = LOCAL_WEIGHT,
    mask_padding: bool = False,
) -> SparcLossTerms:
    """0.5 x symmetric global InfoNCE + 1.0 x mean of the two local directions, tau 0.1 (PROTOCOLS §5.4)."""
    image, text = compute_global_features(out, mask_padding=mask_padding)
    logits = image @ text.T / temperature  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    global_loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    local_loss = (
        compute_masked_pairwise_loss(out.grouped, out.token_embed, out.language_mask, temperature=temperature)
        + compute_masked_pairwise_loss(out.token_embed, out.grouped, out.language_mask, temperature=temperature)
    ) / 2
    return SparcLossTerms(global_weight * global_loss + local_weight * local_loss, global_loss, local_loss)


def compute_sparc_scores(out: SparcOutput, *, local: bool = True, mask_padding: bool = False) -> torch.Tensor:
    """Diagonal scores (B,): <v, g_t> with v = L2norm(mean_t e_t) (``local``, always used) or g_v (not local).

    The mean over t covers all T positions, padding included, unless ``mask_padding`` (a head trained with masked
    padding never learned the padding positions, so they are excluded from both means).
    """
    image, text = compute_global_features(out, mask_padding=mask_padding)
    if local:
        image = F.normalize(compute_token_mean(out.grouped, out.language_mask, mask_padding=mask_padding), dim=-1)
    return (image * text).sum(dim=-1)


def load_sparc_head(path: str | Path, spec: HeadSpec) -> SparcHead:
    """A SparcHead (eval mode) with the weights of ``path``.

    sigma: the file's stored value, else ``spec.sigma``, else 1/num_patches; a file value that disagrees with an
    explicitly configured ``spec.sigma`` is an error (use the eval-time override for compatibility runs).
    """
    state, stored = load_head_file(path)
    check_spec(spec, stored, source=str(path), ignore=("sigma", "pooling"))
    if stored is not None and spec.sigma is not None and stored.sigma is not None and stored.sigma != spec.sigma:
        raise HeadLoadError(
            f"{path}: stored sigma {stored.sigma!r} differs from configured sparc_sigma {spec.sigma!r}; "
            "use sparc_eval_sigma to evaluate with another sigma"
        )
    sigma = stored.sigma if stored is not None and stored.sigma is not None else spec.sigma
    head = SparcHead(replace(spec, sigma=sigma))
    load_state_into(head, state, source=str(path))
    return head.eval()
