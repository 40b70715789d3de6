"""Stage `prune`: apply the sensitivity plan to the trained model in steps, fine-tuning after each.

Step k of N prunes every unit of the plan to k/N of its planned ratio (measured against the original width,
lowest-magnitude channels first, importance recomputed on the fine-tuned weights; Torch-Pruning's MetaPruner
with iterative steps, see pipeline/units.py), then fine-tunes the pruned
module itself for `epochs_per_step` epochs with Ultralytics' trainer and measures it with the shared evaluator.
The plan's depth units (whole bottlenecks, see pipeline/surgery.py) are removed before step 1.
Pruning stops after the first step whose mAP50-95 drop versus the trained model exceeds `prune.max_drop`.
The kept checkpoint is the most pruned step within max_drop (if even step 1 exceeds it, step 1 is kept and the
metrics say so; the gate decides).

The kept model's ONNX Runtime latency is then timed against the trained model's (interleaved, the plan's
graph: PTQ INT8 or FP32), and metrics.json says whether the plan's target (latency, MACs or params
reduction) was met on the kept model and by how much (`plan_target`, `latency_check`).

Outputs in out_dir: best.pt (loads with `YOLO(path)` wherever `pipeline` is importable), metrics.json, steps.json.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline import distill, prepare_ultralytics, sparsity, surgery
from pipeline.io import copy_file, read_json, sha256_file, write_json
from pipeline.params import Params
from pipeline.progress import log_ultralytics_epochs
from pipeline.units import (UnitPruner, cached_depth_units, drop_depth_units, latency_model, list_groups,
                            load_model)
from pipeline.workspace import Workspace


class PruneError(RuntimeError):
    pass


def run(ws: Workspace) -> dict:
    """Stage `prune`: best.pt, metrics.json, steps.json in outputs/prune; registers best.pt as `pruned`."""
    from pipeline.gates import publish

    trained = read_json(ws.input("outputs/train/metrics.json"))
    out_dir = ws.stage_dir()
    metrics = run_prune(ws.input("outputs/train/best.pt"), ws.input("outputs/sensitivity/plan.json"),
                        ws.data_yaml(), ws.params, out_dir, trained, teacher=distill.stage_teacher(ws))
    gate = publish(ws, files={"best.pt": out_dir / "best.pt"}, primary="best.pt", metrics=metrics,
                   gates=ws.params.prune.gates, reference=trained)
    return {"metrics": metrics, "gate": gate}


def load_plan(plan_json: str | Path, trained_pt: str | Path) -> dict:
    """Read plan.json and check it was made for this model's architecture."""
    plan_json = Path(plan_json)
    if not plan_json.is_file():
        raise FileNotFoundError(f"{plan_json}: pruning plan not found (run the sensitivity stage first)")
    try:
        plan = read_json(plan_json)
    except json.JSONDecodeError as e:
        raise PruneError(f"{plan_json}: not valid JSON: {e}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("ratios"), dict) or "model" not in plan:
        raise PruneError(f"{plan_json}: not a pruning plan (expected 'ratios' and 'model' keys)")
    granularity = plan["model"].get("granularity", "layer")
    units = list_groups(trained_pt, granularity)
    if plan["model"].get("units") != units:
        raise PruneError(f"{plan_json}: plan is for a different model than {trained_pt} (pruning units differ)")
    model, _ = load_model(trained_pt)
    n_params = sum(p.numel() for p in model.parameters())
    if plan["model"].get("params") not in (None, n_params):
        raise PruneError(f"{plan_json}: plan is for a different model than {trained_pt} "
                         f"({plan['model']['params']} parameters, this one has {n_params})")
    unknown = sorted(set(plan["ratios"]) - set(units))
    if unknown:
        raise PruneError(f"{plan_json}: units {unknown} do not exist in {trained_pt}")
    bad = {u: r for u, r in plan["ratios"].items() if not (isinstance(r, (int, float)) and 0 <= r < 1)}
    if bad:
        raise PruneError(f"{plan_json}: ratios must be in [0, 1): {bad}")
    round_to = plan.get("round_to")
    if round_to is not None and not (isinstance(round_to, int) and round_to >= 1):
        raise PruneError(f"{plan_json}: 'round_to' must be a positive integer or null, got {round_to!r}")
    depth = plan.get("depth", [])
    if not isinstance(depth, list) or not all(isinstance(u, str) for u in depth):
        raise PruneError(f"{plan_json}: 'depth' must be a list of depth unit names, got {depth!r}")
    unknown = sorted(set(depth) - set(cached_depth_units(trained_pt)))
    if unknown:
        raise PruneError(f"{plan_json}: depth units {unknown} are not depth units of {trained_pt} "
                         f"(removable: {cached_depth_units(trained_pt)})")
    return plan


def finetune(model, data_yaml: str | Path, params: Params, epochs: int, run_dir: Path, base_pt: str | Path,
             what: str = "prune fine-tune", teacher=None, sparsifier=None):
    """Train `model` itself (not a model rebuilt from its YAML) for `epochs` epochs; load the best EMA weights
    back into it. Returns `model`. `teacher`: a pipeline.distill.Teacher to distil from (params.distill).
    `sparsifier`: a pipeline.sparsity.Sparsifier whose zeros are held while training (unstructured pruning).

    Ultralytics' trainer normally builds a fresh model from the YAML, which would undo the pruning. Its
    `setup_model` leaves an `nn.Module` already assigned to `trainer.model` alone, so the pruned module is
    assigned right after construction.
    """
    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer

    prepare_ultralytics()
    p, recipe = params.train, params.prune.finetune
    overrides = dict(model=str(base_pt), data=str(data_yaml), epochs=epochs, imgsz=p.imgsz, batch=p.batch,
                     seed=p.seed, deterministic=True, device=p.device, workers=p.workers,
                     optimizer=recipe.optimizer, lr0=recipe.lr0, momentum=recipe.momentum,
                     patience=max(epochs, 1), project=str(run_dir.parent), name=run_dir.name, exist_ok=True,
                     plots=False, amp=False, verbose=False, pretrained=False, val=True,
                     warmup_epochs=0)  # the weights are already trained: no warm-up from a high-momentum start
    trainer = DetectionTrainer(overrides=overrides)
    log_ultralytics_epochs(trainer, what)
    if teacher is not None:
        distill.attach_to_trainer(trainer, teacher, params.distill)
    if sparsifier is not None:
        sparsifier.attach_to_trainer(trainer)
    trainer.model = model.train()
    try:
        trainer.train()
    finally:
        distill.detach(model)
    best = Path(trainer.best)
    if not best.is_file():
        raise PruneError(f"{best}: fine-tuning finished without a checkpoint")
    trained = torch.load(best, map_location="cpu", weights_only=False)
    weights = (trained.get("ema") or trained.get("model")).float().state_dict()
    model.load_state_dict(weights)
    if sparsifier is not None:
        sparsifier.apply()  # exact zeros whatever rounding the EMA and its FP16 checkpoint went through
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # the trainer freezes DFL; keep the module uniform for the next step
    return model.eval()


def _measure(model, ckpt: dict, data_yaml, params: Params, path: Path, **extra) -> dict:
    from pipeline.evaluate import evaluate

    surgery.save_checkpoint(model, path, ckpt, **extra)
    return evaluate(path, data_yaml, params, latency=False)


def measure_latency_reduction(trained_pt: str | Path, pruned_pt: str | Path, data_yaml: str | Path,
                              params: Params, graph: str = "int8") -> dict:
    """ONNX Runtime latency of the pruned model against the trained one, timed interleaved with
    pipeline.latency at evaluate.threads threads, as the sensitivity stage timed its units (FP32, or a PTQ
    INT8 of each when `graph` is int8): {"trained_ms", "pruned_ms", "reduction", ...}."""
    from pipeline.int8 import calibration_image_paths
    from pipeline.latency import describe_cpu, interleaved

    lat, e = params.sensitivity.latency, params.evaluate
    run_params = params.model_copy(deep=True)
    run_params.sensitivity.latency.graph = graph
    calib = calibration_image_paths(data_yaml, lat.calib_images) if graph == "int8" else []
    trained, ckpt = load_model(trained_pt)  # re-parameterized and split, as the plan's baseline was timed
    pruned, _ = surgery.load_detection_model(pruned_pt)
    with tempfile.TemporaryDirectory(prefix="prune-latency-") as tmp:
        models = {name: latency_model(model, ckpt, Path(tmp) / f"{name}.onnx", run_params, calib)["onnx"]
                  for name, model in (("trained", trained), ("pruned", pruned))}
        runs = max(lat.runs, e.runs)
        timings = interleaved(models, e.threads, warmup=e.warmup, runs=runs, rounds=lat.rounds)
    key = f"{lat.statistic}_ms"
    t, p = timings["trained"][key], timings["pruned"][key]
    return {"graph": graph, "threads": e.threads, "runs": runs, "rounds": lat.rounds, "statistic": lat.statistic,
            "cpu": describe_cpu(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "trained_ms": round(t, 4), "pruned_ms": round(p, 4), "reduction": round(1 - p / t, 4),
            "trained_median_ms": round(timings["trained"]["median_ms"], 4),
            "pruned_median_ms": round(timings["pruned"]["median_ms"], 4),
            "trained_p25_p75_ms": [round(timings["trained"]["p25_ms"], 4), round(timings["trained"]["p75_ms"], 4)],
            "pruned_p25_p75_ms": [round(timings["pruned"]["p25_ms"], 4), round(timings["pruned"]["p75_ms"], 4)]}


def run_prune(trained_pt: str | Path, plan_json: str | Path, data_yaml: str | Path, params: Params,
              out_dir: str | Path, trained_metrics: dict, teacher=None) -> dict:
    """Prune `trained_pt` by `plan_json` in `params.prune.steps` steps with fine-tuning; write out_dir/best.pt,
    metrics.json and steps.json; return the metrics. `trained_metrics`: the evaluator's metrics of
    `trained_pt` (the train stage's metrics.json), which the drops are measured against. `teacher`: a
    pipeline.distill.Teacher the fine-tuning distils from, recorded in the metrics."""
    from pipeline.evaluate import evaluate

    prepare_ultralytics()
    trained_pt, data_yaml, out_dir = Path(trained_pt), Path(data_yaml), Path(out_dir)
    if not trained_pt.is_file():
        raise FileNotFoundError(f"{trained_pt}: trained checkpoint not found")
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: data.yaml not found")
    plan = load_plan(plan_json, trained_pt)
    pp = params.prune
    if pp.steps < 1:
        raise PruneError(f"prune.steps must be >= 1, got {pp.steps}")

    model, ckpt = load_model(trained_pt)
    params_before, macs_before = surgery.count_params_macs(model, params.train.imgsz)
    # method: structured (the plan's depth units and channels), unstructured (global magnitude zeros,
    # pipeline/sparsity.py), both.
    structured = pp.method != "unstructured"
    depth = list(plan.get("depth", [])) if structured else []
    # Depth units go first and whole: their names are the unpruned model's bottleneck indices, and a
    # bottleneck removed in step 1 gives the fine-tuning every step to recover.
    _, ratios = drop_depth_units(model, depth, {u: float(r) for u, r in plan["ratios"].items() if r > 0}
                                 if structured else {})
    pruner = UnitPruner(model, ratios, steps=pp.steps, round_to=plan.get("round_to")) if ratios else None
    sparsifier = sparsity.Sparsifier(model, pp.sparsity) if pp.method != "structured" else None
    if "map50_95" not in trained_metrics:
        raise PruneError("trained_metrics has no 'map50_95': drops are measured against the trained model's mAP")
    trained = trained_metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prune-", dir=out_dir))
    steps: list[dict] = []
    best_step = None
    try:
        for step in range(1, pp.steps + 1):
            step_ratios = {u: r * step / pp.steps for u, r in ratios.items()}
            if pruner is not None:
                pruner.step()
            if sparsifier is not None:
                sparsifier.step(step, pp.steps)
            if pp.epochs_per_step > 0:
                finetune(model, data_yaml, params, pp.epochs_per_step, work / f"step{step}", trained_pt,
                         what=f"prune step {step}/{pp.steps} fine-tune", teacher=teacher, sparsifier=sparsifier)
            n_params, macs = surgery.count_params_macs(model, params.train.imgsz)
            step_pt = work / f"step{step}.pt"
            info = {"step": step, "of": pp.steps, "ratios": step_ratios, "depth": depth, "method": pp.method}
            metrics = _measure(model, ckpt, data_yaml, params, step_pt, pruning=info)
            record = {"step": step, "depth": depth, "map50_95": metrics["map50_95"], "map50": metrics["map50"],
                      "drop": round(trained["map50_95"] - metrics["map50_95"], 6), "params": n_params,
                      "macs": macs, "params_reduction": round(1 - n_params / params_before, 4),
                      "macs_reduction": round(1 - macs / macs_before, 4), "checkpoint": step_pt,
                      "sparsity": sparsity.measure(model)["sparsity"]}
            steps.append(record)
            if record["drop"] <= pp.max_drop or best_step is None:
                best_step = record
            if record["drop"] > pp.max_drop:
                break  # further steps prune more and would only drop further

        best_pt = copy_file(best_step["checkpoint"], out_dir / "best.pt")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    final = evaluate(best_pt, data_yaml, params, latency=True)
    graph = (plan.get("latency") or {}).get("graph", params.sensitivity.latency.graph)
    latency = measure_latency_reduction(trained_pt, best_pt, data_yaml, params, graph)
    achieved = {"latency": latency["reduction"], "macs": best_step["macs_reduction"],
                "params": best_step["params_reduction"]}
    target = plan.get("target", "macs")
    predicted = (plan.get("expected") or {}).get(f"{target}_reduction")
    plan_target = {"target": target, "target_reduction": plan.get("target_reduction"), "predicted": predicted,
                   "achieved": achieved.get(target),
                   "met": (None if plan.get("target_reduction") is None or target not in achieved
                           else bool(achieved[target] >= plan["target_reduction"])),
                   "margin": (None if plan.get("target_reduction") is None or target not in achieved
                              else round(achieved[target] - plan["target_reduction"], 4))}
    metrics = {
        "map50_95": final["map50_95"], "map50": final["map50"], "precision": final["precision"],
        "recall": final["recall"], "params": final["params"], "gflops": final["gflops"],
        "file_mb": final["file_mb"], "file_bytes": final["file_bytes"], "latency_ms": final.get("latency_ms"),
        "params_reduction": best_step["params_reduction"], "macs_reduction": best_step["macs_reduction"],
        "params_before": params_before, "macs_before": macs_before, "macs": best_step["macs"],
        "trained_map50_95": trained["map50_95"], "drop": round(trained["map50_95"] - final["map50_95"], 6),
        "steps_done": len(steps), "steps_planned": pp.steps, "kept_step": best_step["step"],
        "within_max_drop": best_step["drop"] <= pp.max_drop,
        "plan_target_met": plan.get("target_met"),  # what the plan predicted, before fine-tuning
        "plan_target": plan_target,  # the target measured on the kept model: met, and by how much
        "latency_check": latency,
        "depth_units_removed": depth,
        "plan_from_this_checkpoint": plan["model"].get("sha256") == sha256_file(trained_pt),
        "reparam": plan.get("reparam"),  # what re-parameterizing the trained model changed (sensitivity measured it)
        "distill": distill.record(teacher, params.distill),
        "method": pp.method,
        # zeros in the weights (unstructured): counted in best.pt and its ONNX, which is no faster for them
        "sparsity": ({"target": pp.sparsity, **sparsity.report(best_pt, params)}
                     if pp.method != "structured" else None),
    }
    for record in steps:
        record.pop("checkpoint")
    write_json(out_dir / "steps.json", steps)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
