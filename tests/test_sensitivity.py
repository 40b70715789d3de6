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
