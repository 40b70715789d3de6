"""Sensitivity stage: rows per unit and ratio, plan rule, outputs. Tiny random model, 64 px, a few images."""
from __future__ import annotations

import csv
import json

import pytest

from pipeline import sensitivity
from pipeline.params import DemoParams, Params

IMGSZ = 64



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _tiny_checkpoint(path):
    """An unpruned Ultralytics-style checkpoint (original C2f blocks), like train's best.pt but untrained."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    from pipeline.surgery import save_checkpoint

    cfg = yaml_model_load("yolov8n.yaml")
    cfg["scales"] = {"n": [0.33, 0.125, 1024]}
    cfg["scale"] = "n"
    model = DetectionModel(cfg, nc=4, verbose=False)
    model.names = {0: "circle", 1: "square", 2: "triangle", 3: "cross"}
    return save_checkpoint(model, path, {"train_args": {"imgsz": IMGSZ, "task": "detect"}})


def _params(**sensitivity) -> Params:
    p = Params()
    p.train.imgsz = IMGSZ
    p.sensitivity = p.sensitivity.model_copy(update={"val_images": 4, **sensitivity})
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.demo_data import generate_demo

    root = tmp_path_factory.mktemp("sens")
    data_yaml = generate_demo(root / "data", DemoParams(n_train=4, n_val=4, n_empty=0, imgsz=IMGSZ, max_objects=2))
    return _tiny_checkpoint(root / "trained.pt"), data_yaml


def _fake_evaluate(model, ckpt, data_yaml, params):
    # Accuracy that falls with the share of parameters removed: keeps the test fast and the plan meaningful.
    n = sum(p.numel() for p in model.parameters())
    return {"map50_95": 0.5 * n / _fake_evaluate.full, "map50": 0.8 * n / _fake_evaluate.full}


def test_units_are_stable_and_cover_the_groups(tiny):
    trained_pt, _ = tiny
    units = sensitivity.list_groups(trained_pt)
    assert units == sensitivity.list_groups(trained_pt)
    assert units[0] == "model.0" and "model.22.cv3.2" in units
    assert len(units) == 22
    roots = sensitivity.list_groups(trained_pt, granularity="group")
    assert all(any(sensitivity.in_unit(r, u) for u in units) for r in roots)
    assert not any(".22.cv2.0.2" in r or ".dfl" in r for r in roots)  # head outputs and DFL are never pruned


def test_run_sensitivity_one_row_per_unit_and_ratio(tiny, tmp_path, monkeypatch):
    trained_pt, data_yaml = tiny
    model, _ = sensitivity.load_model(trained_pt)
    _fake_evaluate.full = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(sensitivity, "_evaluate_model", _fake_evaluate)
    calls = []

    def recording_map(fn, *iterables):
        calls.append(len(iterables[0]))
        return map(fn, *iterables)

    params = _params(ratios=[0.3, 0.6], max_drop=0.02, target="params", target_reduction=0.2)
    units = sensitivity.list_groups(trained_pt)
    result = sensitivity.run_sensitivity(trained_pt, data_yaml, params, tmp_path, map_fn=recording_map)

    assert calls == [2 * len(units)]  # every evaluation went through map_fn, in one fan-out
    rows = result["rows"]
    assert sorted((r["group"], r["ratio"]) for r in rows) == sorted((u, r) for u in units for r in (0.3, 0.6))
    with open(tmp_path / "sensitivity.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and set(sensitivity.CSV_FIELDS) <= set(csv_rows[0])
    assert len(json.loads((tmp_path / "sensitivity.json").read_text())) == len(rows)
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert [float(c["ratio"]) for c in curves] == [0.0, 0.3, 0.6] and list(curves[0])[1:] == units

    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["model"]["units"] == units and plan["baseline"]["map50_95"] == pytest.approx(0.5)
    assert plan["round_to"] == 8  # what prune must round widths to, as the rows were measured
    drops = {(r["group"], r["ratio"]): r["drop"] for r in rows}
    for unit, ratio in plan["ratios"].items():
        assert ratio <= plan["budget_ratios"][unit]
        budget = plan["budget_ratios"][unit]
        if budget:
            assert drops[(unit, budget)] <= params.sensitivity.max_drop
    # The measured reduction of the plan is what the plan promises, and reaches the target.
    assert plan["target_met"] and plan["expected"]["params_reduction"] >= 0.2


def test_evaluate_group_with_the_real_evaluator(tiny):
    trained_pt, data_yaml = tiny
    params = _params()
    baseline = sensitivity.evaluate_baseline(trained_pt, data_yaml, params)
    row = sensitivity.evaluate_group(trained_pt, data_yaml, params, "model.8", 0.5)
    assert row["group"] == "model.8" and row["ratio"] == 0.5
    assert 0.0 <= row["map50_95"] <= 1.0
    assert row["params"] < baseline["params"] and row["macs"] < baseline["macs"]
    assert row["channels_removed"] > 0


def test_batchnorm_recalibration_uses_the_train_images_statistics(tiny):
    import torch

    from pipeline import int8

    trained_pt, data_yaml = tiny
    model, _ = sensitivity.load_model(trained_pt)
    first = model.model[0]  # conv -> bn -> SiLU
    untouched = first.bn.running_mean.clone()
    sensitivity.recalibrate_batchnorm(model, data_yaml, 0, IMGSZ)
    assert torch.equal(first.bn.running_mean, untouched)

    sensitivity.recalibrate_batchnorm(model, data_yaml, 3, IMGSZ, batch=2)  # two batches: 2 + 1 images
    x = torch.cat([torch.from_numpy(int8.letterboxed_input(p, IMGSZ, IMGSZ))
                   for p in int8.calibration_image_paths(data_yaml, 3)])
    with torch.no_grad():
        conv_out = first.conv(x)
    # A cumulative average over the batches: per-image batches of 2 and 1 weigh equally, not by image count.
    batch_means = [conv_out[:2].mean(dim=(0, 2, 3)), conv_out[2:].mean(dim=(0, 2, 3))]
    assert torch.allclose(first.bn.running_mean, (batch_means[0] + batch_means[1]) / 2, atol=1e-5)
    assert not torch.equal(first.bn.running_mean, untouched)
    assert not model.training and not first.bn.training
    assert first.bn.momentum == 0.03  # Ultralytics' own momentum comes back for fine-tuning


def _rows(curves: dict[str, list[float]], ratios=(0.2, 0.4, 0.6, 0.8)):
    """Synthetic rows: per unit, drops at each ratio; each unit removes 10% params/MACs per 0.2 ratio."""
    rows = []
    for unit, drops in curves.items():
        for ratio, drop in zip(ratios, drops):
            cut = 1000 * ratio / 2
            rows.append({"group": unit, "ratio": ratio, "drop": drop, "map50_95": 0.5 - drop,
                         "params": round(10_000 - cut), "macs": round(100_000 - 10 * cut)})
    return rows


BASELINE = {"map50_95": 0.5, "params": 10_000, "macs": 100_000}


def test_plan_respects_the_budget_and_distrusts_noisy_curves():
    rows = _rows({"a": [0.0, 0.01, 0.05, 0.1],    # within budget up to 0.4
                  "b": [0.03, 0.0, 0.0, 0.0],     # fails at 0.2: a lucky 0.8 is not trusted
                  "c": [0.0, 0.0, 0.0, 0.02]})    # within budget everywhere (<= is allowed)
    plan = sensitivity.build_plan(rows, BASELINE, _params(max_drop=0.02, target="params", target_reduction=0.9))
    assert plan["budget_ratios"] == {"a": 0.4, "b": 0.0, "c": 0.8}
    assert plan["ratios"] == plan["budget_ratios"]  # target unreachable: nothing scaled, nothing exceeded
    assert not plan["target_met"] and "below the target" in plan["note"]
    assert plan["expected"]["params_reduction"] == pytest.approx((200 + 400) / 10_000)


def test_plan_scales_back_when_the_budget_overshoots_the_target():
    rows = _rows({"a": [0.0] * 4, "b": [0.0] * 4})  # both units may be pruned 80%: 8% params reduction
    plan = sensitivity.build_plan(rows, BASELINE, _params(max_drop=0.02, target="macs", target_reduction=0.04))
    assert plan["target_met"]
    assert 0.04 <= plan["expected"]["macs_reduction"] <= 0.041
    assert all(r <= 0.8 for r in plan["ratios"].values()) and plan["scale"] < 1


# ------------------------------------------------------------------------------------------- latency target


def test_latency_planner_prefers_more_ms_saved_per_map_lost():
    candidates = [
        {"unit": "model.2", "kind": "channels", "ratio": 0.6, "drop": 0.010, "saved_ms": 0.4},   # 40 ms/point
        {"unit": "model.4.m.1", "kind": "depth", "ratio": 1.0, "drop": 0.010, "saved_ms": 1.0},  # 100 ms/point
        {"unit": "model.8", "kind": "channels", "ratio": 0.8, "drop": 0.001, "saved_ms": 0.3},   # floored: 60
        {"unit": "model.9", "kind": "channels", "ratio": 0.4, "drop": 0.0, "saved_ms": -0.1},    # saves nothing
    ]
    plan = sensitivity.plan_latency(candidates, baseline_ms=10.0, target_reduction=0.12, drop_floor=0.005)
    # 1.2 ms to save: the depth unit first (1.0), then model.8, taken at the fraction that just reaches it.
    assert plan["order"] == ["model.4.m.1", "model.8"] and plan["depth"] == ["model.4.m.1"]
    assert plan["ratios"] == {"model.8": pytest.approx(0.8 * 0.2 / 0.3, abs=1e-4)}
    assert plan["target_met"] and plan["reduction"] == pytest.approx(0.12)

    short = sensitivity.plan_latency(candidates, baseline_ms=10.0, target_reduction=0.5)
    assert not short["target_met"] and set(short["order"]) == {"model.4.m.1", "model.8", "model.2"}
    assert short["ratios"] == {"model.8": 0.8, "model.2": 0.6}  # full budget ratios; model.9 never taken
    assert short["saved_ms"] == pytest.approx(1.7)


def test_noisy_latency_measurements_fall_back_to_the_pooled_model():
    base = {"timing": {"median_ms": 10.0, "p25_ms": 9.9, "p75_ms": 10.1, "runs": 40}, "macs": 1000, "onnx_nodes": 100}
    timing = lambda ms, spread=0.1: {"median_ms": ms, "p25_ms": ms - spread, "p75_ms": ms + spread, "runs": 40}  # noqa: E731
    timings = {"a": timing(9.0), "b": timing(8.0), "c": timing(9.99), "d": timing(9.0)}
    builds = {"a": {"macs": 900, "onnx_nodes": 100}, "b": {"macs": 800, "onnx_nodes": 100},
              "c": {"macs": 950, "onnx_nodes": 100}, "d": {"macs": 1000, "onnx_nodes": 95}}
    out = sensitivity.latency_savings(base, timings, builds)
    assert out["a"]["source"] == out["b"]["source"] == out["d"]["source"] == "measured"
    assert out["a"]["saved_ms"] == pytest.approx(1.0) and out["d"]["onnx_nodes_removed"] == 5
    # c's 0.01 ms is inside the noise: it gets the pooled estimate, 0.01 ms per MAC here (50 MACs removed).
    assert out["c"]["source"] == "pooled" and out["c"]["saved_ms"] == pytest.approx(0.5, abs=1e-3)


def test_latency_target_end_to_end_writes_a_plan_that_records_its_target(tiny, tmp_path, monkeypatch):
    trained_pt, data_yaml = tiny
    model, _ = sensitivity.load_model(trained_pt)
    _fake_evaluate.full = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(sensitivity, "_evaluate_model", _fake_evaluate)
    params = _params(ratios=[0.5], max_drop=0.5, target="latency", target_reduction=0.1)
    params.sensitivity.latency = params.sensitivity.latency.model_copy(update={"runs": 6, "rounds": 3,
                                                                              "calib_images": 2})
    params.evaluate.warmup = 1
    assert {"model.2.m.0", "model.4.m.1", "model.15.m.0"} <= set(sensitivity.cached_depth_units(trained_pt))
    some, depth_units = ["model.2", "model.8", "model.15"], ["model.4.m.1", "model.15.m.0"]
    result = sensitivity.run_sensitivity(trained_pt, data_yaml, params, tmp_path, groups=some + depth_units)

    depth_rows = [r for r in result["rows"] if r["kind"] == "depth"]
    assert sorted(r["group"] for r in depth_rows) == sorted(depth_units) and all(r["ratio"] == 1.0 for r in depth_rows)
    assert all(r["params"] < result["baseline"]["params"] for r in depth_rows)

    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["target"] == "latency" and plan["target_reduction"] == 0.1
    lat = plan["latency"]
    assert lat["graph"] == "int8" and lat["threads"] == 1 and "interleaved" in lat["method"]
    assert set(lat["units"]) == set(some) | set(depth_units) and lat["baseline_ms"] > 0
    for unit, est in lat["units"].items():
        assert est["source"] in ("measured", "pooled") and est["unit_ms"] > 0
    assert set(plan["depth"]) <= set(depth_units) and set(plan["ratios"]) <= set(some)
    assert set(plan["order"]) == set(plan["depth"]) | {u for u, r in plan["ratios"].items() if r}
    expected = plan["expected"]
    assert expected["latency_ms"] == pytest.approx(lat["baseline_ms"] - expected["latency_saved_ms"], abs=1e-3)
    assert plan["target_met"] == (expected["latency_reduction"] >= 0.1 - 1e-9)
    assert expected["latency_measured"]["plan_ms"] > 0 and expected["params"] <= result["baseline"]["params"]
    if plan["depth"]:  # which units save time on a 64 px model is noise; a removed bottleneck always shows
        assert expected["params"] < result["baseline"]["params"]
    assert lat["session_noise_ms"] >= 0
    assert not (tmp_path / ".latency-work").exists()


def test_pooled_model_never_learns_that_removing_work_slows_a_model():
    # Every unit inside the noise, the depth ones measured "slower": the pooled model may not go negative.
    base = {"timing": {"median_ms": 10.0, "p25_ms": 8.0, "p75_ms": 12.0, "runs": 40}, "macs": 1000, "onnx_nodes": 100}
    timing = lambda ms: {"median_ms": ms, "p25_ms": ms - 2, "p75_ms": ms + 2, "runs": 40}  # noqa: E731
    timings = {"a": timing(9.9), "b": timing(9.8), "d1": timing(10.2), "d2": timing(10.3)}
    builds = {"a": {"macs": 900, "onnx_nodes": 100}, "b": {"macs": 800, "onnx_nodes": 100},
              "d1": {"macs": 990, "onnx_nodes": 93}, "d2": {"macs": 990, "onnx_nodes": 94}}
    for statistic in ("median", "p25"):
        out = sensitivity.latency_savings(base, timings, builds, statistic)
        assert all(u["source"] == "pooled" and u["saved_ms"] >= 0 for u in out.values())
        assert out["b"]["saved_ms"] > out["a"]["saved_ms"] > 0  # MACs still explain the channel units
    with pytest.raises(sensitivity.SensitivityError, match="p90"):
        sensitivity.latency_savings(base, timings, builds, "p90")
