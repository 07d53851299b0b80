"""Counter-based randomness keyed by (seed, purpose, ids...): no draw depends on worker count or order (§0)."""

from __future__ import annotations

import hashlib

import numpy as np


def keyed_seed(seed: int, *keys: object) -> int:
    """A 64-bit seed derived from ``seed`` and the keys (e.g. epoch, sample id, purpose) by SHA-256."""
    text = "\x1f".join([str(int(seed)), *(repr(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def keyed_rng(seed: int, *keys: object) -> np.random.Generator:
    """An independent Philox generator for one (seed, keys) tuple."""
    return np.random.Generator(np.random.Philox(key=keyed_seed(seed, *keys)))
