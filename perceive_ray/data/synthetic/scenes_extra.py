"""Scene specs for What'sUp COCO/VG-QA, the Winoground family, SugarCrepe and SeeTRUE; pure like scenes.py.

Every text states a *claim* about a scene (who is where, with which colour and shape), and its truth is decided
from the scene's geometry with ``derive_relation`` / ``derive_position``: builders assert that each true text
holds on its own image and that each false text (opposite relation, swapped objects, wrong colour, wrong shape,
absent object) does not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from perceive_ray.data.synthetic.scenes import (
    CANVAS,
    COLOURS,
    OPPOSITE,
    RELATION_PHRASES,
    SHAPES_2D,
    SHAPES_3D,
    SIDE_RANGE,
    Scene,
    SceneObject,
    build_scene,
    derive_relation,
    make_rng,
    with_article,
)

SOLO_MARGIN = 4  # px: a lone object is "left" only if its box ends this far left of the vertical centre line, etc.
SOLO_SIDE = (16, 22)  # px: side range of a lone object
POSITION_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# Scene relation key -> the What'sUp QA word of PROTOCOLS §1.2 (on/under read as above/below in COCO two-object).
QA_WORDS = {"left": "left", "right": "right", "on": "above", "under": "below", "in-front": "front", "behind": "behind"}

NP = tuple[str | None, str]  # (colour or None, shape): "a red circle" / "a circle"


@dataclass(frozen=True)
class SoloScene:
    """One object on a plain wall (What'sUp one-object QA): it sits in one quadrant of the frame."""

    obj: SceneObject
    size: int = CANVAS
    kind: str = "S"

    @property
    def objects(self) -> tuple[SceneObject]:
        return (self.obj,)


def derive_position(obj: SceneObject) -> tuple[str, str]:
    """(left|right, top|bottom) of a lone object; ValueError if its box comes near a centre line."""
    x0, y0, x1, y1 = obj.box
    mid = CANVAS // 2
    if x1 <= mid - SOLO_MARGIN:
        horizontal = "left"
    elif x0 >= mid + SOLO_MARGIN:
        horizontal = "right"
    else:
        raise ValueError(f"object {obj} is neither clearly left nor right")
    if y1 <= mid - SOLO_MARGIN:
        vertical = "top"
    elif y0 >= mid + SOLO_MARGIN:
        vertical = "bottom"
    else:
        raise ValueError(f"object {obj} is neither clearly at the top nor at the bottom")
    return horizontal, vertical


def build_solo(rng: random.Random, colour: str, shape: str, horizontal: str, vertical: str) -> SoloScene:
    side = rng.randint(*SOLO_SIDE)
    mid = CANVAS // 2

    def start(first_half: bool) -> int:
        low, high = (3, mid - SOLO_MARGIN - side) if first_half else (mid + SOLO_MARGIN, CANVAS - 3 - side)
        return rng.randint(low, high)

    x0, y0 = start(horizontal == "left"), start(vertical == "top")
    scene = SoloScene(SceneObject(colour, shape, (x0, y0, x0 + side, y0 + side)))
    if derive_position(scene.obj) != (horizontal, vertical):  # a placement bug, never a data condition
        raise AssertionError(f"placement for {horizontal}/{vertical} implies {derive_position(scene.obj)}")
    return scene


def random_pair(rng: random.Random, kind: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two objects that differ in colour and in shape (so a colour or a shape names one object)."""
    c1, c2 = rng.sample(list(COLOURS), 2)
    s1, s2 = rng.sample(SHAPES_3D if kind == "B" else SHAPES_2D, 2)
    return (c1, s1), (c2, s2)


def random_scene(rng: random.Random, kind: str, relation: str) -> Scene:
    low, high = SIDE_RANGE[kind]
    sides = (rng.randint(low, high), rng.randint(low, high))
    return build_scene(rng, kind, random_pair(rng, kind), relation, sides)


# ---------------------------------------------------------------- What'sUp COCO-QA / VG-QA


@dataclass(frozen=True)
class QAItem:
    image: int  # index of the image in its subset's scene list
    true_caption: str
    false_caption: str
    gold: str  # the QA word of the true caption


def qa_one_caption(name: str, position: str) -> str:
    return f"A photo of a {name} on the {position}"


def qa_two_caption(name1: str, relation: str, name2: str) -> str:
    word = QA_WORDS[relation]
    if relation in ("on", "under"):
        return f"A photo of a {name1} {word} a {name2}"
    return f"A photo of a {name1} to the {word} of a {name2}"  # VG's "to the behind of" shape included


def build_qa_one(seed: int, subset: str, n: int) -> tuple[list[SoloScene], list[QAItem]]:
    """``n`` one-object images, one left/right item each plus a top/bottom item for every other image."""
    scenes, items = [], []
    for j in range(n):
        rng = make_rng(seed, "whatsup_qa", subset, j)
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES_2D)
        scene = build_solo(rng, colour, shape, ("left", "right")[j % 2], ("top", "bottom")[(j // 2) % 2])
        scenes.append(scene)
        horizontal, vertical = derive_position(scene.obj)
        name = scene.obj.name
        for position in (horizontal, vertical) if j % 2 == 0 else (horizontal,):  # even images recur
            items.append(
                QAItem(j, qa_one_caption(name, position), qa_one_caption(name, POSITION_OPPOSITE[position]), position)
            )
    make_rng(seed, "whatsup_qa", subset, "order").shuffle(items)
    return scenes, items


def build_qa_two(seed: int, subset: str, n: int) -> tuple[list[Scene], list[QAItem]]:
    """``n`` two-object images: left/right, alternating with above/below (COCO) or front/behind (VG, depth scenes).

    Every third image also gets the reversed item ("Y to the right of X" on the "X left of Y" image).
    """
    second = ("A", ("on", "under")) if subset.startswith("coco") else ("B", ("in-front", "behind"))
    scenes, items = [], []
    for j in range(n):
        rng = make_rng(seed, "whatsup_qa", subset, j)
        kind, relations = ("A", ("left", "right")) if j % 2 == 0 else second
        scene = random_scene(rng, kind, relations[(j // 2) % 2])
        scenes.append(scene)
        a, b = scene.objects
        for first, other in ((a, b), (b, a)) if j % 3 == 0 else ((a, b),):
            relation = derive_relation(kind, (first, other))
            items.append(
                QAItem(
                    j,
                    qa_two_caption(first.name, relation, other.name),
                    qa_two_caption(first.name, OPPOSITE[relation], other.name),
                    QA_WORDS[relation],
                )
            )
    make_rng(seed, "whatsup_qa", subset, "order").shuffle(items)
    return scenes, items


# ---------------------------------------------------------------- claims: texts whose truth follows from a scene


@dataclass(frozen=True)
class Claim:
    """``subject relation object [and extra]``; each NP must name exactly one object of the scene."""

    subject: NP
    relation: str
    object: NP
    extra: NP | None = None  # "... and a green star": claims that such an object is present too


def np_text(np: NP) -> str:
    colour, shape = np
    return with_article(f"{colour} {shape}" if colour else shape)


def claim_text(claim: Claim, style: str = "phrase") -> str:
    """``phrase``: "a red circle to the left of a blue square"; ``sentence``: "The red circle is ... square."."""
    phrase = RELATION_PHRASES[claim.relation]
    if style == "sentence":
        subject, obj = (" ".join(p for p in np if p) for np in (claim.subject, claim.object))
        return f"The {subject} is {phrase} the {obj}."
    text = f"{np_text(claim.subject)} {phrase} {np_text(claim.object)}"
    return text + (f" and {np_text(claim.extra)}" if claim.extra else "")


def find_object(scene: Scene, np: NP) -> SceneObject | None:
    colour, shape = np
    found = [o for o in scene.objects if o.shape == shape and colour in (None, o.colour)]
    return found[0] if len(found) == 1 else None


def claim_holds(scene: Scene, claim: Claim) -> bool:
    a, b = find_object(scene, claim.subject), find_object(scene, claim.object)
    if a is None or b is None or a is b:
        return False
    if claim.extra is not None and find_object(scene, claim.extra) is None:
        return False
    return derive_relation(scene.kind, (a, b)) == claim.relation


def scene_claim(scene: Scene) -> Claim:
    a, b = scene.objects
    return Claim((a.colour, a.shape), scene.relation, (b.colour, b.shape))


# ---------------------------------------------------------------- Winoground family: 2x2 contrasts

# style -> how caption 1 differs from caption 0: "swap" exchanges the two noun phrases (Winoground: the same
# words in another order); "relation" and "sentence" state the opposite relation.
CONTRAST_STYLES = ("swap", "relation", "sentence")


@dataclass(frozen=True)
class ContrastItem:
    scenes: tuple[Scene, Scene]  # the same two objects in opposite relations
    captions: tuple[str, str]  # caption k describes scene k and not the other one


def build_contrast(seed: int, kind: str, relation: str, style: str, *purpose: object) -> ContrastItem:
    if style not in CONTRAST_STYLES:
        raise ValueError(f"unknown contrast style {style!r}; expected one of {CONTRAST_STYLES}")
    rng = make_rng(seed, *purpose)
    low, high = SIDE_RANGE[kind]
    sides = (rng.randint(low, high), rng.randint(low, high))
    pair = random_pair(rng, kind)
    scenes = (build_scene(rng, kind, pair, relation, sides), build_scene(rng, kind, pair, OPPOSITE[relation], sides))
    first = scene_claim(scenes[0])
    if style == "swap":
        second = Claim(first.object, relation, first.subject)
    else:
        second = Claim(first.subject, OPPOSITE[relation], first.object)
    claims = (first, second)
    for k in (0, 1):  # caption k is true of image k only
        if not claim_holds(scenes[k], claims[k]) or claim_holds(scenes[1 - k], claims[k]):
            raise AssertionError(f"contrast {purpose}: claim {claims[k]} does not single out image {k}")
    text_style = "sentence" if style == "sentence" else "phrase"
    return ContrastItem(scenes, (claim_text(claims[0], text_style), claim_text(claims[1], text_style)))


# ---------------------------------------------------------------- SugarCrepe hard negatives, SeeTRUE texts

SUGARCREPE_SUBSETS = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")


def sugarcrepe_claims(seed: int, index: int, scene: Scene) -> dict[str, tuple[Claim, Claim]]:
    """Per subset (positive, negative): the negative is false for ``scene`` by construction, as in SugarCrepe."""
    a, b = scene.objects
    rng = make_rng(seed, "sugarcrepe", index, "negatives")
    colours = [c for c in COLOURS if c not in (a.colour, b.colour)]  # no object has these colours ...
    shapes = [s for s in SHAPES_2D if s not in (a.shape, b.shape)]  # ... or these shapes
    c3, c4, s3, s4 = rng.choice(colours), rng.choice(colours), rng.choice(shapes), rng.choice(shapes)
    positive = scene_claim(scene)
    A, B, r = (a.colour, a.shape), (b.colour, b.shape), scene.relation
    pairs = {
        "add_obj": (positive, Claim(A, r, B, extra=(c3, s3))),
        "add_att": (Claim(A, r, (None, b.shape)), Claim(A, r, (c4, b.shape))),
        "replace_obj": (positive, Claim((a.colour, s4), r, B)),
        "replace_att": (positive, Claim((c4, a.shape), r, B)),
        "replace_rel": (positive, Claim(A, OPPOSITE[r], B)),
        "swap_obj": (positive, Claim(B, r, A)),
        "swap_att": (positive, Claim((b.colour, a.shape), r, (a.colour, b.shape))),
    }
    for subset, (pos, neg) in pairs.items():
        if not claim_holds(scene, pos) or claim_holds(scene, neg):
            raise AssertionError(f"sugarcrepe {subset} {index}: positive {pos} / negative {neg} do not contrast")
    return pairs


SEETRUE_SOURCES = ("synthetic_spatial", "synthetic_attribute")


def seetrue_claims(seed: int, source: str, index: int, scene: Scene) -> tuple[Claim, Claim]:
    """(true, false) texts for one image: the false one has the opposite relation or a wrong colour."""
    a, b = scene.objects
    true = scene_claim(scene)
    if source == "synthetic_spatial":
        false = Claim(true.subject, OPPOSITE[scene.relation], true.object)
    elif source == "synthetic_attribute":
        rng = make_rng(seed, "seetrue", source, index, "colour")
        colour = rng.choice([c for c in COLOURS if c not in (a.colour, b.colour)])
        false = Claim(true.subject, scene.relation, (colour, b.shape))
    else:
        raise ValueError(f"unknown SeeTRUE source {source!r}; expected one of {SEETRUE_SOURCES}")
    if not claim_holds(scene, true) or claim_holds(scene, false):
        raise AssertionError(f"seetrue {source} {index}: {true} / {false} do not contrast")
    return true, false
