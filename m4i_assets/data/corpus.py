"""The embedded default corpus: seeded, generated image-caption pairs with exact ground truth.

Each record is a small PNG scene (one to three coloured shapes on a textured background, with a
per-image noise pattern) and one caption that really describes it: every object with its size,
colour, shape and position, the relation between the first two objects, and the background, in
varied phrasing. Captions are unique across the corpus. Same `CorpusSpec`, same bytes.

The corpus is written as image files plus a JSONL manifest and is ingested through the same manifest
reader as users' data (`m4i_assets.data.manifest`), so it is one source among others, not a special
path. `style="shifted"` renders a deliberately different distribution (muted palette, terse caption
style), used to show the blind-baseline shift gate firing (ATTACKS.md section 4).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}
POSITIONS = (
    ("top left", 0, 0),
    ("top", 1, 0),
    ("top right", 2, 0),
    ("left", 0, 1),
    ("centre", 1, 1),
    ("right", 2, 1),
    ("bottom left", 0, 2),
    ("bottom", 1, 2),
    ("bottom right", 2, 2),
)
TEXTURES = ("plain", "striped", "dotted", "checkered", "noisy", "gradient")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "beige": (225, 210, 180),
    "navy": (25, 35, 80),
    "olive": (110, 120, 50),
    "lavender": (200, 190, 235),
    "teal": (30, 110, 110),
    "sand": (200, 180, 130),
    "charcoal": (55, 55, 60),
    "mint": (180, 230, 200),
}
# The shifted style: a muted palette and a terse caption grammar (a different distribution).
SHIFTED_FACTOR = 0.45

OBJECT_TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "a {colour} {shape}, {size}, at the {position}",
    "one {size} {shape} coloured {colour} in the {position}",
    "a {size} {shape} of {colour} colour near the {position}",
)
OPENERS = ("", "there is ", "the picture shows ", "we see ", "an image of ")
JOINERS = (" and ", ", plus ", "; also ", " together with ")
BACKGROUND_TEMPLATES = (
    " on a {texture} {bg} background",
    ", set against a {texture} {bg} backdrop",
    " over a {bg} background that is {texture}",
)


@dataclass(frozen=True)
class CorpusSpec:
    """What to generate. `seed` fixes every random choice; `style` is "default" or "shifted"."""

    n_records: int = 3000
    image_size: int = 64
    seed: int = 0
    style: str = "default"
    name: str = "synthetic_shapes"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _sample_scene(rng: np.random.Generator) -> dict:
    n_objects = int(rng.integers(1, 4))
    cells = rng.choice(len(POSITIONS), size=n_objects, replace=False)
    objects = []
    for cell in cells:
        name, gx, gy = POSITIONS[int(cell)]
        objects.append(
            SceneObject(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                size=str(rng.choice(list(SIZES))),
                position=name,
                cx=(gx + 0.5 + rng.uniform(-0.18, 0.18)) / 3,
                cy=(gy + 0.5 + rng.uniform(-0.18, 0.18)) / 3,
            )
        )
    return {
        "objects": objects,
        "texture": str(rng.choice(TEXTURES)),
        "background": str(rng.choice(list(BACKGROUNDS))),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
        "phrasing": [int(x) for x in rng.integers(0, 1000, size=8)],
    }


def _caption(scene: dict, style: str) -> str:
    objects: list[SceneObject] = scene["objects"]
    p = scene["phrasing"]
    if style == "shifted":
        parts = [f"{o.colour} {o.shape} {o.position}" for o in objects]
        return f"{' | '.join(parts)} | {scene['background']} {scene['texture']}"
    phrases = [
        OBJECT_TEMPLATES[(p[i] + i) % len(OBJECT_TEMPLATES)].format(
            size=o.size, colour=o.colour, shape=o.shape, position=o.position
        )
        for i, o in enumerate(objects)
    ]
    text = OPENERS[p[3] % len(OPENERS)] + phrases[0]
    for i, phrase in enumerate(phrases[1:], start=1):
        text += JOINERS[(p[4] + i) % len(JOINERS)] + phrase
    text += BACKGROUND_TEMPLATES[p[5] % len(BACKGROUND_TEMPLATES)].format(
        texture=scene["texture"], bg=scene["background"]
    )
    if len(objects) >= 2:
        a, b = objects[0], objects[1]
        text += f", the {a.shape} is {_relation(a, b)} the {b.shape}"
    return text


def _palette(rgb: tuple[int, int, int], style: str) -> tuple[int, int, int]:
    if style != "shifted":
        return rgb
    grey = sum(rgb) / 3
    return tuple(int(grey + SHIFTED_FACTOR * (c - grey)) for c in rgb)  # type: ignore[return-value]


def _background(scene: dict, size: int, style: str) -> np.ndarray:
    rng = np.random.default_rng(scene["noise_seed"])
    base = np.array(_palette(BACKGROUNDS[scene["background"]], style), dtype=np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 9))
    texture = scene["texture"]
    if texture == "striped":
        img[(xx + yy * int(rng.integers(0, 2))) // period % 2 == 0] *= 0.7
    elif texture == "dotted":
        img[((xx % period) < 2) & ((yy % period) < 2)] *= 0.55
    elif texture == "checkered":
        img[((xx // period) + (yy // period)) % 2 == 0] *= 0.75
    elif texture == "noisy":
        img *= rng.uniform(0.6, 1.1, size=(size, size, 1))
    elif texture == "gradient":
        img *= (0.5 + 0.5 * xx / size)[..., None]
    # A faint per-image noise pattern: every image is unique, as real photographs are.
    img += rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, size: int, style: str) -> None:
    r = SIZES[o.size] * size / 2
    cx, cy = o.cx * size, o.cy * size
    fill = _palette(COLOURS[o.colour], style)
    box = (cx - r, cy - r, cx + r, cy + r)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif o.shape == "square":
        draw.rectangle(box, fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif o.shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif o.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif o.shape == "star":
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)], fill=fill)
    elif o.shape == "bar":
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=fill)


def render(scene: dict, size: int, style: str) -> bytes:
    """Render one scene to PNG bytes (deterministic: no timestamps or metadata chunks)."""
    image = Image.fromarray(_background(scene, size, style))
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        _draw_object(draw, o, size, style)
    if style == "shifted":
        image = image.filter(ImageFilter.GaussianBlur(0.8))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def generate(spec: CorpusSpec, out_dir: str | os.PathLike) -> Path:
    """Write `spec.n_records` images and `manifest.jsonl` under `out_dir`; return the manifest path.

    Idempotent: an existing manifest written from the same spec is kept as it is.
    """
    if spec.style not in ("default", "shifted"):
        raise ValueError(f"unknown corpus style {spec.style!r}; expected 'default' or 'shifted'")
    out = Path(out_dir)
    manifest = out / "manifest.jsonl"
    spec_file = out / "spec.json"
    if manifest.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == asdict(spec):
        return manifest
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    seen: set[str] = set()
    lines = []
    i = 0
    while len(lines) < spec.n_records:
        scene = _sample_scene(rng)
        caption = _caption(scene, spec.style)
        if caption in seen:  # captions are unique across the corpus
            continue
        seen.add(caption)
        rel = f"images/{i:06d}.png"
        (out / rel).write_bytes(render(scene, spec.image_size, spec.style))
        objects = scene["objects"]
        lines.append(
            json.dumps(
                {
                    "image": rel,
                    "caption": caption,
                    "metadata": {
                        "style": spec.style,
                        "n_objects": len(objects),
                        "texture": scene["texture"],
                        "background": scene["background"],
                        "shapes": [o.shape for o in objects],
                        "colours": [o.colour for o in objects],
                    },
                },
                sort_keys=True,
            )
        )
        i += 1
    manifest.write_text("\n".join(lines) + "\n")
    spec_file.write_text(json.dumps(asdict(spec), sort_keys=True))
    return manifest
