"""PACL head on frozen CLIP features: patch/text projections, pooling, InfoNCE loss, diagonal scores (PROTOCOLS §5.2).

Also home of what every head shares: the ``HeadSpec`` (architecture, stored as safetensors metadata beside the
weights), saving, and loading of both our files and the reference's released DataParallel state dicts
(``pacl_all.pth`` etc.: ``module.``-prefixed, frozen ``clip_model.*`` weights included). The architecture always
comes from an explicit spec, never from a file name.

Shapes: B pairs, N patches (576 for ViT-L/14-336), Dv vision width (1024), Dt text width (768), E head width (768).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ray.models.heads.rope import compute_rope

PaclPooling = Literal["uniform", "sigmoid"]
HeadKind = Literal["pacl", "sparc"]
POOLINGS: tuple[str, ...] = ("uniform", "sigmoid")
TEMPERATURE = 0.1
METADATA_KEY = "perceive_ray_head"  # safetensors metadata key holding the HeadSpec as JSON
SIGMOID_SCALE = 10.0  # the reference squashes cos(P_p, t) in [-1, 1] through sigmoid(10 x)


class HeadLoadError(ValueError):
    """A head weights file is missing, unreadable, or does not fit the configured architecture."""


@dataclass(frozen=True)
class HeadSpec:
    """A head's architecture and the choices stored with its weights (explicit, never guessed from a file name).

    ``sigma`` (SPARC only) is the alignment threshold used for training and eval alike (default 1/num_patches);
    ``pooling`` (PACL only) is the pooling the head was trained with, ``None`` when unknown (released weights).
    """

    kind: HeadKind
    vision_dim: int
    text_dim: int
    embed_dim: int = 768
    rope: bool = False
    num_patches: int = 576
    sigma: float | None = None
    pooling: PaclPooling | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("pacl", "sparc"):
            raise ValueError(f"unknown head kind {self.kind!r}")
        if self.rope and self.vision_dim % 2:
            raise ValueError(f"RoPE needs an even vision width, got {self.vision_dim}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.sigma is not None and not 0.0 <= self.sigma < 1.0:
            raise ValueError(f"sigma must be in [0, 1), got {self.sigma}")

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> HeadSpec | None:
        if not metadata or METADATA_KEY not in metadata:
            return None
        data = json.loads(metadata[METADATA_KEY])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HeadLoadError(f"head metadata has unknown fields {unknown}")
        return cls(**data)


class PatchProjection(nn.Module):
    """Linear(Dv, E) + [Linear(Dv, E) -> GELU -> Linear(E, E)], the two branches summed (reference names kept)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_projection = nn.Sequential(nn.Linear(in_dim, out_dim))
        self.non_linear_projection = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_projection(x) + self.non_linear_projection(x)


def build_visual_projection(vision_dim: int, embed_dim: int, dropout: float) -> nn.Sequential:
    """LN(Dv) -> Dropout -> PatchProjection; index layout matches the reference's ``visual_projection``."""
    return nn.Sequential(nn.LayerNorm(vision_dim), nn.Dropout(dropout), PatchProjection(vision_dim, embed_dim))


def build_text_projection(text_dim: int, embed_dim: int, dropout: float) -> nn.Sequential:
    """LN(Dt) -> Dropout -> Linear(Dt, E); index layout matches the reference's ``text_projection``."""
    return nn.Sequential(nn.LayerNorm(text_dim), nn.Dropout(dropout), nn.Linear(text_dim, embed_dim))


class PaclHead(nn.Module):
    """Trainable PACL head: frozen patches (+ RoPE) -> visual projection; pooled CLIP text -> text projection."""

    def __init__(self, spec: HeadSpec, *, dropout: float = 0.1, pooling: PaclPooling | None = None) -> None:
        super().__init__()
        if spec.kind != "pacl":
            raise ValueError(f"PaclHead needs a 'pacl' spec, got {spec.kind!r}")
        self.pooling: PaclPooling = pooling or spec.pooling or "uniform"
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.spec = replace(spec, pooling=self.pooling)  # saved with the weights: the pooling it was trained with
        self.visual_projection = build_visual_projection(spec.vision_dim, spec.embed_dim, dropout)
        self.text_projection = build_text_projection(spec.text_dim, spec.embed_dim, dropout)

    def project_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) frozen post-ln_post patches -> (B, N, E); RoPE first when the spec says so."""
        if self.spec.rope:
            patches = compute_rope(patches)
        return self.visual_projection(patches)

    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, Dt) pooled, projected CLIP text embedding -> (B, E)."""
        return self.text_projection(text)

    def forward(self, patches: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's image with row b's text -> L2-normalised (v_b, t_b), each (B, E)."""
        projected = self.project_patches(patches)  # (B, N, E)
        text_embed = self.project_text(text)  # (B, E)
        return compute_pooled_visual(projected, text_embed, self.pooling), F.normalize(text_embed, dim=-1)


def compute_patch_activations(patches: torch.Tensor, text: torch.Tensor, pooling: PaclPooling) -> torch.Tensor:
    """Per-patch weights (B, N): ones (``uniform``) or sigmoid(10 cos(P_p, t)) (``sigmoid``)."""
    if pooling == "uniform":
        return patches.new_ones(patches.shape[:-1])
    if pooling == "sigmoid":
        cos = torch.einsum("bnd,bd->bn", F.normalize(patches, dim=-1), F.normalize(text, dim=-1))  # (B, N)
        return torch.sigmoid(SIGMOID_SCALE * cos)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def compute_pooled_visual(patches: torch.Tensor, text: torch.Tensor, pooling: PaclPooling) -> torch.Tensor:
    """v = L2norm(sum_p a_p P_p) for projected patches (B, N, E) and projected text (B, E) -> (B, E)."""
    weights = compute_patch_activations(patches, text, pooling)  # (B, N)
    return F.normalize(torch.einsum("bn,bnd->bd", weights, patches), dim=-1)


def compute_contrastive_loss(image: torch.Tensor, text: torch.Tensor, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE with fixed temperature: mean of CE(v t^T / tau, diag) and CE(t v^T / tau, diag)."""
    logits = image @ text.T / temperature  # (B, B): rows images, columns texts
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def compute_diagonal_scores(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """score_j = <v_j, t_j> for text-conditioned pairs (B, E), (B, E) -> (B,) (PROTOCOLS §3.5)."""
    return (image * text).sum(dim=-1)


def save_head(head: nn.Module, path: str | Path) -> Path:
    """Write ``head``'s weights as safetensors with its HeadSpec in the file's metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    save_file(state, str(path), metadata=head.spec.to_metadata())
    return path


def load_head_file(path: str | Path) -> tuple[dict[str, torch.Tensor], HeadSpec | None]:
    """Read a head weights file (safetensors, or a torch pickle with ``weights_only=True``): state and stored spec.

    The state is cleaned for the head modules: ``module.`` (DataParallel) stripped, the frozen ``clip_model.*``
    encoder weights dropped, and the reference's aliased ``visual_projection.2.text_projection`` (the same module as
    ``linear_projection``) folded in.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadLoadError(f"{path}: head weights file not found")
    spec = None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                spec = HeadSpec.from_metadata(handle.metadata())
                state = {name: handle.get_tensor(name) for name in handle.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except HeadLoadError:
        raise
    except Exception as exc:  # corrupt file, pickle with objects, bad metadata
        raise HeadLoadError(f"{path}: cannot read head weights: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadLoadError(f"{path}: expected a state dict of tensors")
    return clean_reference_state(state, source=str(path)), spec


def clean_reference_state(state: dict[str, torch.Tensor], *, source: str = "<state>") -> dict[str, torch.Tensor]:
    """Strip ``module.``, drop ``clip_model.*``, fold the reference's aliased patch-projection keys (see above)."""
    cleaned: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        name = name.removeprefix("module.")
        if name.startswith("clip_model.") or name.startswith("llmclip_model."):
            continue  # frozen encoder weights: the encoder comes from the model config
        cleaned[name] = tensor
    alias, target = "visual_projection.2.text_projection.", "visual_projection.2.linear_projection."
    for name in [n for n in cleaned if n.startswith(alias)]:
        tensor = cleaned.pop(name)
        twin = target + name[len(alias):]
        if twin in cleaned and not torch.equal(cleaned[twin], tensor):
            raise HeadLoadError(f"{source}: {name} differs from {twin}; they are one module in the reference")
        cleaned.setdefault(twin, tensor)
    return cleaned


def load_state_into(head: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Strict load with a readable error naming the missing / unexpected / mis-shaped keys."""
    own = head.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs head {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{source}: weights do not fit the configured {head.spec.kind} head ({head.spec})"]
        if missing:
            parts.append(f"  missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"  unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        parts.extend(f"  shape {s}" for s in shapes[:8])
        raise HeadLoadError("\n".join(parts))
    head.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def check_spec(configured: HeadSpec, stored: HeadSpec | None, *, source: str, ignore: tuple[str, ...] = ()) -> None:
    """The file's stored spec (if any) must agree with the configured architecture (fields in ``ignore`` aside)."""
    if stored is None:
        return
    diffs = [f"{f.name}: configured {getattr(configured, f.name)!r}, file {getattr(stored, f.name)!r}"
             for f in fields(HeadSpec) if f.name not in ignore and getattr(configured, f.name) != getattr(stored, f.name)]
    if diffs:
        raise HeadLoadError(f"{source}: stored head spec disagrees with the configuration:\n  " + "\n  ".join(diffs))


def load_pacl_head(path: str | Path, spec: HeadSpec, *, pooling: PaclPooling | None = None) -> PaclHead:
    """A PaclHead for ``spec`` (eval mode) with the weights of ``path``; a stored spec must agree with ``spec``."""
    state, stored = load_head_file(path)
    check_spec(spec, stored, source=str(path), ignore=("sigma", "pooling"))
    head = PaclHead(spec if stored is None else stored, pooling=pooling)
    load_state_into(head, state, source=str(path))
    return head.eval()

