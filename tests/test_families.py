"""Every YOLO family through every stage.

Fast tier, per family: a random tiny model (width 0.125, 64 px) is listed into pruning units, pruned in every
unit, quantization-aware fine-tuned for one epoch, quantized to INT8 ONNX with the QAT ranges, finalized,
and loaded and run by plain `YOLO("model.onnx")`. Slow tier: the whole pipeline per family on tiny data.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import random_tiny_model
from pipeline import int8, qat, surgery, units

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMGSZ = 64
FAMILIES = ["yolov5n.yaml", "yolov8n.yaml", "yolov9t.yaml", "yolo11n.yaml", "yolo26n.yaml"]
WITH_ATTENTION = {"yolo11n.yaml", "yolo26n.yaml"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from pipeline.demo_data import generate_demo
    from pipeline.params import DemoParams

    folder = tmp_path_factory.mktemp("families")
    data_yaml = generate_demo(folder / "data", DemoParams(n_train=8, n_val=4, n_empty=0, imgsz=IMGSZ, max_objects=2))
    return folder, data_yaml


def _params():
    from pipeline.params import Params

    return Params.model_validate({"train": {"imgsz": IMGSZ, "batch": 4}, "export": {"simplify": False},
                                  "qat": {"epochs": 1, "calib_images": 4}})


@pytest.mark.parametrize("model_yaml", FAMILIES)
def test_family_builds_prunes_quantizes_and_exports(model_yaml, tiny_data, tmp_path):
    from ultralytics import YOLO

    _, data_yaml = tiny_data
    params = _params()
    base_ckpt = {"train_args": {"imgsz": IMGSZ, "task": "detect", "data": str(data_yaml)}}
    model = random_tiny_model(model_yaml=model_yaml)
    model.names = {0: "circle", 1: "square", 2: "triangle", 3: "cross"}
    trained = surgery.save_checkpoint(model, tmp_path / "trained.pt", base_ckpt)

    # Units follow the family's blocks; attention is kept whole and says so; YOLO26's one-to-one branches
    # are skipped with their reason.
    unit_ids = units.list_groups(trained)
    assert unit_ids[0] == "model.0" and any(".cv3." in u for u in unit_ids)
    assert bool(units.kept_whole(trained)) == (model_yaml in WITH_ATTENTION)
    skipped = units.skipped_units(trained)
    assert bool(skipped) == (model_yaml == "yolo26n.yaml") and not set(skipped) & set(unit_ids)

    # Prune every unit at once; the pruned checkpoint loads with plain YOLO().
    pruned_model, ckpt = units.load_model(trained)
    params_before = sum(p.numel() for p in pruned_model.parameters())
    units.prune_units(pruned_model, {unit: 0.5 for unit in unit_ids}, groups=units.cached_channel_groups(trained))
    pruned = surgery.save_checkpoint(pruned_model, tmp_path / "pruned.pt", ckpt)
    loaded = YOLO(str(pruned)).model
    assert sum(p.numel() for p in loaded.parameters()) < 0.6 * params_before

    # QAT: fake-quant convs mapped onto the exported graph, calibrated, one epoch of fine-tuning.
    qat_model, ckpt = surgery.load_detection_model(pruned)
    qat.insert_quant_convs(qat_model, "silu")
    probe = qat.export_float_onnx(qat_model, ckpt, tmp_path / "probe.onnx", params)
    qat.share_input_observers(qat_model, qat.map_convs_to_onnx(qat_model, probe))
    images = int8.calibration_image_paths(data_yaml, 4)
    qat.calibrate(qat_model, images, IMGSZ)
    log: list = []
    qat.finetune(qat_model, data_yaml, params, log)
    assert len(log) == 1 and log[0]["loss"] > 0

    # INT8 with the QAT ranges: every conv the QAT model quantizes runs as an integer kernel in ORT, the rest
    # stay float with a stated reason.
    float_onnx = qat.export_float_onnx(qat_model, ckpt, tmp_path / "qat_fp32.onnx", params)
    qparams = qat.activation_qparams(qat_model, qat.map_convs_to_onnx(qat_model, float_onnx))
    quantized = tmp_path / "qat_int8.onnx"
    info = int8.quantize_onnx(float_onnx, quantized, images, activation_qparams=qparams)
    kernels = int8.count_integer_kernels(quantized)
    assert kernels["integer_convs"] == info["quantized_convs"] == len(qat.quant_convs(qat_model))
    reasons = int8.float_conv_reasons(int8.load_onnx(float_onnx))
    assert len(reasons) == info["float_convs"] == kernels["float_convs"]
    assert any("attention" in why for why in reasons.values()) == (model_yaml in WITH_ATTENTION)

    # Export: the final INT8 ONNX loads and predicts with plain Ultralytics.
    final = int8.finalize_int8(quantized, float_onnx, tmp_path / "model.onnx", simplify=False)
    assert final["integer_convs_after"] == kernels["integer_convs"]
    results = YOLO(final["path"], task="detect").predict(str(images[0]), imgsz=IMGSZ, verbose=False)
    assert len(results) == 1 and results[0].names[0] == "circle"


@pytest.mark.slow
# yolov8n.yaml, the default model, goes through every stage in test_flow, test_dvc and test_scheduled already.
@pytest.mark.parametrize("model_yaml", [f for f in FAMILIES if f != "yolov8n.yaml"])
def test_family_through_every_stage(model_yaml, tmp_path):
    """The whole pipeline on 24 generated images at 64 px, width 0.125, one epoch, open gates."""
    from conftest import write_tiny_params
    from pipeline.io import read_json
    from pipeline.stages import RUN_STAGES, run_stage
    from pipeline.workspace import Workspace

    write_tiny_params(tmp_path, {"train": {"model": model_yaml}})
    ws = Workspace.load(tmp_path)
    for stage in RUN_STAGES:
        run_stage(stage, ws)

    outputs = tmp_path / "outputs"
    fused = read_json(outputs / "sensitivity/plan.json")["reparam"]["blocks_fused"]
    assert fused > 0 if model_yaml == "yolov9t.yaml" else fused == 0
    assert read_json(outputs / "prune/metrics.json")["params_reduction"] > 0
    qat_metrics = read_json(outputs / "qat/metrics.json")
    assert qat_metrics["integer_convs"] > 0 and qat_metrics["float_layers"]
    assert read_json(outputs / "gate/report.json")["passed"]
    assert os.path.getsize(outputs / "export/model.onnx") > 0


def test_family_table_says_what_was_applied_and_where_a_run_stopped(tmp_path):
    from pipeline import families
    from pipeline.io import write_json

    outputs = tmp_path / "outputs"
    write_json(outputs / "sensitivity" / "plan.json", {"reparam": {"blocks_fused": 42}})
    write_json(outputs / "prune" / "metrics.json", {"params_reduction": 0.31, "macs_reduction": 0.42})
    write_json(outputs / "prune" / "gate.json", {"passed": True, "checks": []})
    write_json(outputs / "qat" / "metrics.json", {"chosen": "qat_int8", "integer_convs": 90, "float_convs": 7})
    write_json(outputs / "qat" / "gate.json", {"passed": False, "checks": [
        {"gate": "max_map_drop", "passed": False}, {"gate": "max_file_mb", "passed": True}]})

    applied, stopped = families.stages_applied(outputs)
    assert applied == ["re-parameterized (42 RepConv)", "pruned (-31% params, -42% MACs)",
                       "qat_int8 (90 integer convs, 7 float)"]
    assert stopped == "qat gate failed: max_map_drop"

    measured = {"file_mb": 2.5, "map50_95": 0.6, "ms_1_thread": 3.0, "ms_2_threads": 2.0}
    table = families.markdown_table([
        {"family": "YOLOv9", "model": "yolov9t.yaml", "fp32": measured, "int8": None, "stages": applied,
         "stopped": stopped}])
    assert "| YOLOv9 | yolov9t.yaml | 2.50 | – | 0.600 | – | 3.00 / 2.00 | – |" in table
    assert table.rstrip().endswith("stopped: qat gate failed: max_map_drop |")


@pytest.fixture(scope="module")
def yolo11_bench(tmp_path_factory):
    """`bench --models yolo11n.yaml` on tiny data: one whole pipeline run in bench/families/yolo11n."""
    from conftest import write_tiny_params
    from pipeline import families
    from pipeline.workspace import Workspace

    root = tmp_path_factory.mktemp("bench")
    write_tiny_params(root)
    return root, families.bench_families(Workspace.load(root), ["yolo11n.yaml"], runs=3)


@pytest.mark.slow
def test_bench_families_runs_the_pipeline_per_family(yolo11_bench):
    from pipeline import families
    from pipeline.workspace import Workspace

    tmp_path, result = yolo11_bench
    (row,) = result["rows"]
    assert row["run"]["returncode"] == 0 and row["stopped"] is None
    assert row["fp32"]["file_mb"] > row["int8"]["file_mb"] > 0
    assert "pruned" in "; ".join(row["stages"])
    assert (tmp_path / "bench/families/yolo11n/outputs/export/model.onnx").is_file()
    assert "| YOLO11 | yolo11n.yaml |" in (tmp_path / "bench/results/families.md").read_text()
    # A finished run with the same params is measured again, not rerun.
    again = families.bench_families(Workspace.load(tmp_path), ["yolo11n.yaml"], runs=3)
    assert again["rows"][0]["run"]["reused"] and again["rows"][0]["int8"]["file_mb"] == row["int8"]["file_mb"]


@pytest.mark.slow
def test_bench_measures_every_row_in_its_own_runtime(yolo11_bench):
    """The benchmark table on a finished run: Ultralytics' ONNX and OpenVINO exports beside ours."""
    from pipeline.bench import bench_workspace
    from pipeline.workspace import Workspace

    tmp_path, _ = yolo11_bench
    result = bench_workspace(Workspace.load(tmp_path / "bench/families/yolo11n"), runs=3)
    rows = {r["role"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "fp32_dfl", "control", "ultralytics_onnx_int8", "ultralytics_openvino",
                          "ultralytics_openvino_int8", "ours_pruned", "ours_ort", "ours_openvino"]
    # The DFL rewrite changes how the FP32 graph computes, not what: the same mAP.
    assert rows["fp32_dfl"]["map50_95"] == pytest.approx(rows["fp32"]["map50_95"], abs=1e-6)
    assert rows["control"]["baseline"] and not rows["fp32"]["baseline"]
    assert rows["ultralytics_openvino_int8"]["runtime"] == rows["ours_openvino"]["runtime"] == "openvino"
    assert rows["ours_ort"]["file_mb"] < rows["ultralytics_onnx_int8"]["file_mb"] < rows["fp32"]["file_mb"]
    assert all(r["ms_1_thread"] > 0 and r["ms_2_threads"] > 0 for r in rows.values())
    text = (tmp_path / "bench/families/yolo11n/bench/results/bench.md").read_text()
    assert "Ultralytics format=openvino int8=True | openvino |" in text and "Targets:" in text
