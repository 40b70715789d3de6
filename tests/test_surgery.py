"""Block rewrites, the dependency graph and its channel groups, on randomly initialised models of every family
(no training, no data)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_tiny_model as _tiny_model
from pipeline import reparam, surgery, units
from pipeline.families import detection_yamls

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["yolov5n.yaml", "yolov8n.yaml", "yolov9t.yaml", "yolo11n.yaml", "yolo26n.yaml"]


def _prepared(model_yaml: str):
    model = _tiny_model(model_yaml=model_yaml)
    reparam.reparameterize(model)
    surgery.rewrite_blocks(model)
    return model


@pytest.mark.parametrize("model_yaml, rewritten", [("yolov5n.yaml", set()), ("yolov8n.yaml", {"C2fSplit"}),
                                                   ("yolov9t.yaml", {"ELANSplit"}),
                                                   ("yolo11n.yaml", {"C2fSplit", "C2PSASplit"}),
                                                   ("yolo26n.yaml", {"C2fSplit", "C2PSASplit"})])
def test_rewrite_preserves_outputs(model_yaml, rewritten):
    original = _tiny_model(model_yaml=model_yaml)
    model = copy.deepcopy(original)
    count = surgery.rewrite_blocks(model)

    assert {type(m).__name__ for m in model.modules() if type(m).__module__ == surgery.__name__} == rewritten
    assert count == sum(type(m).__module__ == surgery.__name__ for m in model.modules())
    for i, layer in enumerate(model.model):
        assert layer.i == i and hasattr(layer, "f")  # DetectionModel._predict_once routes tensors with .f and .i
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected, got = original(x)[0], model(x)[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_adown_rewrite_preserves_outputs_and_follows_pruning():
    """ADown (YOLOv9 c/e) splits its input: the rewrite slices by the widths of the convs reading each half."""
    from ultralytics.nn.modules.block import ADown

    torch.manual_seed(0)
    block = ADown(16, 32).eval()
    split = surgery.split_adown(copy.deepcopy(block))
    x = torch.rand(2, 16, 20, 20)
    with torch.no_grad():
        assert torch.allclose(block(x), split(x), atol=1e-6)
    split.cv1.conv = torch.nn.Conv2d(5, 16, 3, 2, 1, bias=False)  # as if 3 of the first half's channels were pruned
    with torch.no_grad():
        assert split(torch.rand(1, 13, 20, 20)).shape == (1, 32, 10, 10)


def test_c2_and_cblinear_rewrites_preserve_outputs():
    """C2 (YOLOv8-p6) and CBLinear (YOLOv9-e) split one conv's outputs; the rewrites give each part its conv."""
    from ultralytics.nn.modules.block import C2, CBLinear

    torch.manual_seed(0)
    x = torch.rand(2, 16, 12, 12)
    c2 = C2(16, 24, n=2).eval()
    for bn in (m for m in c2.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    cblinear = CBLinear(16, [8, 16, 32]).eval()
    with torch.no_grad():
        assert torch.allclose(c2(x), surgery.split_c2(copy.deepcopy(c2))(x), atol=1e-5)
        for expected, got in zip(cblinear(x), surgery.split_cblinear(copy.deepcopy(cblinear))(x), strict=True):
            assert torch.allclose(expected, got, atol=1e-6)


@pytest.mark.parametrize("model_yaml", FAMILIES)
def test_graph_groups_skip_fixed_channels(model_yaml):
    """(yolo11n/yolo26n once did not get through `classify_groups` in 10 minutes: Torch-Pruning traced
    attention's reshapes and matmuls as channel-keeping ops; now it takes well under a second.)"""
    model = _prepared(model_yaml)
    graph = surgery.build_dependency_graph(model, 64)
    groups, kept = surgery.classify_groups(model, graph)

    modules = dict(model.named_modules())
    ignored = {id(m) for m in surgery.ignored_head_layers(model)}
    assert groups and not any(id(modules[name]) in ignored for name in groups)
    assert all(isinstance(modules[name], torch.nn.Conv2d) for name in groups)
    has_attention = bool(surgery.opaque_modules(model))
    assert bool(kept) == has_attention  # only attention (and the residual stream around it) is kept whole
    for name, reason in kept.items():
        assert name not in groups and "attention" in reason
        if ".attn." in name:
            assert name.endswith((".qkv.conv", ".proj.conv", ".pe.conv"))


def test_groups_are_named_by_the_conv_that_produces_their_channels():
    model = _prepared("yolov8n.yaml")
    groups = surgery.prunable_groups(model, surgery.build_dependency_graph(model, 64))
    # Both halves of a split C2f are prunable; in the backbone cv1_b is tied to the bottleneck's residual add,
    # and the group is still named by cv1_b, which produces those channels first.
    assert {"model.2.cv1_a.conv", "model.2.cv1_b.conv", "model.12.cv1_a.conv", "model.12.cv1_b.conv"} <= set(groups)
    assert "model.2.m.0.cv2.conv" not in groups


@pytest.mark.parametrize("model_yaml", FAMILIES)
def test_pruning_every_unit_keeps_the_head_outputs(model_yaml):
    model = _prepared(model_yaml)
    groups = units.channel_groups(model)
    every_unit = {units.unit_of(root): 0.5 for root in groups}
    params_before, macs_before = surgery.count_params_macs(model, 64)

    removed = units.prune_units(model, every_unit, groups=groups)

    params_after, macs_after = surgery.count_params_macs(model, 64)
    assert removed > 0 and params_after < 0.5 * params_before and macs_after < 0.5 * macs_before
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64))[0]
    assert y.shape[1] == 4 + 4  # 4 box coordinates + 4 classes: the head's outputs are untouched
    model.train()
    out = model(torch.rand(2, 3, 64, 64))  # training mode (the fine-tuning forward) works too
    assert out


def test_iterative_pruning_aims_at_a_fraction_of_the_original_width():
    model = _prepared("yolov8n.yaml")
    conv = model.get_submodule("model.8.cv1_a.conv")
    original = conv.out_channels
    pruner = units.UnitPruner(model, {"model.8": 0.5}, steps=2)
    pruner.step()
    assert conv.out_channels == original - original // 4  # step 1 of 2: a quarter of the original width
    pruner.step()
    assert conv.out_channels == original // 2  # step 2: half of the original, not half of what step 1 left


def test_pruning_rejects_unknown_units_and_bad_ratios():
    model = _prepared("yolov8n.yaml")
    with pytest.raises(KeyError, match="model.99"):
        units.prune_units(model, {"model.99": 0.5})
    with pytest.raises(ValueError, match="outside"):
        units.prune_units(model, {"model.8": 1.0})


@pytest.mark.parametrize("model_yaml", ["yolov9t.yaml", "yolo11n.yaml"])
def test_save_checkpoint_loads_with_yolo(tmp_path, model_yaml):
    from ultralytics import YOLO

    model = _prepared(model_yaml)
    path = surgery.save_checkpoint(model, tmp_path / "m.pt", {"train_args": {"imgsz": 96}}, pruning={"x": 1})
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    loaded = YOLO(str(path)).model
    assert {type(m).__name__ for m in loaded.modules()} >= {type(m).__name__ for m in model.modules()
                                                             if type(m).__module__ == surgery.__name__}


@pytest.mark.slow
@pytest.mark.parametrize("model_yaml", detection_yamls())
def test_every_detection_yaml_rewrites_exactly_and_prunes_in_every_unit(model_yaml):
    """Every detection YAML of the five families at scales n and s, full width, random weights."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    torch.manual_seed(0)
    original = DetectionModel(yaml_model_load(model_yaml), nc=4, verbose=False).eval()
    model = copy.deepcopy(original)
    reparam.reparameterize(model)
    surgery.rewrite_blocks(model)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert (original(x)[0] - model(x)[0]).abs().max().item() < 1e-3
    del original

    groups = units.channel_groups(model)
    units.prune_units(model, {units.unit_of(root): 0.3 for root in groups}, groups=groups)
    with torch.no_grad():
        assert model(x)[0].shape[1] == 4 + 4
    assert model.train()(torch.rand(2, 3, 64, 64))


def test_load_detection_model_names_the_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        surgery.load_detection_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        surgery.load_detection_model(junk)


def _tensors(output) -> list[torch.Tensor]:
    """Every tensor in a training-mode output (a list for v8, nested dicts for YOLO26's two heads)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    return [t for value in values for t in _tensors(value)]


@pytest.mark.parametrize("model_yaml", ["yolov5n.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_depth_units_remove_operators_and_the_model_still_runs(model_yaml):
    model = _prepared(model_yaml)
    found = surgery.depth_units(model)
    assert found and all(u.startswith("model.") and ".m." in u for u in found)
    convs_before = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    params_before = sum(p.numel() for p in model.parameters())
    removed = sum(surgery.drop_bottleneck(model, unit) for unit in found)

    assert removed == params_before - sum(p.numel() for p in model.parameters())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) <= convs_before - 2 * len(found)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == 4 + 4
    model.train()
    sum(t.float().sum() for t in _tensors(model(torch.rand(2, 3, 64, 64)))).backward()  # gradients flow
    assert all(p.grad is not None for p in model.model[-1].parameters() if p.requires_grad)
    # Channel pruning still works on what is left (the dependency graph traces the shorter blocks).
    model.eval()
    groups = units.channel_groups(model)
    assert units.prune_units(model, {units.unit_of(r): 0.3 for r in groups}, groups=groups) > 0
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == 4 + 4


def test_depth_unit_after_channel_pruning_and_bad_units():
    model = _prepared("yolov8n.yaml")
    units.prune_units(model, {"model.12": 0.5})  # the bottleneck's width is whatever pruning left
    surgery.drop_bottleneck(model, "model.12.m.0")
    assert len(model.model[12].m) == 0
    block = model.model[12]  # the concat now holds only the two halves of cv1
    assert block.cv2.conv.in_channels == block.cv1_a.conv.out_channels + block.cv1_b.conv.out_channels
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == 8
    with pytest.raises(ValueError, match="model.12.m.0.*already removed"):
        surgery.drop_bottleneck(model, "model.12.m.0")
    with pytest.raises(ValueError, match="model.9.m.0.*SPPF"):
        surgery.drop_bottleneck(model, "model.9.m.0")
    with pytest.raises(ValueError, match="'model.12'.*expected"):
        surgery.drop_bottleneck(model, "model.12")


def test_model_without_a_bottleneck_exports_to_onnx_and_loads(tmp_path):
    import onnxruntime as ort
    from ultralytics import YOLO

    model = _prepared("yolov8n.yaml")
    for unit in surgery.depth_units(model):
        surgery.drop_bottleneck(model, unit)
    pt = surgery.save_checkpoint(model, tmp_path / "m.pt", {"train_args": {"imgsz": 64, "task": "detect"}})
    onnx_path = YOLO(str(pt)).export(format="onnx", imgsz=64, simplify=False, verbose=False)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: torch.rand(1, 3, 64, 64).numpy()})[0]
    assert out.shape[1] == 8
    with torch.no_grad():
        expected = model(torch.rand(1, 3, 64, 64))[0]
    assert out.shape == tuple(expected.shape)


@pytest.mark.parametrize("model_yaml", ["yolov5n.yaml", "yolov8n.yaml", "yolo11n.yaml"])
def test_whole_blocks_an_identity_can_replace(model_yaml, tmp_path):
    model = _prepared(model_yaml)
    blocks = surgery.block_units(model)
    if model_yaml == "yolov8n.yaml":  # the backbone's C2f keep their width; the neck's read a concat
        assert blocks == ["model.2:block", "model.4:block", "model.6:block", "model.8:block"]
    for unit in blocks:
        removed = surgery.remove_block(model, unit)
        assert removed > 0 and isinstance(model.get_submodule(unit.removesuffix(":block")), surgery.RemovedBlock)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == 4 + 4
    groups = units.channel_groups(model)  # the dependency graph sees the layers around the identity joined
    assert units.prune_units(model, {units.unit_of(r): 0.3 for r in groups}, groups=groups) > 0
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == 4 + 4


def test_block_removal_refuses_what_an_identity_cannot_replace(tmp_path):
    import onnxruntime as ort
    from ultralytics import YOLO

    model = _prepared("yolov8n.yaml")
    with pytest.raises(ValueError, match="'model.12:block'.*changes the tensor's shape"):
        surgery.remove_block(model, "model.12:block")  # reads a concat of two layers
    with pytest.raises(ValueError, match="'model.4'.*expected"):
        surgery.remove_block(model, "model.4")
    surgery.remove_block(model, "model.4:block")
    with pytest.raises(ValueError, match="already removed"):
        surgery.remove_block(model, "model.4:block")
    # What is left saves, loads with YOLO() and exports to an ONNX that runs.
    pt = surgery.save_checkpoint(model, tmp_path / "m.pt", {"train_args": {"imgsz": 64, "task": "detect"}})
    onnx_path = YOLO(str(pt)).export(format="onnx", imgsz=64, simplify=False, verbose=False)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: torch.rand(1, 3, 64, 64).numpy()})[0].shape[1] == 8
