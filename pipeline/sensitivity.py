"""Stage `sensitivity`: how much mAP50-95 each part of the trained model loses when pruned alone.

For every pruning unit (see `list_groups`) and every ratio in `params.sensitivity.ratios`, the trained model
is pruned in that unit only, saved to a temporary checkpoint and measured with the shared evaluator on the
fixed val subset (`params.sensitivity.val_images` images). The evaluations are independent and take only
picklable arguments, so `run_sensitivity(..., map_fn=...)` can fan them out (Prefect `.map`, Dask, a pool);
the default `map` runs them one after another, which is what the DVC stage does.

Outputs in `out_dir`: sensitivity.csv / sensitivity.json (one row per unit and ratio), curves.csv (the same
drops as one column per unit, for `dvc plots`), plot.png (one curve per unit) and plan.json (per-unit pruning
ratios, see `build_plan`).

Pruning units (pipeline/units.py): by default one Ultralytics layer (`model.6`), or one box/class branch of one
scale in the Detect head (`model.22.cv2.0`); 22 units for YOLOv8n. `granularity: group` measures every
Torch-Pruning group on its own (`model.6.cv1_a.conv`). Units that cannot be pruned safely are not measured:
they get one row in sensitivity.csv with their reason in `skipped` (and are listed in plan.json), as do the
convs kept whole inside units that are measured.

Targets (`sensitivity.target`): `macs` or `params` scale the per-unit budget ratios down to remove
`target_reduction` of them (`build_plan`). `latency` also measures what each unit saves in ONNX Runtime
latency (`measure_unit_latency`, method in LATENCY_METHOD and in plan.json), adds depth units (a block's last
bottleneck removed, or a whole block an identity can replace, see pipeline/surgery.py; one accuracy row each,
kind `depth`), and picks units by
latency saved per mAP lost until `target_reduction` of the latency is saved (`build_latency_plan`,
`plan_latency`); the planned architecture is then timed once against the baseline, so plan.json holds both
the additive prediction and that measurement. At these sizes MACs do not predict latency: operators cost
time whatever their width.

The model measured is the trained checkpoint re-parameterized (pipeline/reparam.py: YOLOv9's RepConv fused
into one conv); plan.json's `reparam` records what that alone changed.
"""
from __future__ import annotations

import csv
import functools
import io
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from pipeline.io import atomic_write, sha256_file, write_json, write_text
from pipeline.params import Params
from pipeline.progress import Progress
from pipeline import prepare_ultralytics, reparam, surgery
# in_unit, list_groups, load_model and prune_units are used through this module by its callers and tests
from pipeline.units import (cached_channel_groups, cached_depth_units, drop_depth_units, in_unit,  # noqa: F401
                            kept_whole, latency_model, list_groups, load_model, prune_units, skipped_units)
from pipeline.workspace import Workspace

CSV_FIELDS = ["group", "kind", "ratio", "map50_95", "map50", "drop", "params", "macs", "channels_removed", "skipped"]


class SensitivityError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ evaluation


@functools.lru_cache(maxsize=2)
def _bn_batch(data_yaml: str, n: int, imgsz: int):
    import torch
    from pipeline import int8

    images = int8.calibration_image_paths(data_yaml, n)  # train split: the val subset stays unseen
    return torch.cat([torch.from_numpy(int8.letterboxed_input(p, imgsz, imgsz)) for p in images])


def recalibrate_batchnorm(model, data_yaml, n_images: int, imgsz: int, batch: int = 8) -> None:
    """Re-estimate every BatchNorm's running mean and variance on `n_images` train images (adaptive BN).

    Removing channels shifts what every later layer sees, and the BatchNorms still normalize with the old
    statistics; measured as it is, a pruned copy looks far worse than it will be after fine-tuning (demo,
    320 px: a 20% cut of model.2 lost 0.204 mAP50-95 as is, 0.066 after this), and the early, high-MAC layers
    look the most sensitive. Recalibrated, the drops rank units by what fine-tuning cannot win back.
    """
    import torch
    from torch import nn

    if n_images <= 0:
        return
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    x = _bn_batch(str(data_yaml), n_images, imgsz)
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all the batches, not an exponential one
        norm.train()
    with torch.no_grad():
        for start in range(0, len(x), batch):
            model(x[start:start + batch])
    for norm, momentum in zip(norms, saved):
        norm.momentum = momentum
    model.eval()


def _evaluate_model(model, ckpt: dict, data_yaml, params: Params) -> dict:
    # The evaluator's accuracy alone: `evaluate` would load the checkpoint a second time to count parameters
    # and FLOPs, which the caller already has (count_params_macs).
    from pipeline.evaluate import accuracy

    prepare_ultralytics()
    recalibrate_batchnorm(model, data_yaml, params.sensitivity.bn_images, params.train.imgsz)
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as tmp:
        pt = surgery.save_checkpoint(model, Path(tmp) / "candidate.pt", ckpt)
        return accuracy(pt, Path(data_yaml), params, max_images=params.sensitivity.val_images)


def evaluate_baseline(trained_pt: str | Path, data_yaml: str | Path, params: Params) -> dict:
    """Metrics of the unpruned model, measured exactly like the pruned candidates (same subset, same path)."""
    model, ckpt = load_model(trained_pt)
    params_count, macs = surgery.count_params_macs(model, params.train.imgsz)
    metrics = _evaluate_model(model, ckpt, data_yaml, params)
    return {"map50_95": metrics["map50_95"], "map50": metrics["map50"], "params": params_count, "macs": macs}


def evaluate_group(trained_pt: str | Path, data_yaml: str | Path, params: Params, group: str,
                   ratio: float) -> dict:
    """Prune one unit of the trained model at `ratio` and measure it. Pure: safe to run in any process.

    Returns a row {group, ratio, map50_95, map50, params, macs, channels_removed}; `drop` is added by
    `run_sensitivity`, which knows the baseline.
    """
    model, ckpt = load_model(trained_pt)
    kind = _prune_one(model, trained_pt, group, ratio, params.sensitivity.round_to)
    removed = 0 if kind == "depth" else kind
    params_count, macs = surgery.count_params_macs(model, params.train.imgsz)
    metrics = _evaluate_model(model, ckpt, data_yaml, params)
    return {"group": group, "kind": "depth" if kind == "depth" else "channels",
            "ratio": 1.0 if kind == "depth" else float(ratio), "map50_95": metrics["map50_95"],
            "map50": metrics["map50"], "params": params_count, "macs": macs, "channels_removed": removed}


def _prune_one(model, trained_pt, unit: str, ratio: float, round_to: int | None = None):
    """Prune `unit` of a fresh copy of the trained model: a depth unit (see surgery.depth_units) is removed
    whole and gives "depth", a channel unit is pruned at `ratio` (widths rounded down to multiples of
    `round_to`) and gives the channels removed."""
    if unit in cached_depth_units(trained_pt):
        drop_depth_units(model, [unit], {})
        return "depth"
    return prune_units(model, {unit: float(ratio)}, groups=cached_channel_groups(trained_pt), round_to=round_to)


# ------------------------------------------------------------------------------------------------------ plan

PLAN_RULE = (
    "Per unit: the largest measured ratio r such that r and every smaller measured ratio lose at most "
    "max_drop mAP50-95 (0 if even the smallest ratio does). If these ratios together reduce the target "
    "(params or MACs) by more than target_reduction, all ratios are scaled down by one common factor until "
    "the reduction just reaches the target; ratios are never raised above the per-unit budget, so if the "
    "target is not reached the plan says so (target_met: false).")


def budget_ratios(rows: list[dict], max_drop: float) -> dict[str, float]:
    """Per unit, the largest ratio within budget, counting only ratios whose smaller ratios are within it too.

    Requiring every smaller ratio to pass guards against a noisy, non-monotonic curve on a small val subset
    (a lucky 0.6 after a failing 0.4 is not trusted).
    """
    by_unit: dict[str, list[dict]] = {}
    for row in rows:
        by_unit.setdefault(row["group"], []).append(row)
    chosen: dict[str, float] = {}
    for unit, unit_rows in by_unit.items():
        best = 0.0
        for row in sorted(unit_rows, key=lambda r: r["ratio"]):
            if row["drop"] > max_drop:
                break
            best = row["ratio"]
        chosen[unit] = best
    return chosen


def _additive_estimate(rows: list[dict], baseline: dict) -> Callable[[dict[str, float]], tuple[int, int]]:
    """(params, MACs) of a plan estimated from the single-unit rows: sum of each unit's own reduction,
    linearly interpolated between measured ratios. Overestimates slightly when neighbouring units are pruned
    together (a conv losing inputs and outputs loses less than the sum)."""
    curves: dict[str, list[tuple[float, int, int]]] = {}
    for row in rows:
        curves.setdefault(row["group"], []).append(
            (row["ratio"], baseline["params"] - row["params"], baseline["macs"] - row["macs"]))

    def reduction_at(unit: str, ratio: float) -> tuple[float, float]:
        points = [(0.0, 0, 0)] + sorted(curves[unit])
        for (r0, p0, m0), (r1, p1, m1) in zip(points, points[1:]):
            if r0 <= ratio <= r1:
                t = 0.0 if r1 == r0 else (ratio - r0) / (r1 - r0)
                return p0 + t * (p1 - p0), m0 + t * (m1 - m0)
        return float(points[-1][1]), float(points[-1][2])

    def measure(ratios: dict[str, float]) -> tuple[int, int]:
        params_cut = macs_cut = 0.0
        for unit, ratio in ratios.items():
            p, m = reduction_at(unit, ratio)
            params_cut, macs_cut = params_cut + p, macs_cut + m
        return round(baseline["params"] - params_cut), round(baseline["macs"] - macs_cut)

    return measure


def build_plan(rows: list[dict], baseline: dict, params: Params,
               measure: Callable[[dict[str, float]], tuple[int, int]] | None = None) -> dict:
    """Per-unit pruning ratios from the sensitivity rows. The rule (also written into the plan):

    1. Per unit, the largest measured ratio r with drop <= params.sensitivity.max_drop for r and every smaller
       measured ratio (0 if none).
    2. If applying those ratios reduces `params.sensitivity.target` ("params" or "macs") by more than
       `target_reduction`, every ratio is multiplied by one common factor s in [0, 1], found by bisection, so the
       reduction just reaches the target. Scaling down never leaves the per-unit budget.
    3. If the budget ratios reach less than the target, they are kept and the plan says target_met: false.

    `rows` need group, ratio, drop, params, macs; `baseline` needs map50_95, params, macs. `measure(ratios) ->
    (params, macs)` gives the size of the model pruned by a plan; by default it is estimated from the rows
    (`run_sensitivity` passes a function that really prunes a copy of the model and counts).
    """
    s = params.sensitivity
    if not rows:
        raise SensitivityError("no sensitivity rows to build a plan from")
    measure = measure or _additive_estimate(rows, baseline)
    budget = budget_ratios(rows, s.max_drop)
    key = "params" if s.target == "params" else "macs"

    def reductions(ratios: dict[str, float]) -> dict[str, float]:
        params_count, macs = measure({u: r for u, r in ratios.items() if r > 0})
        return {"params": 1 - params_count / baseline["params"], "macs": 1 - macs / baseline["macs"],
                "params_after": params_count, "macs_after": macs}

    scale = 1.0
    achieved = reductions(budget)
    if achieved[key] > s.target_reduction:
        low, high = 0.0, 1.0  # reduction(low) <= target < reduction(high)
        for _ in range(8):  # the scale to within 1/256: about one channel of a 256-channel layer
            mid = (low + high) / 2
            if reductions({u: r * mid for u, r in budget.items()})[key] > s.target_reduction:
                high = mid
            else:
                low = mid
        scale = high  # the smallest tried factor that still reaches the target
        achieved = reductions({u: r * scale for u, r in budget.items()})
    ratios = {u: round(r * scale, 4) for u, r in budget.items()}
    target_met = achieved[key] >= s.target_reduction - 1e-9
    note = ("target reached" if target_met else
            f"the per-unit budget (max_drop={s.max_drop}) allows only {achieved[key]:.1%} {key} reduction, "
            f"below the target {s.target_reduction:.0%}; the plan keeps every unit within budget instead")
    return {
        "rule": PLAN_RULE,
        "max_drop": s.max_drop,
        "target": s.target,
        "target_reduction": s.target_reduction,
        "budget_ratios": budget,
        "scale": round(scale, 4),
        "ratios": ratios,
        "expected": {"params_reduction": round(achieved["params"], 4), "macs_reduction": round(achieved["macs"], 4),
                     "params": achieved["params_after"], "macs": achieved["macs_after"]},
        "target_met": bool(target_met),
        "note": note,
        "baseline": baseline,
    }


# --------------------------------------------------------------------------------------- latency per unit

LATENCY_METHOD = (
    "Each channel unit is pruned alone at sensitivity.latency.ratio and each depth unit removed alone, in a "
    "copy of the trained model; every copy and the unpruned model (twice, built separately) are exported to "
    "ONNX (FP32, or with latency.graph int8 a PTQ of that ONNX calibrated on latency.calib_images train "
    "images with pipeline.int8.quantize_onnx) and timed by pipeline.latency.interleaved in one session per "
    "model at evaluate.threads threads, latency.runs runs each spread over latency.rounds interleaved rounds "
    "(rounds = runs: one run per model per round, so every model sees the same load). A unit saves the "
    "baseline's latency.statistic (median, or p25) minus its own; the baseline is the mean of its two copies "
    "and their difference is the session noise. Where a saving is within two standard errors (each "
    "statistic's from its quartiles, plus the session noise), noise dominates and the unit gets the pooled "
    "model instead: ms saved = a x MACs removed + b x ONNX nodes removed (a, b >= 0), least squares over the "
    "units that stand out of the noise (over every unit if fewer than two do). A channel unit's saving at "
    "another ratio is scaled linearly from the timed ratio; a plan's saving is the sum of its units' (no "
    "interactions).")

LATENCY_PLAN_RULE = (
    "Candidates: every channel unit at its budget ratio (the largest measured ratio within max_drop, every "
    "smaller one too) and every depth unit whose removal stays within max_drop. They are taken in order of "
    "estimated ms saved per mAP50-95 lost (drops below latency.drop_floor count as drop_floor), until the "
    "summed savings reach target_reduction of the baseline's latency; a channel unit that would overshoot "
    "is taken at the fraction of its ratio that just reaches the target. Units that save nothing are never "
    "taken. If every candidate together falls short, all are taken and the plan says target_met: false.")


def build_unit_latency_model(trained_pt: str | Path, data_yaml: str | Path, params: Params, unit: str | None,
                             out_onnx: str | Path) -> dict:
    """The latency model of the trained model with one unit pruned (None: unpruned). Pure: safe to run in
    any process that sees `out_onnx`'s folder."""
    from pipeline.int8 import calibration_image_paths

    prepare_ultralytics()
    model, ckpt = load_model(trained_pt)
    if unit is not None:
        _prune_one(model, trained_pt, unit, params.sensitivity.latency.ratio, params.sensitivity.round_to)
    calib = (calibration_image_paths(data_yaml, params.sensitivity.latency.calib_images)
             if params.sensitivity.latency.graph == "int8" else [])
    return {"unit": unit, **latency_model(model, ckpt, out_onnx, params, calib)}


# Standard error of a median from the quartiles: sigma ~ IQR / 1.349, se(median) ~ 1.2533 sigma / sqrt(n); a
# 25th percentile's is 1.087 times that (normal theory). Contention from other jobs makes timings bimodal and
# the IQR wide, so on shared cores this errs towards "noise" and the pooled model.
_SE_FACTOR = {"median": 0.929, "p25": 1.087 * 0.929}


def _quantile_se(timing: dict, statistic: str) -> float:
    return _SE_FACTOR[statistic] * (timing["p75_ms"] - timing["p25_ms"]) / math.sqrt(max(1, timing["runs"]))


def _nonnegative_fit(x, y):
    """Least squares y ~ x @ coef with coef >= 0 (two columns): removing MACs or operators cannot, in
    expectation, make a model slower, and noisy units must not teach the pooled model that it does."""
    import numpy as np

    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    if (coef >= 0).all():
        return coef
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y ** 2))
    for j in range(x.shape[1]):  # one column alone, clipped at 0
        col = x[:, j]
        c = max(0.0, float(col @ y) / float(col @ col)) if float(col @ col) > 0 else 0.0
        err = float(np.sum((y - c * col) ** 2))
        if err < best_err:
            best, best_err = np.zeros(x.shape[1]), err
            best[j] = c
    return best


def latency_savings(baseline: dict, timings: dict[str, dict], builds: dict[str, dict],
                    statistic: str = "median", session_noise_ms: float = 0.0) -> dict[str, dict]:
    """Per unit: measured ms saved, its noise, the pooled model's estimate, and the saving used (see
    LATENCY_METHOD). `baseline`: {"timing", "macs", "onnx_nodes"} of the unpruned model; `timings`: per unit
    `pipeline.latency` summaries; `builds`: per unit {"macs", "onnx_nodes"}; `statistic`: "median" or "p25"
    of each model's runs; `session_noise_ms`: how far two separately built copies of one model time apart,
    a noise that more runs do not shrink. Pure."""
    import numpy as np

    if statistic not in _SE_FACTOR:
        raise SensitivityError(f"latency statistic must be one of {sorted(_SE_FACTOR)}, got {statistic!r}")
    key = f"{statistic}_ms"
    units = list(timings)
    base_ms = baseline["timing"][key]
    measured = {u: base_ms - timings[u][key] for u in units}
    features = {u: (baseline["macs"] - builds[u]["macs"], baseline["onnx_nodes"] - builds[u]["onnx_nodes"])
                for u in units}
    se = {u: math.sqrt(_quantile_se(baseline["timing"], statistic) ** 2 + _quantile_se(timings[u], statistic) ** 2
                       + session_noise_ms ** 2) for u in units}
    noisy = {u: abs(measured[u]) < 2 * se[u] and len(units) >= 2 for u in units}
    # The pooled model learns from the units that stand out of the noise (all of them if fewer than two do).
    fit = [u for u in units if not noisy[u]]
    fit = fit if len(fit) >= 2 else units
    coef = np.zeros(2)
    if len(fit) >= 2:
        # Scaled columns: MACs run to millions, nodes to tens; unscaled, the least squares is ill-conditioned.
        x = np.array([features[u] for u in fit], dtype=float)
        scale = np.maximum(np.abs(x).max(axis=0), 1.0)
        coef = _nonnegative_fit(x / scale, np.array([measured[u] for u in fit])) / scale
    out = {}
    for u in units:
        pooled = float(coef[0] * features[u][0] + coef[1] * features[u][1])
        noisy_u, se_u = noisy[u], se[u]
        out[u] = {"measured_ms": round(measured[u], 4), "se_ms": round(se_u, 4), "pooled_ms": round(pooled, 4),
                  "saved_ms": round(pooled if noisy_u else measured[u], 4),
                  "source": "pooled" if noisy_u else "measured",
                  "unit_ms": round(timings[u][key], 4), "macs_removed": features[u][0],
                  "onnx_nodes_removed": features[u][1]}
    return out


def plan_latency(candidates: list[dict], baseline_ms: float, target_reduction: float,
                 drop_floor: float = 0.005) -> dict:
    """Pick units by estimated latency saved per mAP lost until `target_reduction` of `baseline_ms` is saved
    (LATENCY_PLAN_RULE). Pure: `candidates` are {"unit", "kind" ("channels" or "depth"), "ratio", "drop",
    "saved_ms"}, a channel candidate's saving being that at its `ratio` (savings scale linearly below it).

    Returns {"ratios": {channel unit: ratio}, "depth": [depth units], "order": [picked units, best first],
    "saved_ms", "reduction", "target_met"}."""
    target_ms = target_reduction * baseline_ms
    useful = [c for c in candidates if c["saved_ms"] > 0 and c["ratio"] > 0]
    ranked = sorted(useful, key=lambda c: (-c["saved_ms"] / max(c["drop"], drop_floor), c["unit"]))
    ratios: dict[str, float] = {}
    depth: list[str] = []
    order: list[str] = []
    saved = 0.0
    for c in ranked:
        need = target_ms - saved
        if need <= 1e-12:
            break
        if c["kind"] == "depth":
            depth.append(c["unit"])
            saved += c["saved_ms"]
        else:
            fraction = min(1.0, need / c["saved_ms"])
            ratios[c["unit"]] = round(c["ratio"] * fraction, 4)
            saved += c["saved_ms"] * fraction
        order.append(c["unit"])
    return {"ratios": ratios, "depth": depth, "order": order, "saved_ms": round(saved, 4),
            "reduction": round(saved / baseline_ms, 4) if baseline_ms > 0 else 0.0,
            "target_met": saved >= target_ms - 1e-9}


def build_latency_plan(rows: list[dict], baseline: dict, params: Params, latency: dict,
                       measure: Callable[..., tuple[int, int]] | None = None) -> dict:
    """The plan for `sensitivity.target: latency`. `rows`: channel and depth rows (with `kind`); `latency`:
    {"baseline_ms", "units": latency_savings(...)}; `measure(ratios, depth) -> (params, macs)` counts the
    planned model (by default the additive estimate from the rows, depth rows included)."""
    s = params.sensitivity
    channel_rows = [r for r in rows if r.get("kind", "channels") == "channels"]
    depth_rows = [r for r in rows if r.get("kind") == "depth"]
    if not channel_rows and not depth_rows:
        raise SensitivityError("no sensitivity rows to build a plan from")
    budget = budget_ratios(channel_rows, s.max_drop) if channel_rows else {}
    drops = {(r["group"], r["ratio"]): r["drop"] for r in channel_rows}
    per_unit = latency["units"]
    candidates = []
    for unit, ratio in budget.items():
        if ratio > 0 and unit in per_unit:
            candidates.append({"unit": unit, "kind": "channels", "ratio": ratio, "drop": drops[(unit, ratio)],
                               "saved_ms": per_unit[unit]["saved_ms"] * ratio / s.latency.ratio})
    for row in depth_rows:
        if row["drop"] <= s.max_drop and row["group"] in per_unit:
            candidates.append({"unit": row["group"], "kind": "depth", "ratio": 1.0, "drop": row["drop"],
                               "saved_ms": per_unit[row["group"]]["saved_ms"]})
    picked = plan_latency(candidates, latency["baseline_ms"], s.target_reduction, s.latency.drop_floor)
    ratios = {u: picked["ratios"].get(u, 0.0) for u in budget}
    if measure is None:
        estimate = _additive_estimate(rows, baseline)
        measure = lambda r, d: estimate({**r, **{u: 1.0 for u in d}})  # noqa: E731 (depth rows sit at ratio 1)
    n_params, macs = measure({u: r for u, r in ratios.items() if r > 0}, picked["depth"])
    reduction = picked["reduction"]
    if picked["target_met"]:
        note = "target reached (predicted)"
    elif not picked["order"]:
        note = (f"no unit within budget (max_drop={s.max_drop}) is predicted to save latency; the plan prunes "
                "nothing")
    else:
        note = (f"the units within budget (max_drop={s.max_drop}) that save latency are predicted to save only "
                f"{reduction:.1%} of it, below the target {s.target_reduction:.0%}; the plan takes them all")
    return {
        "rule": LATENCY_PLAN_RULE,
        "max_drop": s.max_drop,
        "target": "latency",
        "target_reduction": s.target_reduction,
        "budget_ratios": budget,
        "ratios": ratios,
        "depth": picked["depth"],
        "order": picked["order"],
        "expected": {"params_reduction": round(1 - n_params / baseline["params"], 4),
                     "macs_reduction": round(1 - macs / baseline["macs"], 4), "params": n_params, "macs": macs,
                     "latency_reduction": reduction, "latency_saved_ms": picked["saved_ms"],
                     "latency_ms": round(latency["baseline_ms"] - picked["saved_ms"], 4)},
        "target_met": bool(picked["target_met"]),
        "note": note,
        "baseline": baseline,
    }


def measure_unit_latency(trained_pt: Path, data_yaml: Path, params: Params, units: list[str], work: Path,
                         map_fn: Callable = map) -> dict:
    """{"baseline_ms", "baseline", "units": latency_savings(...), "method", ...}: what each unit saves in ONNX
    Runtime latency, by LATENCY_METHOD. The models are built through `map_fn` (independent, like the
    accuracy evaluations); the timing runs here, in one process, all models interleaved."""
    from pipeline.latency import describe_cpu, interleaved

    lat, e = params.sensitivity.latency, params.evaluate
    if not 0.0 < lat.ratio < 1.0:
        raise SensitivityError(f"sensitivity.latency.ratio must be in (0, 1), got {lat.ratio}")
    work.mkdir(parents=True, exist_ok=True)
    # The unpruned model twice, built and timed separately: measured here, two builds of one model ran 0.12 ms
    # (2%) apart while one file timed twice agreed to 0.005 ms, a per-session noise no run count removes.
    names: list[str | None] = [None, None, *units]
    paths = [str(work / f"{i:03d}.onnx") for i in range(len(names))]
    n = len(names)
    progress = Progress("latency models", n)
    builds = []
    for build in map_fn(build_unit_latency_model, [str(trained_pt)] * n, [str(data_yaml)] * n, [params] * n,
                        names, paths):
        builds.append(build)
        progress.step(f"{build['unit'] or 'baseline'}: {Path(build['onnx']).name}")
    base, repeat, by_unit = builds[0], builds[1], {b["unit"]: b for b in builds[2:]}
    timings = interleaved({"baseline": base["onnx"], "baseline_repeat": repeat["onnx"],
                           **{u: by_unit[u]["onnx"] for u in units}}, e.threads, warmup=e.warmup, runs=lat.runs,
                          rounds=lat.rounds)
    first, second = timings.pop("baseline"), timings.pop("baseline_repeat")
    # The reference is the two copies' mean; their difference is the session noise.
    base_timing = {k: (first[k] + second[k]) / 2 for k in ("median_ms", "p25_ms", "p75_ms")}
    base_timing["runs"] = first["runs"] + second["runs"]
    key = f"{lat.statistic}_ms"
    session_noise = abs(first[key] - second[key])
    savings = latency_savings({"timing": base_timing, "macs": base["macs"], "onnx_nodes": base["onnx_nodes"]},
                              timings, by_unit, lat.statistic, session_noise)
    return {"method": LATENCY_METHOD, "graph": lat.graph, "threads": e.threads, "ratio": lat.ratio,
            "runs": lat.runs, "rounds": lat.rounds, "statistic": lat.statistic, "cpu": describe_cpu(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "baseline_ms": round(base_timing[key], 4), "session_noise_ms": round(session_noise, 4),
            "baseline": {k: round(v, 4) if isinstance(v, float) else v for k, v in base_timing.items()},
            "units": savings, "baseline_onnx": base["onnx"]}


def time_plan(trained_pt: Path, data_yaml: Path, params: Params, plan: dict, baseline_onnx: str,
              work: Path) -> dict:
    """The planned model (not fine-tuned: latency does not depend on the weights' values) timed against the
    unpruned one, interleaved: how far the additive prediction is from the architecture it plans."""
    from pipeline.int8 import calibration_image_paths
    from pipeline.latency import interleaved

    lat, e = params.sensitivity.latency, params.evaluate
    model, ckpt = load_model(trained_pt)
    ratios = {u: r for u, r in plan["ratios"].items() if r > 0}
    _, ratios = drop_depth_units(model, plan.get("depth", []), ratios)
    if ratios:
        prune_units(model, ratios, round_to=params.sensitivity.round_to)
    calib = calibration_image_paths(data_yaml, lat.calib_images) if lat.graph == "int8" else []
    planned = latency_model(model, ckpt, work / "plan.onnx", params, calib)["onnx"]
    t = interleaved({"baseline": baseline_onnx, "plan": planned}, e.threads, warmup=e.warmup, runs=lat.runs,
                    rounds=lat.rounds)
    key = f"{lat.statistic}_ms"
    return {"statistic": lat.statistic, "baseline_ms": round(t["baseline"][key], 4),
            "plan_ms": round(t["plan"][key], 4), "reduction": round(1 - t["plan"][key] / t["baseline"][key], 4)}


# ---------------------------------------------------------------------------------------------------- outputs


def write_rows_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_curves_csv(rows: list[dict], path: Path) -> None:
    """Wide table for `dvc plots`: one row per ratio (0 included), one drop column per unit, so that
    `x: ratio, y: [<units>]` draws one line per unit with DVC's built-in templates."""
    units = list(dict.fromkeys(row["group"] for row in rows))
    drops = {(row["group"], row["ratio"]): row["drop"] for row in rows}
    ratios = sorted({0.0} | {row["ratio"] for row in rows})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ratio", *units])
    for ratio in ratios:
        writer.writerow([ratio, *(0.0 if ratio == 0 else drops.get((u, ratio), "") for u in units)])
    write_text(path, buffer.getvalue())


def plot_sensitivity(rows: list[dict], baseline: dict, max_drop: float, path: Path) -> None:
    """One curve per unit: mAP50-95 drop against pruning ratio, with the budget line; legend beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(dict.fromkeys(row["group"] for row in rows))
    fig_height = max(4.5, 0.22 * len(units) / max(1, math.ceil(len(units) / 30)))
    fig, ax = plt.subplots(figsize=(11, fig_height))
    colours = plt.get_cmap("tab10").colors  # strong colours; the line style tells apart units 10 apart
    styles = ["-", "--", ":", "-."]
    for i, unit in enumerate(units):
        points = sorted((r["ratio"], r["drop"]) for r in rows if r["group"] == unit)
        ax.plot([0.0] + [p[0] for p in points], [0.0] + [p[1] for p in points], marker="o", markersize=3,
                linewidth=1.2, color=colours[i % len(colours)], linestyle=styles[(i // len(colours)) % len(styles)],
                label=unit.removeprefix("model."))
    ax.axhline(max_drop, color="black", linestyle="--", linewidth=1, label=f"budget ({max_drop})")
    ax.set_xlabel("fraction of channels pruned (this unit only)")
    ax.set_ylabel("mAP50-95 drop vs unpruned (0.02 = 2 points)")
    ax.set_title(f"Pruning sensitivity (baseline mAP50-95 {baseline['map50_95']:.3f})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, ncol=math.ceil(len(units) / 30),
              frameon=False, title="unit (layer)", title_fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _plan_measure(trained_pt, imgsz: int, round_to: int | None = None) -> Callable[..., tuple[int, int]]:
    def measure(ratios: dict[str, float], depth: Iterable[str] = ()) -> tuple[int, int]:
        model, _ = load_model(trained_pt)
        depth = list(depth)
        if depth:
            _, ratios = drop_depth_units(model, depth, ratios)
            groups = None  # the groups of the shorter model
        else:
            groups = cached_channel_groups(trained_pt)
        if ratios:
            prune_units(model, ratios, groups=groups, round_to=round_to)
        return surgery.count_params_macs(model, imgsz)

    return measure


def _single_threaded_worker() -> None:
    import torch

    torch.set_num_threads(1)


def process_pool_map(workers: int):
    """A builtin-`map` stand-in over `workers` local processes, one torch thread each: small models
    evaluate faster side by side than one at a time with every core fighting over each. Yields results in
    order as they come."""
    def pool_map(function, *iterables):
        if workers <= 1:
            yield from map(function, *iterables)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process that already runs torch's thread pools can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_single_threaded_worker) as pool:
            yield from pool.map(function, *iterables)

    return pool_map


def run(ws: Workspace, map_fn: Callable | None = None) -> dict:
    """Stage `sensitivity`. `map_fn(function, *iterables)` runs the independent evaluations: local processes
    from the CLI and DVC, Prefect's task mapping (threads or Dask) in the flow. Paths passed to the evaluations
    are absolute (the workspace root is), so they may run in other processes or on Dask workers elsewhere."""
    map_fn = map_fn or process_pool_map(ws.params.orchestration.max_workers)
    result = run_sensitivity(ws.input("outputs/train/best.pt"), ws.data_yaml(), ws.params, ws.stage_dir(),
                             map_fn=map_fn, granularity=ws.params.sensitivity.granularity)
    plan = result["plan"]
    return {"baseline": result["baseline"], "evaluations": len(result["rows"]),
            "plan": {k: v for k, v in plan.items() if k != "model"}}


def run_sensitivity(trained_pt: str | Path, data_yaml: str | Path, params: Params, out_dir: str | Path,
                    map_fn: Callable = map, groups: Iterable[str] | None = None,
                    granularity: str = "layer") -> dict:
    """Measure every unit at every ratio, then write sensitivity.csv/.json, plot.png and plan.json to out_dir.

    `map_fn(func, *iterables)` runs the evaluations (builtin `map` style; a Prefect/Dask wrapper fans them out).
    `groups` restricts the units (default: all of `list_groups(trained_pt, granularity)`).
    Returns {"baseline", "rows", "plan", "outputs"}.
    """
    trained_pt, data_yaml, out_dir = Path(trained_pt), Path(data_yaml), Path(out_dir)
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: data.yaml not found")
    all_units = list_groups(trained_pt, granularity)
    units = list(groups) if groups is not None else all_units
    ratios = sorted(set(float(r) for r in params.sensitivity.ratios))
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise SensitivityError(f"sensitivity.ratios must be in (0, 1), got {params.sensitivity.ratios}")

    by_latency = params.sensitivity.target == "latency"
    if by_latency and not 0.0 < params.sensitivity.latency.ratio < 1.0:  # before the evaluations, not after
        raise SensitivityError(f"sensitivity.latency.ratio must be in (0, 1), got {params.sensitivity.latency.ratio}")
    # Depth units are measured for the latency plan only: a MACs or params plan keeps today's channel units.
    depth = [u for u in cached_depth_units(trained_pt) if groups is None or u in groups] if by_latency else []
    units = [u for u in units if u not in depth]

    baseline = evaluate_baseline(trained_pt, data_yaml, params)
    jobs = [(unit, ratio) for unit in units for ratio in ratios] + [(unit, 1.0) for unit in depth]
    n = len(jobs)
    results = map_fn(evaluate_group, [str(trained_pt)] * n, [str(data_yaml)] * n, [params] * n,
                     [u for u, _ in jobs], [r for _, r in jobs])
    progress = Progress("sensitivity evaluation", n)
    rows = []
    for row in results:
        row = dict(row)
        row["drop"] = round(baseline["map50_95"] - row["map50_95"], 6)
        rows.append(row)
        progress.step(f"{row['group']} at {row['ratio']:.2f}: drop {row['drop']:+.4f}")

    channel_rows = [r for r in rows if r["kind"] == "channels"]
    measure = _plan_measure(trained_pt, params.train.imgsz, params.sensitivity.round_to)
    if by_latency:
        work = out_dir / ".latency-work"  # absolute, inside the workspace: workers elsewhere write here too
        try:
            latency = measure_unit_latency(trained_pt, data_yaml, params, units + depth, work, map_fn)
            plan = build_latency_plan(rows, baseline, params, latency, measure=measure)
            plan["expected"]["latency_measured"] = time_plan(trained_pt, data_yaml, params, plan,
                                                             latency.pop("baseline_onnx"), work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        plan["latency"] = latency
    else:
        plan = build_plan(channel_rows, baseline, params, measure=measure)
        plan["depth"] = []
    plan["model"] = {"checkpoint": str(trained_pt), "sha256": sha256_file(trained_pt), "units": all_units,
                     "depth_units": cached_depth_units(trained_pt), "granularity": granularity,
                     "params": baseline["params"], "macs": baseline["macs"], "imgsz": params.train.imgsz}
    plan["val_images"] = params.sensitivity.val_images
    plan["round_to"] = params.sensitivity.round_to  # prune keeps the widths this plan was measured with
    skipped, kept = skipped_units(trained_pt, granularity), kept_whole(trained_pt)
    plan["skipped_units"], plan["kept_whole"] = skipped, kept
    plan["reparam"] = reparam.checkpoint_report(trained_pt, params.train.imgsz)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Units not measured, and convs kept whole inside measured units, get one row each with the reason.
    notes = [{"group": name, "skipped": reason} for name, reason in {**skipped, **kept}.items()]
    write_rows_csv(rows + notes, out_dir / "sensitivity.csv")
    write_curves_csv(channel_rows, out_dir / "curves.csv")
    write_json(out_dir / "sensitivity.json", rows)  # a plain list of records: what `dvc plots` reads
    plot_sensitivity(channel_rows, baseline, params.sensitivity.max_drop, out_dir / "plot.png")
    write_json(out_dir / "plan.json", plan)
    return {"baseline": baseline, "rows": rows, "plan": plan,
            "outputs": {name: str(out_dir / name) for name in
                        ("sensitivity.csv", "sensitivity.json", "curves.csv", "plot.png", "plan.json")}}
