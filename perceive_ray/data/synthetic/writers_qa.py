"""Plans of What'sUp COCO-QA / VG-QA (in the Controlled root) and of MMVP (``Questions.csv`` + statements).

What'sUp QA (PROTOCOLS §1.2): ``coco_qa_{one,two}_obj.json`` over ``val2017/{id:012d}.jpg`` and
``vg_qa_{one,two}_obj.json`` over ``vg_images/{id}.jpg``, JSON arrays of ``[image_id, true, false]``. Image ids
are drawn without repetition per image folder; an image can carry two items (the real files reuse images).

MMVP (PROTOCOLS §1.3): ``MMVP Images/{q}.jpg``, ``Questions.csv`` (``Index,Question,Options,Correct Answer``; rows
2k-1 and 2k share question and options, answers opposite) and ``Questions-clip.csv`` (``Question ID,Type,
Statement``, Type ``Unknown``; statement q describes image q). Pairs come from ``build_vlm_pair`` (keyed apart
from MMVP-VLM's), one category after another.
"""

from __future__ import annotations

from perceive_ray.data.synthetic.scenes import NUMBER_WORDS, VLM_TYPES, VlmSpec, build_vlm_pair, make_rng
from perceive_ray.data.synthetic.scenes_extra import build_qa_one, build_qa_two
from perceive_ray.data.synthetic.writers import Plan

# subset -> (annotation file, image path pattern over the integer id, image-id pool)
QA_FILES = {
    "coco_one": ("coco_qa_one_obj.json", "val2017/{:012d}.jpg", "coco"),
    "coco_two": ("coco_qa_two_obj.json", "val2017/{:012d}.jpg", "coco"),
    "vg_one": ("vg_qa_one_obj.json", "vg_images/{}.jpg", "vg"),
    "vg_two": ("vg_qa_two_obj.json", "vg_images/{}.jpg", "vg"),
}
ID_RANGES = {"coco": (1, 581_929), "vg": (1, 2_417_997)}  # COCO 2017 and Visual Genome image-id spans

MMVP_IMAGES = "MMVP Images"  # upstream name, space included (the adapter also accepts MMVP_Images)
MMVP_QUESTIONS_HEADER = ("Index", "Question", "Options", "Correct Answer")
MMVP_STATEMENTS_HEADER = ("Question ID", "Type", "Statement")


def qa_images(pairs: int) -> int:
    """Images per What'sUp QA subset: one-object subsets hold ~1.5 items per image, two-object ~1.33."""
    return max(3, pairs)


def mmvp_pairs(pairs: int) -> int:
    return max(2, pairs)


def plan_whatsup_qa(seed: int, pairs: int) -> Plan:
    """The four QA subsets; one-object images are lone objects in a quadrant, two-object ones table scenes."""
    plan = Plan()
    n = qa_images(pairs)
    built = {
        subset: (build_qa_one if subset.endswith("one") else build_qa_two)(seed, subset, n) for subset in QA_FILES
    }
    for pool, (low, high) in ID_RANGES.items():
        subsets = [s for s, (_, _, p) in QA_FILES.items() if p == pool]
        ids = make_rng(seed, "whatsup_qa", pool, "image-ids").sample(range(low, high + 1), n * len(subsets))
        for k, subset in enumerate(subsets):
            annotation, pattern, _ = QA_FILES[subset]
            scenes, items = built[subset]
            subset_ids = ids[k * n : (k + 1) * n]
            for image_id, scene in zip(subset_ids, scenes, strict=True):
                plan.add_image(pattern.format(image_id), scene)
            rows = [[subset_ids[item.image], item.true_caption, item.false_caption] for item in items]
            plan.files[annotation] = ("json", rows)
            plan.counts[f"whatsup_{subset}"] = len(rows)
    return plan


def pair_question(category: str, specs: tuple[VlmSpec, VlmSpec]) -> tuple[str, tuple[str, str]]:
    """The MMVP question for a pair and the option naming each spec (label k describes specs[k])."""
    first = specs[0]
    if category == "Orientation":
        return "Which direction is the arrow pointing?", tuple(s.variant.capitalize() for s in specs)
    if category == "Presence":
        question = f"Is there a white dot in the middle of the {first.colour} {first.shape}?"
        return question, tuple("Yes" if s.variant == "dot" else "No" for s in specs)
    if category == "State":
        question = f"Is the {first.colour} {first.shape} solid or hollow?"
        return question, tuple("Solid" if s.variant == "filled" else "Hollow" for s in specs)
    if category == "Quantity":
        question = f"How many {first.colour} {first.shape}s are in the picture?"
        return question, tuple(NUMBER_WORDS[int(s.variant) - 1].capitalize() for s in specs)
    if category == "Spatial":
        a, b = (o.name for o in first.scene.objects)
        if first.scene.relation in ("left", "right"):
            question = f"Is the {a} to the left or to the right of the {b}?"
        else:
            question = f"Is the {a} on or under the {b}?"
        return question, tuple(s.scene.relation.capitalize() for s in specs)
    if category == "Color":
        return f"What color is the {first.shape}?", tuple(s.colour.capitalize() for s in specs)
    if category == "Structural Character":
        return "Are the stripes on the square horizontal or vertical?", tuple(s.variant.capitalize() for s in specs)
    if category == "Text":
        return "Which letter is printed on the card?", tuple(f'"{s.variant}"' for s in specs)
    if category == "Camera Perspective":
        question = f"Is the {first.colour} cube seen from the front or from above?"
        return question, tuple("From the front" if s.variant == "front" else "From above" for s in specs)
    raise ValueError(f"no MMVP question for category {category!r}")


def mmvp_specs(seed: int, pairs: int) -> list[tuple[VlmSpec, VlmSpec]]:
    """The MMVP pairs: categories in turn, each pair drawn under MMVP's own key (never an MMVP-VLM image)."""
    n_types = len(VLM_TYPES)
    return [
        build_vlm_pair(seed, VLM_TYPES[k % n_types], k // n_types, purpose="mmvp") for k in range(mmvp_pairs(pairs))
    ]


def plan_mmvp(seed: int, pairs: int) -> Plan:
    plan = Plan()
    questions: list[list[str]] = []
    statements: list[list[str]] = []
    for k, specs in enumerate(mmvp_specs(seed, pairs)):
        question, labels = pair_question(specs[0].category, specs)
        if labels[0] == labels[1]:
            raise AssertionError(f"MMVP pair {k + 1}: both images answer {labels[0]!r}")
        options = list(labels)
        if make_rng(seed, "mmvp", k, "option-order").random() < 0.5:  # (a) is not always the first row's answer
            options.reverse()
        for spec, label in zip(specs, labels, strict=True):
            q = len(statements) + 1
            plan.add_image(f"{MMVP_IMAGES}/{q}.jpg", spec)
            statements.append([str(q), "Unknown", spec.statement])
            answer = "(a)" if label == options[0] else "(b)"
            questions.append([str(q), question, f"(a) {options[0]} (b) {options[1]}", answer])
    plan.files["Questions.csv"] = ("csv", (MMVP_QUESTIONS_HEADER, questions))
    plan.files["Questions-clip.csv"] = ("csv", (MMVP_STATEMENTS_HEADER, statements))
    plan.counts.update(mmvp_pairs=len(statements) // 2, mmvp_rows=len(statements))
    return plan
