"""The one evaluator. Every stage measures its artifact here, so numbers compare across stages.

Accuracy goes through Ultralytics' own validator for `.pt` (PyTorch), `.onnx` (ONNX Runtime) and
`*_openvino_model/` (OpenVINO) artifacts, so NMS and the mAP definition are identical everywhere. Latency
is `pipeline.latency` on the CPU at batch 1, in the artifact's own runtime: a `.pt` is exported to a
temporary FP32 ONNX first, so a latency column means the same thing for every row.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml

from pipeline import prepare_ultralytics
from pipeline.io import copy_file
from pipeline.latency import median_ms
from pipeline.params import Params


class EvaluationError(RuntimeError):
    pass


def _subset_data_yaml(data_yaml: Path, max_images: int, workdir: Path) -> Path:
    """A data.yaml whose val split is the first `max_images` val images in sorted order (a fixed subset)."""
    from pipeline.dataset import load_data_yaml, split_images

    listing = workdir / "val_subset.txt"
    listing.write_text("\n".join(str(p) for p in split_images(data_yaml, "val", max_images)) + "\n")
    subset = workdir / "data_subset.yaml"
    subset.write_text(yaml.safe_dump({"path": str(workdir), "train": str(listing), "val": str(listing),
                                      "names": load_data_yaml(data_yaml).names}))
    return subset


def accuracy(artifact: Path, data_yaml: Path, params: Params, max_images: int | None = None) -> dict:
    """mAP50-95, mAP50, precision and recall of an artifact Ultralytics loads (.pt, .onnx, OpenVINO folder)."""
    from ultralytics import YOLO

    prepare_ultralytics()
    # rect=False for every artifact: Ultralytics letterboxes .pt batches to their own shapes but a
    # fixed-shape ONNX to squares, and mAPs measured on different inputs would not compare.
    with tempfile.TemporaryDirectory(prefix="eval-") as tmp:
        tmp = Path(tmp)
        data = _subset_data_yaml(data_yaml, max_images, tmp) if max_images else data_yaml
        model = YOLO(str(artifact), task="detect")
        results = model.val(data=str(data), imgsz=params.train.imgsz, batch=params.evaluate.batch,
                            conf=params.evaluate.conf, iou=params.evaluate.iou, device="cpu", rect=False,
                            workers=0, plots=False, verbose=False, project=str(tmp), name="val",
                            exist_ok=True)
    box = results.box
    return {"map50_95": float(box.map), "map50": float(box.map50),
            "precision": float(box.mp), "recall": float(box.mr)}


def export_fp32_onnx(pt_path: Path, out_path: Path, imgsz: int, opset: int, simplify: bool) -> Path:
    """Ultralytics ONNX export (with the metadata `YOLO("x.onnx")` needs), written to `out_path`."""
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        # Ultralytics writes the .onnx beside the .pt; export from a copy so stage outputs stay clean.
        local_pt = Path(tmp) / "model.pt"
        shutil.copyfile(pt_path, local_pt)
        exported = YOLO(str(local_pt), task="detect").export(
            format="onnx", imgsz=imgsz, opset=opset, simplify=simplify, dynamic=False, device="cpu",
            verbose=False)
        return copy_file(exported, out_path)


def model_size(artifact: Path, imgsz: int) -> dict:
    """Parameter count and GFLOPs. ONNX: parameters are counted from initializers; GFLOPs are not known."""
    if artifact.suffix == ".onnx":
        import onnx

        model = onnx.load(str(artifact), load_external_data=False)
        n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        return {"params": n_params, "gflops": None}
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops

    model = YOLO(str(artifact), task="detect").model
    n_params = sum(p.numel() for p in model.parameters())
    return {"params": int(n_params), "gflops": round(float(get_flops(model, imgsz)), 4)}


def artifact_bytes(artifact: Path) -> int:
    """Bytes a device downloads: the file, or every file of a model folder (OpenVINO's .xml + .bin)."""
    if artifact.is_dir():
        return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file() and p.suffix in {".xml", ".bin"})
    return artifact.stat().st_size


def evaluate(artifact: str | Path, data_yaml: str | Path, params: Params, *,
             max_images: int | None = None, latency: bool = True) -> dict:
    """Measure one artifact (.pt, .onnx or an OpenVINO model folder) on the val split of `data_yaml`."""
    artifact, data_yaml = Path(artifact), Path(data_yaml)
    if not artifact.exists():
        raise EvaluationError(f"{artifact}: no such artifact")
    openvino = artifact.is_dir() and artifact.name.endswith("_openvino_model")
    if artifact.suffix not in {".pt", ".onnx"} and not openvino:
        raise EvaluationError(f"{artifact}: expected a .pt or .onnx file or an Ultralytics *_openvino_model folder")
    file_bytes = artifact_bytes(artifact)
    sizes = {"params": None, "gflops": None} if openvino else model_size(artifact, params.train.imgsz)
    metrics = {**accuracy(artifact, data_yaml, params, max_images), **sizes,
               "file_bytes": file_bytes, "file_mb": round(file_bytes / 1e6, 4)}
    if latency:
        e = params.evaluate
        if artifact.suffix == ".onnx" or openvino:
            metrics["latency_ms"] = median_ms(artifact, e.threads, e.warmup, e.runs)
        else:
            with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
                onnx_path = export_fp32_onnx(artifact, Path(tmp) / "model.onnx", params.train.imgsz,
                                             params.export.opset, simplify=False)
                metrics["latency_ms"] = median_ms(onnx_path, e.threads, e.warmup, e.runs)
        metrics["latency_threads"] = e.threads
    return metrics
