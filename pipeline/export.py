"""Stage `export`: the deployable models, each checked in its own runtime and registered under its own alias.

- `model.onnx`: the qat stage's INT8 choice for ONNX Runtime, alias `exported`.
- `model_openvino_model/` (`export.openvino`: qdq or nncf; off leaves the folder empty): an OpenVINO IR of
  the same compressed model, laid out as Ultralytics' own OpenVINO export (model.xml, model.bin,
  metadata.yaml) so `YOLO("model_openvino_model/")` predicts; alias `exported-openvino`. Both versions have
  the same parent (the `qat` version), so the acceptance gate can promote them as one lineage.

The IR is made one of two ways: `qdq` converts our INT8 QDQ ONNX (OpenVINO reads the QuantizeLinear /
DequantizeLinear pairs as its FakeQuantize ops, so it runs exactly the integer model ORT runs); `nncf` lets
NNCF quantize a float model with the same calibration images, keeping the same layers float as our scheme
(the head's prediction convs and everything after them): the QAT model's float weights when a QAT candidate
was chosen, else the pruned FP32 model (`nncf_source`).
"""
from __future__ import annotations

import ast
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from pipeline.io import read_json, write_json
from pipeline.workspace import Workspace

OPENVINO_DIR = "model_openvino_model"  # Ultralytics recognises an OpenVINO model by the `_openvino_model` suffix
OPENVINO_XML = "model.xml"
OPENVINO_FILES = (OPENVINO_XML, "model.bin", "metadata.yaml")
OPENVINO_ALIAS = "exported-openvino"
# Ultralytics writes these metadata values as Python literals into ONNX's string-only metadata_props.
_INT_KEYS = {"stride", "batch", "channels"}
_LITERAL_KEYS = {"imgsz", "names", "kpt_shape", "kpt_names", "args", "end2end"}


class ExportError(RuntimeError):
    pass


def run(ws: Workspace) -> dict:
    """The qat stage's choice, simplified, with Ultralytics' metadata, checked to load and predict in
    Ultralytics, and (for a QAT model) checked against its torch twin; registers it as `exported`. Then the
    OpenVINO IR of the same model (unless export.openvino is off), measured in OpenVINO and registered as
    `exported-openvino`. Every target is registered before any gate failure is raised."""
    from pipeline.evaluate import evaluate
    from pipeline.gates import GateFailed, combine_failures, publish
    from pipeline.int8 import PARITY_TOLERANCE, finalize_int8, parity_check

    params, data_yaml = ws.params, ws.data_yaml()
    out_dir = ws.stage_dir()
    model = out_dir / "model.onnx"
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
        extra_checks.append({"gate": "parity_with_qat_torch_model", "value": round(parity["shortfall"], 6),
                             "limit": PARITY_TOLERANCE, "passed": parity["passed"]})
    write_json(out_dir / "metrics.json", metrics)
    reference = read_json(ws.input("outputs/train/metrics.json"))
    failed = []
    try:
        gate = publish(ws, files={"model.onnx": model}, primary="model.onnx", metrics=metrics,
                       gates=params.export.gates, reference=reference, extra_checks=extra_checks)
    except GateFailed as e:
        gate, failed = e.report, [e.report]

    method = params.export.openvino
    ov_dir = out_dir / OPENVINO_DIR
    ov_metrics = {"method": method}
    if method == "off":  # an empty folder and a skipped report: no IR of an earlier run passes for this one's
        _replace_dir(ov_dir, lambda tmp: None)
        write_json(out_dir / "gate_openvino.json", {"stage": ws.stage.name, "alias": OPENVINO_ALIAS, "passed": None,
                                                    "checks": [], "skipped": "export.openvino is off"})
    else:
        from pipeline.int8 import calibration_image_paths

        calib = calibration_image_paths(data_yaml, params.qat.calib_images) if method == "nncf" else []
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            float_onnx, float_source = nncf_source(ws, qat_metrics, Path(tmp)) if method == "nncf" else (None, None)
            build = write_openvino(method, model, float_onnx, ov_dir, calib)
        if float_source:
            build["float_source"] = float_source
        check_loads_and_predicts(ov_dir, data_yaml, params.train.imgsz)
        ov_metrics.update(evaluate(ov_dir, data_yaml, params))
        ov_metrics["build"] = build
        ov_metrics["map50_95_minus_onnx"] = round(ov_metrics["map50_95"] - metrics["map50_95"], 6)
        try:
            publish(ws, files={name: ov_dir / name for name in OPENVINO_FILES},
                    primary=OPENVINO_XML, metrics=ov_metrics, gates=params.export.gates,
                    reference=reference, alias=OPENVINO_ALIAS, report_file="gate_openvino.json")
        except GateFailed as e:
            failed.append(e.report)
    write_json(out_dir / "metrics_openvino.json", ov_metrics)
    if failed:
        raise GateFailed(combine_failures(failed))
    return {"metrics": metrics, "gate": gate, "openvino": ov_metrics}


# ----------------------------------------------------------------------------------------------
# OpenVINO


def nncf_source(ws: Workspace, qat_metrics: dict, work: Path) -> tuple[Path, str]:
    """(float ONNX, "qat" or "pruned"): what NNCF quantizes. The QAT model's float weights when the qat stage
    chose a QAT candidate (they were trained under INT8 noise for qat.epochs more: on the demo at 320 px NNCF
    on them measured 0.869 mAP50-95, on the pruned FP32 weights 0.849, our QDQ INT8 0.870), else the pruned
    FP32 model."""
    if not qat_metrics.get("qat_torch_pt"):
        return ws.input("outputs/qat/pruned_fp32.onnx"), "pruned"
    from pipeline.qat import export_float_onnx, load_checkpoint

    model, ckpt = load_checkpoint(ws.input("outputs/qat/qat_model.pt"))
    return export_float_onnx(model, ckpt, work / "qat_float.onnx", ws.params), "qat"


def ultralytics_metadata(onnx_path: Path) -> dict:
    """The Ultralytics metadata of an ONNX export (plus our `int8_*` keys) as the values Ultralytics'
    own exporter writes into an OpenVINO folder's metadata.yaml."""
    from pipeline.int8 import load_onnx

    raw = {p.key: p.value for p in load_onnx(onnx_path).metadata_props}
    if "names" not in raw or "stride" not in raw:
        raise ExportError(f"{onnx_path}: no Ultralytics metadata (names, stride) to give the OpenVINO model")
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = (int(value) if key in _INT_KEYS else
                             ast.literal_eval(value) if key in _LITERAL_KEYS else value)
        except (ValueError, SyntaxError) as e:
            raise ExportError(f"{onnx_path}: metadata {key!r} = {value!r} is not readable: {e}") from None
    return metadata


def nncf_quantize(float_onnx: Path, calib_images: list[Path]):
    """NNCF post-training quantization of the float model, calibrated on our images, with the head's
    prediction convs and everything downstream of them (DFL, box decode) left float, as in our own scheme."""
    import nncf
    import openvino as ov

    from pipeline.int8 import float_conv_reasons, input_image_size, letterboxed_input, load_onnx

    onnx_model = load_onnx(float_onnx)
    height, width = input_image_size(onnx_model, float_onnx)
    if not calib_images:
        raise ExportError(f"{float_onnx}: NNCF quantization needs calibration images, got none")
    model = ov.convert_model(str(float_onnx))
    # OpenVINO keeps ONNX node names as friendly names; a Conv becomes "<name>/WithoutBiases" + "<name>" (bias).
    float_convs = set(float_conv_reasons(onnx_model))
    seeds = [op for op in model.get_ordered_ops()
             if op.get_friendly_name() in float_convs or op.get_friendly_name().split("/WithoutBiases")[0] in float_convs]
    if not seeds:
        raise ExportError(f"{float_onnx}: none of the prediction convs {sorted(float_convs)[:3]}... found in the "
                          f"OpenVINO model; cannot keep the head float")
    ignored, pending = set(), list(seeds)
    while pending:
        op = pending.pop()
        if op.get_friendly_name() in ignored:
            continue
        ignored.add(op.get_friendly_name())
        for output in op.outputs():
            pending.extend(target.get_node() for target in output.get_target_inputs())
    ignored = sorted(name for name in ignored
                     if not any(op.get_type_name() == "Result" and op.get_friendly_name() == name
                                for op in model.get_results()))
    dataset = nncf.Dataset([letterboxed_input(p, height, width) for p in calib_images])
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(calib_images),
                         ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))


def write_openvino(method: str, int8_onnx: Path, float_onnx: Path | None, out_dir: Path,
                   calib_images: list[Path] = ()) -> dict:
    """Write `out_dir` (an Ultralytics `*_openvino_model` folder): the IR of `int8_onnx` converted as it is
    (method qdq) or of `float_onnx` quantized by NNCF (method nncf), and metadata.yaml from int8_onnx's
    Ultralytics metadata. Replaces the folder whole. Returns what was built."""
    import openvino as ov

    int8_onnx, out_dir = Path(int8_onnx), Path(out_dir)
    if not out_dir.name.endswith("_openvino_model"):
        raise ExportError(f"{out_dir}: Ultralytics loads an OpenVINO folder only if its name ends in _openvino_model")
    metadata = ultralytics_metadata(int8_onnx)
    if method == "qdq":
        model = ov.convert_model(str(int8_onnx))
    elif method == "nncf":
        if float_onnx is None:
            raise ExportError(f"{out_dir}: export.openvino nncf needs the float model to quantize")
        model = nncf_quantize(Path(float_onnx), list(calib_images))
        # NNCF's own weight scheme, not the ONNX's: 8-bit weights, with NNCF's default overflow fix (7-bit in the
        # first layer) for CPUs without VNNI; the ONNX's target CPU does not describe this model.
        metadata["int8_weight_bits"] = "8"
        metadata.pop("int8_target_cpu", None)
    else:
        raise ExportError(f"export.openvino must be qdq, nncf or off, got {method!r}")
    metadata["int8_openvino_method"] = method
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    if not fake_quantize:
        raise ExportError(f"{out_dir}: the OpenVINO model ({method}) holds no FakeQuantize op: it would run float")

    def fill(tmp: Path) -> None:
        ov.save_model(model, str(tmp / OPENVINO_XML), compress_to_fp16=False)
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True))

    _replace_dir(out_dir, fill)
    return {"method": method, "source": str(int8_onnx if method == "qdq" else float_onnx),
            "fake_quantize_ops": fake_quantize, "calibration_images": len(calib_images) if method == "nncf" else 0,
            "openvino_version": ov.get_version()}


def _replace_dir(path: Path, fill) -> Path:
    """Fill a fresh folder beside `path`, then swap it in: a crash leaves the old folder or the new one
    whole (between the two renames, briefly neither)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are ordinary folders others read
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return path


def check_loads_and_predicts(model_path: Path, data_yaml: Path, imgsz: int) -> None:
    """`YOLO(model)` (an .onnx, or an OpenVINO folder) must find names, stride and imgsz in the metadata
    and run a prediction."""
    from ultralytics import YOLO

    from pipeline.dataset import load_data_yaml

    spec = load_data_yaml(data_yaml)
    image = next((images[0] for images in spec.images.values() if images), None)
    if image is None:
        raise ExportError(f"{data_yaml}: no image to run a test prediction on")
    model = YOLO(str(model_path), task="detect")
    results = model.predict(str(image), imgsz=imgsz, device="cpu", verbose=False)
    if model.predictor.model.names != spec.names:
        raise ExportError(f"{model_path}: class names in the model's metadata {model.predictor.model.names} "
                          f"differ from the dataset's {spec.names}")
    if len(results) != 1:
        raise ExportError(f"{model_path}: prediction on {image} returned {len(results)} results, expected 1")
