"""Train, export and gate on the tiny model, with the local registry: files, metrics, registry state."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import nudge_onnx_bias
from pipeline import stages
from pipeline.evaluate import evaluate
from pipeline.gates import GateFailed
from pipeline.params import load_params
from pipeline.registry import open_registry
from pipeline.workspace import Workspace


def workspace(*overrides) -> Workspace:
    return Workspace.load(".", "params.yaml", list(overrides))

METRIC_KEYS = {"map50_95", "map50", "precision", "recall", "params", "file_bytes", "file_mb", "latency_ms"}


def test_train_writes_checkpoint_metrics_curves_and_registers(trained_workdir):
    train_dir = trained_workdir / "outputs" / "train"
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert 0 <= metrics["map50_95"] <= 1 and metrics["params"] > 0 and metrics["gflops"] > 0
    assert metrics["file_bytes"] == (train_dir / "best.pt").stat().st_size
    assert (train_dir / "curves.png").stat().st_size > 0
    assert "epoch" in (train_dir / "curves.csv").read_text().splitlines()[0]
    registry = open_registry(load_params("params.yaml").registry)
    version = registry.alias("trained")
    manifest = registry.manifest(version)
    assert manifest.stage == "train" and manifest.primary == "best.pt"
    assert manifest.metrics["map50_95"] == metrics["map50_95"]
    assert manifest.dataset_hash and manifest.params_hash and manifest.params["train"]["imgsz"] == 64


def test_export_onnx_loads_in_ultralytics_and_ort_and_is_registered(trained_workdir):
    params = load_params("params.yaml")
    result = stages.run_stage("export", workspace())
    model = trained_workdir / "outputs" / "export" / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert {"names", "stride", "imgsz", "task"} <= set(meta)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 64, 64), np.float32)})
    assert output.shape[0] == 1
    assert result["metrics"]["integer_kernels"]["integer_convs_after"] > 0  # INT8 convs survive finalizing
    registry = open_registry(params.registry)
    exported = registry.manifest(registry.alias("exported"))
    # Lineage: export derives from qat; where the final file's bytes equal the qat file's (a PTQ pick, nothing
    # simplified) the registry de-duplicates and `exported` is that qat version itself.
    assert registry.alias(stages.stage_named("export").parent) in (exported.parent, exported.version)
    assert exported.metrics["file_bytes"] == model.stat().st_size == result["metrics"]["file_bytes"]


def test_evaluator_measures_pt_and_onnx_the_same_way(trained_workdir):
    ws = workspace()
    params = ws.params
    stages.run_stage("export", ws)
    data = ws.data_yaml()
    pt = evaluate("outputs/train/best.pt", data, params)
    onnx_metrics = evaluate("outputs/export/model.onnx", data, params)
    assert METRIC_KEYS <= set(pt) and METRIC_KEYS <= set(onnx_metrics)
    assert pt["latency_ms"] > 0 and onnx_metrics["latency_ms"] > 0
    # Same weights, same validator: FP32 ONNX and PyTorch agree closely.
    assert abs(pt["map50_95"] - onnx_metrics["map50_95"]) < 0.02
    subset = evaluate("outputs/export/model.onnx", data, params, max_images=2, latency=False)
    assert "latency_ms" not in subset


def test_failed_stage_gate_keeps_version_but_does_not_move_alias(trained_workdir):
    params = load_params("params.yaml", ["export.gates.max_file_mb=0.001"])
    with pytest.raises(GateFailed, match="max_file_mb"):
        stages.run_stage("export", workspace("export.gates.max_file_mb=0.001"))
    registry = open_registry(params.registry)
    assert registry.alias("exported") is None
    assert [m.stage for m in registry.versions()][-1] == "export"
    report = json.loads((trained_workdir / "outputs" / "export" / "gate.json").read_text())
    assert report["passed"] is False


def test_acceptance_gate_promotes_then_champion_blocks_a_worse_challenger(trained_workdir):
    params = load_params("params.yaml")
    stages.run_stage("export", workspace())
    first = stages.run_stage("gate", workspace())
    registry = open_registry(params.registry)
    assert first["passed"] and registry.alias("production") == registry.alias("exported")
    # The OpenVINO IR of the same model is promoted with it, under its own alias, with the same parent.
    assert registry.alias("production-openvino") == registry.alias("exported-openvino") is not None
    assert first["targets"]["openvino"]["qat_version"] == first["targets"]["onnx"]["qat_version"] == registry.alias("qat")
    production = registry.alias("production")

    # A challenger (other bytes, practically the same weights) that must beat production by an impossible
    # margin is refused; production stays.
    qat_model = trained_workdir / "outputs" / "qat" / "model_int8.onnx"
    nudge_onnx_bias(qat_model)
    challenger = workspace("gate.champion_tolerance=-1.0")
    stages.run_stage("export", challenger)
    assert registry.alias("exported") != production
    with pytest.raises(GateFailed, match=f"not_worse_than_production_v{production}"):
        stages.run_stage("gate", challenger)
    assert registry.alias("production") == production
    assert registry.alias("candidate") == registry.alias("exported")


def test_absolute_gate_threshold_stops_promotion(trained_workdir):
    params = load_params("params.yaml", ["gate.max_latency_ms=0.0001"])
    stages.run_stage("export", workspace("gate.max_latency_ms=0.0001"))
    with pytest.raises(GateFailed, match="max_latency_ms"):
        stages.run_stage("gate", workspace("gate.max_latency_ms=0.0001"))
    assert open_registry(params.registry).alias("production") is None


def test_control_is_the_trained_model_fine_tuned_as_long_as_compression(trained_workdir):
    from pipeline.control import compression_epochs

    params = load_params("params.yaml")
    control = json.loads((trained_workdir / "outputs" / "control" / "metrics.json").read_text())
    assert control["extra_epochs"] == compression_epochs(params) == 2  # 1 prune step x 1 epoch + 1 QAT epoch
    assert control["baseline"] == "control" and METRIC_KEYS <= set(control)
    registry = open_registry(params.registry)
    manifest = registry.manifest(registry.alias("control"))
    assert manifest.parent == registry.alias("trained") and manifest.metrics["map50_95"] == control["map50_95"]
    qat_metrics = json.loads((trained_workdir / "outputs" / "qat" / "metrics.json").read_text())
    best = max(("control", "pruned"), key=lambda n: qat_metrics[f"{n}_map50_95"])
    assert qat_metrics["accuracy_reference"] == best

    # baseline: trained -> the trained model itself, nothing fine-tuned
    stages.run_stage("control", workspace("control.baseline=trained"))
    again = json.loads((trained_workdir / "outputs" / "control" / "metrics.json").read_text())
    trained = json.loads((trained_workdir / "outputs" / "train" / "metrics.json").read_text())
    assert again["extra_epochs"] == 0 and again["map50_95"] == trained["map50_95"]


def test_acceptance_gate_judges_accuracy_against_the_best_float_model(trained_workdir):
    stages.run_stage("export", workspace())
    with pytest.raises(GateFailed, match="max_map_drop_vs_(control|pruned)"):
        stages.run_stage("gate", workspace("gate.max_map_drop=-1.0"))
    report = json.loads((trained_workdir / "outputs" / "gate" / "report.json").read_text())
    assert report["accuracy_reference"]["model"] in ("control", "pruned")

