"""The OpenVINO deploy target: the IR folder Ultralytics loads (qdq and nncf), the export stage registering it
beside the ONNX under its own alias with the same lineage, and the acceptance gate promoting both."""
from __future__ import annotations

import json

import openvino as ov
import pytest
import yaml

from conftest import nudge_onnx_bias
from pipeline import export, int8, latency, stages
from pipeline.gates import GateFailed
from pipeline.registry import open_registry
from pipeline.workspace import Workspace

from tests.test_int8 import IMGSZ, tiny  # noqa: F401  (module-scoped fixture: tiny random model, ONNX, images)


@pytest.fixture(scope="module")
def int8_onnx(tiny):  # noqa: F811
    chosen = tiny["folder"] / "ov_chosen.onnx"
    int8.quantize_onnx(tiny["fp32"], chosen, tiny["images"], weight_bits=8, target_cpu="vnni")
    final = tiny["folder"] / "ov_model.onnx"
    int8.finalize_int8(chosen, tiny["fp32"], final)
    return final


@pytest.mark.parametrize("method", ["qdq", "nncf"])
def test_openvino_folder_loads_in_ultralytics_and_runs_int8(tiny, int8_onnx, method):  # noqa: F811
    from ultralytics import YOLO

    folder = tiny["folder"] / f"{method}_openvino_model"
    build = export.write_openvino(method, int8_onnx, tiny["fp32"], folder, tiny["images"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(export.OPENVINO_FILES)
    assert build["fake_quantize_ops"] > 0 and build["method"] == method

    metadata = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert metadata["names"] == {i: f"class{i}" for i in range(4)} and metadata["stride"] == 32
    assert metadata["imgsz"] == [IMGSZ, IMGSZ] and metadata["task"] == "detect"
    assert metadata["int8_openvino_method"] == method and metadata["int8_weight_bits"] == "8"
    assert metadata.get("int8_target_cpu") == ("vnni" if method == "qdq" else None)

    # The compiled model still holds integer work (OpenVINO folds FakeQuantize into its int8 kernels).
    model = ov.Core().read_model(str(folder / "model.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    if method == "nncf":  # the head's prediction convs and the decode stay float, as in our ORT scheme
        head = [op for op in model.get_ordered_ops() if op.get_friendly_name().startswith("/model.22/dfl")]
        inputs = [i.get_source_output().get_node().get_type_name() for op in head for i in op.inputs()]
        assert head and "FakeQuantize" not in inputs

    yolo = YOLO(str(folder), task="detect")
    results = yolo.predict(str(tiny["images"][0]), imgsz=IMGSZ, device="cpu", verbose=False)
    assert len(results) == 1 and results[0].names[0] == "class0"
    timed = latency.interleaved({"onnx": int8_onnx, "openvino": folder}, threads=1, warmup=1, runs=3)
    assert timed["openvino"]["median_ms"] > 0 and timed["onnx"]["median_ms"] > 0


def test_openvino_clear_errors(tmp_path, tiny, int8_onnx):  # noqa: F811
    with pytest.raises(export.ExportError, match="_openvino_model"):
        export.write_openvino("qdq", int8_onnx, tiny["fp32"], tmp_path / "model_ov")
    with pytest.raises(export.ExportError, match="qdq, nncf or off"):
        export.write_openvino("int4", int8_onnx, tiny["fp32"], tmp_path / "x_openvino_model")
    bare = tmp_path / "bare.onnx"
    model = int8.load_onnx(int8_onnx)
    del model.metadata_props[:]
    int8.save_onnx_atomic(model, bare)
    with pytest.raises(export.ExportError, match="bare.onnx: no Ultralytics metadata"):
        export.write_openvino("qdq", bare, tiny["fp32"], tmp_path / "x_openvino_model")
    with pytest.raises(int8.Int8Error, match="missing.onnx"):
        export.write_openvino("qdq", tmp_path / "missing.onnx", tiny["fp32"], tmp_path / "x_openvino_model")
    assert not (tmp_path / "x_openvino_model").exists()  # nothing half-written


def _workspace(*overrides) -> Workspace:
    return Workspace.load(".", "params.yaml", list(overrides))


def test_export_and_gate_register_and_promote_both_targets_with_one_lineage(trained_workdir):
    result = stages.run_stage("export", _workspace())
    out = trained_workdir / "outputs" / "export"
    folder = out / export.OPENVINO_DIR
    ov_metrics = json.loads((out / "metrics_openvino.json").read_text())
    assert ov_metrics == json.loads(json.dumps(result["openvino"], default=float))
    assert ov_metrics["method"] == "nncf" and ov_metrics["latency_ms"] > 0 and 0 <= ov_metrics["map50_95"] <= 1
    # NNCF quantizes the QAT model's float weights when the qat stage chose a QAT candidate, else the pruned model
    qat_chose_qat = bool(json.loads((trained_workdir / "outputs/qat/metrics.json").read_text())["qat_torch_pt"])
    assert ov_metrics["build"]["float_source"] == ("qat" if qat_chose_qat else "pruned")
    assert ov_metrics["file_bytes"] == sum((folder / n).stat().st_size for n in ("model.xml", "model.bin"))
    assert json.loads((out / "gate_openvino.json").read_text())["passed"] is True

    registry = open_registry(_workspace().params.registry)
    onnx_manifest = registry.manifest(registry.alias("exported"))
    ov_manifest = registry.manifest(registry.alias(export.OPENVINO_ALIAS))
    assert ov_manifest.version != onnx_manifest.version
    qat_version = registry.alias("qat")
    # Both derive from the qat version (the ONNX is that version itself when its bytes equal the qat file's).
    assert ov_manifest.parent == qat_version
    assert qat_version in (onnx_manifest.parent, onnx_manifest.version)
    assert ov_manifest.stage == "export" and ov_manifest.primary == "model.xml"
    assert set(ov_manifest.files) == set(export.OPENVINO_FILES)

    report = stages.run_stage("gate", _workspace())
    assert report["passed"] and set(report["targets"]) == {"onnx", "openvino"}
    assert registry.alias("production") == onnx_manifest.version
    assert registry.alias("production-openvino") == ov_manifest.version
    assert registry.alias("candidate-openvino") == ov_manifest.version
    assert any(c["gate"] == "openvino: same_qat_version_as_onnx" and c["passed"] for c in report["checks"])
    assert report["targets"]["openvino"]["qat_version"] == report["targets"]["onnx"]["qat_version"] == qat_version

    # A challenger (other bytes): the IR champion is fetched into an OpenVINO folder and re-evaluated in
    # OpenVINO, and both production aliases move together.

    qat_model = trained_workdir / "outputs" / "qat" / "model_int8.onnx"
    nudge_onnx_bias(qat_model)
    # qdq: the IR is converted from the nudged ONNX, so it has other bytes too (nncf's comes from the float model)
    stages.run_stage("export", _workspace("export.openvino=qdq"))
    second = stages.run_stage("gate", _workspace("export.openvino=qdq"))
    openvino = second["targets"]["openvino"]
    assert openvino["production_before"] == ov_manifest.version and openvino["champion_metrics"]["map50_95"] >= 0
    new_ov = registry.alias(export.OPENVINO_ALIAS)
    assert new_ov != ov_manifest.version and registry.alias("production-openvino") == new_ov
    assert second["targets"]["openvino"]["qat_version"] == second["targets"]["onnx"]["qat_version"]

    # A failure of the OpenVINO target alone keeps both production aliases where they were.
    production = registry.alias("production")
    bad = dict(json.loads((out / "metrics_openvino.json").read_text()), latency_ms=2e6)
    (out / "metrics_openvino.json").write_text(json.dumps(bad))
    with pytest.raises(GateFailed, match="openvino: max_latency_ms"):
        stages.run_stage("gate", _workspace("gate.max_latency_ms=1000000"))
    assert registry.alias("production") == production and registry.alias("production-openvino") == new_ov


def test_openvino_off_writes_no_ir_and_gate_promotes_onnx_only(trained_workdir):
    stages.run_stage("export", _workspace("export.openvino=off"))
    out = trained_workdir / "outputs" / "export"
    assert (out / export.OPENVINO_DIR).is_dir() and not any((out / export.OPENVINO_DIR).iterdir())
    assert json.loads((out / "metrics_openvino.json").read_text()) == {"method": "off"}
    report = stages.run_stage("gate", _workspace("export.openvino=off"))
    registry = open_registry(_workspace().params.registry)
    assert set(report["targets"]) == {"onnx"} and registry.alias("production-openvino") is None
    assert registry.alias(export.OPENVINO_ALIAS) is None


def test_lineage_check_finds_the_qat_version_when_the_export_is_the_qat_file(tmp_path):
    """An export whose bytes equal the qat stage's file is that qat version (the registry de-duplicates): the
    acceptance gate must still see it and the IR (parent: qat) as one lineage."""
    from pipeline.gates import _qat_version
    from pipeline.params import RegistryParams

    registry = open_registry(RegistryParams(uri=str(tmp_path / "registry")))
    files = {name: tmp_path / name for name in ("best.pt", "model_int8.onnx", "model.xml")}
    for i, path in enumerate(files.values()):
        path.write_bytes(bytes([i]) * 10)
    pruned = registry.register("prune", {"best.pt": files["best.pt"]}, "best.pt").version
    qat_v = registry.register("qat", {"model_int8.onnx": files["model_int8.onnx"]}, "model_int8.onnx",
                              parent=pruned).version
    onnx_v = registry.register("export", {"model.onnx": files["model_int8.onnx"]}, "model.onnx", parent=qat_v).version
    ir_v = registry.register("export", {"model.xml": files["model.xml"]}, "model.xml", parent=qat_v).version
    assert onnx_v == qat_v != ir_v  # the same bytes: the registry hands back the qat version
    assert _qat_version(registry, onnx_v) == _qat_version(registry, ir_v) == qat_v
    assert _qat_version(registry, pruned) is None
