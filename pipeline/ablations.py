"""`python -m pipeline bench --ablations`: what each compression technique adds, on one trained model.

From the same trained model, plan and data, with the workspace's params otherwise:
  structured        prune by the plan + QAT, no distillation; QAT with mixed_precision: always, so the same run
                    gives both "INT8, every conv" and "INT8, mixed precision"
  structured+KD     the same with distillation (prune fine-tuning and QAT) from the trained model
  unstructured      global magnitude sparsity (prune.sparsity) + QAT
  both              structured, then sparsity on what is left + QAT
Every INT8 row is the QAT SiLU candidate (qat_int8), or its mixed-precision twin, so rows differ only by the
technique. Latencies of every ONNX are measured at the end, in turns (pipeline/latency.py), on one machine.
Writes bench/results/ablations.md and ablations.json; the work is kept under bench/ablations/.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline import latency, sparsity
from pipeline.io import read_json, write_json, write_text
from pipeline.workspace import Workspace

ABLATION_DIR = "bench/ablations"
RESULTS_DIR = "bench/results"
# name: (prune.method, distill, qat.mixed_precision)
VARIANTS = {
    "structured": ("structured", False, "always"),
    "structured+KD": ("structured", True, "off"),
    "unstructured": ("unstructured", False, "off"),
    "both": ("both", False, "off"),
}
NEEDED = ("outputs/train/best.pt", "outputs/train/metrics.json", "outputs/sensitivity/plan.json",
          "outputs/control/metrics.json")


def run_ablations(ws: Workspace, variants: list[str] | None = None) -> dict:
    from pipeline import distill, prune, qat
    from pipeline.evaluate import export_fp32_onnx
    from pipeline.gates import GateFailed
    from pipeline.stages import run_stage

    from pipeline.stages import RUN_STAGES

    unknown = sorted(set(variants or []) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {sorted(VARIANTS)}")
    if not all(ws.path(p).exists() for p in NEEDED):  # validate, train, control, sensitivity
        names = [s.name for s in RUN_STAGES]
        for stage in RUN_STAGES[:names.index("sensitivity") + 1]:
            try:
                run_stage(stage, ws)
            except GateFailed as e:  # its files are written; the ablation compares techniques, not gates
                print(f"ablations: {stage.name} gate failed, going on with its outputs: {e}")
    trained_pt = ws.path("outputs/train/best.pt")
    trained = read_json(ws.path("outputs/train/metrics.json"))
    control = read_json(ws.path("outputs/control/metrics.json"))
    data_yaml = ws.data_yaml()
    root = ws.path(ABLATION_DIR)
    rows, onnx_files = [], {}
    started = time.time()
    # The dense trained model, timed in turns with the variants: the anchor of every latency and size column
    # (same architecture as an unstructured variant, so the two differ only by the zeros).
    trained_onnx = export_fp32_onnx(trained_pt, root / "trained_fp32.onnx", ws.params.train.imgsz,
                                    ws.params.export.opset, ws.params.export.simplify)
    rows.append({"variant": "trained", "method": None, "distilled": False, "params": trained["params"],
                 "params_reduction": 0.0, "sparsity": 0.0, "artifact": "FP32 (dense)",
                 "map50_95": trained["map50_95"], "path": str(trained_onnx)})
    onnx_files["trained/fp32"] = trained_onnx
    for name in variants or list(VARIANTS):
        method, distilled, mixed = VARIANTS[name]
        params = ws.params.model_copy(deep=True)
        params.prune.method = method
        params.distill.enabled = distilled
        params.qat.mixed_precision = mixed
        params.qat.activation, params.qat.ptq = "silu", False
        teacher = distill.load_teacher(trained_pt, source="trained") if distilled else None
        folder = root / name.replace("+", "_")
        t0 = time.time()
        pruned = prune.run_prune(trained_pt, ws.path("outputs/sensitivity/plan.json"), data_yaml, params,
                                 folder / "prune", trained, teacher=teacher)
        q = qat.run_qat(folder / "prune" / "best.pt", data_yaml, params, folder / "qat",
                        {"control": control, "pruned": pruned}, teacher=teacher)
        minutes = (time.time() - t0) / 60
        fp32 = export_fp32_onnx(folder / "prune" / "best.pt", folder / "pruned_fp32.onnx", params.train.imgsz,
                                params.export.opset, params.export.simplify)
        candidates = read_json(folder / "qat" / "candidates.json")["candidates"]
        int8_rows = [("qat_int8", candidates["qat_int8"])]
        if q.get("mixed_precision") and q["mixed_precision"].get("candidate"):
            int8_rows.append((q["mixed_precision"]["candidate"], candidates[q["mixed_precision"]["candidate"]]))
        s = pruned.get("sparsity") or {}
        common = {"variant": name, "method": method, "distilled": distilled, "params": pruned["params"],
                  "params_reduction": pruned["params_reduction"], "sparsity": s.get("sparsity", 0.0),
                  "minutes": round(minutes, 1)}
        rows.append({**common, "artifact": "pruned FP32", "map50_95": pruned["map50_95"], "path": str(fp32)})
        onnx_files[f"{name}/fp32"] = fp32
        for cname, c in int8_rows:
            mp = c.get("mixed_precision")
            rows.append({**common, "artifact": f"INT8 {cname}", "map50_95": c["metrics"]["map50_95"],
                         "path": c["path"], "float_convs_added": len(mp["float_layers"]) if mp else 0})
            onnx_files[f"{name}/{cname}"] = Path(c["path"])
    e = ws.params.evaluate
    timed = latency.interleaved(onnx_files, e.threads, e.warmup, max(e.runs, 30))
    for row, key in zip(rows, onnx_files):
        sizes = sparsity.file_sizes(row["path"])
        row.update({"ms": timed[key]["median_ms"], "mb": sizes["bytes"] / 1e6, "gzip_mb": sizes["gzip_bytes"] / 1e6,
                    "onnx_sparsity": sparsity.onnx_zeros(row["path"])["sparsity"]})
    header = (f"Ablations {time.strftime('%Y-%m-%d')} on {latency.describe_cpu()}; ORT CPU batch 1, "
              f"{e.threads} thread(s), median of {max(e.runs, 30)} in turns; data {data_yaml}; imgsz "
              f"{ws.params.train.imgsz}; trained mAP50-95 {trained['map50_95']:.3f}, control "
              f"{control['map50_95']:.3f}; prune {ws.params.prune.steps} steps x {ws.params.prune.epochs_per_step} "
              f"epochs, QAT {ws.params.qat.epochs} epochs; {(time.time() - started) / 60:.0f} min in all.")
    text = header + "\n\n" + markdown_table(rows) + "\n"
    out = ws.path(RESULTS_DIR)
    write_text(out / "ablations.md", text)
    write_json(out / "ablations.json", {"header": header, "rows": rows})
    return {"rows": rows, "markdown": text}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | artifact | params | params cut | weight sparsity | mAP50-95 | MB | MB gzip | ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = f" (+{r['float_convs_added']} float convs)" if r.get("float_convs_added") else ""
        lines.append(f"| {r['variant']} | {r['artifact']}{extra} | {r['params']:,} | {r['params_reduction']:.1%} | "
                     f"{r['onnx_sparsity']:.1%} | {r['map50_95']:.3f} | {r['mb']:.2f} | {r['gzip_mb']:.2f} | "
                     f"{r['ms']:.2f} |")
    return "\n".join(lines)
