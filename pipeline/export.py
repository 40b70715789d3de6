"""Stage `export`: the deployable INT8 ONNX, which must load and predict with plain Ultralytics."""
from __future__ import annotations

from pathlib import Path

from pipeline.io import read_json, write_json
from pipeline.workspace import Workspace


class ExportError(RuntimeError):
    pass


def run(ws: Workspace) -> dict:
    """The qat stage's choice, simplified, with Ultralytics' metadata, checked to load and predict in
    Ultralytics, and (for a QAT model) checked against its torch twin; registers it as `exported`."""
    from pipeline.evaluate import evaluate
    from pipeline.gates import publish
    from pipeline.int8 import PARITY_TOLERANCE, finalize_int8, parity_check

    params, data_yaml = ws.params, ws.data_yaml()
    model = ws.stage_dir() / "model.onnx"
    qat_metrics = read_json(ws.input("outputs/qat/metrics.json"))
    kernels = finalize_int8(ws.input("outputs/qat/model_int8.onnx"), ws.input("outputs/qat/pruned_fp32.onnx"),
                            model, simplify=params.export.simplify)
    check_loads_and_predicts(model, data_yaml, params.train.imgsz)
    metrics = evaluate(model, data_yaml, params)
    metrics["integer_kernels"] = kernels
    extra_checks = []
    if qat_metrics.get("qat_torch_pt"):
        parity = parity_check(model, ws.input("outputs/qat/qat_model.pt"), data_yaml, params)
        metrics["parity"] = parity
        extra_checks.append({"gate": "parity_with_qat_torch_model", "value": round(parity["abs_diff"], 6),
                             "limit": PARITY_TOLERANCE, "passed": parity["passed"]})
    write_json(ws.stage_dir() / "metrics.json", metrics)
    gate = publish(ws, files={"model.onnx": model}, primary="model.onnx", metrics=metrics,
                   gates=params.export.gates, reference=read_json(ws.input("outputs/train/metrics.json")),
                   extra_checks=extra_checks)
    return {"metrics": metrics, "gate": gate}


def check_loads_and_predicts(onnx_path: Path, data_yaml: Path, imgsz: int) -> None:
    """`YOLO("model.onnx")` must find names, stride and imgsz in the metadata and run a prediction."""
    from ultralytics import YOLO

    from pipeline.dataset import load_data_yaml

    spec = load_data_yaml(data_yaml)
    image = next((images[0] for images in spec.images.values() if images), None)
    if image is None:
        raise ExportError(f"{data_yaml}: no image to run a test prediction on")
    model = YOLO(str(onnx_path), task="detect")
    results = model.predict(str(image), imgsz=imgsz, device="cpu", verbose=False)
    if model.predictor.model.names != spec.names:
        raise ExportError(f"{onnx_path}: class names in the ONNX metadata {model.predictor.model.names} "
                          f"differ from the dataset's {spec.names}")
    if len(results) != 1:
        raise ExportError(f"{onnx_path}: prediction on {image} returned {len(results)} results, expected 1")
