"""What each pruning unit saves in ONNX Runtime latency on the demo's architecture: the script behind the
README's per-unit latency figures.

    python tests/bench_latency_units.py [int8|fp32] [median|p25] [runs per model] [out.json]

The demo model (yolov8n, 4 classes, 160 px) with random weights: latency depends on the graph's shapes and
operators, not on the weights' values, so no training is needed (an INT8 graph's calibration ranges only
move its scales). Runs `sensitivity.measure_unit_latency` over every channel unit (at
sensitivity.latency.ratio) and every depth unit, then times two plans against the unpruned model,
interleaved: the MACs plan (every unit at the same ratio, scaled to remove half the MACs, as build_plan does
when no unit's accuracy limits it) and a latency plan aimed at the latency reduction the MACs plan
measured (plan_latency with every drop 0).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(graph: str = "int8", statistic: str = "median", runs: int = 40, out_json: str | None = None) -> dict:
    import numpy as np
    import torch

    from conftest import random_tiny_model
    from pipeline import sensitivity, surgery
    from pipeline.demo_data import generate_demo
    from pipeline.int8 import calibration_image_paths
    from pipeline.latency import describe_cpu, interleaved
    from pipeline.params import DemoParams, Params

    torch.set_num_threads(1)
    params = Params()
    params.sensitivity.latency.graph = graph
    params.sensitivity.latency.statistic = statistic
    params.sensitivity.latency.runs = runs
    params.sensitivity.latency.rounds = runs  # one run per model per round: every model sees the same load
    key = f"{statistic}_ms"
    imgsz = params.train.imgsz
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        tmp = Path(tmp)
        data_yaml = generate_demo(tmp / "data", DemoParams(n_train=8, n_val=2, n_empty=0, imgsz=imgsz))
        model = random_tiny_model(width=0.25, depth=0.33, nc=4)  # yolov8n's own scale
        trained = surgery.save_checkpoint(model, tmp / "trained.pt", {"train_args": {"imgsz": imgsz, "task": "detect"}})
        channel = sensitivity.list_groups(trained)
        depth = sensitivity.cached_depth_units(trained)
        lat = sensitivity.measure_unit_latency(trained, data_yaml, params, channel + depth, tmp / "work")
        base_macs = surgery.count_params_macs(sensitivity.load_model(trained)[0], imgsz)[1]

        units = lat["units"]
        xs = np.array([units[u]["macs_removed"] for u in units], dtype=float)
        ys = np.array([units[u]["measured_ms"] for u in units], dtype=float)
        pearson = float(np.corrcoef(xs, ys)[0, 1])
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        spearman = float(np.corrcoef(rank(xs), rank(ys))[0, 1])

        # Plans without accuracy limits: which architecture each target buys.
        def build(ratios, depth_units):
            m, ckpt = sensitivity.load_model(trained)
            _, left = sensitivity.drop_depth_units(m, depth_units, ratios)
            if left:
                sensitivity.prune_units(m, left)
            calib = calibration_image_paths(data_yaml, params.sensitivity.latency.calib_images) if graph == "int8" else []
            return sensitivity.latency_model(m, ckpt, tmp / f"plan{len(ratios)}-{len(depth_units)}.onnx", params, calib)

        rows = [{"group": u, "kind": "channels", "ratio": r, "drop": 0.0, "map50_95": 0.5,
                 **dict(zip(("params", "macs"), sensitivity._plan_measure(trained, imgsz)({u: r}))), }
                for u in channel for r in (0.2, 0.4, 0.6, 0.8)]
        baseline = {"map50_95": 0.5, **dict(zip(("params", "macs"), surgery.count_params_macs(
            sensitivity.load_model(trained)[0], imgsz)))}
        params.sensitivity.target, params.sensitivity.target_reduction = "macs", 0.5
        macs_plan = sensitivity.build_plan(rows, baseline, params, measure=sensitivity._plan_measure(trained, imgsz))
        macs_built = build({u: r for u, r in macs_plan["ratios"].items() if r > 0}, [])
        base_onnx = lat.pop("baseline_onnx")
        first = interleaved({"baseline": base_onnx, "macs_plan": macs_built["onnx"]}, 1, 5, runs, runs)
        macs_plan_latency = 1 - first["macs_plan"][key] / first["baseline"][key]

        candidates = [{"unit": u, "kind": "channels", "ratio": 0.8, "drop": 0.0,
                       "saved_ms": units[u]["saved_ms"] * 0.8 / params.sensitivity.latency.ratio} for u in channel]
        candidates += [{"unit": u, "kind": "depth", "ratio": 1.0, "drop": 0.0, "saved_ms": units[u]["saved_ms"]}
                       for u in depth]
        picked = sensitivity.plan_latency(candidates, lat["baseline_ms"], max(macs_plan_latency, 0.01))
        latency_built = build(picked["ratios"], picked["depth"])
        timed = interleaved({"baseline": base_onnx, "macs_plan": macs_built["onnx"],
                             "latency_plan": latency_built["onnx"]}, 1, 5, runs, runs)

    b = timed["baseline"][key]
    result = {
        "cpu": describe_cpu(), "graph": graph, "statistic": statistic, "runs": runs, "imgsz": imgsz, "load_average": os.getloadavg(),
        "baseline_ms": lat["baseline_ms"], "session_noise_ms": lat["session_noise_ms"], "baseline_macs": base_macs,
        "units": units, "pearson_macs_vs_ms": round(pearson, 3), "spearman_macs_vs_ms": round(spearman, 3),
        "plans": {
            "macs": {"macs_reduction": macs_plan["expected"]["macs_reduction"],
                     "latency_ms": timed["macs_plan"][key],
                     "latency_reduction": round(1 - timed["macs_plan"][key] / b, 4)},
            "latency": {"aimed_at": round(max(macs_plan_latency, 0.01), 4), "predicted": picked["reduction"],
                        "depth": picked["depth"], "ratios": picked["ratios"],
                        "macs_reduction": round(1 - latency_built["macs"] / base_macs, 4),
                        "latency_ms": timed["latency_plan"][key],
                        "latency_reduction": round(1 - timed["latency_plan"][key] / b, 4)},
            "baseline_ms": b},
    }
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    lines = [f"{result['cpu']}, load average {result['load_average'][0]:.1f}, {result['graph']} graph, "
             f"{result['imgsz']} px, 1 thread, {result['statistic']} of {result['runs']} runs; "
             f"baseline {result['baseline_ms']:.3f} ms (two builds {result['session_noise_ms']:.3f} ms apart), "
             f"{result['baseline_macs'] / 1e6:.1f} M MACs",
             "| unit | MACs removed | ONNX nodes removed | ms saved (measured) | se | used | source |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for unit, u in sorted(result["units"].items(), key=lambda kv: -kv[1]["saved_ms"]):
        lines.append(f"| {unit} | {u['macs_removed'] / result['baseline_macs']:.1%} | {u['onnx_nodes_removed']} | "
                     f"{u['measured_ms']:+.3f} | {u['se_ms']:.3f} | {u['saved_ms']:+.3f} | {u['source']} |")
    lines.append(f"MACs removed vs ms saved: Pearson {result['pearson_macs_vs_ms']}, "
                 f"Spearman {result['spearman_macs_vs_ms']}")
    plans = result["plans"]
    for name in ("macs", "latency"):
        p = plans[name]
        lines.append(f"{name} plan: MACs -{p['macs_reduction']:.1%}, latency {p['latency_ms']:.3f} ms "
                     f"(-{p['latency_reduction']:.1%} vs {plans['baseline_ms']:.3f})")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(table(main(args[0] if args else "int8", args[1] if len(args) > 1 else "median",
                     int(args[2]) if len(args) > 2 else 40, args[3] if len(args) > 3 else None)))
