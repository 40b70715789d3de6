"""Unstructured pruning: global magnitude sparsity reached over the steps, held through fine-tuning and QAT,
and still there, as zeros, in the exported ONNX (float and INT8)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import sparsity
from pipeline.io import write_json
from pipeline.params import DemoParams, Params

from tests.conftest import random_tiny_model

IMGSZ = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_global_magnitude_sparsity_grows_to_its_target_over_the_steps():
    from pipeline.surgery import ignored_head_layers

    model = random_tiny_model()
    head = {id(p) for m in ignored_head_layers(model) for p in m.parameters()}
    head_before = [p.clone() for p in model.parameters() if id(p) in head]
    sparsifier = sparsity.Sparsifier(model, 0.6)
    first = sparsifier.step(1, 3)
    zeros_first = {n: m.weight == 0 for n, m in sparsity.prunable_convs(model).items()}
    assert first["sparsity"] == pytest.approx(0.2, abs=1e-4)
    last = sparsifier.step(3, 3)
    assert last["sparsity"] == pytest.approx(0.6, abs=1e-4)
    for name, m in sparsity.prunable_convs(model).items():  # once zero, always zero
        assert bool((m.weight[zeros_first[name]] == 0).all()), name
    # Global, not per layer: the layers end up with different sparsities.
    per_layer = [float((m.weight == 0).float().mean()) for m in sparsity.prunable_convs(model).values()]
    assert max(per_layer) - min(per_layer) > 0.1
    assert all(torch.equal(a, b) for a, b in zip(head_before, [p for p in model.parameters() if id(p) in head]))

    with pytest.raises(sparsity.SparsityError, match="prune.sparsity"):
        sparsity.Sparsifier(model, 1.0)


def test_zeros_are_held_through_optimizer_steps():
    model = random_tiny_model().train()
    sparsifier = sparsity.Sparsifier(model, 0.5)
    sparsifier.step(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    handle = sparsifier.hold(optimizer)
    for _ in range(2):
        loss = sum(o.float().pow(2).mean() for o in _outputs(model(torch.rand(2, 3, IMGSZ, IMGSZ))))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sparsity.measure(model)["sparsity"] == pytest.approx(0.5, abs=1e-4)
    handle.remove()
    optimizer.step()  # without the hook, momentum alone regrows them: the hook is what held them
    assert sparsity.measure(model)["sparsity"] < 0.5


def _outputs(preds):
    return [preds["boxes"], preds["scores"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.demo_data import generate_demo

    from tests.test_prune import _tiny_checkpoint

    root = tmp_path_factory.mktemp("sparsity")
    data_yaml = generate_demo(root / "data", DemoParams(n_train=4, n_val=4, n_empty=0, imgsz=IMGSZ, max_objects=2))
    return _tiny_checkpoint(root / "trained.pt"), data_yaml, root


def _params(method: str, steps: int) -> Params:
    return Params.model_validate({
        "train": {"imgsz": IMGSZ, "batch": 4},
        "evaluate": {"batch": 4, "warmup": 1, "runs": 2},
        "export": {"simplify": False},
        "prune": {"steps": steps, "epochs_per_step": 1, "max_drop": 1.0, "method": method, "sparsity": 0.6},
        "qat": {"epochs": 1, "calib_images": 2, "activation": "silu", "ptq": False,
                "gates": {"max_map_drop": 1.0, "max_file_mb": 20, "max_latency_ratio": None}},
    })


def test_unstructured_prune_reaches_its_target_and_the_zeros_survive_onnx_and_int8(tiny):
    from pipeline import prune, qat
    from pipeline.surgery import load_detection_model

    from tests.test_prune import _plan

    trained_pt, data_yaml, root = tiny
    write_json(root / "plan.json", _plan(trained_pt, {"model.2": 0.5}))  # ignored by unstructured
    params = _params("unstructured", steps=2)
    metrics = prune.run_prune(trained_pt, root / "plan.json", data_yaml, params, root / "u", {"map50_95": 0.0})

    steps = json.loads((root / "u" / "steps.json").read_text())
    assert [s["sparsity"] for s in steps] == pytest.approx([0.3, 0.6], abs=1e-3)  # gradual, through fine-tuning
    s = metrics["sparsity"]
    assert s["target"] == 0.6 and s["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert metrics["params_reduction"] == 0  # zeros remove no parameters
    model, _ = load_detection_model(root / "u" / "best.pt")
    assert sparsity.measure(model)["sparsity"] == pytest.approx(0.6, abs=1e-3)  # permanent: plain zeros
    assert not any("mask" in k or "orig" in k for k in model.state_dict())
    # The FP32 ONNX counts the head's final convs too, which stay dense: a little under the target.
    assert 0.5 < s["onnx_sparsity"] < 0.6
    assert s["onnx_gzip_bytes"] < 0.8 * s["onnx_bytes"]

    # QAT holds them, and the INT8 weights keep them (0 quantizes to 0).
    out = root / "u_qat"
    qat.run_qat(root / "u" / "best.pt", data_yaml, params, out, {"control": {"map50_95": 0.0}, "pruned": metrics})
    in_int8 = sparsity.onnx_zeros(out / "qat_int8.onnx")
    assert in_int8["sparsity"] >= s["onnx_sparsity"] - 0.01


def test_both_prunes_channels_then_zeros_what_is_left(tiny):
    from pipeline import prune

    from tests.test_prune import _plan

    trained_pt, data_yaml, root = tiny
    write_json(root / "plan_b.json", _plan(trained_pt, {"model.2": 0.5, "model.8": 0.5}))
    metrics = prune.run_prune(trained_pt, root / "plan_b.json", data_yaml, _params("both", steps=1), root / "b",
                              {"map50_95": 0.0})
    assert metrics["params_reduction"] > 0.05
    assert metrics["sparsity"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert metrics["method"] == "both"


@pytest.mark.slow
def test_ablation_rows_for_unstructured_pruning(tiny_ws):
    """`bench --ablations` on tiny data, one variant: the dense latency/size columns come from the files."""
    from pipeline.ablations import run_ablations

    result = run_ablations(tiny_ws, ["unstructured"])
    rows = {r["artifact"]: r for r in result["rows"]}
    # The dense trained model is timed in turns with the variant: the anchor of its sizes and latencies.
    assert set(rows) == {"FP32 (dense)", "pruned FP32", "INT8 qat_int8"}
    assert rows["FP32 (dense)"]["onnx_sparsity"] < 0.1 and rows["FP32 (dense)"]["ms"] > 0
    for r in (rows["pruned FP32"], rows["INT8 qat_int8"]):
        assert r["onnx_sparsity"] > 0.4 and r["gzip_mb"] < r["mb"] and r["ms"] > 0
    assert rows["INT8 qat_int8"]["mb"] < rows["pruned FP32"]["mb"]
    assert (tiny_ws.root / "bench/results/ablations.md").read_text().count("| unstructured |") == 2
    with pytest.raises(ValueError, match="nope"):
        run_ablations(tiny_ws, ["nope"])
