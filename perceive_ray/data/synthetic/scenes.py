"""Seeded scene specs for the synthetic benchmark: objects, boxes, draw order and the relations they imply.

Pure: no drawing and no IO. Every scene is built from its own generator keyed by (seed, purpose, ...) so any
scene can be rebuilt alone, and the relation a caption states is *derived* from the geometry
(``derive_relation``), never only asserted: ``build_scene`` fails if its boxes imply another relation.

Coordinates are pixels on a square canvas of ``CANVAS`` px, x to the right, y downwards; boxes are
``(x0, y0, x1, y1)`` with x1/y1 exclusive.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

from perceive_ray.data.benchmarks.mmvp import MMVP_VLM_CATEGORIES

CANVAS = 80  # px; small so that a few hundred images take well under a second each to write

# Object colours (RGB). No name is (or contains as a whitespace token) a relation word, so the 2-way rule of
# PROTOCOLS §2.1 sees exactly one relation word per caption; "orange" only contains "on" as a substring.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 160, 60),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
    "cyan": (30, 190, 200),
    "pink": (240, 120, 180),
    "black": (30, 30, 30),
}
SHAPES_2D = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
)  # subset A (side view on a table), LLaVA split
SHAPES_3D = ("cube", "sphere", "cylinder")  # subset B (CLEVR-like floor with depth)

RELATION_WORDS = frozenset({"on", "under", "front", "behind", "left", "right"})
KIND_RELATIONS = {"A": ("on", "under", "left", "right"), "B": ("in-front", "behind", "left", "right")}
RELATION_PHRASES = {
    "on": "on",
    "under": "under",
    "left": "to the left of",
    "right": "to the right of",
    "in-front": "in front of",
    "behind": "behind",
}
OPPOSITE = {
    "on": "under",
    "under": "on",
    "left": "right",
    "right": "left",
    "in-front": "behind",
    "behind": "in-front",
}

GROUND_A = 68  # px: y of the table top in subset A; resting objects have y1 == GROUND_A
HORIZON_B = 30  # px: y of the floor's far edge in subset B
BASE_B = {"far": 62, "mid": 68, "near": 76}  # px: y1 of an object standing at each depth
SCALE_B = {"far": 0.7, "mid": 0.85, "near": 1.0}  # perspective: apparent size relative to the near size
# px: full (near) object sizes. In B the smallest near object (18) still exceeds the largest far one
# (0.7 * 24 -> 17) and its top (76 - 18 = 58) lies 4 px above the far base (62), so it always overlaps the far
# one in height; ``build_scene`` sets the horizontal overlap.
SIDE_RANGE = {"A": (16, 24), "B": (18, 24)}
DEPTH_MIN_GAP = 4  # px: bases closer than this count as the same depth


def make_rng(seed: int, *purpose: object) -> random.Random:
    """A generator keyed by (seed, purpose...): independent of global state, call order and PYTHONHASHSEED."""
    key = "/".join([str(seed), *(str(p) for p in purpose)]).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) px, x1/y1 exclusive
    z: int = 0  # draw order: higher is drawn later, over lower ones

    @property
    def name(self) -> str:
        """Caption form, e.g. ``red circle``."""
        return f"{self.colour} {self.shape}"

    @property
    def token(self) -> str:
        """Filename form (What'sUp grammar: words joined by hyphens), e.g. ``red-circle``."""
        return f"{self.colour}-{self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


@dataclass(frozen=True)
class Scene:
    kind: str  # "A" (side view, stacking) or "B" (floor with depth)
    relation: str  # relation key of objects[0] (obj1) to objects[1] (obj2), as derived from the boxes
    objects: tuple[SceneObject, SceneObject]
    size: int = CANVAS

    @property
    def caption(self) -> str:
        return caption_for(self.objects[0].name, self.relation, self.objects[1].name)

    @property
    def filename(self) -> str:
        """What'sUp grammar ``obj1_relation[_of]_obj2.jpeg``; "of" after left/right/in-front."""
        obj1, obj2 = self.objects
        joiner = "_of" if self.relation in ("left", "right", "in-front") else ""
        return f"{obj1.token}_{self.relation}{joiner}_{obj2.token}.jpeg"


def caption_for(name1: str, relation: str, name2: str) -> str:
    """What'sUp style: capital "A", and "a" before obj2 whatever its first letter (as the real data does)."""
    return f"A {name1} {RELATION_PHRASES[relation]} a {name2}"


def with_article(name: str) -> str:
    """English indefinite article, for the MMVP-VLM and LLaVA texts: "an orange square"."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def phrase_for(name1: str, relation: str, name2: str) -> str:
    """Lower-case noun phrase with proper articles: "an orange star to the left of a red circle"."""
    return f"{with_article(name1)} {RELATION_PHRASES[relation]} {with_article(name2)}"


def pick_object_pairs(seed: int, kind: str, n: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``n`` distinct ordered (colour, shape) pairs whose objects differ in both colour and shape."""
    shapes = SHAPES_3D if kind == "B" else SHAPES_2D
    objects = list(itertools.product(COLOURS, shapes))
    candidates = [(a, b) for a, b in itertools.product(objects, objects) if a[0] != b[0] and a[1] != b[1]]
    if n > len(candidates):
        raise ValueError(
            f"at most {len(candidates)} distinct object pairs exist for subset {kind}; asked for {n}"
        )
    make_rng(seed, kind, "object-pairs").shuffle(candidates)
    return candidates[:n]


def max_pairs(kind: str) -> int:
    shapes = len(SHAPES_3D if kind == "B" else SHAPES_2D)
    objects = len(COLOURS) * shapes
    return objects * (len(COLOURS) - 1) * (shapes - 1)


def build_set(seed: int, kind: str, index: int, pair) -> tuple[Scene, ...]:
    """The 4 scenes of one What'sUp set: one object pair in each relation of ``kind``, sizes shared."""
    sizes = make_rng(seed, kind, index, "sizes")
    low, high = SIDE_RANGE[kind]
    sides = (sizes.randint(low, high), sizes.randint(low, high))  # px: full size of obj1, obj2
    return tuple(
        build_scene(make_rng(seed, kind, index, relation), kind, pair, relation, sides)
        for relation in KIND_RELATIONS[kind]
    )


def build_scene(rng: random.Random, kind: str, pair, relation: str, sides: tuple[int, int]) -> Scene:
    """Place obj1 and obj2 so that their boxes imply ``relation``; checked with ``derive_relation``."""
    (c1, s1), (c2, s2) = pair
    if relation not in KIND_RELATIONS[kind]:
        raise ValueError(f"relation {relation!r} is not one of subset {kind}'s {KIND_RELATIONS[kind]}")
    if relation in ("left", "right"):
        base = GROUND_A if kind == "A" else BASE_B["mid"]
        scale = 1.0 if kind == "A" else SCALE_B["mid"]
        w1, w2 = (round(s * scale) for s in sides)
        first, second = (0, 1) if relation == "left" else (1, 0)  # which object sits on the left
        widths = (w1, w2)
        gap = rng.randint(4, 14)
        total = widths[first] + gap + widths[second]
        x = rng.randint(3, CANVAS - 3 - total)
        boxes = [None, None]
        boxes[first] = (x, base - widths[first], x + widths[first], base)
        x2 = x + widths[first] + gap
        boxes[second] = (x2, base - widths[second], x2 + widths[second], base)
        z = (0, 0)
    elif relation in ("on", "under"):
        top, bottom = (0, 1) if relation == "on" else (1, 0)
        tw, bw = sides[top], sides[bottom]
        bx = rng.randint(6, CANVAS - 6 - bw)
        boxes = [None, None]
        boxes[bottom] = (bx, GROUND_A - bw, bx + bw, GROUND_A)
        # Centre the top object over the bottom one (+-3 px), clamped; contact: top y1 == bottom y0.
        tx = min(max(bx + (bw - tw) // 2 + rng.randint(-3, 3), 1), CANVAS - 1 - tw)
        boxes[top] = (tx, GROUND_A - bw - tw, tx + tw, GROUND_A - bw)
        z = (0, 0)
    else:  # in-front / behind: near object lower, larger, drawn later and overlapping the far one
        near, far = (0, 1) if relation == "in-front" else (1, 0)
        nw = round(sides[near] * SCALE_B["near"])
        fw = round(sides[far] * SCALE_B["far"])
        # px: horizontal offset between the two centres, about half the near width: the near object covers
        # roughly half of the far one (at least 4 px of overlap), the rest stays in view beside it.
        shift = rng.choice((-1, 1)) * rng.randint(nw // 2 - 1, nw // 2 + 2)
        offset = (fw - nw) // 2 + shift  # nx - fx
        fx = rng.randint(max(2, 1 - offset), min(CANVAS - 2 - fw, CANVAS - 1 - nw - offset))
        nx = fx + offset
        boxes = [None, None]
        boxes[far] = (fx, BASE_B["far"] - fw, fx + fw, BASE_B["far"])
        boxes[near] = (nx, BASE_B["near"] - nw, nx + nw, BASE_B["near"])
        z = (1, 0) if near == 0 else (0, 1)
    objects = (SceneObject(c1, s1, boxes[0], z[0]), SceneObject(c2, s2, boxes[1], z[1]))
    derived = derive_relation(kind, objects)
    if derived != relation:  # a bug in the placement above, never a data condition
        raise AssertionError(f"placement for {relation!r} implies {derived!r}: {objects}")
    return Scene(kind, relation, objects)


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def derive_relation(kind: str, objects: tuple[SceneObject, SceneObject]) -> str:
    """The relation of obj1 to obj2 that the boxes imply; ValueError if the geometry is ambiguous.

    A: stacked with contact (one box's bottom edge on the other's top edge, overlapping in x) -> on/under;
       both resting on the table without x overlap -> left/right by x.
    B: different depths -> in-front/behind, requiring all three cues to agree (lower base in the frame,
       larger, drawn later with boxes overlapping, i.e. occluding); same depth, no x overlap -> left/right.
    """
    a, b = objects
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    x_overlap = _overlap(ax0, ax1, bx0, bx1)
    if kind == "A":
        if x_overlap and ay1 == by0:
            return "on"
        if x_overlap and by1 == ay0:
            return "under"
        if ay1 == by1 == GROUND_A and not x_overlap:
            return "left" if a.centre[0] < b.centre[0] else "right"
        raise ValueError(f"ambiguous subset-A geometry: {objects}")
    if kind == "B":
        if abs(ay1 - by1) >= DEPTH_MIN_GAP:
            near, far = (a, b) if ay1 > by1 else (b, a)
            occludes = (
                near.z > far.z and x_overlap and _overlap(near.box[1], near.box[3], far.box[1], far.box[3])
            )
            if not (near.area > far.area and occludes):
                raise ValueError(f"depth cues disagree in subset-B geometry: {objects}")
            return "in-front" if near is a else "behind"
        if not x_overlap:
            return "left" if a.centre[0] < b.centre[0] else "right"
        raise ValueError(f"ambiguous subset-B geometry: {objects}")
    raise ValueError(f"unknown scene kind {kind!r}; expected 'A' or 'B'")


def build_whatsup_sets(seed: int, kind: str, pairs: int) -> list[tuple[Scene, ...]]:
    """``pairs`` sets of 4 scenes for What'sUp subset ``kind`` ("A" or "B")."""
    return [build_set(seed, kind, i, pair) for i, pair in enumerate(pick_object_pairs(seed, kind, pairs))]


def caption_options(seed: int, scene: Scene, index: int) -> list[str]:
    """True caption first, then the subset's other three relations in a seeded order."""
    obj1, obj2 = scene.objects
    others = [r for r in KIND_RELATIONS[scene.kind] if r != scene.relation]
    make_rng(seed, scene.kind, index, scene.relation, "caption-order").shuffle(others)
    return [scene.caption, *(caption_for(obj1.name, r, obj2.name) for r in others)]


def build_random_scene(seed: int, relation: str, *purpose: object) -> Scene:
    """A single subset-A style scene with random objects in ``relation`` (the LLaVA training split)."""
    rng = make_rng(seed, *purpose)
    (c1, c2), (s1, s2) = rng.sample(list(COLOURS), 2), rng.sample(SHAPES_2D, 2)
    return build_scene(rng, "A", ((c1, s1), (c2, s2)), relation, (rng.randint(16, 24), rng.randint(16, 24)))


# MMVP-VLM categories in the real file's row order: the exact ``Type`` values and folder names the adapter reads.
VLM_TYPES = tuple(MMVP_VLM_CATEGORIES)
NUMBER_WORDS = ("one", "two", "three", "four")
LETTERS = "ABEFGHKLMPRTXYZ"  # drawn with PIL's default font; all distinguishable at 44 px


@dataclass(frozen=True)
class VlmSpec:
    """One MMVP-VLM image: its statement and what to draw (``motif`` picks the routine in render.py)."""

    category: str
    statement: str
    motif: str
    colour: str
    variant: str = ""  # motif parameter: arrow direction, count, letter, view, ...
    shape: str = ""
    scene: Scene | None = None  # Spatial: the scene whose derived relation the statement names


def build_vlm_pair(
    seed: int, category: str, index: int, purpose: str = "mmvp_vlm"
) -> tuple[VlmSpec, VlmSpec]:
    """Two images of one category with contrasting statements; each statement describes its own image.

    ``purpose`` keys the generator: MMVP-VLM uses the default, MMVP its own, so the two never share images.
    """
    rng = make_rng(seed, purpose, category, index)
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(("circle", "square", "diamond"))
    if category == "Orientation":
        ways = rng.choice((("up", "down"), ("left", "right")))
        specs = [
            VlmSpec(category, f"{with_article(colour)} arrow pointing {w}", "arrow", colour, w) for w in ways
        ]
    elif category == "Presence":
        specs = [
            VlmSpec(
                category,
                f"{with_article(colour)} {shape} with a white dot in the middle",
                "dot",
                colour,
                "dot",
                shape,
            ),
            VlmSpec(category, f"a plain {colour} {shape} with no dot", "dot", colour, "plain", shape),
        ]
    elif category == "State":
        specs = [
            VlmSpec(category, f"a solid {colour} {shape}", "state", colour, "filled", shape),
            VlmSpec(category, f"a hollow {colour} {shape} outline", "state", colour, "outline", shape),
        ]
    elif category == "Quantity":
        shape = rng.choice(SHAPES_2D)
        n = rng.randint(1, len(NUMBER_WORDS) - 1)
        specs = [
            VlmSpec(
                category,
                f"{NUMBER_WORDS[k - 1]} {colour} {shape}{'s' if k > 1 else ''}",
                "count",
                colour,
                str(k),
                shape,
            )
            for k in (n, n + 1)
        ]
    elif category == "Spatial":
        (c1, c2), (s1, s2) = rng.sample(list(COLOURS), 2), rng.sample(SHAPES_2D, 2)
        sides = (rng.randint(16, 22), rng.randint(16, 22))
        relations = rng.choice((("left", "right"), ("on", "under")))
        scenes = [build_scene(rng, "A", ((c1, s1), (c2, s2)), r, sides) for r in relations]
        statements = [phrase_for(s.objects[0].name, s.relation, s.objects[1].name) for s in scenes]
        specs = [
            VlmSpec(category, t, "scene", c1, s.relation, s1, s)
            for t, s in zip(statements, scenes, strict=True)
        ]
    elif category == "Color":
        other = rng.choice([c for c in COLOURS if c != colour])
        specs = [
            VlmSpec(category, with_article(f"{c} {shape}"), "shape", c, "", shape) for c in (colour, other)
        ]
    elif category == "Structural Character":
        specs = [
            VlmSpec(category, f"{with_article(colour)} square with {w} stripes", "stripes", colour, w)
            for w in ("horizontal", "vertical")
        ]
    elif category == "Text":
        # Quotes exercise RFC-4180 quoting in Questions.csv, as in the real "key ""Z"" on the keyboard".
        specs = [
            VlmSpec(category, f'a card with the letter "{ch}" printed on it', "letter", colour, ch)
            for ch in rng.sample(LETTERS, 2)
        ]
    elif category == "Camera Perspective":
        specs = [
            VlmSpec(
                category,
                f"{with_article(colour)} cube seen straight from the front",
                "cube_view",
                colour,
                "front",
            ),
            VlmSpec(
                category,
                f"{with_article(colour)} cube seen from above at an angle",
                "cube_view",
                colour,
                "above",
            ),
        ]
    else:
        raise ValueError(f"unknown MMVP-VLM category {category!r}; expected one of {VLM_TYPES}")
    if rng.random() < 0.5:  # which statement comes first in the pair is seeded, not fixed by category
        specs.reverse()
    return specs[0], specs[1]
