"""1-D rotary position embedding over raster patch positions, applied to frozen patch features (PROTOCOLS §5.3).

For a feature x in R^d at raster position p (row-major, 0..N-1; 0..575 for a 24x24 grid) and k = 0 .. d/2-1:
phi = p * base^(-2k/d); out[k] = x[2k] cos phi - x[2k+1] sin phi; out[d/2 + k] = x[2k] sin phi + x[2k+1] cos phi.
The output is laid out as [even-half || odd-half], not interleaved: the released ``*_rope*`` heads were trained on
that layout. At p = 0 nothing is rotated, so the output is x with its even and odd coordinates de-interleaved
(the same fixed permutation as at every other position). RoPE acts on the frozen features before the trainable
head: never on text, on CLS, or inside attention.
"""

from __future__ import annotations

import torch

ROPE_BASE = 10000.0


def compute_rope_angles(num_positions: int, dim: int, *, base: float = ROPE_BASE) -> torch.Tensor:
    """phi[p, k] = p * base^(-2k/dim) as float32 (the reference's arithmetic), shape (num_positions, dim/2)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even feature dimension, got {dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    positions = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)  # (N, 1)
    return positions * inv_freq  # (N, dim/2)


def compute_rope(features: torch.Tensor, *, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotate ``features`` (..., N, d) by their position along dim -2; returns (..., N, d) in [even || odd] layout."""
    num_positions, dim = features.shape[-2], features.shape[-1]
    angles = compute_rope_angles(num_positions, dim, base=base).to(features.device)  # (N, d/2)
    cos, sin = angles.cos().to(features.dtype), angles.sin().to(features.dtype)
    even, odd = features[..., 0::2], features[..., 1::2]  # (..., N, d/2) each
    return torch.cat([even * cos - odd * sin, even * sin + odd * cos], dim=-1)


def compute_rope_layout(features: torch.Tensor) -> torch.Tensor:
    """The [even || odd] permutation RoPE applies at every position: what position 0 returns exactly."""
    return torch.cat([features[..., 0::2], features[..., 1::2]], dim=-1)
