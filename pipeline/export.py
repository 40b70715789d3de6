"""Stage `export` helpers: the exported ONNX must load and predict with plain Ultralytics."""
from __future__ import annotations

from pathlib import Path


class ExportError(RuntimeError):
    pass


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
