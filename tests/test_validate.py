"""The validate stage and the dataset reader it stands on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from broken_datasets import BREAKERS
from pipeline.dataset import DatasetError, box_table, dataset_hash, image_table, load_data_yaml
from pipeline.demo_data import generate_demo
from pipeline.params import DemoParams, ValidateParams
from pipeline.validate import ValidationFailed, validate

TINY = DemoParams(seed=3, n_train=8, n_val=4, n_empty=2, max_objects=4)
# The tiny set has only a handful of boxes per class, so the default floor of 5 would not hold.
TINY_VALIDATE = ValidateParams(min_instances_per_class=1, max_examples=3)


@pytest.fixture(scope="module")
def demo_yaml(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", DemoParams())


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("tiny") / "tiny", TINY).parent


@pytest.fixture
def tiny(tiny_source, tmp_path) -> Path:
    """A private copy of the tiny demo dataset that a test may break."""
    root = tmp_path / "tiny"
    shutil.copytree(tiny_source, root)
    return root


# --- validate -------------------------------------------------------------------------------------

def test_validate_passes_on_demo_data_and_writes_reports(demo_yaml, tmp_path):
    result = validate(demo_yaml, ValidateParams(), tmp_path / "out")

    assert result.success
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["success"] is True
    assert summary["n_failed"] == 0
    names = [e["name"] for e in summary["expectations"]]
    for rule in ["images decode", "label lines have 5 fields", "class ids in names", "box x in [0, 1]",
                 "box w > 0", "box right edge inside image", "no image content in two splits",
                 "no split is empty", "each class has >= 5 train instances"]:
        assert rule in names
    assert all(e["success"] and e["unexpected_count"] == 0 for e in summary["expectations"])

    stats = summary["stats"]
    assert stats["splits"]["train"]["images"] == 240
    assert stats["splits"]["val"]["images"] == 60
    assert stats["splits"]["train"]["background_images"] + stats["splits"]["val"]["background_images"] == 12
    assert set(stats["instances_per_class"]) == {"circle", "square", "triangle", "cross"}
    assert sum(stats["instances_per_class"].values()) == (
        stats["splits"]["train"]["boxes"] + stats["splits"]["val"]["boxes"])
    assert len(stats["dataset_hash"]) == 64

    report = (tmp_path / "out/report.html").read_text()
    assert report.startswith("<!DOCTYPE html>")
    assert "PASSED" in report
    assert "class ids in names" in report
    assert stats["dataset_hash"] in report


def test_tiny_demo_passes(tiny, tmp_path):
    # The baseline for the broken-dataset tests: unbroken, the tiny set is valid.
    assert validate(tiny / "data.yaml", TINY_VALIDATE, tmp_path / "out").success


@pytest.mark.parametrize("breakage", list(BREAKERS))
def test_validate_rejects_broken_dataset(breakage, tiny, tmp_path):
    expected = BREAKERS[breakage](tiny)

    with pytest.raises(ValidationFailed) as failure:
        validate(tiny / "data.yaml", TINY_VALIDATE, tmp_path / "out")

    message = str(failure.value)
    assert message.startswith("validation failed:")
    assert expected.expectation in message
    assert expected.offending in message

    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["success"] is False
    failed = {e["name"]: e for e in summary["expectations"] if not e["success"]}
    assert expected.expectation in failed
    assert failed[expected.expectation]["unexpected_count"] >= 1
    assert any(expected.offending in f for f in failed[expected.expectation]["files"])
    assert "FAIL" in (tmp_path / "out/report.html").read_text()


def test_failure_message_lists_first_examples_and_total(tiny, tmp_path):
    for i in range(5):
        (tiny / "labels/train/img_0001.txt").open("a").write(f"{9 + i} 0.5 0.5 0.1 0.1\n")

    with pytest.raises(ValidationFailed) as failure:
        validate(tiny / "data.yaml", TINY_VALIDATE, tmp_path / "out")

    message = str(failure.value)
    assert "class ids in names (5 bad rows)" in message
    assert "labels/train/img_0001.txt" in message
    assert "class 9 " in message and "class 11 " in message
    assert "class 12 " not in message  # max_examples=3
    assert "... 2 more" in message
    assert "1 of " in message.splitlines()[0]
    # Only the broken rule fails: the other 17 are unaffected by a bad class id.
    assert failure.value.result.failed[0].name == "class ids in names"


def test_validate_overwrites_previous_report(tiny, tmp_path):
    BREAKERS["corrupt image"](tiny)
    with pytest.raises(ValidationFailed):
        validate(tiny / "data.yaml", TINY_VALIDATE, tmp_path / "out")
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["report.html", "summary.json"]  # no temp files left behind


# --- dataset reader -------------------------------------------------------------------------------

def test_load_data_yaml_resolves_demo_layout(tiny, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the yaml has no `path:`, so the cwd must not matter
    spec = load_data_yaml(tiny / "data.yaml")
    assert spec.root == tiny
    assert spec.names == {0: "circle", 1: "square", 2: "triangle", 3: "cross"}
    assert [len(spec.images[s]) for s in ("train", "val")] == [8, 4]
    assert spec.label_path(spec.images["val"][0]) == tiny / "labels/val/img_0000.txt"


def test_load_data_yaml_with_names_list_absolute_path_and_txt_list(tiny, tmp_path):
    (tiny / "train.txt").write_text("".join(f"./images/train/{p.name}\n"
                                            for p in sorted((tiny / "images/train").iterdir())[:5]))
    yaml_path = tmp_path / "elsewhere.yaml"
    yaml_path.write_text(f"path: {tiny}\ntrain: train.txt\nval: images/val\n"
                         f"names: [circle, square, triangle, cross]\n")
    spec = load_data_yaml(yaml_path)
    assert spec.root == tiny
    assert spec.names[3] == "cross"
    assert len(spec.images["train"]) == 5
    assert spec.images["train"][0] == tiny / "images/train/img_0000.png"


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    ("train: [unclosed", "not valid YAML"),
    ("train: images/train\nval: images/val\n", "no 'names'"),
    ("train: images/nope\nval: images/val\nnames: [a]\n", "images/nope does not exist"),
    ("train: images/train\nnames: [a]\n", "no 'val' entry"),
])
def test_load_data_yaml_errors_name_file_and_problem(tiny, content, problem):
    yaml_path = tiny / "data.yaml"
    if content is None:
        yaml_path.unlink()
    else:
        yaml_path.write_text(content)
    with pytest.raises(DatasetError) as error:
        load_data_yaml(yaml_path)
    assert str(yaml_path) in str(error.value)
    assert problem in str(error.value)


def test_missing_label_file_is_background_not_error(tiny, tmp_path):
    (tiny / "labels/train/img_0002.txt").unlink()
    spec = load_data_yaml(tiny / "data.yaml")
    images = image_table(spec).set_index("path")
    assert pd.isna(images.loc["images/train/img_0002.png", "label_path"])
    assert images.loc["images/train/img_0002.png", "box_count"] == 0


def test_tables_keep_bad_rows_instead_of_crashing(tiny):
    (tiny / "labels/train/img_0001.txt").open("a").write("2 0.5 0.5 0.1\nx y z w h\n")
    BREAKERS["corrupt image"](tiny)
    spec = load_data_yaml(tiny / "data.yaml")

    images = image_table(spec).set_index("path")
    assert not images.loc["images/train/img_0001.png", "decodes"]
    assert images.loc["images/train/img_0000.png", "decodes"]
    assert images.loc["images/train/img_0000.png", "width"] == 160

    boxes = box_table(spec)
    bad = boxes[boxes["label"] == "labels/train/img_0001.txt"].tail(2)
    assert list(bad["n_fields"]) == [4, 5]
    assert list(bad["numeric"]) == [True, False]
    assert bad["h"].isna().all()
    assert bad["x"].isna().tolist() == [False, True]
    assert bad["raw"].tolist() == ["2 0.5 0.5 0.1", "x y z w h"]


def test_dataset_hash_tracks_content_not_location(tiny, tmp_path):
    first = dataset_hash(load_data_yaml(tiny / "data.yaml"))
    moved = tmp_path / "moved"
    shutil.copytree(tiny, moved)
    assert dataset_hash(load_data_yaml(moved / "data.yaml")) == first

    (moved / "labels/val/img_0001.txt").open("a").write("0 0.5 0.5 0.1 0.1\n")
    assert dataset_hash(load_data_yaml(moved / "data.yaml")) != first
