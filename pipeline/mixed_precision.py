"""Mixed precision with accuracy control: return the convs INT8 hurts most to float, one at a time, until the
qat gate's accuracy floor holds or `qat.max_float_layers` convs are float.

Each quantizable conv's own INT8 sensitivity is the mAP50-95 gained, on a fixed val subset
(`qat.mixed_precision_val_images`), by leaving that conv alone in float with every other one quantized.
That probe is a quantize + evaluate per conv, so only the `qat.mixed_precision_probes` convs with the largest
local INT8 error get it: the relative error of a conv's output when its input and weights alone are quantized
as the INT8 model quantizes them, on the float model's own tensors (`local_errors`, one ORT pass).
Convs then go back to float in that order; after each, the whole model is re-quantized (the same QAT ranges
or PTQ calibration) and measured on the full val split, the split the gate reads, so the stopping rule and
the gate agree. Every remaining quantized conv still runs as an ORT integer kernel (counted in ORT's
optimized graph), and the latency cost of the float convs is measured against the all-INT8 model.

When: `qat.mixed_precision: auto` runs only when even the most accurate candidate misses the floor (then no
candidate can pass the accuracy gate); `always` runs every time, aiming at the float reference's own mAP,
which gives the choice rule an accuracy-first candidate to weigh against latency; `off` never.
The result is one more candidate, `<base>_mixed`, measured and gated like the others; for a QAT base its
torch twin (the fake-quant model with those convs float) is what export's parity check compares with.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from pipeline import int8, latency
from pipeline.params import Params


# Images the local INT8 errors are computed on: a ranking, not a measurement, and every conv's input and
# output tensors of each image are held in memory at once.
LOCAL_ERROR_IMAGES = 4


class MixedPrecisionError(RuntimeError):
    pass


def return_to_float(gains: dict[str, float], measure: Callable[[list[str]], float], floor: float, budget: int,
                    start_map: float) -> dict:
    """The rule, free of any model: convs go float in order of `gains` (largest first, ties by name), one at a
    time, each step re-measured by `measure(float_convs) -> mAP`, until mAP >= floor or `budget` convs are float.

    Kept: the first step that meets the floor; if none does, the most accurate step (fewest floats on ties).
    """
    order = sorted(gains, key=lambda name: (-gains[name], name))
    steps = [{"float_layers": [], "map50_95": start_map}]
    floats: list[str] = []
    current = start_map
    while current < floor and len(floats) < min(budget, len(order)):
        floats.append(order[len(floats)])
        current = measure(list(floats))
        steps.append({"float_layers": list(floats), "map50_95": current})
    met = [s for s in steps if s["map50_95"] >= floor]
    kept = met[0] if met else max(steps, key=lambda s: (s["map50_95"], -len(s["float_layers"])))
    return {"order": order, "steps": steps, "kept": kept, "floor": floor, "floor_met": bool(met),
            "budget": budget}


def accuracy_floor(reference_float: dict, gates) -> float | None:
    """The lowest mAP50-95 the qat gate accepts: the float reference minus max_map_drop, or min_map50_95."""
    floors = []
    if gates.max_map_drop is not None:
        floors.append(reference_float["map50_95"] - gates.max_map_drop)
    if gates.min_map50_95 is not None:
        floors.append(gates.min_map50_95)
    return max(floors) if floors else None


def accuracy(artifact: Path, data_yaml: Path, params: Params, max_images: int | None = None) -> dict:
    """The evaluator's accuracy (one name the tests can replace with synthetic measurements)."""
    from pipeline import evaluate

    return evaluate.accuracy(artifact, data_yaml, params, max_images=max_images)


def local_errors(float_onnx: Path, conv_names: list[str], calib_images: list[Path], weight_bits: int,
                 activation_qparams: dict[str, tuple[float, int]] | None = None) -> dict[str, float]:
    """{conv: ||y_q - y|| / ||y||}, where y is the conv's output in the float model on `calib_images` and y_q
    the same conv computed from its input quantized to uint8 (the QAT range when `activation_qparams` has one,
    else the min/max seen, as calibration would) and its weights per output channel to `weight_bits`.

    Only this conv is quantized, so the error is its own, not what upstream convs pass on: a cheap ranking
    for which convs to probe, not a measure of the model's accuracy."""
    import onnx
    import onnxruntime as ort
    import torch.nn.functional as F
    from onnx import numpy_helper

    from pipeline.qat import ACT_QMAX, ACT_QMIN, ActivationQuant, fake_quant_weight

    model = int8.load_onnx(float_onnx)
    nodes = {n.name: n for n in model.graph.node if n.name in set(conv_names)}
    weights = {i.name: i for i in model.graph.initializer}
    wanted = sorted({t for n in nodes.values() for t in (n.input[0], n.output[0])})
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in existing)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    height, width = int8.input_image_size(model, float_onnx)
    input_name = session.get_inputs()[0].name
    runs = [dict(zip(names, session.run(None, {input_name: int8.letterboxed_input(p, height, width)})))
            for p in calib_images]
    errors = {}
    for name, node in nodes.items():
        x = torch.from_numpy(np.concatenate([r[node.input[0]] for r in runs]))
        y = torch.from_numpy(np.concatenate([r[node.output[0]] for r in runs]))
        if activation_qparams and node.input[0] in activation_qparams:
            scale, zero = activation_qparams[node.input[0]]
        else:  # the range calibration would give: QAT's own observer, fed these tensors
            observer = ActivationQuant()
            observer.observe = True
            observer(x)
            scale, zero = observer.qparams()
        xq = torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)
        wq = fake_quant_weight(torch.from_numpy(numpy_helper.to_array(weights[node.input[1]]).copy()), weight_bits)
        bias = torch.from_numpy(numpy_helper.to_array(weights[node.input[2]]).copy()) if len(node.input) > 2 else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        xq = F.pad(xq, (pads[1], pads[3], pads[0], pads[2]))
        yq = F.conv2d(xq, wq, bias, stride=tuple(attrs.get("strides", (1, 1))),
                      dilation=tuple(attrs.get("dilations", (1, 1))), groups=int(attrs.get("group", 1)))
        errors[name] = float((yq - y).norm() / y.norm().clamp_min(1e-12))
    return errors


class FloatConv(nn.Module):
    """A QAT conv returned to float: conv and activation with no fake quantization (the mixed torch twin)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def _float_twin(qat_model: nn.Module, mapping: dict[str, tuple[str, str]], float_outputs: set[str]) -> nn.Module:
    from pipeline import qat

    twin = copy.deepcopy(qat_model)
    convs = qat.quant_convs(twin)
    for name, (_, output_tensor) in mapping.items():
        if output_tensor not in float_outputs:
            continue
        old = convs[name]
        new = FloatConv(old.conv, old.act)
        for attr in qat._LAYER_ATTRS:
            if hasattr(old, attr):
                setattr(new, attr, getattr(old, attr))
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, new)
    return twin


def _source(candidate: dict, reference_onnx: Path, params: Params, work: Path) -> dict:
    """What rebuilds a candidate with some convs float: its float ONNX, its activation ranges (QAT) and, for
    QAT, the fake-quant torch model with the ONNX tensors of each conv."""
    from pipeline import qat

    if candidate["method"] != "qat":
        return {"float_onnx": reference_onnx, "qparams": None, "model": None}
    model, ckpt = qat.load_checkpoint(candidate["qat_torch_pt"])
    float_onnx = qat.export_float_onnx(model, ckpt, work / "mixed_source_fp32.onnx", params)
    mapping = qat.map_convs_to_onnx(model, float_onnx)
    return {"float_onnx": float_onnx, "qparams": qat.activation_qparams(model, mapping), "model": model,
            "ckpt": ckpt, "mapping": mapping}


def run_mixed_precision(candidates: dict[str, dict], reference_float: dict, reference_onnx: Path,
                        data_yaml: Path, params: Params, out_dir: Path, calib_images: list[Path],
                        measure: Callable[[Path, Path, Params], dict]) -> dict | None:
    """Add the `<base>_mixed` candidate to `candidates` (measured with `measure`, like the others) when
    qat.mixed_precision calls for it; returns the search record, or None when it did not run (and why not
    is then in the record of the stage: mode off, floor held, no floor). Candidates need their "metrics"."""
    from pipeline import qat

    q = params.qat
    floor = accuracy_floor(reference_float, q.gates)
    base = max(candidates, key=lambda n: candidates[n]["metrics"]["map50_95"])
    best = candidates[base]["metrics"]["map50_95"]
    if q.mixed_precision == "off":
        return None
    if q.mixed_precision == "auto" and (floor is None or best >= floor):
        return None
    if q.mixed_precision == "always":
        floor = reference_float["map50_95"]
    if q.max_float_layers < 1:
        return None
    if best >= floor:  # `always`, and INT8 already matches the float reference: nothing to measure
        return {"mode": q.mixed_precision, "base": base, "floor": floor, "floor_met": True, "candidate": None,
                "steps": [{"float_layers": [], "map50_95": best}], "float_layers": []}

    candidate = candidates[base]
    name = f"{base}_mixed"
    path = out_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory(prefix="mixed-", dir=out_dir) as tmp:
        work = Path(tmp)
        source = _source(candidate, reference_onnx, params, work)
        silu = candidate["silu_quantized"]

        def build(exclude: list[str], out: Path) -> dict:
            return int8.quantize_onnx(source["float_onnx"], out, calib_images, activation_qparams=source["qparams"],
                                      quantize_silu=silu, weight_bits=candidate["quantization"]["weight_bits"],
                                      target_cpu=candidate["quantization"].get("target_cpu"), exclude_convs=exclude)

        convs = [n.name for n in int8.feature_conv_nodes(int8.load_onnx(source["float_onnx"]))]
        errors = local_errors(source["float_onnx"], convs, calib_images[:LOCAL_ERROR_IMAGES],
                              candidate["quantization"]["weight_bits"], source["qparams"])
        probed = sorted(convs, key=lambda c: (-errors[c], c))[:q.mixed_precision_probes]
        subset = q.mixed_precision_val_images
        probe = work / "probe.onnx"
        build([], probe)
        all_int8 = accuracy(probe, data_yaml, params, max_images=subset)["map50_95"]
        gains = {}
        for conv in probed:
            build([conv], probe)
            gains[conv] = accuracy(probe, data_yaml, params, max_images=subset)["map50_95"] - all_int8

        def measure_full(exclude: list[str]) -> float:
            build(exclude, probe)
            return accuracy(probe, data_yaml, params)["map50_95"]

        record = return_to_float(gains, measure_full, floor, q.max_float_layers, best)
        kept = record["kept"]["float_layers"]
        record.update({"mode": q.mixed_precision, "base": base, "val_subset_images": subset,
                       "subset_all_int8_map50_95": all_int8, "gains": gains, "convs": len(convs),
                       "local_errors": {c: round(errors[c], 5) for c in probed}})
        if not kept:
            record["candidate"] = None
            return record
        info = build(kept, path)

        twin_pt = None
        if source["model"] is not None:
            outputs = {n.output[0] for n in int8.load_onnx(source["float_onnx"]).graph.node if n.name in kept}
            twin = _float_twin(source["model"], source["mapping"], outputs)
            twin_pt = qat.save_checkpoint(twin, out_dir / f"{name}_model.pt", source["ckpt"],
                                          mixed_precision={"float_layers": kept})
        kernels = int8.count_integer_kernels(path)
        e = params.evaluate
        timed = latency.interleaved({"all_int8": candidate["path"], "mixed": path}, e.threads, e.warmup, e.runs)
    record.update({
        "candidate": name, "float_layers": kept,
        "integer_convs": kernels["integer_convs"], "quantized_convs": info["quantized_convs"],
        "all_quantized_convs_fused": kernels["integer_convs"] == info["quantized_convs"],
        "latency_ms": {k: v["median_ms"] for k, v in timed.items()},
        "latency_cost_ms": timed["mixed"]["median_ms"] - timed["all_int8"]["median_ms"],
    })
    new = {**{k: v for k, v in candidate.items() if k not in ("metrics", "parity", "qat_log")},
           "path": str(path), "quantization": info, "mixed_precision": record, "qat_torch_pt": str(twin_pt) if twin_pt else None}
    new["metrics"] = measure(path, data_yaml, params)
    if twin_pt is not None:
        new["qat_torch_map50_95"] = int8.torch_accuracy_square(twin_pt, data_yaml, params)["map50_95"]
        diff = abs(new["metrics"]["map50_95"] - new["qat_torch_map50_95"])
        new["parity"] = {"abs_diff": diff, "passed": bool(diff <= int8.PARITY_TOLERANCE)}
    candidates[name] = new
    return record
