"""Benchmark: our pruned + INT8 model against FP32 and against Ultralytics' own INT8 ONNX export.

Same trained baseline for every row (outputs/train/best.pt), same val data, same evaluator. Latency is
ONNX Runtime CPU at batch 1, median of `runs` after warm-up, at 1 and 2 intra-op threads.
`python -m pipeline bench` runs the pipeline first where its outputs are missing.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.evaluate import evaluate, export_fp32_onnx, model_size, onnx_latency_ms
from pipeline.io import write_json, write_text
from pipeline.params import Params
from pipeline.workspace import Workspace

BENCH_DIR = "bench/results"  # under the workspace root
TARGETS = {"size_ratio_max": 1 / 8, "map_ratio_min": 0.97, "speedup_vs_fp32_min": 3.0, "speedup_vs_ultralytics_min": 2.0}


def ultralytics_int8_onnx(trained_pt: Path, data_yaml: Path, params: Params, out_path: Path) -> Path:
    """What a user gets today: `YOLO(best.pt).export(format="onnx", quantize=8, data=...)`."""
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="ultra-int8-") as tmp:
        local_pt = Path(tmp) / "model.pt"
        shutil.copyfile(trained_pt, local_pt)
        exported = YOLO(str(local_pt), task="detect").export(
            format="onnx", quantize=8, data=str(data_yaml), imgsz=params.train.imgsz, device="cpu",
            opset=params.export.opset, verbose=False)
        shutil.copyfile(exported, out_path)
    return out_path


def measure(name: str, onnx_path: Path, size_source: Path, data_yaml: Path, params: Params, runs: int) -> dict:
    metrics = evaluate(onnx_path, data_yaml, params, latency=False)
    sizes = model_size(size_source, params.train.imgsz)
    return {"artifact": name, "file_mb": metrics["file_mb"], "params": sizes["params"], "gflops": sizes["gflops"],
            "map50_95": metrics["map50_95"], "map50": metrics["map50"],
            "ms_1_thread": onnx_latency_ms(onnx_path, 1, params.evaluate.warmup, runs),
            "ms_2_threads": onnx_latency_ms(onnx_path, 2, params.evaluate.warmup, runs)}


def markdown_table(rows: list[dict]) -> str:
    fp32 = rows[0]
    lines = ["| artifact | MB | params | GFLOPs | mAP50-95 | mAP50 | ms, 1 thread | ms, 2 threads | size vs FP32 | "
             "mAP vs FP32 | speed-up 1t | speed-up 2t |", "|---|" + "---:|" * 11]
    for r in rows:
        gflops = f"{r['gflops']:.3f}" if r["gflops"] is not None else "–"
        lines.append(
            f"| {r['artifact']} | {r['file_mb']:.2f} | {r['params']:,} | {gflops} | {r['map50_95']:.3f} | "
            f"{r['map50']:.3f} | {r['ms_1_thread']:.2f} | {r['ms_2_threads']:.2f} | "
            f"{r['file_mb'] / fp32['file_mb']:.3f} | {r['map50_95'] / max(fp32['map50_95'], 1e-9):.3f} | "
            f"{fp32['ms_1_thread'] / r['ms_1_thread']:.2f}x | {fp32['ms_2_threads'] / r['ms_2_threads']:.2f}x |")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    fp32, ultra, ours = rows[0], rows[1], rows[-1]
    checks = [
        ("final file <= 1/8 of FP32 ONNX", ours["file_mb"] / fp32["file_mb"], TARGETS["size_ratio_max"], "<="),
        ("mAP50-95 >= 97% of FP32", ours["map50_95"] / max(fp32["map50_95"], 1e-9), TARGETS["map_ratio_min"], ">="),
        ("latency >= 3x faster than FP32 (1 thread)", fp32["ms_1_thread"] / ours["ms_1_thread"],
         TARGETS["speedup_vs_fp32_min"], ">="),
        ("latency >= 3x faster than FP32 (2 threads)", fp32["ms_2_threads"] / ours["ms_2_threads"],
         TARGETS["speedup_vs_fp32_min"], ">="),
        ("latency >= 2x faster than Ultralytics INT8 (1 thread)", ultra["ms_1_thread"] / ours["ms_1_thread"],
         TARGETS["speedup_vs_ultralytics_min"], ">="),
        ("latency >= 2x faster than Ultralytics INT8 (2 threads)", ultra["ms_2_threads"] / ours["ms_2_threads"],
         TARGETS["speedup_vs_ultralytics_min"], ">="),
    ]
    lines = []
    for label, value, limit, op in checks:
        met = value <= limit if op == "<=" else value >= limit
        lines.append(f"- {'met' if met else 'NOT met'}: {label} (measured {value:.3f}, target {op} {limit:.3f})")
    return lines


def run_bench(ws: Workspace) -> dict:
    """`python -m pipeline bench`: runs the pipeline first (up to export) where its outputs are missing."""
    from pipeline.stages import RUN_STAGES, run_stage

    needed = ["outputs/train/best.pt", "outputs/prune/best.pt", "outputs/export/model.onnx"]
    if not all(ws.path(path).exists() for path in needed):
        for stage in RUN_STAGES[:[s.name for s in RUN_STAGES].index("export") + 1]:
            run_stage(stage, ws)
    return bench(ws.params, ws.data_yaml(), ws.outputs("train"), ws.outputs("prune"),
                 ws.outputs("export") / "model.onnx", ws.path(BENCH_DIR))


def bench(params: Params, data_yaml: Path, train_dir: Path, prune_dir: Path, final_onnx: Path,
          out_dir: Path, runs: int = 50) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        fp32 = export_fp32_onnx(train_dir / "best.pt", tmp / "fp32.onnx", params.train.imgsz, params.export.opset,
                                params.export.simplify)
        ultra = ultralytics_int8_onnx(train_dir / "best.pt", data_yaml, params, tmp / "ultralytics_int8.onnx")
        pruned = export_fp32_onnx(prune_dir / "best.pt", tmp / "pruned_fp32.onnx", params.train.imgsz,
                                  params.export.opset, params.export.simplify)
        rows = [measure("FP32 ONNX (trained)", fp32, train_dir / "best.pt", data_yaml, params, runs),
                measure("Ultralytics export quantize=8", ultra, train_dir / "best.pt", data_yaml, params, runs),
                measure("ours: pruned FP32", pruned, prune_dir / "best.pt", data_yaml, params, runs),
                measure("ours: pruned + INT8", final_onnx, prune_dir / "best.pt", data_yaml, params, runs)]
    machine = f"{platform.machine()} {_cpu_model()}, {_cpu_count()} cores, {platform.system()}"
    import onnxruntime

    header = (f"Benchmark {time.strftime('%Y-%m-%d')} on {machine}; ONNX Runtime {onnxruntime.__version__} CPU, "
              f"batch 1, median of {runs} after {params.evaluate.warmup} warm-up runs; data {data_yaml}; "
              f"imgsz {params.train.imgsz}. GFLOPs of the INT8 rows are those of the float model they quantize.")
    text = "\n".join([header, "", markdown_table(rows), "", "Targets:", *target_lines(rows)]) + "\n"
    write_text(out_dir / "bench.md", text)
    write_json(out_dir / "bench.json", {"rows": rows, "targets": TARGETS, "header": header})
    return {"rows": rows, "markdown": text}


def _cpu_model() -> str:
    """CPU model and whether it has VNNI (integer dot products): INT8 speed-ups depend on it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "cpu"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "cpu")
    vnni = "avx512_vnni" in info or "avx_vnni" in info
    return f"{model} ({'with' if vnni else 'no'} VNNI)"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
