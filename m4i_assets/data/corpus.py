"""The embedded default corpus: seeded, generated image-caption pairs with exact ground truth.

Each record is a small PNG scene (one to three coloured shapes on a textured background, with a
per-image noise pattern) and one caption that really describes it: every object with its size,
colour, shape and position, the relation between the first two objects, and the background, in
varied phrasing. Captions are unique across the corpus. Same `CorpusSpec`, same bytes.

The corpus is written as image files plus a JSONL manifest and is ingested through the same manifest
reader as users' data (`m4i_assets.data.manifest`), so it is one source among others, not a special
path. `style="shifted"` renders a deliberately different distribution (muted palette, terse caption
style), used to show the blind-baseline shift gate firing (README, Rules of evidence).

`style="sketch"` is a second caption domain, a different dataset over the same scene sampler, for the
data-restricted scenario (shadow model trained on another dataset than the target's; Hu et al. 2022):
line drawings on light paper (blank, ruled, gridded, speckled, grainy or smudged), each shape a
coloured outline with hatching (white ones edged in graphite), and captions in their own vocabulary
and templates ("pencil drawing showing a tiny disc outlined in scarlet by the upper left ...").
Its metadata keeps the scene's labels in the default vocabulary and adds the `paper` and `ruling`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
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
STYLES = ("default", "shifted", "sketch")

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

# The sketch domain: its own words for the same scene labels, its own templates, paper instead of textures.
SKETCH_SHAPES = {
    "circle": "disc",
    "square": "box",
    "triangle": "wedge",
    "diamond": "rhombus",
    "cross": "crosshair",
    "ring": "hoop",
    "star": "starburst",
    "bar": "strip",
}
SKETCH_COLOURS = {
    "red": "scarlet",
    "green": "jade",
    "blue": "cobalt",
    "yellow": "lemon",
    "purple": "violet",
    "orange": "tangerine",
    "cyan": "turquoise",
    "pink": "rose",
    "brown": "umber",
    "white": "chalk",
    "black": "soot",
    "grey": "graphite",
}
SKETCH_SIZES = {"small": "tiny", "medium": "midsize", "large": "big"}
SKETCH_POSITIONS = {
    "top left": "upper left",
    "top": "upper edge",
    "top right": "upper right",
    "left": "left side",
    "centre": "middle",
    "right": "right side",
    "bottom left": "lower left",
    "bottom": "lower edge",
    "bottom right": "lower right",
}
SKETCH_RELATIONS = {"left of": "left of", "right of": "right of", "above": "over", "below": "under"}
# Scene background -> paper (name, colour); scene texture -> ruling of the sheet.
SKETCH_PAPERS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "beige": ("cream", (250, 243, 220)),
    "navy": ("ivory", (254, 253, 244)),
    "olive": ("parchment", (236, 222, 186)),
    "lavender": ("newsprint", (226, 225, 218)),
    "teal": ("manila", (243, 226, 168)),
    "sand": ("kraft", (212, 188, 148)),
    "charcoal": ("vellum", (230, 238, 242)),
    "mint": ("linen", (244, 234, 224)),
}
SKETCH_RULINGS = {
    "plain": "blank",
    "striped": "ruled",
    "dotted": "speckled",
    "checkered": "gridded",
    "noisy": "grainy",
    "gradient": "smudged",
}
SKETCH_RULE_INK = (140, 165, 215)  # pale blue of ruled and gridded paper
SKETCH_GRAPHITE = (70, 70, 75)
# Short templates: a sketch caption has at most 47 words (the captioner's default `max_len` is 48).
SKETCH_OBJECT_TEMPLATES = (
    "a {size} {shape} outlined in {colour} by the {position}",
    "a {size} {colour} {shape} drawn at the {position}",
    "a {colour} {shape}, {size}, toward the {position}",
    "a hatched {size} {colour} {shape} at the {position}",
)
SKETCH_OPENERS = ("sketch of ", "pencil drawing showing ", "line art: ", "doodle of ", "ink study of ")
SKETCH_JOINERS = (", beside ", " alongside ", "; then ", " and ")
SKETCH_PAPER_TEMPLATES = (
    " on {ruling} {paper} paper",
    " on a {ruling} {paper} sheet",
    " across a {ruling} {paper} page",
)
SKETCH_RELATION_TEMPLATES = ("; the {a} sits {rel} the {b}", ", its {a} drawn {rel} the {b}")


@dataclass(frozen=True)
class CorpusSpec:
    """What to generate. `seed` fixes every random choice; `style` is one of `STYLES`: "default",
    "shifted" (muted palette, terse captions) or "sketch" (line drawings on paper, own vocabulary)."""

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


def _sketch_caption(scene: dict) -> str:
    """The sketch domain's caption: the same content as the default one, in its own words and templates."""
    objects: list[SceneObject] = scene["objects"]
    p = scene["phrasing"]
    phrases = [
        SKETCH_OBJECT_TEMPLATES[(p[i] + i) % len(SKETCH_OBJECT_TEMPLATES)].format(
            size=SKETCH_SIZES[o.size],
            colour=SKETCH_COLOURS[o.colour],
            shape=SKETCH_SHAPES[o.shape],
            position=SKETCH_POSITIONS[o.position],
        )
        for i, o in enumerate(objects)
    ]
    text = SKETCH_OPENERS[p[3] % len(SKETCH_OPENERS)] + phrases[0]
    for i, phrase in enumerate(phrases[1:], start=1):
        text += SKETCH_JOINERS[(p[4] + i) % len(SKETCH_JOINERS)] + phrase
    text += SKETCH_PAPER_TEMPLATES[p[5] % len(SKETCH_PAPER_TEMPLATES)].format(
        ruling=SKETCH_RULINGS[scene["texture"]], paper=SKETCH_PAPERS[scene["background"]][0]
    )
    if len(objects) >= 2:
        a, b = objects[0], objects[1]
        text += SKETCH_RELATION_TEMPLATES[p[6] % len(SKETCH_RELATION_TEMPLATES)].format(
            a=SKETCH_SHAPES[a.shape], rel=SKETCH_RELATIONS[_relation(a, b)], b=SKETCH_SHAPES[b.shape]
        )
    return text


def _caption(scene: dict, style: str) -> str:
    objects: list[SceneObject] = scene["objects"]
    p = scene["phrasing"]
    if style == "sketch":
        return _sketch_caption(scene)
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
    _draw_shape(draw, o, size, _palette(COLOURS[o.colour], style))


def _draw_shape(draw: ImageDraw.ImageDraw, o: SceneObject, size: int, fill: tuple[int, int, int] | int) -> None:
    """The object's shape, filled with `fill` (a ring is its band)."""
    r = SIZES[o.size] * size / 2
    cx, cy = o.cx * size, o.cy * size
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


def _render_sketch(scene: dict, size: int) -> Image.Image:
    """A line drawing: a light sheet of paper, each shape a coloured outline with hatching inside."""
    rng = np.random.default_rng(scene["noise_seed"])
    img = np.broadcast_to(np.array(SKETCH_PAPERS[scene["background"]][1], dtype=np.float32), (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(5, 9)) * max(1, size // 64)
    rule = np.array(SKETCH_RULE_INK, dtype=np.float32)
    texture = scene["texture"]
    if texture == "striped":  # ruled
        lines = yy % period == period - 1
        img[lines] = 0.55 * img[lines] + 0.45 * rule
    elif texture == "checkered":  # gridded
        lines = (xx % period == 0) | (yy % period == 0)
        img[lines] = 0.7 * img[lines] + 0.3 * rule
    elif texture == "dotted":  # speckled
        img[rng.random((size, size)) < 0.05] *= 0.65
    elif texture == "noisy":  # grainy
        img *= rng.uniform(0.88, 1.02, size=(size, size, 1))
    elif texture == "gradient":  # smudged: graphite rubbed in from one corner
        img *= (1.0 - 0.25 * (1.0 - (xx + yy) / (2 * size)))[..., None]
    thickness = max(2, round(size / 24))
    hatch_gap = max(3, size // 12)
    graphite = np.array(SKETCH_GRAPHITE, dtype=np.float32)
    for o in scene["objects"]:
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), o, size, 255)
        filled = np.asarray(mask) > 127
        band = filled & ~(np.asarray(mask.filter(ImageFilter.MinFilter(2 * thickness + 1))) > 127)
        direction = int(rng.integers(0, 3))
        if direction == 0:
            pattern = (xx + yy) % hatch_gap == 0
        elif direction == 1:
            pattern = (xx - yy) % hatch_gap == 0
        else:  # cross-hatching
            pattern = ((xx + yy) % hatch_gap == 0) | ((xx - yy) % hatch_gap == 0)
        hatch = filled & ~band & pattern
        ink = np.array(COLOURS[o.colour], dtype=np.float32)
        img[hatch] = 0.3 * img[hatch] + 0.7 * ink
        img[band] = ink
        if o.colour == "white":  # chalk on paper: edged in graphite so that it shows
            edge = (np.asarray(mask.filter(ImageFilter.MaxFilter(3))) > 127) & ~filled
            img[edge] = graphite
    # Paper grain: every image is unique.
    img += rng.normal(0.0, 3.0, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def render(scene: dict, size: int, style: str) -> bytes:
    """Render one scene to PNG bytes (deterministic: no timestamps or metadata chunks)."""
    if style == "sketch":
        image = _render_sketch(scene, size)
    else:
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
    if spec.style not in STYLES:
        raise ValueError(f"unknown corpus style {spec.style!r}; known styles: {', '.join(STYLES)}")
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
        metadata = {
            "style": spec.style,
            "n_objects": len(objects),
            "texture": scene["texture"],
            "background": scene["background"],
            "shapes": [o.shape for o in objects],
            "colours": [o.colour for o in objects],
        }
        if spec.style == "sketch":
            metadata["paper"] = SKETCH_PAPERS[scene["background"]][0]
            metadata["ruling"] = SKETCH_RULINGS[scene["texture"]]
        lines.append(json.dumps({"image": rel, "caption": caption, "metadata": metadata}, sort_keys=True))
        i += 1
    manifest.write_text("\n".join(lines) + "\n")
    spec_file.write_text(json.dumps(asdict(spec), sort_keys=True))
    return manifest


def generate_pairs(spec: CorpusSpec, out_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """`generate`, then (image paths, captions) in manifest order: for benchmarks and tests that need the
    corpus's pairs without the ingestion path."""
    manifest = generate(spec, out_dir)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return [str(Path(out_dir) / r["image"]) for r in rows], [r["caption"] for r in rows]


def zero_shot_task(metadata: Sequence[str | None], single_object: bool = False) -> tuple[list[str], list[int | None]]:
    """A zero-shot classification task with labels that exist in the embedded corpus.

    `metadata` holds records' metadata JSON (`generate` writes "shapes",
    "colours", "n_objects", "style", ...; the sketch style keeps the default shape names). The label is
    the shape of the first object (the one each caption names first), the classes the corpus's
    `SHAPES`. Returns (class names, label index per record); None where the metadata is missing, not
    JSON, lacks a known first shape, or (with `single_object`) shows more than one object, which
    makes the task unambiguous at the cost of about two thirds of the records.
    """
    classes = list(SHAPES)
    index = {name: j for j, name in enumerate(classes)}
    labels: list[int | None] = []
    for raw in metadata:
        label = None
        try:
            meta = json.loads(raw) if raw else None
        except (TypeError, ValueError):
            meta = None
        if isinstance(meta, dict):
            shapes = meta.get("shapes")
            if isinstance(shapes, list) and shapes and isinstance(shapes[0], str):
                if not single_object or len(shapes) == 1:
                    label = index.get(shapes[0])
        labels.append(label)
    return classes, labels


def zero_shot_prompts(class_names: Sequence[str], style: str = "default") -> list[list[str]]:
    """Prompt texts per class in the corpus's own caption vocabulary, for `metrics.utility.zero_shot_accuracy`.

    One list per class, the same number of prompts each (stack their embeddings to
    (n_classes, n_prompts, d)). `default`: the caption openers with "a {shape}" ("a circle", "there is a
    circle", "the picture shows a circle", "we see a circle", "an image of a circle"). `shifted`, whose
    captions are terse "{colour} {shape} {position}" lists: "{shape}" and "{shape} {position}" for every
    position. `sketch`: its openers with its own shape words ("sketch of a disc", ...). Class names are
    the corpus's `SHAPES`; `default` and `shifted` accept any name, `sketch` only those.
    """
    if style not in STYLES:
        raise ValueError(f"unknown corpus style {style!r}; known styles: {', '.join(STYLES)}")
    if isinstance(class_names, str):
        raise ValueError("class_names must be a sequence of names, not a string")
    if style == "sketch":
        unknown = [c for c in class_names if c not in SKETCH_SHAPES]
        if unknown:
            raise ValueError(f"sketch prompts need corpus shape names, got unknown {unknown}")
        return [[f"{opener}a {SKETCH_SHAPES[c]}" for opener in SKETCH_OPENERS] for c in class_names]
    if style == "shifted":
        return [[c] + [f"{c} {position}" for position, _, _ in POSITIONS] for c in class_names]
    return [[f"{opener}a {c}" for opener in OPENERS] for c in class_names]
