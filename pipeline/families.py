"""The family table: each YOLO family at its smallest scale through the whole pipeline on the same data, the
FP32 ONNX export of the trained model against our final INT8 model.

`python -m pipeline bench --models yolov5n.yaml yolov8n.yaml ...` (`bench_families(ws, models)`) makes one
workspace per model YAML under `bench/families/<model>/` (`bench.sub_workspace`: the run's params with
`train.model` set to that YAML, the same dataset, a local registry), runs `python -m pipeline run` in each
(a finished run with the same params is reused), then measures both ONNX models of every family with the
shared evaluator, timed in turns in ONNX Runtime (`bench.accuracy_row`, `bench.timed_rows`: the same
measurement as the benchmark table) and writes bench/results/families.md and families.json. A family whose
run stops at a gate still gets a row: its FP32 column, its INT8 column if qat made one, and which gate
stopped it with the measured value.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from pipeline import latency
from pipeline.bench import accuracy_row, run_pipeline, sub_workspace, timed_rows
from pipeline.io import read_json, write_json, write_text
from pipeline.params import Params
from pipeline.workspace import Workspace

# The smallest scale of every supported family (`n`, or `t` for YOLOv9).
FAMILIES = {"yolov5n.yaml": "YOLOv5u", "yolov8n.yaml": "YOLOv8", "yolov9t.yaml": "YOLOv9",
            "yolo11n.yaml": "YOLO11", "yolo26n.yaml": "YOLO26"}
FAMILIES_DIR = Path("bench/families")
RESULTS_DIR = Path("bench/results")


def detection_yamls(scales: str = "ns") -> list[str]:
    """Every detection model YAML (a plain `Detect` head) the installed Ultralytics ships in the v5, v8, v9, 11
    and 26 families, at the given scale letters where the YAML has scales (`yolov8-p2.yaml` at "n" is
    `yolov8n-p2.yaml`)."""
    import ultralytics

    names = []
    for folder in ("v5", "v8", "v9", "11", "26"):
        for path in sorted((Path(ultralytics.__file__).parent / "cfg" / "models" / folder).glob("*.yaml")):
            cfg = yaml.safe_load(path.read_text())
            if cfg["head"][-1][2] != "Detect":
                continue
            if not cfg.get("scales"):
                names.append(path.name)
                continue
            base, _, variant = path.stem.partition("-")
            names += [f"{base}{scale}{'-' + variant if variant else ''}.yaml" for scale in scales
                      if scale in cfg["scales"]]
    return names


def stages_applied(outputs: Path) -> tuple[list[str], str | None]:
    """(what the pipeline did to the model, in order; the gate that stopped it or None) from a run's outputs."""
    from pipeline.stages import RUN_STAGES

    applied: list[str] = []
    plan = outputs / "sensitivity" / "plan.json"
    if plan.is_file():
        fused = (read_json(plan).get("reparam") or {}).get("blocks_fused", 0)
        if fused:
            applied.append(f"re-parameterized ({fused} RepConv)")
    prune = outputs / "prune" / "metrics.json"
    if prune.is_file():
        m = read_json(prune)
        applied.append(f"pruned (-{m['params_reduction']:.0%} params, -{m['macs_reduction']:.0%} MACs)")
    qat = outputs / "qat" / "metrics.json"
    if qat.is_file():
        m = read_json(qat)
        applied.append(f"{m['chosen']} ({m['integer_convs']} integer convs, {m['float_convs']} float)")
    stopped = None
    for stage in [stage.name for stage in RUN_STAGES]:
        gate = outputs / stage / ("report.json" if stage == "gate" else "gate.json")
        if gate.is_file() and not read_json(gate)["passed"]:
            failed = [c["gate"] + (f" {c['value']:.3f} (limit {c['limit']})" if "value" in c and "limit" in c else "")
                      for c in read_json(gate)["checks"] if not c["passed"]]
            stopped = f"{stage} gate failed: {', '.join(failed)}"
            break
    return applied, stopped


def family_row(model_yaml: str, root: Path, data_yaml: Path, params: Params, runs: int) -> dict:
    """One table row: the trained model's FP32 ONNX and the final INT8 ONNX, measured alike and timed in turns."""
    from pipeline.evaluate import export_fp32_onnx

    outputs = root / "outputs"
    trained = outputs / "train" / "best.pt"
    # A run stopped by the qat gate still made its INT8 model: measured, the row shows what the gate refused.
    final = next((p for p in (outputs / "export" / "model.onnx", outputs / "qat" / "model_int8.onnx") if p.is_file()),
                 None)
    applied, stopped = stages_applied(outputs)
    row = {"family": FAMILIES.get(model_yaml, model_yaml), "model": model_yaml, "fp32": None, "int8": None,
           "stages": applied, "stopped": stopped}
    with tempfile.TemporaryDirectory(prefix="families-") as tmp:
        measured = []
        if trained.is_file():
            fp32 = export_fp32_onnx(trained, Path(tmp) / "fp32.onnx", params.train.imgsz, params.export.opset,
                                    params.export.simplify)
            row["fp32"] = accuracy_row("FP32 ONNX", "onnxruntime", fp32, trained, data_yaml, params)
            measured.append(row["fp32"])
        if final is not None:
            row["int8"] = accuracy_row("final INT8", "onnxruntime", final, outputs / "prune" / "best.pt",
                                       data_yaml, params)
            measured.append(row["int8"])
        if measured:
            timed_rows(measured, params.evaluate.warmup, runs)
    return row


def markdown_table(rows: list[dict]) -> str:
    def cells(m: dict | None) -> tuple[str, str, str]:
        if m is None:
            return "–", "–", "–"
        return f"{m['file_mb']:.2f}", f"{m['map50_95']:.3f}", f"{m['ms_1_thread']:.2f} / {m['ms_2_threads']:.2f}"

    lines = ["| family | model | FP32 MB | INT8 MB | FP32 mAP50-95 | INT8 mAP50-95 | FP32 ms (1 / 2 threads) | "
             "INT8 ms (1 / 2 threads) | stages applied |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        (fp32_mb, fp32_map, fp32_ms), (int8_mb, int8_map, int8_ms) = cells(r["fp32"]), cells(r["int8"])
        stages = "; ".join(r["stages"]) + (f"; stopped: {r['stopped']}" if r["stopped"] else "")
        lines.append(f"| {r['family']} | {r['model']} | {fp32_mb} | {int8_mb} | {fp32_map} | {int8_map} | "
                     f"{fp32_ms} | {int8_ms} | {stages or '–'} |")
    return "\n".join(lines)


def bench_families(ws: Workspace, models: list[str] | None = None, runs: int = 50, fresh: bool = False) -> dict:
    """Run the pipeline for every model YAML in `models` (default: FAMILIES) on `ws`'s dataset and params, and
    write bench/results/families.md and families.json under `ws.root`. Returns {"rows", "markdown"}."""
    import onnxruntime

    data_yaml = ws.data_yaml()
    rows = []
    for model_yaml in models or list(FAMILIES):
        root = sub_workspace(ws, ws.path(FAMILIES_DIR) / Path(model_yaml).stem, {"train.model": model_yaml})
        run = run_pipeline(root, fresh)
        row = family_row(model_yaml, root, data_yaml, ws.params, runs)
        row["run"] = run
        if run["returncode"] != 0 and not row["stopped"]:
            row["stopped"] = f"pipeline failed (exit {run['returncode']}), see {run['log']}"
        rows.append(row)
    header = (f"Families {time.strftime('%Y-%m-%d')} on {latency.describe_cpu()}; ONNX Runtime "
              f"{onnxruntime.__version__} CPU (spinning off), batch 1, each family's two models interleaved, "
              f"median of {runs}; data {data_yaml}; imgsz "
              f"{ws.params.train.imgsz}; every family trained, pruned and quantized with the same params.")
    text = "\n".join([header, "", markdown_table(rows)]) + "\n"
    out_dir = ws.path(RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "families.md", text)
    write_json(out_dir / "families.json", {"rows": rows, "header": header})
    return {"rows": rows, "markdown": text}
