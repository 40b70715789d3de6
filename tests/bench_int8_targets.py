"""The script behind the README's INT8 target-CPU and OpenVINO figures (not a test: minutes of CPU).

On a workspace that already ran the pipeline up to `prune` (its outputs/prune/best.pt and metrics.json):
  1. the qat stage's candidates with 7-bit weights (target avx2) and with 8-bit weights (target vnni), same
     seed, same QAT epochs: mAP50-95 and ONNX Runtime latency of each;
  2. the OpenVINO IR of the 8-bit QAT model both ways (qdq: our ONNX converted; nncf: NNCF PTQ of the pruned
     float model with the same calibration images), against the same model in ONNX Runtime: accuracy through
     the one evaluator, latency through pipeline.latency, interleaved, at 1 and 2 threads.

    python tests/bench_int8_targets.py WORKSPACE [OUT_JSON]
    python tests/bench_int8_targets.py --latency WORKSPACE OUT_JSON   # time the files built before, again
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline import export, int8, latency, qat
from pipeline.evaluate import evaluate
from pipeline.io import read_json, write_json
from pipeline.workspace import Workspace


def main(root: str, out_json: str | None = None) -> dict:
    ws = Workspace.load(root, overrides=["qat.activation=silu"])
    data_yaml, params = ws.data_yaml(), ws.params
    pruned_pt = ws.root / "outputs" / "prune" / "best.pt"
    float_models = {"pruned": read_json(ws.root / "outputs" / "prune" / "metrics.json")}
    work = ws.root / "bench_int8_targets"
    results: dict = {"cpu": latency.describe_cpu(), "imgsz": params.train.imgsz, "qat_epochs": params.qat.epochs,
                     "pruned_fp32_map50_95": float_models["pruned"]["map50_95"], "weights": {}}
    for target in ("avx2", "vnni"):
        p = params.model_copy(deep=True)
        p.qat.target_cpu = target
        started = time.time()
        qat.run_qat(pruned_pt, data_yaml, p, work / target, float_models)
        candidates = read_json(work / target / "candidates.json")
        results["weights"][target] = {
            "weight_bits": int8.weight_bits_for(target), "seconds": round(time.time() - started),
            "reference_fp32": {k: candidates["reference_pruned_fp32"][k] for k in ("map50_95", "map50", "latency_ms")},
            "candidates": {name: {k: c["metrics"][k] for k in ("map50_95", "map50", "latency_ms", "latency_ms_1thr",
                                                                 "latency_ms_2thr", "file_mb")}
                           | {"qat_torch_map50_95": c.get("qat_torch_map50_95")}
                           for name, c in candidates["candidates"].items()}}
        print(json.dumps(results["weights"][target], indent=1), flush=True)

    # OpenVINO, from the 8-bit QAT model (this machine has VNNI) and from the pruned float model.
    vnni = work / "vnni"
    onnx_model = vnni / "final" / "model.onnx"
    int8.finalize_int8(vnni / "qat_int8.onnx", vnni / "pruned_fp32.onnx", onnx_model, simplify=params.export.simplify)
    calib = int8.calibration_image_paths(data_yaml, params.qat.calib_images)
    models = {"fp32_onnx_ort": vnni / "pruned_fp32.onnx", "int8_onnx_ort": onnx_model}
    builds = {}
    for method in ("qdq", "nncf"):
        folder = vnni / "final" / f"{method}_openvino_model"
        started = time.time()
        builds[method] = export.write_openvino(method, onnx_model, vnni / "pruned_fp32.onnx", folder, calib)
        builds[method]["seconds"] = round(time.time() - started, 1)
        models[f"int8_ov_{method}"] = folder
    accuracy = {name: evaluate(path, data_yaml, params, latency=False) for name, path in models.items()}
    timing = time_models(work)
    results["openvino"] = {name: {"map50_95": accuracy[name]["map50_95"], "map50": accuracy[name]["map50"],
                                  "file_mb": accuracy[name]["file_mb"],
                                  **{f"ms_{t}thr": timing[str(t)][name]["median_ms"] for t in (1, 2)},
                                  **{f"p25_p75_{t}thr": [timing[str(t)][name]["p25_ms"], timing[str(t)][name]["p75_ms"]]
                                     for t in (1, 2)}}
                           for name in models}
    results["openvino_builds"] = builds
    results["weights_latency"] = {name: {str(t): timing[str(t)][name] for t in (1, 2)} for name in ("int8_7bit_onnx_ort",
                                                                                          "int8_8bit_onnx_ort")}
    print(json.dumps(results["openvino"], indent=1), flush=True)
    write_json(Path(out_json or work / "results.json"), results)
    return results


def time_models(work: Path) -> dict:
    """Every model of the comparison timed in turns (300 runs in 15 rounds), at 1 and 2 threads."""
    vnni = work / "vnni"
    models = {"fp32_onnx_ort": vnni / "pruned_fp32.onnx", "int8_onnx_ort": vnni / "final" / "model.onnx",
              "int8_ov_qdq": vnni / "final" / "qdq_openvino_model", "int8_ov_nncf": vnni / "final" / "nncf_openvino_model",
              "int8_7bit_onnx_ort": work / "avx2" / "qat_int8.onnx", "int8_8bit_onnx_ort": vnni / "qat_int8.onnx"}
    return {str(threads): latency.interleaved(models, threads, warmup=10, runs=300, rounds=15) for threads in (1, 2)}


if __name__ == "__main__":
    if sys.argv[1] == "--latency":
        write_json(sys.argv[3], {"cpu": latency.describe_cpu(),
                                 **time_models(Path(sys.argv[2]).resolve() / "bench_int8_targets")})
    else:
        main(*sys.argv[1:])
