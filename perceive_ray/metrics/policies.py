"""Tie policies and the label-errata switch, defined once (PROTOCOLS §0): config, CLI and metrics all read these."""

from __future__ import annotations

from typing import Literal, get_args

TiePolicy = Literal["strict", "argmax_first", "mmvp_reference"]
LabelErrata = Literal["original", "corrected"]

TIE_POLICIES: tuple[str, ...] = get_args(TiePolicy)
LABEL_ERRATA: tuple[str, ...] = get_args(LabelErrata)
# The policies every choice-style metric implements; ``mmvp_reference`` is MMVP's own rule (PROTOCOLS §2.3).
GENERIC_TIE_POLICIES: tuple[str, ...] = ("strict", "argmax_first")
