"""The synthetic demo dataset: deterministic, well-formed, and readable by Ultralytics."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.demo_data import CLASS_NAMES, generate_demo, make_image
from pipeline.params import DemoParams

SMALL = DemoParams(seed=1, n_train=24, n_val=8, n_empty=4, imgsz=160, max_objects=4)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: Path, split: str) -> list[list[str]]:
    return [p.read_text().splitlines() for p in sorted((root / "labels" / split).glob("*.txt"))]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("small") / "demo", SMALL).parent


def test_generation_is_byte_identical(small, tmp_path):
    again = generate_demo(tmp_path / "again", SMALL).parent
    assert _files(again) == _files(small)
    assert len(_files(small)) == 2 * (24 + 8) + 2  # images, labels, data.yaml, demo.json


def test_another_seed_gives_other_images(small, tmp_path):
    other = generate_demo(tmp_path / "other", SMALL.model_copy(update={"seed": 2})).parent
    first = (small / "images/train/img_0003.png").read_bytes()
    assert (other / "images/train/img_0003.png").read_bytes() != first


def test_counts_classes_and_empty_images(small):
    for split, n in [("train", 24), ("val", 8)]:
        images = sorted((small / "images" / split).iterdir())
        labels = sorted((small / "labels" / split).iterdir())
        assert len(images) == n and len(labels) == n
        assert [p.stem for p in images] == [p.stem for p in labels]
        for image in images:
            with Image.open(image) as im:
                assert im.size == (160, 160) and im.mode == "RGB"

    train, val = _labels(small, "train"), _labels(small, "val")
    assert sum(1 for lines in train + val if not lines) == SMALL.n_empty
    assert any(not lines for lines in val)  # empty images are spread over both splits
    assert all(1 <= len(lines) <= SMALL.max_objects for lines in train + val if lines)
    classes = {int(line.split()[0]) for lines in train for line in lines}
    assert classes == set(range(len(CLASS_NAMES)))


def test_boxes_are_normalised_and_inside_the_image(small):
    sizes = []
    for split in ("train", "val"):
        for lines in _labels(small, split):
            for line in lines:
                fields = line.split()
                assert len(fields) == 5
                c, x, y, w, h = map(float, fields)
                assert c in range(len(CLASS_NAMES))
                assert 0 < w <= 1 and 0 < h <= 1
                assert 0 <= x - w / 2 and x + w / 2 <= 1
                assert 0 <= y - h / 2 and y + h / 2 <= 1
                sizes.append(max(w, h))
    assert min(sizes) >= 0.07 and max(sizes) <= 0.46
    assert max(sizes) - min(sizes) > 0.2  # sizes really vary


def test_box_is_the_exact_extent_of_the_shape():
    # Find images that are a flat background plus one shape (exactly two colours): there the shape's
    # pixels are known, and the label box must be exactly their bounding box.
    checked = 0
    for seed in range(300):
        image, lines = make_image(np.random.default_rng([99, seed]), 160, max_objects=1)
        pixels = np.asarray(image).astype(np.int32)
        packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]  # one int per colour
        colours, counts = np.unique(packed, return_counts=True)
        if len(colours) != 2:
            continue
        shape = packed == colours[np.argmin(counts)]
        rows, cols = np.nonzero(shape)
        _, x, y, w, h = map(float, lines[0].split())
        assert round((x - w / 2) * 160) == cols.min() and round((x + w / 2) * 160) == cols.max() + 1
        assert round((y - h / 2) * 160) == rows.min() and round((y + h / 2) * 160) == rows.max() + 1
        checked += 1
    assert checked >= 3


def test_data_yaml_is_relocatable_and_loads_in_ultralytics(small, tmp_path, monkeypatch):
    import ultralytics.data.utils as ultralytics_data
    # check_det_dataset ends by fetching a plotting font; there is no network here, and no need.
    monkeypatch.setattr(ultralytics_data, "check_font", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)

    raw = yaml.safe_load((small / "data.yaml").read_text())
    assert "path" not in raw  # so Ultralytics takes the yaml's folder as the root, whatever the cwd
    assert raw["names"] == dict(enumerate(CLASS_NAMES))

    data = ultralytics_data.check_det_dataset(str(small / "data.yaml"), autodownload=False)
    assert Path(data["path"]) == small
    assert Path(data["train"]) == small / "images/train"
    assert Path(data["val"]) == small / "images/val"
    assert data["nc"] == 4
    assert data["names"] == dict(enumerate(CLASS_NAMES))


def test_same_params_leave_dataset_alone(small, tmp_path):
    root = tmp_path / "demo"
    generate_demo(root, SMALL)
    first_mtime = (root / "images/train/img_0000.png").stat().st_mtime_ns
    time.sleep(0.01)
    generate_demo(root, SMALL)
    assert (root / "images/train/img_0000.png").stat().st_mtime_ns == first_mtime
    assert json.loads((root / "demo.json").read_text())["params"] == SMALL.model_dump()


def test_changed_params_replace_dataset_without_leftovers(tmp_path):
    root = tmp_path / "demo"
    generate_demo(root, SMALL)
    changed = SMALL.model_copy(update={"n_train": 10})
    generate_demo(root, changed)
    assert len(list((root / "images/train").iterdir())) == 10
    assert json.loads((root / "demo.json").read_text())["params"]["n_train"] == 10
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # no temp or old folders left next to it


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    import pipeline.demo_data as demo_data

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "make_image", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path / "demo", SMALL)
    assert os.listdir(tmp_path) == []


def test_default_demo_is_quick_to_generate(tmp_path):
    started = time.perf_counter()
    data_yaml = generate_demo(tmp_path / "demo", DemoParams())
    seconds = time.perf_counter() - started
    assert len(list((data_yaml.parent / "images/train").iterdir())) == 240
    assert len(list((data_yaml.parent / "images/val").iterdir())) == 60
    assert seconds < 30  # about 2-3 s on a laptop core; the bound only catches a pathological slowdown


DIGITS = DemoParams(kind="digits", seed=3, n_train=40, n_val=10, n_empty=2, imgsz=160, max_objects=4)


def test_digits_dataset_has_ten_classes_and_exact_boxes(tmp_path, monkeypatch):
    import ultralytics.data.utils as ultralytics_data
    monkeypatch.setattr(ultralytics_data, "check_font", lambda *args, **kwargs: None)

    root = generate_demo(tmp_path / "digits", DIGITS).parent
    data = ultralytics_data.check_det_dataset(str(root / "data.yaml"), autodownload=False)
    assert data["nc"] == 10 and data["names"] == {d: str(d) for d in range(10)}
    train = _labels(root, "train")
    assert {int(line.split()[0]) for lines in train for line in lines} == set(range(10))

    # The object's colour is one flat colour on a noisy background: inside its box, the pixels of the most
    # common colour are the glyph, and their extent must be the label box exactly.
    checked = 0
    for split in ("train", "val"):
        for label in sorted((root / "labels" / split).glob("*.txt")):
            pixels = np.asarray(Image.open(root / "images" / split / f"{label.stem}.png")).astype(np.int64)
            packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
            for line in label.read_text().splitlines():
                _, x, y, w, h = map(float, line.split())
                left, right = round((x - w / 2) * 160), round((x + w / 2) * 160)
                top, bottom = round((y - h / 2) * 160), round((y + h / 2) * 160)
                assert 0 <= left < right <= 160 and 0 <= top < bottom <= 160
                inside = packed[top:bottom, left:right]
                colours, counts = np.unique(inside, return_counts=True)
                rows, cols = np.nonzero(inside == colours[np.argmax(counts)])
                assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (0, right - left, 0, bottom - top)
                checked += 1
    assert checked > 50


def test_digits_generation_is_byte_identical_and_kind_is_part_of_the_marker(tmp_path):
    first = generate_demo(tmp_path / "a", DIGITS).parent
    again = generate_demo(tmp_path / "b", DIGITS).parent
    assert _files(first) == _files(again)
    assert json.loads((first / "demo.json").read_text())["params"]["kind"] == "digits"
    shapes = generate_demo(tmp_path / "a", DIGITS.model_copy(update={"kind": "shapes"})).parent
    assert yaml.safe_load((shapes / "data.yaml").read_text())["names"] == dict(enumerate(CLASS_NAMES))


def test_unknown_dataset_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        DemoParams(kind="letters")
