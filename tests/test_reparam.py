"""Re-parameterization of YOLOv9's RepConv: one conv, same outputs, fewer parameters, loads anywhere."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_tiny_model
from pipeline import reparam, surgery

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4  # float rounding of summing three branches into one kernel; outputs are O(1..64)


def _randomize_branches(model):
    # Fresh BatchNorms in every branch would make the fusion trivially exact; random ones exercise the folding.
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def test_repconv_fuses_into_one_conv_with_the_same_outputs():
    from ultralytics.nn.modules.conv import RepConv

    original = random_tiny_model(model_yaml="yolov9t.yaml")
    _randomize_branches(original)
    model = copy.deepcopy(original)
    n_rep = sum(isinstance(m, RepConv) for m in original.modules())

    assert reparam.reparameterize(model) == n_rep > 0
    assert not any(isinstance(m, RepConv) for m in model.modules())
    assert reparam.reparameterize(model) == 0  # idempotent
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = original(x), model(x)
    assert (expected[0] - got[0]).abs().max().item() < TOLERANCE  # decoded boxes (pixels) and scores
    for raw_expected, raw_got in zip(surgery.head_outputs(expected), surgery.head_outputs(got)):
        assert (raw_expected - raw_got).abs().max().item() < TOLERANCE


def test_report_measures_the_change_and_leaves_the_model_alone():
    model = random_tiny_model(model_yaml="yolov9t.yaml")
    _randomize_branches(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = reparam.report(model, 64, runs=2)

    assert result["blocks_fused"] > 0 and result["params_after"] < result["params_before"]
    assert result["max_abs_diff"] < TOLERANCE
    assert result["torch_ms_before"] > 0 and result["torch_ms_after"] > 0
    assert model.state_dict().keys() == before.keys()  # the caller's model is not fused

    plain = reparam.report(random_tiny_model(model_yaml="yolov8n.yaml"), 64)
    assert plain["blocks_fused"] == 0 and plain["params_after"] == plain["params_before"]
    assert plain["torch_ms_before"] is None  # nothing fused, nothing to time


def test_fused_checkpoint_trains_and_loads_with_yolo(tmp_path):
    from ultralytics import YOLO

    model = random_tiny_model(model_yaml="yolov9t.yaml")
    reparam.reparameterize(model)
    model.train()
    assert model(torch.rand(2, 3, 64, 64))  # the fused convs train (no BatchNorm, bias learnt)
    path = surgery.save_checkpoint(model.eval(), tmp_path / "fused.pt", {"train_args": {"imgsz": 64}})
    loaded = YOLO(str(path)).model
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        assert torch.allclose(loaded.float()(x)[0], model(x)[0], atol=0.05)  # saved in FP16
    assert surgery.load_detection_model(path)[0]  # and the pipeline's loader takes it as it is
