"""Mixed precision: the order/stop rule on synthetic measurements, the exclude parameter of the quantizer, and
one real tiny QAT run in which convs go back to float (accuracy read from the graph that was really built)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import int8, mixed_precision, qat
from pipeline.params import StageGates

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic(gains: dict[str, float], start: float):
    """mAP = start + the gains of the convs in float (additive), and a log of what was measured."""
    calls = []

    def measure(floats):
        calls.append(list(floats))
        return start + sum(gains[c] for c in floats)
    return measure, calls


def test_convs_go_float_in_sensitivity_order_until_the_floor_holds():
    gains = {"a": 0.01, "b": 0.05, "c": 0.03, "d": 0.0}
    measure, calls = _synthetic(gains, 0.50)
    record = mixed_precision.return_to_float(gains, measure, floor=0.575, budget=4, start_map=0.50)
    assert record["order"] == ["b", "c", "a", "d"]
    assert calls == [["b"], ["b", "c"]]  # 0.55 < 0.575, then 0.58 holds: stops there
    assert record["kept"]["float_layers"] == ["b", "c"] and record["floor_met"]
    assert [s["map50_95"] for s in record["steps"]] == pytest.approx([0.50, 0.55, 0.58])


def test_budget_stops_the_search_and_the_most_accurate_step_is_kept():
    gains = {"a": 0.02, "b": -0.01, "c": 0.01}
    measure, calls = _synthetic(gains, 0.40)
    record = mixed_precision.return_to_float(gains, measure, floor=0.9, budget=2, start_map=0.40)
    assert calls == [["a"], ["a", "c"]] and not record["floor_met"]
    assert record["kept"]["float_layers"] == ["a", "c"]

    # Measurements are not additive in reality: a step that loses accuracy is not kept.
    record = mixed_precision.return_to_float(gains, lambda f: {1: 0.45, 2: 0.43}[len(f)], floor=0.9, budget=2,
                                             start_map=0.40)
    assert record["kept"]["float_layers"] == ["a"]
    # The floor already holds: nothing goes float, nothing is measured.
    measure, calls = _synthetic(gains, 0.95)
    record = mixed_precision.return_to_float(gains, measure, floor=0.9, budget=2, start_map=0.95)
    assert calls == [] and record["kept"]["float_layers"] == [] and record["floor_met"]


def test_accuracy_floor_is_the_gates_lowest_accepted_map():
    reference = {"map50_95": 0.60}
    assert mixed_precision.accuracy_floor(reference, StageGates(max_map_drop=0.02)) == pytest.approx(0.58)
    assert mixed_precision.accuracy_floor(reference, StageGates(max_map_drop=0.02, min_map50_95=0.59)) == 0.59
    assert mixed_precision.accuracy_floor(reference, StageGates()) is None


def test_excluded_convs_stay_float_and_the_rest_still_fuse(tmp_path):
    from tests.test_int8 import IMGSZ, _tiny_model
    from pipeline.demo_data import generate_demo
    from pipeline.evaluate import export_fp32_onnx
    from pipeline.params import DemoParams

    data_yaml = generate_demo(tmp_path / "data", DemoParams(n_train=4, n_val=2, n_empty=0, imgsz=IMGSZ, max_objects=2))
    pt = qat.save_checkpoint(_tiny_model(), tmp_path / "tiny.pt", {"train_args": {"imgsz": IMGSZ, "task": "detect"}})
    fp32 = export_fp32_onnx(pt, tmp_path / "fp32.onnx", IMGSZ, opset=17, simplify=True)
    images = int8.calibration_image_paths(data_yaml, 2)
    convs = [n.name for n in int8.feature_conv_nodes(int8.load_onnx(fp32))]
    excluded = [convs[1], convs[len(convs) // 2]]

    info = int8.quantize_onnx(fp32, tmp_path / "mixed.onnx", images, exclude_convs=excluded)
    assert info["quantized_convs"] == len(convs) - 2 and info["excluded_convs"] == sorted(excluded)
    kernels = int8.count_integer_kernels(tmp_path / "mixed.onnx")
    assert kernels["integer_convs"] == len(convs) - 2
    assert _float_convs(tmp_path / "mixed.onnx") >= set(excluded)

    with pytest.raises(int8.Int8Error, match="fp32.onnx.*no_such_conv"):
        int8.quantize_onnx(fp32, tmp_path / "bad.onnx", images, exclude_convs=["no_such_conv"])


def test_local_error_ranks_a_badly_quantizable_conv_first(tmp_path):
    import onnx
    from onnx import numpy_helper

    from tests.test_int8 import IMGSZ, _tiny_model
    from pipeline.demo_data import generate_demo
    from pipeline.evaluate import export_fp32_onnx
    from pipeline.params import DemoParams

    data_yaml = generate_demo(tmp_path / "data", DemoParams(n_train=4, n_val=2, n_empty=0, imgsz=IMGSZ, max_objects=2))
    pt = qat.save_checkpoint(_tiny_model(), tmp_path / "tiny.pt", {"train_args": {"imgsz": IMGSZ, "task": "detect"}})
    fp32 = export_fp32_onnx(pt, tmp_path / "fp32.onnx", IMGSZ, opset=17, simplify=True)
    images = int8.calibration_image_paths(data_yaml, 2)
    model = int8.load_onnx(fp32)
    convs = [n.name for n in int8.feature_conv_nodes(model)]
    # One outlier weight per output channel: per-channel INT8 then rounds every other weight of that conv to 0.
    damaged = next(n for n in model.graph.node if n.name == convs[len(convs) // 2])
    init = next(i for i in model.graph.initializer if i.name == damaged.input[1])
    w = numpy_helper.to_array(init).copy()
    w.reshape(w.shape[0], -1)[:, 0] = 1000 * np.abs(w).max()
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, tmp_path / "damaged.onnx")

    errors = mixed_precision.local_errors(tmp_path / "damaged.onnx", convs, images, weight_bits=8)
    assert set(errors) == set(convs)
    assert max(errors, key=errors.get) == damaged.name
    assert errors[damaged.name] > 2 * max(e for c, e in errors.items() if c != damaged.name)
    clean = mixed_precision.local_errors(fp32, convs, images, weight_bits=8)
    assert max(clean.values()) < 0.2 and min(clean.values()) > 0  # INT8 is close, but not exact, everywhere
    assert all(clean[c] <= e for c, e in mixed_precision.local_errors(fp32, convs, images, weight_bits=7).items()
               if c in clean and e > 1e-3)  # 7-bit weights lose more than 8-bit


def _float_convs(onnx_path) -> set[str]:
    """Conv nodes of a QDQ graph whose weight is not dequantized from int8, i.e. that run in float."""
    graph = int8.load_onnx(onnx_path).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] not in dequantized}


def test_real_qat_run_returns_sensitive_convs_to_float(tmp_path, monkeypatch):
    """A random tiny model measures mAP 0 everywhere, so accuracy is synthetic here, but read from each ONNX the
    search really builds: 0.1 plus a gain for each of two chosen convs found float in the graph. Everything else
    (QAT, quantizing with exclusions, ORT's fused kernels, the torch twin, latency, gates) is real."""
    from pipeline.demo_data import generate_demo
    from pipeline.params import DemoParams, Params

    from tests.test_int8 import IMGSZ, _tiny_model

    data_yaml = generate_demo(tmp_path / "data", DemoParams(n_train=4, n_val=2, n_empty=0, imgsz=IMGSZ, max_objects=2))
    pruned_pt = qat.save_checkpoint(_tiny_model(), tmp_path / "pruned.pt",
                                    {"train_args": {"imgsz": IMGSZ, "task": "detect", "data": str(data_yaml)}})
    chosen: dict[str, float] = {}
    measured = []

    def fake_accuracy(artifact, data_yaml, params, max_images=None):
        floats = _float_convs(artifact)
        if not chosen:  # the first call measures the all-INT8 model: two of its quantized convs are sensitive
            graph = int8.load_onnx(artifact).graph
            quantized = sorted(n.name for n in graph.node if n.op_type == "Conv" and n.name not in floats)
            chosen.update({quantized[2]: 0.2, quantized[5]: 0.3})
        measured.append((max_images, sorted(floats & set(chosen))))
        return {"map50_95": 0.1 + sum(g for c, g in chosen.items() if c in floats)}

    monkeypatch.setattr(mixed_precision, "accuracy", fake_accuracy)
    params = Params.model_validate({
        "train": {"imgsz": IMGSZ, "batch": 2},
        "evaluate": {"batch": 2, "warmup": 1, "runs": 2},
        "qat": {"epochs": 1, "calib_images": 2, "activation": "silu", "ptq": False, "mixed_precision": "auto",
                "max_float_layers": 3, "mixed_precision_val_images": 2, "mixed_precision_probes": 1000,
                # floor 0.55: above every all-INT8 candidate (real mAP 0), met with both sensitive convs float
                "gates": {"min_map50_95": 0.55, "max_map_drop": None, "max_file_mb": 20, "max_latency_ratio": None}},
    })
    out = tmp_path / "qat"
    metrics = qat.run_qat(pruned_pt, data_yaml, params, out, {"control": {"map50_95": 0.6}})

    mp = metrics["mixed_precision"]
    order = sorted(chosen, key=chosen.get, reverse=True)
    assert mp["order"][:2] == order  # most sensitive first
    assert mp["float_layers"] == order and mp["floor_met"]
    assert [s["map50_95"] for s in mp["steps"][1:]] == pytest.approx([0.4, 0.6])
    assert mp["all_quantized_convs_fused"] and mp["integer_convs"] == mp["quantized_convs"]
    assert set(mp["latency_ms"]) == {"all_int8", "mixed"} and isinstance(mp["latency_cost_ms"], float)
    # Sensitivities on the val subset, the steps on the full val split the gate reads.
    assert {m[0] for m in measured} == {2, None}
    assert sum(1 for m in measured if m[0] == 2) == 1 + mp["convs"] == 1 + len(mp["local_errors"])  # all probed

    candidates = json.loads((out / "candidates.json").read_text())["candidates"]
    name = mp["candidate"]
    assert name == f"{mp['base']}_mixed" and name in candidates
    mixed = candidates[name]
    assert mixed["quantization"]["excluded_convs"] == sorted(order)
    assert mixed["metrics"]["integer_convs"] == mixed["quantization"]["quantized_convs"]
    # Its torch twin has those convs in float, so the ONNX and the torch model still agree.
    assert Path(mixed["qat_torch_pt"]).is_file() and mixed["parity"]["passed"]
