"""Stage qat on the tiny trained model: candidates written and measured, the gate's choice and its reasons."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import int8, qat
from pipeline.params import StageGates


def test_run_qat_writes_measured_candidates_and_a_choice(tmp_path):
    """On a random tiny model (the stage needs any Ultralytics checkpoint, trained or not)."""
    from pipeline.demo_data import generate_demo
    from pipeline.params import DemoParams, Params

    from tests.test_int8 import IMGSZ, _tiny_model

    data_yaml = generate_demo(tmp_path / "data", DemoParams(n_train=8, n_val=4, n_empty=0, imgsz=IMGSZ, max_objects=2))
    trained_pt = qat.save_checkpoint(_tiny_model(), tmp_path / "pruned.pt",
                                     {"train_args": {"imgsz": IMGSZ, "task": "detect", "data": str(data_yaml)}})
    params = Params.model_validate({
        "train": {"imgsz": IMGSZ, "batch": 4},
        "evaluate": {"batch": 4, "warmup": 1, "runs": 3},
        "qat": {"epochs": 1, "lr0": 0.0005, "calib_images": 4, "activation": "silu",
                "gates": {"max_map_drop": 1.0, "max_file_mb": 20}},
    })
    float_models = {"control": {"map50_95": 0.0}, "pruned": {"map50_95": 0.0}}
    out = tmp_path / "outputs" / "qat"

    metrics = qat.run_qat(trained_pt, data_yaml, params, out, float_models)

    candidates = json.loads((out / "candidates.json").read_text())["candidates"]
    assert set(candidates) == {"qat_int8", "qat_qsilu_int8", "ptq_int8"}
    fp32_mb = Path(out / "pruned_fp32.onnx").stat().st_size / 1e6
    for name, candidate in candidates.items():
        m = candidate["metrics"]
        assert Path(candidate["path"]).is_file()
        assert m["integer_convs"] == candidate["quantization"]["quantized_convs"] > 0, name
        assert m["int8_bytes"] > m["float_bytes"]
        assert m["file_mb"] < fp32_mb
        for key in ("map50_95", "latency_ms", "latency_ms_1thr", "latency_ms_2thr"):
            assert m[key] is not None
        assert candidate["passed"] == (not candidate["gate_failures"])
    assert candidates["qat_int8"]["qat_log"][0]["lr0"] == 0.0005  # qat.lr0, not a tenth of train.lr0
    assert (out / "model_int8.onnx").is_file()
    assert (out / "qat_model.pt").is_file()  # the fake-quant torch model for export's parity check
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics, default=float))
    assert metrics["chosen"] in candidates and metrics["choice"]["chosen"] == metrics["chosen"]
    assert metrics["accuracy_reference"] in float_models
    # qat.target_cpu: auto resolves to this machine; every candidate and the chosen file carry its weight bits.
    assert metrics["target_cpu_param"] == "auto" and metrics["target_cpu"] == int8.resolve_target_cpu("auto")
    assert metrics["weight_bits"] == int8.weight_bits_for(metrics["target_cpu"])
    assert {c["quantization"]["weight_bits"] for c in candidates.values()} == {metrics["weight_bits"]}
    chosen_metadata = {p.key: p.value for p in int8.load_onnx(out / "model_int8.onnx").metadata_props}
    assert chosen_metadata["int8_target_cpu"] == metrics["target_cpu"]
    assert chosen_metadata["int8_weight_bits"] == str(metrics["weight_bits"])
    if not metrics["passed"]:  # on 2 busy cores a 64 px model may well not beat FP32 latency
        assert metrics["why_none_passed"] and all(metrics["why_none_passed"].values())

    # The fake-quant torch model loads and validates through Ultralytics like any checkpoint.
    from pipeline.evaluate import evaluate

    assert evaluate(out / "qat_model.pt", data_yaml, params, latency=False)["map50_95"] >= 0.0
    qat_int8 = candidates["qat_int8"]  # one-sided parity: the ONNX may not lose more than 0.005 to its twin
    shortfall = qat_int8["qat_torch_map50_95"] - qat_int8["metrics"]["map50_95"]
    assert qat_int8["parity"]["shortfall"] == pytest.approx(shortfall)
    assert qat_int8["parity"]["passed"] == (shortfall <= 0.005)

    # Export's part: metadata + simplify without losing integer convs, then the parity check.
    final = int8.finalize_int8(out / "qat_int8.onnx", out / "pruned_fp32.onnx", tmp_path / "export" / "model_int8.onnx")
    assert final["integer_convs_after"] == candidates["qat_int8"]["metrics"]["integer_convs"]
    parity = int8.parity_check(final["path"], out / "qat_model.pt", data_yaml, params)
    assert {"int8_onnx_map50_95", "qat_torch_map50_95", "abs_diff", "passed"} <= set(parity)
    assert parity["passed"] == (parity["shortfall"] <= 0.005)
    assert parity["abs_diff"] == abs(parity["shortfall"])


def test_gate_checks_name_each_violation():
    from pipeline.gates import check, failures

    metrics = {"map50_95": 0.40, "file_mb": 6.0, "latency_ms": 9.0}
    gates = StageGates(max_map_drop=0.05, max_file_mb=5, max_latency_ms=8, max_latency_ratio=1.0)
    found = failures(check(metrics, gates, {"map50_95": 0.50}, reference_latency_ms=7.0))
    assert [f.split(":")[0] for f in found] == ["max_file_mb", "max_latency_ms", "max_map_drop", "max_latency_ratio"]
    assert "max_map_drop: 0.1000 (limit 0.0500)" in found
    assert "max_latency_ratio: 1.2857 (limit 1.0000)" in found
    passing = {"map50_95": 0.49, "file_mb": 3.0, "latency_ms": 5.0}
    assert failures(check(passing, gates, {"map50_95": 0.50}, reference_latency_ms=7.0)) == []


def test_run_qat_rejects_bad_inputs(tmp_path):
    from pipeline.params import Params

    with pytest.raises(qat.QatError, match="missing.pt"):
        qat.run_qat(tmp_path / "missing.pt", tmp_path / "data.yaml", Params(), tmp_path / "out",
                    {"control": {"map50_95": 0.5}})
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"x")
    with pytest.raises(qat.QatError, match="map50_95"):
        qat.run_qat(pt, tmp_path / "data.yaml", Params(), tmp_path / "out", {"control": {}})


def test_choice_is_the_fastest_within_tolerance_of_the_most_accurate_passing_candidate():
    def candidate(map50_95, latency_ms, passed=True):
        return {"passed": passed, "metrics": {"map50_95": map50_95, "latency_ms": latency_ms}}

    candidates = {"silu": candidate(0.360, 9.2), "qsilu": candidate(0.357, 8.0), "relu": candidate(0.292, 6.0),
                  "fast_but_failing": candidate(0.370, 1.0, passed=False)}
    chosen, why = qat.choose_candidate(candidates, tolerance=0.005)
    assert chosen == "qsilu"  # relu is faster but 6.8 points below the most accurate passing one
    assert why["most_accurate"] == "silu" and why["eligible"] == ["silu", "qsilu"]
    assert "fastest passing candidate within 0.005" in why["why"]
    assert qat.choose_candidate(candidates, tolerance=0.1)[0] == "relu"
    assert qat.choose_candidate(candidates, tolerance=0.0)[0] == "silu"
    none_pass = {n: {**c, "passed": False} for n, c in candidates.items()}
    chosen, why = qat.choose_candidate(none_pass, tolerance=0.005)
    assert chosen == "fast_but_failing" and why["passing"] == []  # the most accurate, for the record


def test_activation_qparams_follow_ort_formula():
    import torch

    quant = qat.ActivationQuant()
    quant.observe = True
    quant(torch.tensor([-1.0, 3.0]))
    scale, zero_point = quant.qparams()
    assert scale == pytest.approx(4.0 / 255)
    assert zero_point == round(1.0 / (4.0 / 255))
    quant.observe, quant.enabled = False, True
    y = quant(torch.tensor([0.0, 10.0]))
    assert y[0].item() == 0.0  # zero is exactly representable
    assert y[1].item() == pytest.approx((255 - zero_point) * scale)  # clipped at the top of the range
    assert int8.ACTIVATION_OPS  # the graph-side rule the torch side mirrors
