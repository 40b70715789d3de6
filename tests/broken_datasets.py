"""Ways to break a copy of the tiny demo dataset, one per validation rule.

Each breaker edits the dataset under `root` in place and returns what the validate stage must report:
the expectation that fails and a path (relative to root) that the failure message must name.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Breakage:
    expectation: str  # name of the expectation that must fail, as in summary.json
    offending: str  # a file or folder the failure message must name


def _append_line(root: Path, label: str, line: str) -> None:
    path = root / label
    path.write_text(path.read_text() + line + "\n")


def corrupt_image(root: Path) -> Breakage:
    image = root / "images/train/img_0001.png"
    image.write_bytes(image.read_bytes()[:100])  # a PNG header and then nothing: truncated
    return Breakage("images decode", "images/train/img_0001.png")


def label_line_with_4_numbers(root: Path) -> Breakage:
    _append_line(root, "labels/train/img_0001.txt", "1 0.5 0.5 0.1")
    return Breakage("label lines have 5 fields", "labels/train/img_0001.txt")


def label_value_not_a_number(root: Path) -> Breakage:
    _append_line(root, "labels/train/img_0002.txt", "1 0.5 abc 0.1 0.1")
    return Breakage("label fields are numbers", "labels/train/img_0002.txt")


def class_out_of_range(root: Path) -> Breakage:
    _append_line(root, "labels/val/img_0001.txt", "7 0.5 0.5 0.1 0.1")
    return Breakage("class ids in names", "labels/val/img_0001.txt")


def coordinate_above_1(root: Path) -> Breakage:
    _append_line(root, "labels/train/img_0003.txt", "0 1.2 0.5 0.1 0.1")
    return Breakage("box x in [0, 1]", "labels/train/img_0003.txt")


def box_sticking_out(root: Path) -> Breakage:
    # Centre and size are each within [0, 1], but the box crosses the right border.
    _append_line(root, "labels/train/img_0003.txt", "0 0.95 0.5 0.2 0.1")
    return Breakage("box right edge inside image", "labels/train/img_0003.txt")


def zero_size_box(root: Path) -> Breakage:
    _append_line(root, "labels/train/img_0004.txt", "0 0.5 0.5 0 0.1")
    return Breakage("box w > 0", "labels/train/img_0004.txt")


def missing_labels_folder(root: Path) -> Breakage:
    shutil.rmtree(root / "labels/val")
    return Breakage("data.yaml and folder layout load", "labels/val")


def same_image_in_train_and_val(root: Path) -> Breakage:
    shutil.copy(root / "images/train/img_0002.png", root / "images/val/img_0099.png")
    shutil.copy(root / "labels/train/img_0002.txt", root / "labels/val/img_0099.txt")
    return Breakage("no image content in two splits", "images/val/img_0099.png")


def empty_val_split(root: Path) -> Breakage:
    for image in (root / "images/val").iterdir():
        image.unlink()
    return Breakage("no split is empty", "images/val")


def class_below_floor(root: Path) -> Breakage:
    # Drop every "cross" (class 3) box from train; the test runs with min_instances_per_class=1.
    for label in (root / "labels/train").glob("*.txt"):
        kept = [line for line in label.read_text().splitlines() if not line.startswith("3 ")]
        label.write_text("".join(line + "\n" for line in kept))
    return Breakage("each class has >= 1 train instances", "labels/train")


BREAKERS: dict[str, Callable[[Path], Breakage]] = {
    "corrupt image": corrupt_image,
    "label line with 4 numbers": label_line_with_4_numbers,
    "label value not a number": label_value_not_a_number,
    "class out of range": class_out_of_range,
    "coordinate above 1": coordinate_above_1,
    "box sticking out of the image": box_sticking_out,
    "zero-size box": zero_size_box,
    "missing labels folder": missing_labels_folder,
    "same image in train and val": same_image_in_train_and_val,
    "empty val split": empty_val_split,
    "class below floor": class_below_floor,
}
