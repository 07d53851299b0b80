"""PIL drawing of synthetic scene specs, and deterministic JPEG encoding.

Drawing is aliased (no anti-aliasing, no resampling) so every object pixel has exactly its palette colour,
which lets tests recover object centroids from the rendered image. Nothing here is random: the specs decide.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from perceive_ray.data.synthetic.scenes import (
    CANVAS,
    COLOURS,
    GROUND_A,
    HORIZON_B,
    Scene,
    SceneObject,
    VlmSpec,
)
from perceive_ray.data.synthetic.scenes_extra import SoloScene

JPEG_QUALITY = 92
WALL_A, TABLE_A = (236, 232, 222), (196, 170, 135)  # subset A: wall above the table top, table below it
WALL_B, FLOOR_B = (214, 214, 220), (168, 168, 174)  # subset B: wall above the horizon, floor below it
PAPER = (246, 246, 246)  # MMVP-VLM background
WHITE = (255, 255, 255)

Box = tuple[int, int, int, int]


def encode_jpeg(image: Image.Image) -> bytes:
    """Baseline JPEG with fixed quality and no EXIF/ICC/comment, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buffer.getvalue()


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG with fixed compression and no text/time chunks (the formats whose real images are PNG)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """factor < 1 darkens towards black, > 1 lightens towards white (factor 2 = white)."""
    if factor <= 1.0:
        return tuple(round(c * factor) for c in rgb)
    return tuple(round(c + (255 - c) * (factor - 1.0)) for c in rgb)


def _inclusive(box: Box) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (x0, y0, x1 - 1, y1 - 1)  # PIL draws both end coordinates; spec boxes exclude x1/y1


def _outline_points(shape: str, box: Box) -> list[tuple[int, int]]:
    x0, y0, x1, y1 = _inclusive(box)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "triangle":
        return [(x0, y1), (cx, y0), (x1, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        outer, inner = (x1 - x0) / 2.0, (x1 - x0) / 5.0  # px radii of the 5 tips and 5 notches
        centre_y = y0 + outer  # tips reach the top edge; the lower tips stay inside the box
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((round(cx + radius * math.cos(angle)), round(centre_y + radius * math.sin(angle))))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_flat(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill, outline_width: int = 0) -> None:
    """A 2-D shape filling ``box``; ``outline_width`` > 0 draws only its outline."""
    fill_arg, outline_arg = (None, fill) if outline_width else (fill, None)
    if shape == "circle":
        draw.ellipse(_inclusive(box), fill=fill_arg, outline=outline_arg, width=outline_width or 1)
    elif shape == "square":
        draw.rectangle(_inclusive(box), fill=fill_arg, outline=outline_arg, width=outline_width or 1)
    else:
        draw.polygon(
            _outline_points(shape, box), fill=fill_arg, outline=outline_arg, width=outline_width or 1
        )


def draw_solid(
    draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int], depth: float = 0.25
) -> None:
    """A shaded pseudo-3-D solid (cube, sphere, cylinder) filling ``box``; ``depth`` = receding fraction."""
    x0, y0, x1, y1 = _inclusive(box)
    w = x1 - x0
    if shape == "cube":
        d = max(2, round(w * depth))  # px: receding edge of the top and side faces
        draw.rectangle((x0, y0 + d, x1 - d, y1), fill=rgb)
        draw.polygon([(x0, y0 + d), (x0 + d, y0), (x1, y0), (x1 - d, y0 + d)], fill=_shade(rgb, 1.35))
        draw.polygon([(x1 - d, y0 + d), (x1, y0), (x1, y1 - d), (x1 - d, y1)], fill=_shade(rgb, 0.7))
    elif shape == "sphere":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
        r = max(2, w // 5)  # px: highlight radius, upper left as if lit from there
        hx, hy = x0 + w // 3, y0 + w // 3
        draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=_shade(rgb, 1.45))
    elif shape == "cylinder":
        e = max(3, w // 3)  # px: height of the elliptical caps
        draw.rectangle((x0, y0 + e // 2, x1, y1 - e // 2), fill=rgb)
        draw.ellipse((x0, y1 - e, x1, y1), fill=rgb)
        draw.ellipse((x0, y0, x1, y0 + e), fill=_shade(rgb, 1.35))
    else:
        raise ValueError(f"no solid for shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, kind: str, obj: SceneObject) -> None:
    rgb = COLOURS[obj.colour]
    if kind == "B":
        draw_solid(draw, obj.shape, obj.box, rgb)
    else:
        draw_flat(draw, obj.shape, obj.box, rgb)


def render_scene(scene: Scene) -> Image.Image:
    """What'sUp-style scene: A = objects on a table seen from the side; B = solids on a floor, from above."""
    image = Image.new("RGB", (scene.size, scene.size), WALL_A if scene.kind == "A" else WALL_B)
    draw = ImageDraw.Draw(image)
    if scene.kind == "A":
        draw.rectangle((0, GROUND_A, scene.size - 1, scene.size - 1), fill=TABLE_A)
    else:
        draw.rectangle((0, HORIZON_B, scene.size - 1, scene.size - 1), fill=FLOOR_B)
        y, step = HORIZON_B, 3  # floor seams, spaced wider towards the viewer: a perspective cue
        while y < scene.size:
            draw.line((0, y, scene.size - 1, y), fill=_shade(FLOOR_B, 0.92))
            y, step = y + step, step + 2
        for obj in scene.objects:  # contact shadows anchor each solid to its depth on the floor
            x0, _, x1, y1 = obj.box
            draw.ellipse((x0 - 1, y1 - 3, x1, y1 + 1), fill=_shade(FLOOR_B, 0.75))
    # Stable sort by z: the nearer (higher z) object is drawn last and occludes the other where they overlap.
    for obj in sorted(scene.objects, key=lambda o: o.z):
        _draw_object(draw, scene.kind, obj)
    return image


def render_solo(scene: SoloScene) -> Image.Image:
    """One flat object on a plain wall (What'sUp one-object QA); no table, so only its quadrant says where it is."""
    image = Image.new("RGB", (scene.size, scene.size), WALL_A)
    draw_flat(ImageDraw.Draw(image), scene.obj.shape, scene.obj.box, COLOURS[scene.obj.colour])
    return image


def render_spec(spec: Scene | SoloScene | VlmSpec) -> Image.Image:
    """Any image spec of the generator: a two-object scene, a one-object scene or an MMVP-VLM style motif."""
    if isinstance(spec, Scene):
        return render_scene(spec)
    if isinstance(spec, SoloScene):
        return render_solo(spec)
    if isinstance(spec, VlmSpec):
        return render_vlm(spec)
    raise TypeError(f"no renderer for {type(spec).__name__}")


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font: no font file on disk, so the output does not depend on the host's fonts.
    return ImageFont.load_default(size=size)


def _centred(side: int) -> Box:
    start = (CANVAS - side) // 2
    return (start, start, start + side, start + side)


def _draw_arrow(draw: ImageDraw.ImageDraw, direction: str, rgb) -> None:
    c, half, shaft = CANVAS // 2, 26, 5  # px: centre, half-length, half-width of the shaft
    head = 14  # px: head length (and half-width)
    # Drawn pointing up, then rotated by mapping (dx, dy) offsets from the centre.
    shaft_pts = [(-shaft, half), (shaft, half), (shaft, -half + head), (-shaft, -half + head)]
    head_pts = [(-head, -half + head), (head, -half + head), (0, -half)]
    turn = {
        "up": lambda x, y: (x, y),
        "down": lambda x, y: (-x, -y),
        "left": lambda x, y: (y, -x),
        "right": lambda x, y: (-y, x),
    }
    for pts in (shaft_pts, head_pts):
        draw.polygon([(c + turn[direction](x, y)[0], c + turn[direction](x, y)[1]) for x, y in pts], fill=rgb)


def render_vlm(spec: VlmSpec) -> Image.Image:
    """One MMVP-VLM image for ``spec``; each motif makes the statement's distinguishing detail plain."""
    if spec.motif == "scene":
        assert spec.scene is not None
        return render_scene(spec.scene)
    image = Image.new("RGB", (CANVAS, CANVAS), PAPER)
    draw = ImageDraw.Draw(image)
    rgb = COLOURS[spec.colour]
    if spec.motif == "arrow":
        _draw_arrow(draw, spec.variant, rgb)
    elif spec.motif == "dot":
        draw_flat(draw, spec.shape, _centred(44), rgb)
        if spec.variant == "dot":
            c = CANVAS // 2
            draw.ellipse((c - 6, c - 6, c + 6, c + 6), fill=WHITE)
    elif spec.motif == "state":
        draw_flat(draw, spec.shape, _centred(48), rgb, outline_width=0 if spec.variant == "filled" else 3)
    elif spec.motif == "count":
        n, side, gap = int(spec.variant), 16, 3  # px: side of each shape, gap between neighbours
        x = (CANVAS - (n * side + (n - 1) * gap)) // 2
        y = (CANVAS - side) // 2
        for k in range(n):
            draw_flat(draw, spec.shape, (x + k * (side + gap), y, x + k * (side + gap) + side, y + side), rgb)
    elif spec.motif == "shape":
        draw_flat(draw, spec.shape, _centred(44), rgb)
    elif spec.motif == "stripes":
        x0, y0, x1, y1 = _centred(48)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=WHITE, outline=rgb, width=2)
        for k in range(0, 48, 8):  # 4 px stripe, 4 px gap
            band = (
                (x0, y0 + k, x1 - 1, y0 + k + 3)
                if spec.variant == "horizontal"
                else (x0 + k, y0, x0 + k + 3, y1 - 1)
            )
            draw.rectangle(band, fill=rgb)
    elif spec.motif == "letter":
        draw.rectangle((12, 10, CANVAS - 13, CANVAS - 11), fill=WHITE, outline=(90, 90, 90), width=1)
        draw.text((CANVAS // 2, CANVAS // 2), spec.variant, fill=rgb, font=_font(44), anchor="mm")
    elif spec.motif == "cube_view":
        if spec.variant == "front":
            draw.rectangle(_inclusive(_centred(40)), fill=rgb)
        else:
            draw_solid(draw, "cube", _centred(48), rgb, depth=0.4)
    else:
        raise ValueError(f"unknown MMVP-VLM motif {spec.motif!r}")
    return image
