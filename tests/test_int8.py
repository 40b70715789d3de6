"""INT8 ONNX building on a tiny random YOLOv8 (no training): integer kernels after ORT optimization, INT8
weights in the file, outputs that track the fake-quant torch model, metadata and finalizing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import random_tiny_model
from pipeline import int8, qat

IMGSZ = 64


def _tiny_model(nc: int = 4):
    from pipeline.surgery import rewrite_c2f

    model = random_tiny_model(nc=nc)
    rewrite_c2f(model)  # the form pruned checkpoints have
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random detector as .pt and FP32 ONNX (with Ultralytics metadata), plus calibration images."""
    from pipeline.demo_data import generate_demo
    from pipeline.evaluate import export_fp32_onnx
    from pipeline.params import DemoParams

    folder = tmp_path_factory.mktemp("int8")
    data_yaml = generate_demo(folder / "data", DemoParams(n_train=8, n_val=4, n_empty=0, imgsz=IMGSZ, max_objects=2))
    base_ckpt = {"train_args": {"imgsz": IMGSZ, "task": "detect", "data": str(data_yaml)}}
    pt = qat.save_checkpoint(_tiny_model(), folder / "tiny.pt", base_ckpt)
    fp32 = export_fp32_onnx(pt, folder / "tiny_fp32.onnx", IMGSZ, opset=17, simplify=True)
    images = int8.calibration_image_paths(data_yaml, 4)
    return {"folder": folder, "data_yaml": data_yaml, "pt": pt, "fp32": fp32, "images": images, "base_ckpt": base_ckpt}


def test_ptq_holds_int8_weights_and_integer_convs(tiny):
    out = tiny["folder"] / "ptq.onnx"
    info = int8.quantize_onnx(tiny["fp32"], out, tiny["images"])

    # Every conv followed by an activation is quantized; the head's box/class convs and DFL stay float.
    fp32_graph = int8.load_onnx(tiny["fp32"])
    n_convs = sum(n.op_type == "Conv" for n in fp32_graph.graph.node)
    assert info["quantized_convs"] == len(int8.feature_conv_nodes(fp32_graph)) > 0
    assert info["float_convs"] == n_convs - info["quantized_convs"] == 7  # 3 box + 3 class convs + DFL

    kernels = int8.count_integer_kernels(out)  # counted in ORT's optimized graph, not in the quantizer's
    assert kernels["integer_convs"] == info["quantized_convs"]
    assert kernels["float_convs"] == info["float_convs"]

    sizes = int8.int8_initializer_bytes(out)
    assert sizes["int8_bytes"] > sizes["float_bytes"]
    assert out.stat().st_size < 0.5 * Path(tiny["fp32"]).stat().st_size

    # Concat/Add that share an input with a conv keep reading float: DequantizeLinear only feeds convs
    # and the SiLU after them.
    model = int8.load_onnx(out)
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        for name in node.input:
            if name in producers and producers[name].op_type == "DequantizeLinear":
                assert node.op_type in {"Conv", "Sigmoid", "Mul"}, node.name


def test_quantized_silu_variant_fuses_sigmoid_and_mul(tiny):
    out = tiny["folder"] / "ptq_qsilu.onnx"
    info = int8.quantize_onnx(tiny["fp32"], out, tiny["images"], quantize_silu=True)
    kernels = int8.count_integer_kernels(out)
    assert kernels["integer_convs"] == info["quantized_convs"]
    assert kernels["QLinearSigmoid"] > 0 and kernels["QLinearMul"] > 0


def test_int8_onnx_tracks_fake_quant_torch_model(tiny):
    from pipeline.surgery import load_detection_model

    model, base_ckpt = load_detection_model(tiny["pt"])
    qat.insert_quant_convs(model, "silu")
    params = _params()
    folder = tiny["folder"]
    probe = qat.export_float_onnx(model, base_ckpt, folder / "probe.onnx", params)
    mapping = qat.map_convs_to_onnx(model, probe)
    assert len(mapping) == len(qat.quant_convs(model))
    qat.share_input_observers(model, mapping)
    qat.calibrate(model, tiny["images"], IMGSZ)
    qparams = qat.activation_qparams(model, mapping)
    out = folder / "qat.onnx"
    int8.quantize_onnx(probe, out, tiny["images"], activation_qparams=qparams)

    x = int8.letterboxed_input(tiny["images"][0], IMGSZ, IMGSZ)
    int8_out = int8.ort_outputs(out, x)[0]
    with torch.no_grad():
        qat.set_fake_quant(model, True)
        fake_quant = model(torch.from_numpy(x))[0].numpy()
        qat.set_fake_quant(model, False)
        float_out = model(torch.from_numpy(x))[0].numpy()
    # The integer graph reproduces the fake-quant model: closer to it than to the float model. (Not equal:
    # bias rounding and float summation order flip a few values by one step, and flips cascade.)
    to_fake_quant = np.abs(int8_out - fake_quant).mean()
    to_float = np.abs(int8_out - float_out).mean()
    print(f"mean |int8 - fake quant| {to_fake_quant:.5f}, mean |int8 - float| {to_float:.5f}")
    assert to_fake_quant < to_float, (to_fake_quant, to_float)
    np.testing.assert_allclose(int8_out[:, 4:], fake_quant[:, 4:], atol=0.02)  # class scores


@pytest.mark.parametrize("bits", [7, 8])
def test_fake_quant_weight_matches_ort_weights(tiny, bits):
    """torch's fake-quant weights equal ORT's dequantized INT8 weights (same scale formula and range), for
    7-bit (AVX2 targets) and 8-bit (VNNI, ARM64) weights alike."""
    out = tiny["folder"] / f"ptq_weights_{bits}.onnx"
    int8.quantize_onnx(tiny["fp32"], out, tiny["images"], weight_bits=bits, target_cpu="test")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in int8.load_onnx(out).graph.initializer}
    fp32 = {i.name: onnx.numpy_helper.to_array(i) for i in int8.load_onnx(tiny["fp32"]).graph.initializer}
    checked = widest = 0
    for name, q in inits.items():
        if not name.endswith("_quantized") or q.dtype != np.int8:
            continue
        weight_name = name[: -len("_quantized")]
        scale = inits[f"{weight_name}_scale"].reshape(-1, 1, 1, 1)
        assert np.abs(q).max() <= qat.WEIGHT_RANGES[bits][1]
        torch_fq = qat.fake_quant_weight(torch.from_numpy(fp32[weight_name].copy()), bits).numpy()
        # ORT divides by the scale, torch multiplies by its inverse: an exact .5 may round the other way.
        steps = np.abs(q.astype(np.float32) * scale - torch_fq) / scale
        assert np.mean(steps > 0.5) < 1e-3 and steps.max() <= 1.0 + 1e-3
        checked += 1
        widest = max(widest, int(np.abs(q).max()))
    assert checked > 0
    assert widest == qat.WEIGHT_RANGES[bits][1]  # the largest weight of a channel lands on the range's end
    metadata = {p.key: p.value for p in int8.load_onnx(out).metadata_props}
    assert metadata["int8_weight_bits"] == str(bits) and metadata["int8_target_cpu"] == "test"


def test_target_cpu_resolves_to_weight_bits(monkeypatch):
    import platform

    from pipeline import latency

    assert [int8.weight_bits_for(t) for t in ("vnni", "avx2", "arm64")] == [8, 7, 8]
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(latency, "has_vnni", lambda: True)
    assert int8.resolve_target_cpu("auto") == "vnni"
    monkeypatch.setattr(latency, "has_vnni", lambda: False)
    assert int8.resolve_target_cpu("auto") == "avx2"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert int8.resolve_target_cpu("auto") == "arm64"
    with pytest.raises(int8.Int8Error, match="target_cpu must be"):
        int8.resolve_target_cpu("avx512")
    with pytest.raises(qat.QatError, match="weight bits"):
        qat.fake_quant_weight(torch.ones(2, 1, 1, 1), bits=6)


def test_finalize_copies_metadata_keeps_integer_convs_and_predicts(tiny):
    from ultralytics import YOLO

    chosen = tiny["folder"] / "chosen.onnx"
    int8.quantize_onnx(tiny["fp32"], chosen, tiny["images"], weight_bits=8, target_cpu="vnni")
    final = tiny["folder"] / "final" / "model_int8.onnx"
    report = int8.finalize_int8(chosen, tiny["fp32"], final)
    assert report["integer_convs_after"] == report["integer_convs_before"] > 0
    assert report["dfl_softmax_rewritten"] == 1
    metadata = {p.key: p.value for p in int8.load_onnx(final).metadata_props}
    for key in ("names", "stride", "imgsz", "task"):
        assert key in metadata
    # The FP32 export's metadata replaces the quantizer's, except what says which CPU the weights are for.
    assert metadata["int8_target_cpu"] == report["int8_target_cpu"] == "vnni"
    assert metadata["int8_weight_bits"] == "8"
    results = YOLO(str(final), task="detect").predict(str(tiny["images"][0]), imgsz=IMGSZ, verbose=False)
    assert len(results) == 1 and results[0].names[0] == "class0"

    bare = tiny["folder"] / "bare.onnx"
    int8.quantize_onnx(tiny["fp32"], bare, tiny["images"])
    stripped = int8.load_onnx(bare)
    del stripped.metadata_props[:]
    int8.save_onnx_atomic(stripped, bare)
    int8.copy_metadata(tiny["fp32"], bare)
    assert {p.key for p in int8.load_onnx(bare).metadata_props} == set(metadata) - {"int8_target_cpu", "int8_weight_bits"}


def test_dfl_softmax_rewrite_keeps_the_outputs(tiny):
    model = int8.load_onnx(tiny["fp32"])
    softmax_axes = lambda m: [a.i for n in m.graph.node if n.op_type == "Softmax" for a in n.attribute]  # noqa: E731
    assert softmax_axes(model) == [1]
    assert int8.rewrite_dfl_softmax(model) == 1
    assert softmax_axes(model) == [-1]
    assert not [n for n in model.graph.node if n.op_type == "Conv" and "dfl" in n.name]
    onnx.checker.check_model(model, full_check=True)
    rewritten = int8.save_onnx_atomic(model, tiny["folder"] / "dfl_rewritten.onnx")
    x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    before, after = int8.ort_outputs(tiny["fp32"], x), int8.ort_outputs(rewritten, x)
    assert before[0].shape == after[0].shape
    assert np.allclose(before[0], after[0], atol=1e-4)
    assert int8.rewrite_dfl_softmax(model) == 0  # already rewritten: nothing matches twice


def test_clear_errors(tmp_path, tiny):
    with pytest.raises(int8.Int8Error, match="not found"):
        int8.count_integer_kernels(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(int8.Int8Error, match="broken.onnx"):
        int8.quantize_onnx(broken, tmp_path / "out.onnx", tiny["images"])


def _params():
    from pipeline.params import Params

    params = Params()
    params.train.imgsz = IMGSZ
    params.export.simplify = True
    return params
