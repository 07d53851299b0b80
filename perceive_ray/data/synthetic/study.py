"""Seeded synthetic WORLD for a miniature of "generative MLLMs perceive more than CLIP with the same vision encoder".

The paper's structure, in small: a CLIP is pretrained on web-like alt-text that names the objects but never states
where they are; CLIP variants and a tiny LLaVA are then trained on LLaVA-1.5-format data that does state spatial
relations; everything is evaluated on What'sUp Controlled A/B sets whose object pairs no training image shows.

``generate_study(out_dir, seed=S, scale="full")`` writes, under ``out_dir``::

    web/web_558k.json, web/images/web/{i:06d}.jpg          alt-text captions (objects only, random order), 558K schema
    llava/captions_558k.json, llava/images/llava/{i:06d}.jpg  relation captions (BLIP style), 558K schema
    llava/instruct_665k.json                                  yes/no + where chats about the SAME images, 665K schema
    whatsup/controlled_images_dataset.json, controlled_images/*.jpeg   Controlled A, held-out object pairs only
    whatsup/controlled_clevr_dataset.json, controlled_clevr/*.jpeg     Controlled B, held-out object pairs only
    STUDY.json                                                generator, version, seed, scale, counts, digest

Held-out split: per subset kind, the unordered pairs {a, b} of (colour, shape) objects differing in colour AND
shape; {a, b} is held out iff ``make_rng(seed, "study", "holdout", kind, key).random() < 0.25`` (``pair_key``).
Training scenes (web and llava) use only the other pairs; the What'sUp sets use only held-out ones.

Every text's truth follows from the geometry (``scenes.derive_relation``); every scene is rebuilt alone from
``training_scene(seed, split, i)`` / ``eval_sets(seed, kind, n)``. All files go through one ``TreeWriter``: the
same seed and scale give a byte-identical tree (for one Pillow/libjpeg build), with no timestamps or absolute paths.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceive_ray.data.synthetic.render import render_scene
from perceive_ray.data.synthetic.scenes import (
    COLOURS,
    KIND_RELATIONS,
    OPPOSITE,
    RELATION_PHRASES,
    SHAPES_2D,
    SHAPES_3D,
    SIDE_RANGE,
    Scene,
    build_scene,
    caption_for,
    caption_options,
    make_rng,
    phrase_for,
    with_article,
)
from perceive_ray.data.synthetic.writers import (
    _BRIEF_PROMPTS,
    WHATSUP_FILES,
    TreeWriter,
    _sentence,
    clear_generated,
    read_generator_summary,
)

STUDY_VERSION = 1  # bump whenever the bytes a given seed and scale produce change
STUDY_FILE = "STUDY.json"
STUDY_GENERATOR = "perceive_ray.data.synthetic.study"
# What is where, relative to out_dir. Image paths in the JSON files are relative to the *_image_root entries.
STUDY_ROOTS = {
    "web_json": "web/web_558k.json",
    "web_image_root": "web/images",
    "captions_json": "llava/captions_558k.json",
    "instruct_json": "llava/instruct_665k.json",
    "llava_image_root": "llava/images",
    "whatsup_root": "whatsup",  # registry benchmarks whatsup_controlled_a / _b read this folder
}
_TOP_LEVEL = tuple(sorted({rel.split("/")[0] for rel in STUDY_ROOTS.values()}))  # what generate_study owns
WEB_FOLDER = "web"  # web/images/web/{i:06d}.jpg; ``image`` = "web/{i:06d}.jpg"
LLAVA_FOLDER = "llava"  # llava/images/llava/{i:06d}.jpg; ``image`` = "llava/{i:06d}.jpg"
KINDS = ("A", "B")
SPLITS = ("web", "llava")
HOLDOUT_FRACTION = 0.25
MAX_SEED = 2**63 - 1
# Lower-cased whitespace tokens no web caption may contain: the web never states where things are.
FORBIDDEN_WEB_TOKENS = frozenset(
    {"on", "under", "left", "right", "front", "behind", "above", "below", "top", "bottom", "beside", "near", "next",
     "over", "in"}
)
# For these relations the opposite is also the converse: r(a, b) <=> CONVERSE[r](b, a).
CONVERSE = dict(OPPOSITE)
# Alt-text templates: the objects (colour + shape), sometimes a count, never a position. {a1}/{a2} with article.
WEB_TEMPLATES = (
    "{a1} and {a2}",
    "a photo of {a1} and {a2}",
    "two shapes: {a1} and {a2}",
    "{a1} with {a2}",
    "two objects, {a1} and {a2}",
    "an image of {a1} and {a2}",
    "{n1} and {n2}",
    "{n1}, {n2}",
    "a picture with {a1} and {a2}",
    "2 objects: {n1} and {n2}",
)
YES_NO_TEMPLATES = ("vqascore", "is_the", "is_there", "is_it_true")

Obj = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class StudyScale:
    """Sizes of one study tree: training images of each split, and object pairs per What'sUp subset (4 images each)."""

    web_images: int
    llava_images: int
    eval_pairs: int

    def __post_init__(self) -> None:
        minimum = {"web_images": 1, "llava_images": len(_COMBOS), "eval_pairs": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"scale.{name} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return {"web_images": self.web_images, "llava_images": self.llava_images, "eval_pairs": self.eval_pairs}


# (kind, relation) of every relation of both kinds: the llava split cycles through them (see ``_llava_combo``).
_COMBOS = tuple((kind, relation) for kind in KINDS for relation in KIND_RELATIONS[kind])

SCALES = {
    "full": StudyScale(web_images=3000, llava_images=3000, eval_pairs=50),
    "quick": StudyScale(web_images=800, llava_images=800, eval_pairs=24),
}


@dataclass(frozen=True)
class StudySummary:
    """What ``generate_study`` wrote (or ``ensure_study`` found: ``reused=True``)."""

    out_dir: Path
    seed: int
    scale: str  # a SCALES name, or "custom-<web>-<llava>-<eval>"
    version: int
    sizes: dict[str, int] = field(default_factory=dict)  # StudyScale fields
    counts: dict[str, int] = field(default_factory=dict)
    held_out_pairs: dict[str, int] = field(default_factory=dict)  # kind -> unordered held-out object pairs
    tree_sha256: str = ""
    reused: bool = False

    def path(self, name: str) -> Path:
        """Absolute path of a ``STUDY_ROOTS`` entry."""
        return study_roots(self.out_dir)[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "seed": self.seed,
            "scale": self.scale,
            "version": self.version,
            "sizes": dict(self.sizes),
            "counts": dict(self.counts),
            "held_out_pairs": dict(self.held_out_pairs),
            "tree_sha256": self.tree_sha256,
            "reused": self.reused,
        }


def study_roots(out_dir: str | Path) -> dict[str, Path]:
    """Absolute path of every ``STUDY_ROOTS`` entry (plus ``study_file``) for a tree under ``out_dir``."""
    out = Path(out_dir).expanduser().absolute()
    paths = {name: out / rel for name, rel in STUDY_ROOTS.items()}
    paths["study_file"] = out / STUDY_FILE
    return paths


def study_sources(out_dir: str | Path) -> dict[str, dict[str, str]]:
    """``data.sources[]`` entries (name, path, image_root, format) for the three training files."""
    roots = study_roots(out_dir)
    return {
        "web": {"name": "study_web", "path": str(roots["web_json"]), "image_root": str(roots["web_image_root"]),
                "format": "pretrain"},
        "captions": {"name": "study_captions", "path": str(roots["captions_json"]),
                     "image_root": str(roots["llava_image_root"]), "format": "pretrain"},
        "instruct": {"name": "study_instruct", "path": str(roots["instruct_json"]),
                     "image_root": str(roots["llava_image_root"]), "format": "mix"},
    }


# ---------------------------------------------------------------- held-out split


def kind_objects(kind: str) -> list[Obj]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return list(itertools.product(COLOURS, SHAPES_2D if kind == "A" else SHAPES_3D))


def pair_key(a: Obj, b: Obj) -> str:
    """Order-free key of an object pair: the sorted "colour-shape" tokens joined by "|"."""
    return "|".join(sorted(f"{colour}-{shape}" for colour, shape in (a, b)))


def is_held_out(seed: int, kind: str, a: Obj, b: Obj) -> bool:
    return make_rng(seed, "study", "holdout", kind, pair_key(a, b)).random() < HOLDOUT_FRACTION


@functools.lru_cache(maxsize=32)
def _split(seed: int, kind: str) -> tuple[tuple[tuple[Obj, Obj], ...], tuple[tuple[Obj, Obj], ...]]:
    """(unordered training pairs, unordered held-out pairs) of ``kind``, in a fixed order."""
    train, held = [], []
    for a, b in itertools.combinations(kind_objects(kind), 2):
        if a[0] != b[0] and a[1] != b[1]:
            (held if is_held_out(seed, kind, a, b) else train).append((a, b))
    return tuple(train), tuple(held)


def held_out_pairs(seed: int, kind: str) -> tuple[tuple[Obj, Obj], ...]:
    """Unordered held-out object pairs of ``kind``."""
    return _split(seed, kind)[1]


@functools.lru_cache(maxsize=32)
def train_pairs(seed: int, kind: str) -> tuple[tuple[Obj, Obj], ...]:
    """Ordered object pairs a training scene of ``kind`` may show: both orders of every non-held-out pair."""
    return tuple(p for a, b in _split(seed, kind)[0] for p in ((a, b), (b, a)))


def eval_object_pairs(seed: int, kind: str, n: int) -> list[tuple[Obj, Obj]]:
    """The first ``n`` held-out ORDERED pairs of ``kind`` after a seeded shuffle; ValueError if fewer exist."""
    ordered = [p for a, b in held_out_pairs(seed, kind) for p in ((a, b), (b, a))]
    if n > len(ordered):
        raise ValueError(
            f"scale.eval_pairs={n} exceeds the {len(ordered)} held-out ordered object pairs of subset {kind} "
            f"for seed {seed}"
        )
    make_rng(seed, "study", "eval-pairs", kind).shuffle(ordered)
    return ordered[:n]


def eval_sets(seed: int, kind: str, n: int) -> list[tuple[Scene, ...]]:
    """``n`` What'sUp sets of ``kind``: one held-out pair in each relation of the kind, sizes shared in a set."""
    sets = []
    low, high = SIDE_RANGE[kind]
    for index, pair in enumerate(eval_object_pairs(seed, kind, n)):
        sizes = make_rng(seed, "study", "whatsup", kind, index, "sizes")
        sides = (sizes.randint(low, high), sizes.randint(low, high))
        sets.append(tuple(
            build_scene(make_rng(seed, "study", "whatsup", kind, index, relation), kind, pair, relation, sides)
            for relation in KIND_RELATIONS[kind]
        ))
    return sets


# ---------------------------------------------------------------- training scenes and texts


def _llava_combo(seed: int, i: int) -> tuple[str, str]:
    """(kind, relation) of llava scene ``i``: every block of 8 images is a seeded permutation of all 8 combinations,
    so both kinds have probability 1/2 and every relation of both kinds occurs (left/right in A and in B)."""
    combos = list(_COMBOS)
    make_rng(seed, "study", "llava", "cycle", i // len(combos)).shuffle(combos)
    return combos[i % len(combos)]


def training_scene(seed: int, split: str, i: int) -> Scene:
    """Training image ``i`` of ``split`` ("web" or "llava"): a non-held-out pair placed by ``build_scene``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = make_rng(seed, "study", split, i)
    if split == "web":
        kind = "A" if rng.random() < 0.5 else "B"
        relation = rng.choice(KIND_RELATIONS[kind])
    else:
        kind, relation = _llava_combo(seed, i)
    pair = rng.choice(train_pairs(seed, kind))
    low, high = SIDE_RANGE[kind]
    sides = (rng.randint(low, high), rng.randint(low, high))
    return build_scene(rng, kind, pair, relation, sides)


def check_alt_text(caption: str) -> str:
    """``caption`` if no lower-cased whitespace token (also with punctuation stripped) states a position."""
    tokens = caption.lower().split()
    found = (set(tokens) | {t.strip(".,:;!?\"'()") for t in tokens}) & FORBIDDEN_WEB_TOKENS
    if found:
        raise AssertionError(f"web caption {caption!r} contains position word(s) {sorted(found)}")
    return caption


def web_caption(seed: int, i: int, scene: Scene) -> str:
    """Alt-text for web image ``i``: both objects in a seeded order independent of the layout, no position word."""
    rng = make_rng(seed, "study", "web", i, "caption")
    names = [obj.name for obj in scene.objects]
    rng.shuffle(names)
    template = rng.choice(WEB_TEMPLATES)
    text = template.format(a1=with_article(names[0]), a2=with_article(names[1]), n1=names[0], n2=names[1])
    return check_alt_text(text)


def brief_request(seed: int, split: str, i: int) -> str:
    """The 558K human turn: a brief-caption request with ``<image>`` before or after it (seeded 50/50)."""
    rng = make_rng(seed, "study", split, i, "prompt")
    prompt = rng.choice(_BRIEF_PROMPTS)
    return f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"


def yes_no_question(template: str, subject: str, relation: str, other: str) -> str:
    """One yes/no question stating ``relation`` of ``subject`` to ``other`` ("vqascore" is VQAScore's own)."""
    phrase = RELATION_PHRASES[relation]
    if template == "vqascore":
        return f'Does this figure show "{caption_for(subject, relation, other)}"? Please answer yes or no.'
    if template == "is_the":
        return f"Is the {subject} {phrase} the {other}? Answer yes or no."
    if template == "is_there":
        return f"Is there {with_article(subject)} {phrase} {with_article(other)} in the image? Please answer yes or no."
    if template == "is_it_true":
        return f"Is it true that the {subject} is {phrase} the {other}? Please answer yes or no."
    raise ValueError(f"unknown yes/no template {template!r}; expected one of {YES_NO_TEMPLATES}")


def instruct_conversation(seed: int, i: int, scene: Scene) -> list[dict[str, str]]:
    """Two yes/no rounds about one object order (seeded: (obj1, obj2), or the swapped order with the converse
    relation), in a seeded order, each with a seeded template: the true relation ("Yes") and its opposite ("No"); the
    first question carries ``<image>``, as in mix-665K's multi-round chats. Then: where is one object relative to
    the other (seeded order)."""
    rng = make_rng(seed, "study", "instruct", i)
    obj1, obj2 = (obj.name for obj in scene.objects)
    orders = ((obj1, scene.relation, obj2), (obj2, CONVERSE[scene.relation], obj1))
    subject, relation, other = orders[0] if rng.random() < 0.5 else orders[1]
    rounds = [(relation, True), (OPPOSITE[relation], False)]
    rng.shuffle(rounds)
    turns = []
    for index, (asked, yes) in enumerate(rounds):
        question = yes_no_question(rng.choice(YES_NO_TEMPLATES), subject, asked, other)
        turns.append({"from": "human", "value": f"<image>\n{question}" if index == 0 else question})
        turns.append({"from": "gpt", "value": "Yes" if yes else "No"})
    where_subject, where_relation, where_other = orders[0] if rng.random() < 0.5 else orders[1]
    turns.append({"from": "human", "value": f"Where is the {where_subject} relative to the {where_other}?"})
    turns.append({"from": "gpt", "value": _sentence(where_subject, where_relation, where_other)})
    return turns


def _record(rid: str, image: str, human: str, gpt: str) -> dict[str, Any]:
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


# ---------------------------------------------------------------- writing


def _write_training(tree: TreeWriter, seed: int, scale: StudyScale) -> dict[str, int]:
    counts: dict[str, int] = {}
    web = []
    for i in range(scale.web_images):
        scene = training_scene(seed, "web", i)
        image = f"{WEB_FOLDER}/{i:06d}.jpg"
        tree.write_jpeg(f"{STUDY_ROOTS['web_image_root']}/{image}", render_scene(scene))
        web.append(_record(f"study-web-{i:06d}", image, brief_request(seed, "web", i), web_caption(seed, i, scene)))
        counts[f"web_kind_{scene.kind.lower()}"] = counts.get(f"web_kind_{scene.kind.lower()}", 0) + 1
    captions, instruct = [], []
    for i in range(scale.llava_images):
        scene = training_scene(seed, "llava", i)
        image = f"{LLAVA_FOLDER}/{i:06d}.jpg"
        tree.write_jpeg(f"{STUDY_ROOTS['llava_image_root']}/{image}", render_scene(scene))
        obj1, obj2 = (obj.name for obj in scene.objects)
        caption = phrase_for(obj1, scene.relation, obj2)  # BLIP-style: lower case, no period
        captions.append(_record(f"study-caption-{i:06d}", image, brief_request(seed, "llava", i), caption))
        instruct.append({"id": f"study-instruct-{i:06d}", "image": image,
                         "conversations": instruct_conversation(seed, i, scene)})
        counts[f"llava_kind_{scene.kind.lower()}"] = counts.get(f"llava_kind_{scene.kind.lower()}", 0) + 1
    tree.write_json(STUDY_ROOTS["web_json"], web)
    tree.write_json(STUDY_ROOTS["captions_json"], captions)
    tree.write_json(STUDY_ROOTS["instruct_json"], instruct)
    counts.update(web_558k=len(web), captions_558k=len(captions), instruct_665k=len(instruct))
    return counts


def _write_whatsup(tree: TreeWriter, seed: int, scale: StudyScale) -> dict[str, int]:
    """Controlled A and B in exactly ``writers.write_whatsup``'s format, over held-out object pairs."""
    counts = {}
    prefix = STUDY_ROOTS["whatsup_root"]
    for kind, (annotation, folder) in WHATSUP_FILES.items():
        records = []
        for index, scenes in enumerate(eval_sets(seed, kind, scale.eval_pairs)):
            for scene in scenes:
                rel = f"{prefix}/{folder}/{scene.filename}"
                if rel in tree.hashes:
                    raise AssertionError(f"What'sUp image {rel!r} written twice")
                tree.write_jpeg(rel, render_scene(scene))
                records.append({"image_path": f"data/{folder}/{scene.filename}",
                                "caption_options": caption_options(seed, scene, index)})
        tree.write_json(f"{prefix}/{annotation}", records)
        counts[f"whatsup_controlled_{kind.lower()}"] = len(records)
    counts["whatsup_pairs_per_subset"] = scale.eval_pairs
    return counts


def _resolve_scale(scale: Any) -> tuple[str, StudyScale]:
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)} or a StudyScale, got {scale!r}")
        return scale, SCALES[scale]
    if isinstance(scale, StudyScale):
        for name, known in SCALES.items():
            if known == scale:
                return name, scale
        return f"custom-{scale.web_images}-{scale.llava_images}-{scale.eval_pairs}", scale
    raise ValueError(f"scale must be one of {sorted(SCALES)} or a StudyScale, got {scale!r}")


def _check_args(out_dir: Path, seed: Any, scale: Any) -> tuple[str, StudyScale]:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    name, resolved = _resolve_scale(scale)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    for kind in KINDS:  # enough held-out pairs: checked before anything on disk is touched
        eval_object_pairs(seed, kind, resolved.eval_pairs)
    return name, resolved


def _clear_previous(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix trees; with ``overwrite`` remove only what a previous ``generate_study`` wrote here."""
    clear_generated(out_dir, _TOP_LEVEL, STUDY_FILE, overwrite=overwrite, owner=STUDY_GENERATOR,
                    check_summary=read_study)


def generate_study(
    out_dir: str | Path, *, seed: int, scale: StudyScale | str = "full", overwrite: bool = False
) -> StudySummary:
    """Write the study world under ``out_dir`` (see the module docstring) and return what was written.

    ``overwrite`` replaces a tree an earlier call wrote there; files this generator did not write are never removed.
    """
    out = Path(out_dir)
    name, sizes = _check_args(out, seed, scale)
    _clear_previous(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tree = TreeWriter(out)
    counts = _write_training(tree, seed, sizes)
    counts.update(_write_whatsup(tree, seed, sizes))
    for kind in KINDS:
        counts[f"train_pairs_{kind.lower()}"] = len(_split(seed, kind)[0])
    counts["images"] = sum(rel.endswith((".jpg", ".jpeg")) for rel in tree.hashes)
    summary = StudySummary(
        out_dir=out,
        seed=seed,
        scale=name,
        version=STUDY_VERSION,
        sizes=sizes.to_dict(),
        counts=dict(sorted(counts.items())),
        held_out_pairs={kind: len(held_out_pairs(seed, kind)) for kind in KINDS},
        tree_sha256=tree.tree_sha256(),
    )
    on_disk = {"generator": STUDY_GENERATOR, **summary.to_dict(), "roots": dict(STUDY_ROOTS)}
    del on_disk["out_dir"]  # no absolute paths on disk: the same seed must give the same bytes anywhere
    del on_disk["reused"]  # a property of one call, not of the tree
    tree.write_json(STUDY_FILE, on_disk)
    return summary


def read_study(out_dir: str | Path) -> StudySummary | None:
    """The summary a previous ``generate_study`` left in ``out_dir`` (``reused=True``), or None if there is none.

    ValueError if ``STUDY.json`` exists but is not one this generator writes.
    """
    out = Path(out_dir)
    data = read_generator_summary(out / STUDY_FILE, STUDY_GENERATOR,
                                  ("version", "seed", "scale", "sizes", "counts", "held_out_pairs", "tree_sha256"))
    if data is None:
        return None
    version = data["version"]
    return StudySummary(
        out_dir=out,
        seed=data["seed"],
        scale=data["scale"],
        version=version,
        sizes=dict(data["sizes"]),
        counts=dict(data["counts"]),
        held_out_pairs=dict(data["held_out_pairs"]),
        tree_sha256=data["tree_sha256"],
        reused=True,
    )


def _complete(summary: StudySummary) -> bool:
    """Every file and folder of the tree is there, with as many images as the summary counts."""
    roots = study_roots(summary.out_dir)
    if not all(roots[k].is_file() for k in ("web_json", "captions_json", "instruct_json")):
        return False
    folders = {
        roots["web_image_root"] / WEB_FOLDER: summary.counts.get("web_558k"),
        roots["llava_image_root"] / LLAVA_FOLDER: summary.counts.get("captions_558k"),
    }
    for kind, (annotation, folder) in WHATSUP_FILES.items():
        if not (roots["whatsup_root"] / annotation).is_file():
            return False
        folders[roots["whatsup_root"] / folder] = summary.counts.get(f"whatsup_controlled_{kind.lower()}")
    return all(path.is_dir() and sum(1 for _ in path.iterdir()) == n for path, n in folders.items())


def ensure_study(out_dir: str | Path, *, seed: int, scale: StudyScale | str = "full") -> StudySummary:
    """A study tree of this version, ``seed`` and ``scale`` in ``out_dir``: reuse a complete one, else write one.

    - ``STUDY.json`` of the current version, same seed and scale, every file there: nothing is written; the
      returned summary has ``reused=True``.
    - No ``STUDY.json``: ``generate_study``; ValueError, nothing removed, where foreign files occupy its folders.
    - ``STUDY.json`` of an older version, another seed or scale, or an incomplete tree: regenerated (it is ours).
    - ``STUDY.json`` of a newer version, or one not written by this generator: ValueError, nothing replaced.
    """
    out = Path(out_dir)
    name, sizes = _check_args(out, seed, scale)
    found = read_study(out)
    if found is None:  # overwrite=True only to get the clearer error where foreign files hold our folders
        return generate_study(out, seed=seed, scale=scale, overwrite=True)
    if found.version > STUDY_VERSION:
        raise ValueError(
            f"{out / STUDY_FILE} was written by study version {found.version}, newer than this one "
            f"({STUDY_VERSION}); not replacing it"
        )
    same = (found.version, found.seed, found.scale, found.sizes) == (STUDY_VERSION, seed, name, sizes.to_dict())
    if same and _complete(found):
        return found
    return generate_study(out, seed=seed, scale=scale, overwrite=True)


__all__ = [
    "FORBIDDEN_WEB_TOKENS",
    "SCALES",
    "STUDY_FILE",
    "STUDY_ROOTS",
    "STUDY_VERSION",
    "StudyScale",
    "StudySummary",
    "ensure_study",
    "eval_object_pairs",
    "eval_sets",
    "generate_study",
    "held_out_pairs",
    "instruct_conversation",
    "is_held_out",
    "pair_key",
    "read_study",
    "study_roots",
    "study_sources",
    "train_pairs",
    "training_scene",
    "web_caption",
]
