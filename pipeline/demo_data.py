"""Small synthetic YOLO-format detection datasets that a tiny model learns in minutes on a CPU.

`kind: shapes` (the demo): filled shapes (circle, square, triangle, cross) of random colour and size on
flat, gradient or noisy backgrounds. `kind: digits` (a second, harder dataset): the ten digits in Pillow's
bundled font, rotated up to 25 degrees and of varied stroke weight, on photo-like backgrounds (blotchy
low-frequency colour with texture), among clutter lines and unlabelled letters the model must learn to
ignore. Colour is random per object, so only the form tells the class. Every box is the exact pixel extent
of the drawn object (taken from its own mask), and objects never overlap, so the labels are as clean as
labels get and mAP is limited by the model, not by the data.

The output is byte-identical for the same params: every image gets its own seeded generator, and
PNG encoding carries no timestamps.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from pipeline.params import DEMO_DATA_YAML, DemoParams
from pipeline.workspace import Workspace

CLASS_NAMES = ["circle", "square", "triangle", "cross"]
DIGIT_NAMES = [str(d) for d in range(10)]
DISTRACTORS = "ACEFHKLMNPRTUVWXY"  # letters unlike any digit (no O, I, S, Z, B, G, Q, D)
MAX_ROTATION_DEG = 25

MIN_SIZE_FRACTION = 0.08  # of the image side
MAX_SIZE_FRACTION = 0.45
MIN_CONTRAST = 120.0  # RGB distance between an object and the background under it
PLACEMENT_TRIES = 50
GAP_PX = 2  # free pixels kept between objects so boxes never touch
MARKER_FILE = "demo.json"
GENERATOR_VERSION = 1  # bump when the drawing code changes, so old datasets are regenerated


def class_names(kind: str) -> list[str]:
    return {"shapes": CLASS_NAMES, "digits": DIGIT_NAMES}[kind]


def run(ws: Workspace) -> dict:
    """Stage `demo`: (re)writes data/demo whatever data.yaml points at, since dvc.yaml's demo stage owns it."""
    return {"data_yaml": str(generate_demo(ws.path(DEMO_DATA_YAML).parent, ws.params.data.demo))}


def generate_demo(out_dir: Path, p: DemoParams) -> Path:
    """Write the demo dataset into out_dir and return the path of its data.yaml.

    If out_dir already holds a dataset generated from the same params it is left untouched.
    """
    out_dir = Path(out_dir)
    data_yaml = out_dir / "data.yaml"
    marker = {"generator_version": GENERATOR_VERSION, "params": p.model_dump(mode="json")}
    if _existing_marker(out_dir) == marker and data_yaml.exists():
        return data_yaml

    # Build next to out_dir (same filesystem) and swap it in with renames, so an interrupted run
    # leaves either the old dataset or the new one, never half of one.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_dataset(tmp_dir, p)
        (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it 0700
        try:
            if out_dir.exists():
                old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                os.replace(out_dir, old_dir / "dataset")
                os.replace(tmp_dir, out_dir)
                shutil.rmtree(old_dir, ignore_errors=True)
            else:
                os.replace(tmp_dir, out_dir)
        except OSError:
            # Another process (a parallel flow run) may have put the same dataset there first.
            if _existing_marker(out_dir) != marker:
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return data_yaml


def _existing_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_dataset(root: Path, p: DemoParams) -> None:
    total = p.n_train + p.n_val
    n_empty_val = round(p.n_empty * p.n_val / total) if total else 0
    n_empty_train = p.n_empty - n_empty_val
    for split_index, (split, n_images, n_empty) in enumerate(
            [("train", p.n_train, n_empty_train), ("val", p.n_val, n_empty_val)]):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        empty_indices = _evenly_spaced(n_empty, n_images)
        for i in range(n_images):
            rng = np.random.default_rng([p.seed, split_index, i])
            max_objects = 0 if i in empty_indices else p.max_objects
            image, label_lines = make_image(rng, p.imgsz, max_objects, p.kind)
            name = f"img_{i:04d}"
            image.save(root / "images" / split / f"{name}.png", optimize=False)
            (root / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in label_lines))

    # No `path:` key: Ultralytics then uses the folder holding data.yaml as the root, so the dataset
    # can be moved or checked out anywhere (a relative `path:` would be resolved against the cwd).
    data = {
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(class_names(p.kind))),
    }
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _evenly_spaced(k: int, n: int) -> set[int]:
    k = min(k, n)
    return {j * n // k for j in range(k)} if k else set()


def make_image(rng: np.random.Generator, size: int, max_objects: int,
               kind: str = "shapes") -> tuple[Image.Image, list[str]]:
    """One image with 1..max_objects objects (none if max_objects is 0) and its YOLO label lines."""
    pixels = _background(rng, size) if kind == "shapes" else _photo_background(rng, size)
    image = Image.fromarray(pixels, "RGB")
    _draw_clutter(rng, image)
    background = np.asarray(image, dtype=np.float32)

    n_objects = int(rng.integers(1, max_objects + 1)) if max_objects > 0 else 0
    taken: list[tuple[int, int, int, int]] = []
    label_lines = []
    for _ in range(n_objects):
        placed = _place_object(rng, size, taken, kind)
        if placed is None:
            continue
        class_id, mask = placed
        left, top, right, bottom = mask.getbbox()  # right/bottom exclusive: the exact drawn extent
        colour = _contrasting_colour(rng, background[top:bottom, left:right].reshape(-1, 3).mean(axis=0))
        image.paste(colour, (0, 0), mask)
        taken.append((left, top, right, bottom))
        x = (left + right) / 2 / size
        y = (top + bottom) / 2 / size
        w = (right - left) / size
        h = (bottom - top) / size
        label_lines.append(f"{class_id} {x:.6f} {y:.6f} {w:.6f} {h:.6f}")
    if kind == "digits":
        _draw_distractors(rng, image, taken)
    return image, label_lines


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(0, 3)
    base = rng.integers(0, 256, size=3).astype(np.float32)
    if kind == 0:  # flat colour
        pixels = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient between two colours, horizontal or vertical
        other = rng.integers(0, 256, size=3).astype(np.float32)
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = ramp[None, :, None] if rng.integers(0, 2) else ramp[:, None, None]
        pixels = base + (other - base) * np.broadcast_to(ramp, (size, size, 1))
    else:  # colour noise around a base colour
        pixels = base + rng.normal(0.0, 25.0, size=(size, size, 3)).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_clutter(rng: np.random.Generator, image: Image.Image) -> None:
    # Thin lines: edges the model must learn to ignore, without looking like any class.
    draw = ImageDraw.Draw(image)
    size = image.width
    for _ in range(int(rng.integers(0, 6))):
        start = tuple(int(v) for v in rng.integers(0, size, size=2))
        end = tuple(int(v) for v in rng.integers(0, size, size=2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line([start, end], fill=colour, width=1)


def _place_object(rng: np.random.Generator, size: int, taken: list[tuple[int, int, int, int]],
                  kind: str) -> tuple[int, Image.Image] | None:
    """Pick a class, size and position that does not touch any taken box; return (class, mask)."""
    low = max(4, round(MIN_SIZE_FRACTION * size))
    high = max(low, round(MAX_SIZE_FRACTION * size))
    for _ in range(PLACEMENT_TRIES):
        class_id = int(rng.integers(0, len(class_names(kind))))
        side = int(rng.integers(low, high + 1))
        if kind == "digits":
            glyph = _glyph_mask(DIGIT_NAMES[class_id], side, rng)
            left = int(rng.integers(0, size - glyph.width + 1))
            top = int(rng.integers(0, size - glyph.height + 1))
            left_ink, top_ink, right_ink, bottom_ink = glyph.getbbox()
            box = (left + left_ink, top + top_ink, left + right_ink, top + bottom_ink)
        else:
            left = int(rng.integers(0, size - side + 1))
            top = int(rng.integers(0, size - side + 1))
            box = (left, top, left + side, top + side)
        if any(_touches(box, other) for other in taken):
            continue
        mask = Image.new("L", (size, size), 0)
        if kind == "digits":
            mask.paste(glyph, (left, top))
        else:
            _draw_shape(ImageDraw.Draw(mask), class_id, box, rng)
        return class_id, mask
    return None


def _glyph_mask(text: str, side: int, rng: np.random.Generator) -> Image.Image:
    """A binary mask of `text` about `side` pixels tall, of random stroke weight and rotation, cropped to its
    ink and never wider or taller than `side` (so it fits wherever a shape of that side fits)."""
    font = ImageFont.load_default(size=max(6, round(side * 1.3)))  # cap height is ~0.75 of the font size
    stroke = int(rng.integers(0, max(1, side // 12) + 1))
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    glyph = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(glyph).text((1 - left, 1 - top), text, fill=255, font=font, stroke_width=stroke,
                               stroke_fill=255)
    glyph = glyph.rotate(float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)), resample=Image.BILINEAR,
                         expand=True)
    glyph = glyph.point(lambda v: 255 if v >= 128 else 0)  # hard edges: the box is the exact ink extent
    glyph = glyph.crop(glyph.getbbox())
    scale = side / max(glyph.size)
    if scale < 1:
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                             Image.NEAREST)
    return glyph


def _photo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    # Blotchy low-frequency colour (a few random colours smoothly interpolated over the image) with fine
    # texture on top: closer to a photograph than flat colour, and no colour tells where objects are.
    cells = int(rng.integers(2, 6))
    coarse = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    pixels += rng.normal(0.0, float(rng.uniform(4.0, 20.0)), size=(size, size, 3)).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_distractors(rng: np.random.Generator, image: Image.Image, taken: list[tuple[int, int, int, int]]) -> None:
    # Unlabelled letters of the same font, weights and colours as the digits, clear of every labelled box:
    # the model must tell digits from other glyphs, not just find glyphs.
    size = image.width
    low, high = max(4, round(MIN_SIZE_FRACTION * size)), max(4, round(MAX_SIZE_FRACTION * size * 0.6))
    for _ in range(int(rng.integers(0, 3))):
        glyph = _glyph_mask(str(rng.choice(list(DISTRACTORS))), int(rng.integers(low, high + 1)), rng)
        left = int(rng.integers(0, size - glyph.width + 1))
        top = int(rng.integers(0, size - glyph.height + 1))
        if any(_touches((left, top, left + glyph.width, top + glyph.height), box) for box in taken):
            continue
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        image.paste(colour, (left, top), glyph)


def _touches(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return (a[0] < b[2] + GAP_PX and b[0] < a[2] + GAP_PX
            and a[1] < b[3] + GAP_PX and b[1] < a[3] + GAP_PX)


def _draw_shape(draw: ImageDraw.ImageDraw, class_id: int, box: tuple[int, int, int, int],
                rng: np.random.Generator) -> None:
    left, top, right, bottom = box
    last_x, last_y = right - 1, bottom - 1  # PIL coordinates are inclusive
    name = CLASS_NAMES[class_id]
    if name == "circle":
        draw.ellipse([left, top, last_x, last_y], fill=255)
    elif name == "square":
        draw.rectangle([left, top, last_x, last_y], fill=255)
    elif name == "triangle":
        # Apex up or down, so the class is not tied to one orientation.
        middle = (left + last_x) / 2
        if rng.integers(0, 2):
            points = [(middle, top), (last_x, last_y), (left, last_y)]
        else:
            points = [(left, top), (last_x, top), (middle, last_y)]
        draw.polygon(points, fill=255)
    elif name == "cross":
        side = right - left
        arm = max(2, side // 3)
        start = left + (side - arm) // 2
        draw.rectangle([start, top, start + arm - 1, last_y], fill=255)
        start = top + (side - arm) // 2
        draw.rectangle([left, start, last_x, start + arm - 1], fill=255)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    best, best_distance = None, -1.0
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        distance = float(np.linalg.norm(colour - under))
        if distance >= MIN_CONTRAST:
            return tuple(int(v) for v in colour)
        if distance > best_distance:
            best, best_distance = colour, distance
    return tuple(int(v) for v in best)
