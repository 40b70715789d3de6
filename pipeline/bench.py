"""Benchmark: our compressed model against a fair FP32 baseline and against what Ultralytics alone gives.

Rows, all from the same run (same trained model, same val data, same evaluator):
- the trained model's FP32 ONNX, and the control (trained + the same extra epochs as compression, nothing
  removed: the fair FP32 baseline that "mAP vs baseline" divides by);
- Ultralytics alone: `export(format="onnx", quantize=8)`, and for x86 CPUs the peer a user would pick,
  `export(format="openvino")` and `export(format="openvino", int8=True)` (NNCF post-training quantization);
- ours: the pruned FP32 ONNX, the final INT8 ONNX in ONNX Runtime, and the final model in OpenVINO (the
  export stage's IR where it made one, else the same INT8 ONNX file read by OpenVINO, whose mAP is then the
  ONNX Runtime one, marked *).

Latency is `pipeline.latency.interleaved`: every model timed in turns in the same rounds, at 1 and at 2
threads, each in its own runtime, median with the 25th-75th percentile spread, on the CPU the header names.

`python -m pipeline bench` benchmarks the workspace's own run (running the pipeline first where outputs are
missing); `--imgsz 320 640` runs the whole pipeline again at each size in its own workspace under
bench/imgsz-<N>/ (the demo data is generated at that size) and benchmarks each; `--models` makes the family
table instead (pipeline/families.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline import int8, latency
from pipeline.evaluate import artifact_bytes, evaluate, export_fp32_onnx, model_size
from pipeline.io import read_json, write_json, write_text
from pipeline.params import DEMO_DATA_YAML, Params, params_hash
from pipeline.workspace import Workspace

RESULTS_DIR = Path("bench/results")  # under the workspace root
REPO = Path(__file__).resolve().parents[1]
TARGETS = {"size_ratio_max": 1 / 8, "map_ratio_min": 0.97, "ort_speedup_vs_fp32_min": 3.0,
           "openvino_speedup_vs_ultralytics_int8_min": 1.5}


# ----------------------------------------------------------------------------------------------
# Workspaces of their own (other image sizes, other model families)


def sub_workspace(ws: Workspace, root: Path, changes: dict[str, object]) -> Path:
    """A workspace folder `root` whose params.yaml is `ws`'s with `changes` ({"train.imgsz": 320}) applied and a
    local registry of its own. The demo dataset is generated inside it (at its own `data.demo` params);
    another dataset is shared by absolute path."""
    root.mkdir(parents=True, exist_ok=True)
    raw = ws.params.as_dict()
    if raw["data"]["yaml"] != DEMO_DATA_YAML:
        raw["data"]["yaml"] = str(ws.data_yaml().resolve())
    raw["registry"].update({"uri": "registry", "endpoint_url": None})
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[leaf] = value
    write_text(root / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
    return root


def run_pipeline(root: Path, fresh: bool = False) -> dict:
    """`python -m pipeline run` in the workspace `root`, in a process of its own (a clean torch/Ultralytics
    state; a failing run leaves the others going). A run that already finished with the same params.yaml (all
    gates passed, exit 0, or a gate's verdict failed, exit 1: the same params give the same verdict) is not
    repeated unless `fresh`; a crash is. Returns {"returncode", "seconds", "log", "reused"}."""
    record_path = root / "run.json"
    current = params_hash(yaml.safe_load((root / "params.yaml").read_text()))
    if not fresh and record_path.is_file():
        record = read_json(record_path)
        if record.get("params_hash") == current and record.get("returncode") in (0, 1):
            return {**record, "reused": True}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(root / "run.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--root", str(root), "--quiet"],
                              cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    record = {"returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1),
              "log": str(root / "run.log"), "params_hash": current}
    write_json(record_path, record)
    return {**record, "reused": False}


# ----------------------------------------------------------------------------------------------
# Peers: what Ultralytics alone gives


def ultralytics_export(trained_pt: Path, out_dir: Path, imgsz: int, data_yaml: Path, **export_args) -> Path:
    """`YOLO(best.pt).export(**export_args)` from a copy of the checkpoint, moved to `out_dir`; returns the
    exported file or folder."""
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="ultralytics-export-") as tmp:
        local_pt = Path(tmp) / "model.pt"
        shutil.copyfile(trained_pt, local_pt)
        exported = Path(YOLO(str(local_pt), task="detect").export(
            imgsz=imgsz, data=str(data_yaml), device="cpu", verbose=False, **export_args))
        target = out_dir / exported.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.move(str(exported), target)
    return target


# ----------------------------------------------------------------------------------------------
# The table


def timed_rows(rows: list[dict], warmup: int, runs: int) -> None:
    """Adds "ms_1_thread", "ms_2_threads" (medians) and their "_spread" (p25, p75) to every row, measuring all
    rows in the same interleaved rounds; a row's "timed" is [path, runtime]."""
    for threads, key in ((1, "ms_1_thread"), (2, "ms_2_threads")):
        measured = latency.interleaved({r["artifact"]: r["timed"] for r in rows}, threads, warmup, runs,
                                       rounds=10)
        for r in rows:
            m = measured[r["artifact"]]
            r[key], r[f"{key}_spread"] = m["median_ms"], (m["p25_ms"], m["p75_ms"])


def accuracy_row(name: str, runtime: str, artifact: Path, size_source: Path | None, data_yaml: Path,
                 params: Params, accuracy_of: Path | None = None) -> dict:
    """Size and accuracy of one artifact; `accuracy_of` measures mAP on another file (marked in the table)."""
    metrics = evaluate(accuracy_of or artifact, data_yaml, params, latency=False)
    sizes = model_size(size_source, params.train.imgsz) if size_source else {"params": None, "gflops": None}
    return {"artifact": name, "runtime": runtime, "file_mb": round(artifact_bytes(artifact) / 1e6, 4),
            "params": sizes["params"], "gflops": sizes["gflops"], "map50_95": metrics["map50_95"],
            "map50": metrics["map50"], "map_measured_elsewhere": accuracy_of is not None,
            "timed": [str(artifact), runtime], "role": ""}


def bench_rows(ws: Workspace, work: Path, runs: int) -> list[dict]:
    params, data_yaml = ws.params, ws.data_yaml()
    imgsz, opset, simplify = params.train.imgsz, params.export.opset, params.export.simplify
    trained_pt, control_pt = ws.outputs("train") / "best.pt", ws.outputs("control") / "best.pt"
    pruned_pt, final_onnx = ws.outputs("prune") / "best.pt", ws.outputs("export") / "model.onnx"
    openvino_ir = ws.outputs("export") / "model_openvino_model"

    fp32 = export_fp32_onnx(trained_pt, work / "trained_fp32.onnx", imgsz, opset, simplify)
    # The same FP32 graph with the DFL rewrite our INT8 export applies: shows how much of our ORT speed-up
    # is that rewrite alone, which any FP32 export could have too.
    fp32_dfl = int8.load_onnx(fp32)
    int8.rewrite_dfl_softmax(fp32_dfl)
    fp32_dfl = int8.save_onnx_atomic(fp32_dfl, work / "trained_fp32_dfl.onnx")
    control = export_fp32_onnx(control_pt, work / "control_fp32.onnx", imgsz, opset, simplify)
    pruned = export_fp32_onnx(pruned_pt, work / "pruned_fp32.onnx", imgsz, opset, simplify)
    ultra_onnx = ultralytics_export(trained_pt, work, imgsz, data_yaml, format="onnx", quantize=8, opset=opset)
    ultra_ov = ultralytics_export(trained_pt, work, imgsz, data_yaml, format="openvino")
    ultra_ov_int8 = ultralytics_export(trained_pt, work, imgsz, data_yaml, format="openvino", int8=True)

    rows = [accuracy_row("FP32 (trained)", "onnxruntime", fp32, trained_pt, data_yaml, params),
            accuracy_row("FP32 (trained), DFL softmax rewritten as ours", "onnxruntime", fp32_dfl, trained_pt,
                         data_yaml, params),
            accuracy_row("FP32 control (trained + same extra epochs)", "onnxruntime", control, control_pt,
                         data_yaml, params),
            accuracy_row("Ultralytics export quantize=8", "onnxruntime", ultra_onnx, trained_pt, data_yaml, params),
            accuracy_row("Ultralytics format=openvino", "openvino", ultra_ov, trained_pt, data_yaml, params),
            accuracy_row("Ultralytics format=openvino int8=True", "openvino", ultra_ov_int8, trained_pt,
                         data_yaml, params),
            accuracy_row("ours: pruned FP32", "onnxruntime", pruned, pruned_pt, data_yaml, params),
            accuracy_row("ours: pruned + INT8", "onnxruntime", final_onnx, pruned_pt, data_yaml, params)]
    if any(openvino_ir.glob("*.xml")):  # with export.openvino: off the folder is there, empty
        rows.append(accuracy_row("ours: pruned + INT8 (OpenVINO IR)", "openvino", openvino_ir, pruned_pt,
                                 data_yaml, params))
    else:
        rows.append(accuracy_row("ours: pruned + INT8 (same ONNX file)", "openvino", final_onnx, pruned_pt,
                                 data_yaml, params, accuracy_of=final_onnx))
    roles = ["fp32", "fp32_dfl", "control", "ultralytics_onnx_int8", "ultralytics_openvino",
             "ultralytics_openvino_int8", "ours_pruned", "ours_ort", "ours_openvino"]
    for row, role in zip(rows, roles):
        row["role"] = role
    # "mAP vs baseline" divides by the fair baseline: the control, or the trained model where params say so.
    baseline_role = "fp32" if params.control.baseline == "trained" else "control"
    for row in rows:
        row["baseline"] = row["role"] == baseline_role
    timed_rows(rows, params.evaluate.warmup, runs)
    return rows


def _row(rows: list[dict], role: str) -> dict:
    if role == "baseline":
        return next(r for r in rows if r["baseline"])
    return next(r for r in rows if r["role"] == role)


def markdown_table(rows: list[dict]) -> str:
    fp32, baseline = _row(rows, "fp32"), _row(rows, "baseline")
    lines = ["| artifact | runtime | MB | params | mAP50-95 | mAP vs baseline | ms, 1 thread (p25-p75) | "
             "ms, 2 threads (p25-p75) | size vs FP32 | speed-up vs FP32 1t / 2t |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = f"{r['params']:,}" if r["params"] else "–"
        mark = "*" if r["map_measured_elsewhere"] else ""
        ms1, ms2 = r["ms_1_thread_spread"], r["ms_2_threads_spread"]
        lines.append(
            f"| {r['artifact']} | {r['runtime']} | {r['file_mb']:.2f} | {params} | {r['map50_95']:.3f}{mark} | "
            f"{r['map50_95'] / max(baseline['map50_95'], 1e-9):.1%} | "
            f"{r['ms_1_thread']:.2f} ({ms1[0]:.2f}-{ms1[1]:.2f}) | {r['ms_2_threads']:.2f} ({ms2[0]:.2f}-{ms2[1]:.2f}) | "
            f"{r['file_mb'] / fp32['file_mb']:.3f} | "
            f"{fp32['ms_1_thread'] / r['ms_1_thread']:.2f}x / {fp32['ms_2_threads'] / r['ms_2_threads']:.2f}x |")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, judged on the measured rows: size and ORT speed against the trained FP32 ONNX,
    accuracy against the fair baseline, OpenVINO speed against Ultralytics' OpenVINO INT8 export."""
    fp32, baseline = _row(rows, "fp32"), _row(rows, "baseline")
    ours, ours_ov, peer = _row(rows, "ours_ort"), _row(rows, "ours_openvino"), _row(rows, "ultralytics_openvino_int8")
    t = TARGETS
    checks = [("final INT8 file <= 1/8 of the FP32 ONNX", ours["file_mb"] / fp32["file_mb"], t["size_ratio_max"], "<="),
              ("mAP50-95 >= 97% of the fair FP32 baseline", ours["map50_95"] / max(baseline["map50_95"], 1e-9),
               t["map_ratio_min"], ">=")]
    for key, label in (("ms_1_thread", "1 thread"), ("ms_2_threads", "2 threads")):
        checks.append((f"ONNX Runtime >= 3x faster than the FP32 ONNX ({label})", fp32[key] / ours[key],
                       t["ort_speedup_vs_fp32_min"], ">="))
    for key, label in (("ms_1_thread", "1 thread"), ("ms_2_threads", "2 threads")):
        checks.append((f"OpenVINO >= 1.5x faster than Ultralytics' OpenVINO INT8 ({label})", peer[key] / ours_ov[key],
                       t["openvino_speedup_vs_ultralytics_int8_min"], ">="))
    lines = []
    for label, value, limit, op in checks:
        met = value <= limit if op == "<=" else value >= limit
        lines.append(f"- {'met' if met else 'NOT met'}: {label} (measured {value:.3f}, target {op} {limit:.3f})")
    fp32_dfl = next((r for r in rows if r["role"] == "fp32_dfl"), None)
    if fp32_dfl:  # not a target: the speed-up that compression alone gives, the export's graph rewrite set aside
        lines.append(f"- for reference: ONNX Runtime speed-up vs the FP32 ONNX with the same DFL rewrite "
                     f"{fp32_dfl['ms_1_thread'] / ours['ms_1_thread']:.2f}x (1 thread) / "
                     f"{fp32_dfl['ms_2_threads'] / ours['ms_2_threads']:.2f}x (2 threads)")
    return lines


def bench_workspace(ws: Workspace, runs: int = 50, name: str = "bench") -> dict:
    """Benchmark the run in `ws` (its outputs must exist); writes bench/results/<name>.md and .json under `ws`."""
    import onnxruntime
    import openvino

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        rows = bench_rows(ws, Path(tmp), runs)
    header = (f"Benchmark {time.strftime('%Y-%m-%d')} on {latency.describe_cpu()}; ONNX Runtime "
              f"{onnxruntime.__version__} (thread spinning off) and OpenVINO {openvino.__version__} (LATENCY hint), "
              f"CPU, batch 1, models interleaved in 10 rounds, median of {runs} runs after "
              f"{ws.params.evaluate.warmup} warm-up; imgsz {ws.params.train.imgsz}; data {ws.data_yaml()}. "
              f"mAP vs baseline: vs the {_row(rows, 'baseline')['artifact']} row. "
              f"* mAP of the same file in ONNX Runtime.")
    text = "\n".join([header, "", markdown_table(rows), "", "Targets:", *target_lines(rows)]) + "\n"
    out_dir = ws.path(RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / f"{name}.md", text)
    write_json(out_dir / f"{name}.json", {"rows": rows, "targets": TARGETS, "header": header})
    return {"rows": rows, "markdown": text}


def run_bench(ws: Workspace, sizes: list[int] | None = None, runs: int = 50, fresh: bool = False) -> dict:
    """`python -m pipeline bench [--imgsz N ...]`. Without sizes: the workspace's own run (the pipeline runs
    first where its outputs are missing). With sizes: one whole run per size under bench/imgsz-<N>/, each
    benchmarked; the tables are also collected in the workspace's bench/results/bench-<N>.md."""
    if not sizes:
        from pipeline.stages import RUN_STAGES, run_stage

        needed = ["outputs/train/best.pt", "outputs/control/best.pt", "outputs/prune/best.pt",
                  "outputs/export/model.onnx"]
        if not all(ws.path(path).exists() for path in needed):
            for stage in RUN_STAGES[:[s.name for s in RUN_STAGES].index("export") + 1]:
                run_stage(stage, ws)
        return bench_workspace(ws, runs)
    texts = []
    for size in sizes:
        root = sub_workspace(ws, ws.path(f"bench/imgsz-{size}"), {"train.imgsz": size, "data.demo.imgsz": size})
        run = run_pipeline(root, fresh)
        if run["returncode"] != 0:
            texts.append(f"imgsz {size}: the pipeline failed (exit {run['returncode']}), see {run['log']}\n")
            continue
        result = bench_workspace(Workspace.load(root), runs, name=f"bench-{size}")
        write_text(ws.path(RESULTS_DIR) / f"bench-{size}.md", result["markdown"])
        texts.append(result["markdown"])
    return {"markdown": "\n".join(texts)}
