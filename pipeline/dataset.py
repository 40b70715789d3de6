"""Reading a YOLO-format detection dataset the way Ultralytics reads it.

`load_data_yaml` resolves a data.yaml into concrete image and label paths with Ultralytics' own
conventions, so what we validate is exactly what training will read. `image_table` and `box_table`
flatten the dataset into DataFrames for the validate stage; they never raise on bad content (a
corrupt image or a malformed label line becomes a row that an expectation can flag).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from pipeline.io import sha256_file

# Ultralytics' IMG_FORMATS: any other file inside an images folder is ignored by training.
IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The data.yaml or the folder layout it points to is unusable (not the content of the files)."""

    def __init__(self, message: str, path: Path | str):
        super().__init__(message)
        self.path = Path(path)  # the file or folder at fault


@dataclass
class DatasetSpec:
    yaml_path: Path
    root: Path  # the dataset root after Ultralytics' `path:` resolution
    names: dict[int, str]
    sources: dict[str, list[Path]]  # split -> the folders or .txt lists data.yaml names for it
    images: dict[str, list[Path]] = field(default_factory=dict)  # split -> absolute image paths, sorted

    def label_path(self, image: Path) -> Path:
        return label_path_for(image)

    def relpath(self, path: Path) -> str:
        """Path as shown to people and hashed: relative to the dataset root when inside it."""
        try:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return Path(os.path.abspath(path)).as_posix()


def label_path_for(image: Path) -> Path:
    # Ultralytics swaps the LAST /images/ path component for /labels/ and the suffix for .txt.
    text = os.path.abspath(image)
    marker, replacement = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if marker in text:
        head, tail = text.rsplit(marker, 1)
        text = head + replacement + tail
    return Path(text.rsplit(".", 1)[0] + ".txt")


def load_data_yaml(path: str | Path) -> DatasetSpec:
    yaml_path = Path(path).absolute()
    if not yaml_path.is_file():
        raise DatasetError(f"{yaml_path}: data.yaml not found", yaml_path)
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(f"{yaml_path}: not valid YAML: {e}", yaml_path) from e
    if not isinstance(data, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with train, val and names", yaml_path)

    names = _parse_names(yaml_path, data)
    root = _resolve_root(yaml_path, data.get("path"))

    sources: dict[str, list[Path]] = {}
    for split in SPLITS:
        key = "val" if split == "val" and "val" not in data and "validation" in data else split
        entry = data.get(key)
        if not entry:
            if split in ("train", "val"):
                raise DatasetError(f"{yaml_path}: no '{split}' entry", yaml_path)
            continue
        entries = entry if isinstance(entry, list) else [entry]
        sources[split] = [_resolve_split_entry(root, str(e)) for e in entries]

    spec = DatasetSpec(yaml_path=yaml_path, root=root, names=names, sources=sources)
    for split, split_sources in sources.items():
        spec.images[split] = _list_images(yaml_path, split, split_sources)
        _check_labels_folders(yaml_path, split, split_sources, spec.images[split])
    return spec


def split_images(data_yaml: str | Path, split: str, limit: int | None = None) -> list[Path]:
    """The first `limit` (all by default) images of a split, in sorted order, as Ultralytics lists them; the one
    place that reads a split's folders and .txt lists."""
    spec = load_data_yaml(data_yaml)
    images = spec.images.get(split, [])[:limit]
    if not images:
        raise DatasetError(f"{spec.yaml_path}: the {split} split has no images", spec.yaml_path)
    return images


def _parse_names(yaml_path: Path, data: dict) -> dict[int, str]:
    names = data.get("names")
    if not names:
        raise DatasetError(f"{yaml_path}: no 'names' (the class names, as a list or a {{id: name}} mapping)",
                           yaml_path)
    if isinstance(names, list):
        return {i: str(name) for i, name in enumerate(names)}
    if isinstance(names, dict):
        try:
            return {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: 'names' keys must be integer class ids", yaml_path) from None
    raise DatasetError(f"{yaml_path}: 'names' must be a list or a mapping, got {type(names).__name__}",
                       yaml_path)


def _resolve_root(yaml_path: Path, path_value) -> Path:
    # Ultralytics: no `path` -> the yaml's folder; a relative `path` is taken from the CURRENT
    # directory if it exists there, otherwise from Ultralytics' datasets_dir setting.
    if not path_value:
        return yaml_path.parent
    root = Path(str(path_value))
    if root.is_absolute() or root.exists():
        return root.absolute()
    from ultralytics.utils import DATASETS_DIR  # only for this rare case: the import is slow
    return (Path(DATASETS_DIR) / root).absolute()


def _resolve_split_entry(root: Path, entry: str) -> Path:
    resolved = (root / entry).resolve()
    if not resolved.exists() and entry.startswith("../"):  # Ultralytics retries without the "../"
        resolved = (root / entry[3:]).resolve()
    return resolved


def _list_images(yaml_path: Path, split: str, sources: list[Path]) -> list[Path]:
    images: list[Path] = []
    for source in sources:
        if source.is_dir():
            images += [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif source.is_file() and source.suffix == ".txt":
            for line in source.read_text().splitlines():
                line = line.strip()
                if not line:
                    continue
                # Ultralytics resolves "./x" against the list's folder and anything else as given.
                image = source.parent / line[2:] if line.startswith("./") else Path(line)
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(image.absolute())
        else:
            raise DatasetError(f"{yaml_path}: {split} images folder {source} does not exist", source)
    return sorted(images)


def _check_labels_folders(yaml_path: Path, split: str, sources: list[Path], images: list[Path]) -> None:
    # A missing label FILE is a background image to Ultralytics; a missing labels FOLDER almost
    # always means a wrong layout, and training would silently see a dataset of empty images.
    for source in sources:
        if source.is_dir():
            labels_dir = label_path_for(source / "x.png").parent
            if not labels_dir.is_dir():
                raise DatasetError(f"{yaml_path}: {split} labels folder {labels_dir} does not exist "
                                   f"(expected next to images folder {source})", labels_dir)
    for labels_dir in sorted({label_path_for(image).parent for image in images}):
        if not labels_dir.is_dir():
            raise DatasetError(f"{yaml_path}: {split} labels folder {labels_dir} does not exist", labels_dir)


def dataset_hash(spec: DatasetSpec) -> str:
    """sha256 over (relative path, content sha256) of every image and label file, in sorted order."""
    files: dict[str, Path] = {}
    for split_images in spec.images.values():
        for image in split_images:
            files[spec.relpath(image)] = image
            label = spec.label_path(image)
            if label.exists():
                files[spec.relpath(label)] = label
    digest = hashlib.sha256()
    for relpath in sorted(files):
        digest.update(f"{relpath}\0{sha256_file(files[relpath])}\n".encode())
    return digest.hexdigest()


def image_table(spec: DatasetSpec) -> pd.DataFrame:
    rows = []
    for split, split_images in spec.images.items():
        for image in split_images:
            row = {"split": split, "path": spec.relpath(image), "decodes": False, "decode_error": None,
                   "width": None, "height": None, "sha256": None, "box_count": 0,
                   "label_path": None, "label_error": None}
            try:
                row["sha256"] = sha256_file(image)
                with Image.open(image) as im:
                    im.load()  # a full decode: verify() alone misses truncated data
                    row["width"], row["height"] = im.size
                row["decodes"] = True
            except Exception as e:  # noqa: BLE001 - any decoder failure means the image is unusable
                row["decode_error"] = f"{type(e).__name__}: {e}"
            label = spec.label_path(image)
            if label.exists():
                row["label_path"] = spec.relpath(label)
                try:
                    row["box_count"] = sum(1 for line in label.read_text().splitlines() if line.strip())
                except (OSError, UnicodeDecodeError) as e:
                    row["label_error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
    columns = ["split", "path", "decodes", "decode_error", "width", "height", "sha256", "box_count",
               "label_path", "label_error"]
    table = pd.DataFrame(rows, columns=columns)
    table["width"] = table["width"].astype("Int64")
    table["height"] = table["height"].astype("Int64")
    return table


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def box_table(spec: DatasetSpec) -> pd.DataFrame:
    """One row per non-blank label line. Unparseable values are NaN and `numeric` is False."""
    rows = []
    for split, split_images in spec.images.items():
        for image in split_images:
            label = spec.label_path(image)
            if not label.exists():
                continue
            try:
                lines = label.read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                continue  # reported per image by image_table's label_error
            for number, raw in enumerate(lines, start=1):
                fields = raw.split()
                if not fields:
                    continue
                values = [_number(f) for f in fields]
                padded = (values + [math.nan] * 5)[:5]
                rows.append({
                    "split": split, "image": spec.relpath(image), "label": spec.relpath(label),
                    "line": number, "class_id": padded[0], "x": padded[1], "y": padded[2],
                    "w": padded[3], "h": padded[4], "n_fields": len(fields),
                    "numeric": not any(math.isnan(v) for v in values), "raw": raw,
                })
    columns = ["split", "image", "label", "line", "class_id", "x", "y", "w", "h", "n_fields", "numeric", "raw"]
    table = pd.DataFrame(rows, columns=columns)
    for column in ["class_id", "x", "y", "w", "h"]:
        table[column] = table[column].astype("float64")
    table["line"] = table["line"].astype("int64")
    table["n_fields"] = table["n_fields"].astype("int64")
    table["numeric"] = table["numeric"].astype("bool")
    return table


def workspace_dataset_hash(ws) -> str:
    """`dataset_hash` of a workspace's dataset, computed once per run (hashing every image is not free)."""
    if "dataset_hash" not in ws.cache:
        ws.cache["dataset_hash"] = dataset_hash(load_data_yaml(ws.data_yaml()))
    return ws.cache["dataset_hash"]
