"""Scoring rows from a manifest and image decoding: image refs under a root -> RGB uint8 arrays (H, W, 3).

A scoring row is one (item, image) with ALL of the item's candidate texts, so a scorer sees every candidate of an
image together (the shared-prefix VQAScore path needs that) and a batch never splits an image's candidates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from perceive_ray.data.manifest import Manifest

PAD_COLOUR = (122, 116, 104)  # int(255 * CLIP mean), LLaVA's expand2square background


class ImageError(ValueError):
    """An image cannot be read or decoded; the message names the file."""


def scoring_rows(manifest: Manifest, *, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per (item, image) of the first ``limit`` items: ids, the image path, all texts, item context."""
    items = manifest.items if limit is None else manifest.items[:limit]
    rows = []
    for item in items:
        meta = json.dumps(dict(item.meta), sort_keys=True, ensure_ascii=False)
        for image_index, image_path in enumerate(item.images):
            rows.append(
                {
                    "benchmark": manifest.benchmark,
                    "item_id": item.item_id,
                    "image_index": image_index,
                    "image_path": image_path,
                    "texts": list(item.texts),
                    "subset": item.subset,
                    "group": item.group,
                    "meta": meta,
                }
            )
    return rows


def load_rgb(root: str | Path, rel: str) -> np.ndarray:
    """Decode ``root/rel`` to an RGB uint8 array (H, W, 3).

    ``.npy`` frames (EqBen YouCook2) are stored BGR (OpenCV order) and are flipped to RGB.
    """
    path = Path(root) / rel
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim != 3 or array.shape[2] != 3:
                raise ImageError(f"{path}: expected an (H, W, 3) array, got shape {array.shape}")
            return np.ascontiguousarray(array[..., ::-1]).astype(np.uint8)
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{path}: cannot decode image: {exc}") from exc


def to_pil(array: np.ndarray) -> Image.Image:
    """RGB uint8 (H, W, 3) -> PIL image (what open_clip / HF processors expect)."""
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))


def pad_to_square(image: Image.Image, colour: tuple[int, int, int] = PAD_COLOUR) -> Image.Image:
    """Paste centred on a max(W, H) square of ``colour``; the short-axis offset is floor(|W - H| / 2)."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
