"""C2f rewrite and the pruning helpers, on randomly initialised models (no training, no data)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_tiny_model as _tiny_model
from pipeline import surgery

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("width", [0.125])
def test_c2f_rewrite_preserves_outputs(width):
    from ultralytics.nn.modules.block import C2f

    torch.manual_seed(0)
    original = _tiny_model(width)
    rewritten = copy.deepcopy(original)
    n_c2f = sum(isinstance(m, C2f) for m in original.modules())

    assert surgery.rewrite_c2f(rewritten) == n_c2f > 0
    assert not any(isinstance(m, C2f) for m in rewritten.modules())
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected, got = original(x)[0], rewritten(x)[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_rewrite_keeps_layer_routing_attributes():
    model = _tiny_model()
    surgery.rewrite_c2f(model)
    for i, layer in enumerate(model.model):
        assert layer.i == i  # DetectionModel._predict_once routes tensors with .f and .i
        assert hasattr(layer, "f")


def test_groups_exclude_detect_outputs_and_prune_runs():
    model = _tiny_model()
    surgery.rewrite_c2f(model)
    graph = surgery.build_dependency_graph(model, 64)
    groups = surgery.prunable_groups(model, graph)
    ignored = {id(m) for m in surgery.ignored_head_layers(model)}
    modules = dict(model.named_modules())
    assert groups and not any(id(modules[name]) in ignored for name in groups)
    # The split makes both halves prunable (in the backbone cv1_b is tied to the bottleneck's residual add,
    # so its group is rooted elsewhere; in the neck C2f has no shortcut and both halves are their own roots).
    assert "model.2.cv1_a.conv" in groups
    assert "model.12.cv1_a.conv" in groups and "model.12.cv1_b.conv" in groups

    params_before, macs_before = surgery.count_params_macs(model, 96)
    root = "model.12.cv1_b.conv"
    channels = modules[root].out_channels
    assert surgery.prune_group(model, graph, root, channels // 2) == channels - channels // 2
    params_after, macs_after = surgery.count_params_macs(model, 96)
    assert params_after < params_before and macs_after < macs_before
    with torch.no_grad():
        y = model(torch.rand(1, 3, 96, 96))[0]
    assert y.shape[1] == 4 + 4  # 4 box coordinates + 4 classes: the head's outputs are untouched


def test_save_checkpoint_loads_with_yolo(tmp_path):
    from ultralytics import YOLO

    model = _tiny_model()
    surgery.rewrite_c2f(model)
    path = surgery.save_checkpoint(model, tmp_path / "m.pt", {"train_args": {"imgsz": 96}}, pruning={"x": 1})
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    loaded = YOLO(str(path)).model
    assert any(isinstance(m, surgery.C2fSplit) for m in loaded.modules())


def test_load_detection_model_names_the_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        surgery.load_detection_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        surgery.load_detection_model(junk)
