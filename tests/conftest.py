"""Shared test setup: no network, tiny data, a tiny model, every test in its own working folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

# Before anything imports prefect or ultralytics.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "false"

REPO = Path(__file__).resolve().parents[1]

# A scaled-down YOLOv8 at 64 px on 24 generated images: trains an epoch in seconds on 2 cores.
TINY_OVERRIDES = {
    "data": {"demo": {"n_train": 16, "n_val": 8, "n_empty": 2, "imgsz": 64, "max_objects": 2}},
    "validate": {"min_instances_per_class": 1},
    "train": {"model": "yolov8n.yaml", "depth_multiple": 0.33, "width_multiple": 0.125, "imgsz": 64,
              "epochs": 1, "batch": 8, "patience": 0,
              "gates": {"min_map50_95": 0.0, "max_file_mb": 20}},
    "evaluate": {"batch": 8, "warmup": 1, "runs": 3},
    "sensitivity": {"ratios": [0.5], "val_images": 4},
    "prune": {"steps": 1, "epochs_per_step": 1, "max_drop": 1.0,
              "gates": {"max_map_drop": 1.0, "min_params_reduction": 0.0}},
    # Latency of a 64 px model on busy CI cores says nothing; the latency gate is tested on its own.
    "qat": {"epochs": 1, "calib_images": 4, "activation": "silu",
            "gates": {"max_map_drop": 1.0, "max_file_mb": 20, "max_latency_ratio": None}},
    "export": {"simplify": False, "gates": {"min_map50_95": 0.0, "max_file_mb": 20}},
    "gate": {"min_map50_95": 0.0, "max_file_mb": 20, "max_latency_ms": 10000, "champion_tolerance": 1.0,
             "max_map_drop": 1.0},
}


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def write_tiny_params(folder: Path, extra: dict | None = None) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(raw, TINY_OVERRIDES)
    deep_update(raw, extra or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def random_tiny_model(width: float = 0.125, depth: float = 0.33, nc: int = 4, model_yaml: str = "yolov8n.yaml"):
    """An untrained scaled-down YOLO (YOLOv8 unless `model_yaml` names another family) with random BatchNorm
    statistics and affine terms: a fresh model's near-constant outputs would hide wrong channel slices or
    quantization errors."""
    import torch
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    torch.manual_seed(0)
    cfg = yaml_model_load(model_yaml)
    cfg["scales"] = {"n": [depth, width, 1024]}
    cfg["scale"] = "n"
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.names = {i: f"class{i}" for i in range(nc)}
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: on 2 shared cores extra intra-op threads only add contention."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder holding tiny params.yaml; the pipeline's relative paths land in it."""
    monkeypatch.chdir(tmp_path)
    write_tiny_params(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_params(workdir):
    from pipeline.params import load_params

    return load_params(workdir / "params.yaml")


@pytest.fixture
def tiny_ws(workdir):
    from pipeline.workspace import Workspace

    return Workspace.load(workdir)


def run_stages_until(ws, last: str) -> None:
    """Run the stages of a whole run in order, up to and without `last`."""
    from pipeline.stages import RUN_STAGES, run_stage

    for stage in RUN_STAGES:
        if stage.name == last:
            return
        run_stage(stage, ws)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """One tiny run up to the stage before export (demo data, outputs/, registry) made once, copied per test.
    Run from another folder on purpose: every path must come from the workspace root, not the working folder."""
    from pipeline.workspace import Workspace

    folder = tmp_path_factory.mktemp("trained")
    write_tiny_params(folder)
    run_stages_until(Workspace.load(folder), "export")
    return folder


@pytest.fixture
def trained_workdir(trained_tiny, tmp_path, monkeypatch):
    """A working folder that already holds the tiny dataset, every stage's outputs up to export, and the
    registry entries they made."""
    for name in ("params.yaml", "data", "outputs", "registry"):
        source = trained_tiny / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        elif source.exists():
            shutil.copy(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def nudge_onnx_bias(path: Path) -> None:
    """Add 1e-3 to one float bias of an ONNX file in place: other bytes (a new registry version), practically
    the same model (a challenger that neither wins nor loses on accuracy)."""
    import onnx
    import onnx.numpy_helper

    graph = onnx.load(str(path))
    bias = next(t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1)
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 1e-3
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(graph, str(path))
