"""Prune stage: the pruned module itself is fine-tuned, and best.pt loads, predicts and exports elsewhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline import prune, sensitivity
from pipeline.io import write_json
from pipeline.params import DemoParams, Params

IMGSZ = 64
REPO = Path(__file__).resolve().parents[1]
# What the train stage's metrics.json holds; drops are measured against its mAP (an untrained model: 0).
TRAINED_METRICS = {"map50_95": 0.0}



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _tiny_checkpoint(path, width=0.125):
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    from pipeline.surgery import save_checkpoint

    cfg = yaml_model_load("yolov8n.yaml")
    cfg["scales"] = {"n": [0.33, width, 1024]}
    cfg["scale"] = "n"
    model = DetectionModel(cfg, nc=4, verbose=False)
    model.names = {0: "circle", 1: "square", 2: "triangle", 3: "cross"}
    return save_checkpoint(model, path, {"train_args": {"imgsz": IMGSZ, "task": "detect"}})


def _plan(trained_pt, ratios: dict[str, float]) -> dict:
    # The shape run_sensitivity writes; only what run_prune reads matters here.
    model, _ = sensitivity.load_model(trained_pt)
    return {"ratios": ratios, "target_met": True,
            "model": {"units": sensitivity.list_groups(trained_pt), "granularity": "layer",
                      "params": sum(p.numel() for p in model.parameters())}}


def _params() -> Params:
    p = Params()
    p.train.imgsz = IMGSZ
    p.train.batch = 4
    p.prune = p.prune.model_copy(update={"steps": 1, "epochs_per_step": 1, "max_drop": 1.0})
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.demo_data import generate_demo

    root = tmp_path_factory.mktemp("prune")
    data_yaml = generate_demo(root / "data", DemoParams(n_train=4, n_val=4, n_empty=0, imgsz=IMGSZ, max_objects=2))
    return _tiny_checkpoint(root / "trained.pt"), data_yaml, root


def test_pruned_model_trains_exports_and_loads_elsewhere(tiny, monkeypatch):
    import socket

    trained_pt, data_yaml, root = tiny
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise OSError(f"test: no network ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    plan_json = root / "plan.json"
    write_json(plan_json, _plan(trained_pt, {"model.2": 0.5, "model.8": 0.5, "model.15": 0.5,
                                             "model.22.cv3.0": 0.5}))
    out = root / "pruned"
    metrics = prune.run_prune(trained_pt, plan_json, data_yaml, _params(), out, TRAINED_METRICS)
    monkeypatch.undo()
    assert lookups == []  # fine-tuning and evaluation never tried to reach the network

    assert metrics["params_reduction"] > 0.1 and metrics["macs_reduction"] > 0.05
    assert metrics["steps_done"] == 1 and metrics["params"] < metrics["params_before"]
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("map50_95", "map50", "params", "gflops", "file_mb", "params_reduction", "macs_reduction",
                "drop", "steps_done"):
        assert key in on_disk
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "metrics.json", "steps.json"]

    # A fresh process: plain YOLO() loads best.pt (pipeline importable), predicts, exports to ONNX, and the
    # ONNX model predicts too.
    script = textwrap.dedent(f"""
        import numpy as np
        from ultralytics import YOLO
        model = YOLO({str(out / "best.pt")!r})
        image = np.zeros(({IMGSZ}, {IMGSZ}, 3), dtype=np.uint8)
        model.predict(image, imgsz={IMGSZ}, verbose=False)
        onnx_path = model.export(format="onnx", imgsz={IMGSZ}, simplify=False, verbose=False)
        YOLO(onnx_path, task="detect").predict(image, imgsz={IMGSZ}, verbose=False)
        print("OK", type(model.model.model[2]).__name__)
    """)
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK C2fSplit" in done.stdout


def test_plan_round_to_keeps_pruned_widths_at_multiples(tiny, tmp_path):
    import torch.nn as nn

    trained_pt, data_yaml, _ = tiny
    units = {"model.8": 0.3, "model.15": 0.3}

    def unit_widths(model):
        return {name: m.out_channels for name, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and any(sensitivity.in_unit(name, u) for u in units)}

    exact, _ = sensitivity.load_model(trained_pt)
    sensitivity.prune_units(exact, units)
    assert any(w % 8 for w in unit_widths(exact).values())  # 30% of these widths is not a multiple of 8

    plan = _plan(trained_pt, units)
    plan["round_to"] = 8
    write_json(tmp_path / "plan.json", plan)
    prune.run_prune(trained_pt, tmp_path / "plan.json", data_yaml, _params(), tmp_path / "out", TRAINED_METRICS)
    pruned, _ = sensitivity.load_model(tmp_path / "out" / "best.pt")
    widths = unit_widths(pruned)
    assert widths and all(w % 8 == 0 for w in widths.values()), widths
    assert sum(widths.values()) < sum(unit_widths(exact).values())  # rounded down, never up

    plan["round_to"] = 0
    write_json(tmp_path / "bad.json", plan)
    with pytest.raises(prune.PruneError, match="bad.json: 'round_to' must be a positive integer or null, got 0"):
        prune.run_prune(trained_pt, tmp_path / "bad.json", data_yaml, _params(), tmp_path / "out2", TRAINED_METRICS)


def test_finetune_trains_the_pruned_module_not_a_rebuilt_one(tiny):
    import torch

    trained_pt, data_yaml, root = tiny
    model, _ = sensitivity.load_model(trained_pt)
    sensitivity.prune_units(model, {"model.4": 0.5})
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = _params()
    params.prune.finetune.lr0 = 0.0005
    prune.finetune(model, data_yaml, params, 1, root / "ft", trained_pt)
    after = model.state_dict()
    assert {k: v.shape for k, v in after.items()} == shapes  # still the pruned shapes
    assert any(not torch.equal(before[k], after[k]) for k in after if after[k].is_floating_point())
    # The fine-tuning recipe is prune.finetune's, not Ultralytics' `auto` (AdamW at ~1e-3 wrecks a trained model)
    args = yaml.safe_load((root / "ft" / "args.yaml").read_text())
    assert (args["optimizer"], args["lr0"], args["momentum"], args["warmup_epochs"]) == ("SGD", 0.0005, 0.937, 0)


def test_plan_for_another_model_is_refused(tiny, tmp_path):
    trained_pt, data_yaml, _ = tiny
    other_pt = _tiny_checkpoint(tmp_path / "other.pt", width=0.25)
    write_json(tmp_path / "plan.json", _plan(other_pt, {"model.2": 0.5}))  # same layers, other widths
    with pytest.raises(prune.PruneError, match="plan.json.*different model"):
        prune.run_prune(trained_pt, tmp_path / "plan.json", data_yaml, _params(), tmp_path / "out", TRAINED_METRICS)
    plan = _plan(trained_pt, {"model.2": 0.5})
    plan["model"]["units"] = plan["model"]["units"][:-1]  # another architecture lists other units
    write_json(tmp_path / "plan1.json", plan)
    with pytest.raises(prune.PruneError, match="plan1.json.*different model"):
        prune.run_prune(trained_pt, tmp_path / "plan1.json", data_yaml, _params(), tmp_path / "out", TRAINED_METRICS)
    write_json(tmp_path / "plan2.json", _plan(trained_pt, {"model.99": 0.5}))
    with pytest.raises(prune.PruneError, match="model.99"):
        prune.run_prune(trained_pt, tmp_path / "plan2.json", data_yaml, _params(), tmp_path / "out", TRAINED_METRICS)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        prune.run_prune(tmp_path / "missing.pt", tmp_path / "plan.json", data_yaml, _params(), tmp_path / "out", TRAINED_METRICS)


def test_depth_units_are_removed_and_the_latency_target_is_checked(tiny):
    trained_pt, data_yaml, root = tiny
    plan = _plan(trained_pt, {"model.8": 0.5})
    plan.update({"depth": ["model.4.m.1", "model.12.m.0", "model.6:block"], "target": "latency", "target_reduction": 0.05,
                 "expected": {"latency_reduction": 0.07}, "latency": {"graph": "int8"}})
    write_json(root / "plan_depth.json", plan)
    out = root / "pruned_depth"
    metrics = prune.run_prune(trained_pt, root / "plan_depth.json", data_yaml, _params(), out, TRAINED_METRICS)

    from pipeline.surgery import load_detection_model

    model, _ = load_detection_model(out / "best.pt")  # fine-tuned after the removal, saved, loads
    assert len(model.model[4].m) == 1 and len(model.model[12].m) == 0
    assert type(model.model[6]).__name__ == "RemovedBlock"
    assert metrics["depth_units_removed"] == ["model.4.m.1", "model.12.m.0", "model.6:block"]
    steps = json.loads((out / "steps.json").read_text())
    assert steps[0]["depth"] == ["model.4.m.1", "model.12.m.0", "model.6:block"]

    check = metrics["latency_check"]
    assert check["graph"] == "int8" and check["threads"] == 1 and check["trained_ms"] > 0 and check["pruned_ms"] > 0
    assert check["reduction"] == pytest.approx(1 - check["pruned_ms"] / check["trained_ms"], abs=1e-3)
    target = metrics["plan_target"]
    assert target["target"] == "latency" and target["predicted"] == 0.07 and target["achieved"] == check["reduction"]
    assert target["met"] == (check["reduction"] >= 0.05)
    assert target["margin"] == pytest.approx(check["reduction"] - 0.05, abs=1e-4)
    assert json.loads((out / "metrics.json").read_text())["plan_target"] == target


def test_plan_with_unknown_depth_units_is_refused(tiny, tmp_path):
    trained_pt, data_yaml, _ = tiny
    plan = _plan(trained_pt, {"model.8": 0.5})
    plan["depth"] = ["model.4.m.0"]  # not the last bottleneck of layer 4
    write_json(tmp_path / "plan.json", plan)
    with pytest.raises(prune.PruneError, match=r"plan.json: depth units \['model.4.m.0'\]"):
        prune.run_prune(trained_pt, tmp_path / "plan.json", data_yaml, _params(), tmp_path / "out", TRAINED_METRICS)


def test_latency_target_from_sensitivity_to_prune(tiny, tmp_path):
    """The latency plan end to end on tiny data: sensitivity (real evaluator, a few units) writes a plan that
    records its target, prune applies it and records the latency reduction it measured against the target."""
    trained_pt, data_yaml, _ = tiny
    params = _params()
    params.sensitivity = params.sensitivity.model_copy(update={
        "ratios": [0.5], "val_images": 4, "max_drop": 1.0, "target": "latency", "target_reduction": 0.3})
    params.sensitivity.latency = params.sensitivity.latency.model_copy(update={"runs": 6, "rounds": 3,
                                                                              "calib_images": 2})
    params.evaluate = params.evaluate.model_copy(update={"warmup": 1, "runs": 6})
    sensitivity.run_sensitivity(trained_pt, data_yaml, params, tmp_path / "sens",
                                groups=["model.6", "model.8", "model.6.m.1", "model.8.m.0"])
    plan = json.loads((tmp_path / "sens" / "plan.json").read_text())
    assert plan["target"] == "latency" and plan["target_reduction"] == 0.3
    assert "latency_reduction" in plan["expected"] and plan["latency"]["method"]

    metrics = prune.run_prune(trained_pt, tmp_path / "sens" / "plan.json", data_yaml, params, tmp_path / "out",
                              TRAINED_METRICS)
    target = metrics["plan_target"]
    assert target["target"] == "latency" and target["target_reduction"] == 0.3
    assert target["predicted"] == plan["expected"]["latency_reduction"]
    assert target["achieved"] == metrics["latency_check"]["reduction"]
    assert target["met"] == (target["achieved"] >= 0.3)
    assert metrics["depth_units_removed"] == plan["depth"]
