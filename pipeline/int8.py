"""INT8 ONNX building and inspection: ORT static quantization, fused-kernel counts, metadata, finalizing.

The INT8 scheme is the one ONNX Runtime's CPU provider runs fastest (measured, see the qat stage's notes):
weights int8, symmetric, per output channel; activations uint8, asymmetric, per tensor; only the Conv
nodes that feed an activation are quantized. The raw prediction convs of the head (box and class
outputs), the DFL conv and the box decode stay float, because one 8-bit scale cannot span pixel box
coordinates and class scores at once.

Activation ranges come either from calibration images (the PTQ path) or from a QAT model
(`activation_qparams`: tensor name -> (scale, zero_point) learned in torch), so that ORT's integer graph
reproduces the fake-quant model instead of re-deriving its own ranges.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from pipeline.io import atomic_write

# Ops whose presence right after a Conv marks it as a feature conv (quantized) rather than a raw
# prediction conv (left float). SiLU is exported as Sigmoid + Mul.
ACTIVATION_OPS = {"Sigmoid", "Relu", "Clip", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu"}
INTEGER_CONV_OPS = {"QLinearConv", "ConvInteger"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class Int8Error(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Small ONNX helpers


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise Int8Error(f"{path}: ONNX file not found")
    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError / ValueError depending on the damage
        raise Int8Error(f"{path}: not a readable ONNX model: {e}") from e


def save_onnx_atomic(model: onnx.ModelProto, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: onnx.save(model, tmp))


def input_image_size(model: onnx.ModelProto, path: str | Path = "") -> tuple[int, int]:
    """(height, width) of the model's single NCHW image input; INT8 export needs a static size."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[2].dim_value or not dims[3].dim_value:
        raise Int8Error(f"{path}: expected a static NCHW image input, got {[d.dim_value or d.dim_param for d in dims]}")
    return dims[2].dim_value, dims[3].dim_value


def consumers_by_tensor(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def feature_conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv nodes followed by an activation: the ones to quantize.

    Works on any conv net without relying on node names: a conv whose output goes straight into
    Concat/Reshape/Softmax (Detect's box and class convs, DFL) is a prediction conv and stays float.
    """
    consumers = consumers_by_tensor(model)
    return [node for node in model.graph.node
            if node.op_type == "Conv" and any(c.op_type in ACTIVATION_OPS for c in consumers.get(node.output[0], []))]


def float_conv_reasons(model: onnx.ModelProto) -> dict[str, str]:
    """{Conv node name: why it stays float} for every Conv that `feature_conv_nodes` leaves out.

    The reason follows from what reads the conv's output, as the selection does; the QAT model keeps the
    same convs float (insert_quant_convs only fake-quantizes conv blocks with an activation).
    """
    consumers = consumers_by_tensor(model)
    selected = {node.name for node in feature_conv_nodes(model)}
    reasons = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in selected:
            continue
        readers = {c.op_type for c in consumers.get(node.output[0], [])}
        if "attn" in node.name and "Reshape" in readers:
            why = "attention query/key/value: reshaped into heads for float matrix products and a softmax"
        elif "Reshape" in readers or "Softmax" in readers or not readers:
            why = ("prediction conv (box distances, class logits or DFL): one 8-bit scale cannot span "
                   "the decoded values")
        else:  # could be quantized too, but it is outside the conv -> activation pairs this scheme covers
            read_by = "a residual Add" if readers == {"Add"} else ", ".join(sorted(readers))
            why = f"no activation after it (read by {read_by}): outside the conv+activation pairs quantized here"
        reasons[node.name] = why
    return reasons


def isolate_conv_inputs(model: onnx.ModelProto, convs: list[onnx.NodeProto]) -> dict[str, str]:
    """Give the quantized convs their own copy (Identity) of any input tensor that other nodes also read.

    ORT's quantizer rewires every reader of a quantized tensor to the DequantizeLinear output, so a
    Concat or Add that shares its input with a conv would read rounded values. That changes the model
    (the QAT torch model feeds them float), and costs a DequantizeLinear per such reader at run time.
    With an Identity in between, only the convs read the quantized copy; ORT removes the Identity
    itself when it optimizes the session. Returns {original tensor: tensor the convs now read}. In place.
    """
    conv_names = {n.name for n in convs}
    consumers = consumers_by_tensor(model)
    graph_outputs = {o.name for o in model.graph.output}
    renamed: dict[str, str] = {}
    for conv in convs:
        tensor = conv.input[0]
        if tensor in renamed:
            conv.input[0] = renamed[tensor]
            continue
        others = [c for c in consumers.get(tensor, []) if c.name not in conv_names]
        if not others and tensor not in graph_outputs:
            continue
        copy_name = f"{tensor}_conv_input"
        model.graph.node.append(onnx.helper.make_node("Identity", [tensor], [copy_name], name=f"{tensor}_conv_input_Identity"))
        renamed[tensor] = copy_name
        conv.input[0] = copy_name
    if renamed:  # keep the node list topologically sorted: each Identity right after its producer
        _topological_sort(model)
    return renamed


def _topological_sort(model: onnx.ModelProto) -> None:
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        progressed = False
        for node in list(pending):
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                pending.remove(node)
                progressed = True
        if not progressed:
            raise Int8Error(f"graph is not a DAG or reads undefined tensors: {[n.name for n in pending][:5]}")
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def silu_nodes_after(model: onnx.ModelProto, convs: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The Sigmoid and Mul nodes of the SiLU that follows each conv (x * sigmoid(x))."""
    consumers = consumers_by_tensor(model)
    found = []
    for conv in convs:
        out = conv.output[0]
        for sig in consumers.get(out, []):
            if sig.op_type != "Sigmoid":
                continue
            for mul in consumers.get(sig.output[0], []):
                if mul.op_type == "Mul" and out in mul.input:
                    found += [sig, mul]
    return found


# ----------------------------------------------------------------------------------------------
# Calibration images


def calibration_image_paths(data_yaml: str | Path, n: int, split: str = "train") -> list[Path]:
    """The first n images (sorted) of a split of an Ultralytics data.yaml.

    The train split by default: calibrating on val would leak the images the gates are measured on.
    """
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml), autodownload=False)
    sources = data.get(split)
    if not sources:
        raise Int8Error(f"{data_yaml}: no '{split}' split to take calibration images from")
    images: list[Path] = []
    for source in sources if isinstance(sources, list) else [sources]:
        source = Path(source)
        if source.is_dir():
            images += [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif source.suffix == ".txt":  # a list of image paths, relative to the list file's folder
            for line in source.read_text().splitlines():
                if line.strip():
                    p = Path(line.strip())
                    images.append(p if p.is_absolute() else source.parent / p)
    images = sorted(images)[:n]
    if not images:
        raise Int8Error(f"{data_yaml}: the '{split}' split holds no images")
    return images


def letterboxed_input(image_path: str | Path, height: int, width: int) -> np.ndarray:
    """A 1x3xHxW float32 RGB tensor in [0, 1], letterboxed exactly like Ultralytics' predictor."""
    import cv2
    from ultralytics.data.augment import LetterBox

    bgr = cv2.imread(str(image_path))
    if bgr is None:
        raise Int8Error(f"{image_path}: cannot read image")
    boxed = LetterBox(new_shape=(height, width), auto=False)(image=bgr)
    rgb = boxed[..., ::-1].transpose(2, 0, 1)
    return np.ascontiguousarray(rgb, dtype=np.float32)[None] / 255.0


class ImageCalibrationReader:
    """ORT CalibrationDataReader over a list of image files (duck-typed: get_next/rewind)."""

    def __init__(self, image_paths: list[Path], input_name: str, height: int, width: int):
        self.inputs = [letterboxed_input(p, height, width) for p in image_paths]
        self.input_name = input_name
        self.position = 0

    def get_next(self):
        if self.position >= len(self.inputs):
            return None
        self.position += 1
        return {self.input_name: self.inputs[self.position - 1]}

    def rewind(self):
        self.position = 0

    def __len__(self):
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int):  # used by ORT's strided calibration only
        self.position = start_index


# ----------------------------------------------------------------------------------------------
# Target CPU

TARGET_CPUS = ("vnni", "avx2", "arm64")
# Weight bits each CPU family computes exactly: AVX2's u8*s8 kernels (vpmaddubsw) add pairs of products into
# a saturating int16, so full-range weights overflow there; VNNI (vpdpbusd) and ARM64's dot-product kernels
# accumulate in int32 and can keep the eighth bit (ORT's documentation: reduce_range is for non-VNNI x86).
WEIGHT_BITS = {"vnni": 8, "avx2": 7, "arm64": 8}


def resolve_target_cpu(target: str) -> str:
    """`auto` -> the CPU this runs on (arm64, vnni or avx2); any other value is checked and returned."""
    import platform

    from pipeline.latency import has_vnni

    if target == "auto":
        if platform.machine().lower() in ("arm64", "aarch64"):
            return "arm64"
        return "vnni" if has_vnni() else "avx2"
    if target not in TARGET_CPUS:
        raise Int8Error(f"target_cpu must be auto or one of {', '.join(TARGET_CPUS)}, got {target!r}")
    return target


def weight_bits_for(target: str) -> int:
    return WEIGHT_BITS[resolve_target_cpu(target)]


# ----------------------------------------------------------------------------------------------
# Quantization


def quantize_onnx(fp32_onnx: str | Path, out_onnx: str | Path, calib_images: list[Path], *,
                  activation_qparams: dict[str, tuple[float, int]] | None = None,
                  quantize_silu: bool = False, quant_format: str = "qdq", weight_bits: int = 7,
                  target_cpu: str | None = None, exclude_convs: list[str] | tuple[str, ...] = ()) -> dict:
    """Write an INT8 copy of fp32_onnx: int8 per-channel weights, uint8 per-tensor activations.

    calib_images: images that give ORT its MinMax ranges (needed even with activation_qparams, for any
    tensor they do not cover). activation_qparams: tensor name -> (scale, zero_point) to use instead
    of calibrated ranges, e.g. learned by QAT. quantize_silu: also quantize the Sigmoid and Mul of
    each SiLU (ORT's QLinearSigmoid / QLinearMul). quant_format: "qdq" or "qoperator".
    weight_bits: 7 (weights in [-64, 64], ORT's reduce_range) or 8 ([-127, 127]). 7 is needed on x86
    CPUs without VNNI (AVX2 only): their u8*s8 kernels add pairs of products in int16, which saturates
    with full-range weights and uint8 activations (measured: boxes off by 2 px on average at 160 px).
    VNNI and ARM64 kernels accumulate in int32, so they keep the eighth bit (see `weight_bits_for`).
    The int8 storage is the same either way; 7 bits is correct on every CPU, so that is the default.
    target_cpu: recorded with weight_bits in the model's metadata (`int8_target_cpu`, `int8_weight_bits`),
    so a deployed file says which CPUs it was quantized for.
    exclude_convs: names of Conv nodes that `feature_conv_nodes` selects but that stay float (mixed
    precision, pipeline/mixed_precision.py); their SiLU stays float too.

    Returns what was quantized: {"quantized_convs", "float_convs", "quantized_silu_nodes", ...}.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    if weight_bits not in (7, 8):
        raise Int8Error(f"weight_bits must be 7 or 8, got {weight_bits!r}")
    model = load_onnx(fp32_onnx)
    height, width = input_image_size(model, fp32_onnx)
    convs = feature_conv_nodes(model)
    unknown = sorted(set(exclude_convs) - {n.name for n in convs})
    if unknown:
        raise Int8Error(f"{fp32_onnx}: exclude_convs names {unknown}, which are not quantizable Conv nodes here")
    convs = [n for n in convs if n.name not in set(exclude_convs)]
    if not convs:
        raise Int8Error(f"{fp32_onnx}: no Conv followed by an activation, nothing to quantize")
    all_convs = [n for n in model.graph.node if n.op_type == "Conv"]
    silu = silu_nodes_after(model, convs) if quantize_silu else []
    # With SiLU quantized its output is an integer tensor anyway; isolating would only add Q/DQ pairs.
    isolated = {} if quantize_silu else isolate_conv_inputs(model, convs)
    if quantize_silu and not silu:
        raise Int8Error(f"{fp32_onnx}: quantize_silu asked for, but the graph has no Sigmoid+Mul after its convs")
    nodes_to_quantize = [n.name for n in convs + silu]
    if len(set(nodes_to_quantize)) != len(nodes_to_quantize) or any(not name for name in nodes_to_quantize):
        raise Int8Error(f"{fp32_onnx}: Conv/SiLU nodes need unique non-empty names to be selected for quantization")

    overrides = {}
    for tensor, (scale, zero_point) in (activation_qparams or {}).items():
        overrides[isolated.get(tensor, tensor)] = [{"scale": np.array(scale, dtype=np.float32),
                              "zero_point": np.array(zero_point, dtype=np.uint8)}]
    extra_options = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if overrides:
        extra_options["TensorQuantOverrides"] = overrides

    reader = ImageCalibrationReader(calib_images, model.graph.input[0].name, height, width)
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise Int8Error(f"quant_format must be one of {sorted(formats)}, got {quant_format!r}")

    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_onnx.with_name(f".{out_onnx.stem}.{os.getpid()}.tmp.onnx")
    prepared = out_onnx.with_name(f".{out_onnx.stem}.{os.getpid()}.fp32.onnx")
    try:
        onnx.save(model, str(prepared))
        quantize_static(
            str(prepared), str(tmp), reader,
            quant_format=formats[quant_format],
            op_types_to_quantize=["Conv", "Sigmoid", "Mul"] if quantize_silu else ["Conv"],
            nodes_to_quantize=nodes_to_quantize,
            per_channel=True,
            reduce_range=weight_bits == 7,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra_options,
        )
        # quantize_static drops the model's metadata; keep it so Ultralytics can load the result.
        quantized = onnx.load(str(tmp))
        metadata = {p.key: p.value for p in model.metadata_props}
        metadata["int8_weight_bits"] = str(weight_bits)
        if target_cpu:
            metadata["int8_target_cpu"] = target_cpu
        _set_metadata(quantized, metadata)
        save_onnx_atomic(quantized, out_onnx)
    finally:
        for path in (tmp, prepared):
            if path.exists():
                path.unlink()
    return {
        "quantized_convs": len(convs),
        "float_convs": len(all_convs) - len(convs),
        "quantized_silu_nodes": len(silu),
        "excluded_convs": sorted(exclude_convs),
        "calibration_images": len(calib_images),
        "activation_overrides": len(overrides),
        "isolated_conv_inputs": len(isolated),
        "quant_format": quant_format,
        "weight_bits": weight_bits,
        "target_cpu": target_cpu,
    }


# ----------------------------------------------------------------------------------------------
# Inspection


def optimized_graph(onnx_path: str | Path, threads: int = 1) -> onnx.ModelProto:
    """The graph ORT's CPU provider actually runs, after all its fusions (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise Int8Error(f"{onnx_path}: ONNX file not found")
    with tempfile.TemporaryDirectory(prefix="ort-opt-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3  # the "hardware specific optimizations" warning is expected
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def count_integer_kernels(onnx_path: str | Path) -> dict:
    """Op counts in ORT's optimized graph: how many convs really run as integer kernels.

    Counting here, not in the quantizer's output, is the point: a QDQ Conv that ORT cannot fuse runs as
    DequantizeLinear + float Conv, which is slower than no quantization at all.
    """
    ops = Counter(node.op_type for node in optimized_graph(onnx_path).graph.node)
    integer_convs = sum(ops[op] for op in INTEGER_CONV_OPS)
    float_convs = ops["Conv"] + ops["FusedConv"]
    return {
        "integer_convs": integer_convs,
        "float_convs": float_convs,
        "QLinearConv": ops["QLinearConv"],
        "ConvInteger": ops["ConvInteger"],
        "QuantizeLinear": ops["QuantizeLinear"],
        "DequantizeLinear": ops["DequantizeLinear"],
        "QLinearSigmoid": ops["QLinearSigmoid"],
        "QLinearMul": ops["QLinearMul"],
        "ops": dict(sorted(ops.items())),
    }


def int8_initializer_bytes(onnx_path: str | Path) -> dict:
    """Bytes of weights stored as 8-bit integers vs float, to show the file really holds INT8 weights."""
    model = load_onnx(onnx_path)
    int8_bytes = float_bytes = other_bytes = 0
    for init in model.graph.initializer:
        size = onnx.numpy_helper.to_array(init).nbytes
        if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            int8_bytes += size
        elif init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            float_bytes += size
        else:
            other_bytes += size
    return {"int8_bytes": int8_bytes, "float_bytes": float_bytes, "other_bytes": other_bytes,
            "file_bytes": Path(onnx_path).stat().st_size}


def ort_outputs(onnx_path: str | Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


# ----------------------------------------------------------------------------------------------
# Metadata and the final artifact


def _set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def int8_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The `int8_*` metadata quantize_onnx records (weight bits, target CPU)."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("int8_")}


def copy_metadata(src_onnx: str | Path, dst_onnx: str | Path) -> dict[str, str]:
    """Copy metadata_props (Ultralytics' names, stride, imgsz, task, ...) from src to dst, in place."""
    metadata = {p.key: p.value for p in load_onnx(src_onnx).metadata_props}
    if not metadata:
        raise Int8Error(f"{src_onnx}: has no metadata_props to copy (is it an Ultralytics ONNX export?)")
    model = load_onnx(dst_onnx)
    _set_metadata(model, metadata)
    save_onnx_atomic(model, dst_onnx)
    return metadata


def rewrite_dfl_softmax(model: onnx.ModelProto) -> int:
    """Run the Detect head's DFL softmax along the last axis; returns how many DFL blocks were rewritten.

    Ultralytics exports DFL as Reshape (b, 4, 16, A) -> Transpose to (b, 16, 4, A) -> Softmax(axis=1) -> 1x1
    Conv (16 -> 1, weights 0..15) -> Reshape (b, 4, A). ORT's Softmax on a non-last axis transposes internally
    and is slow: measured at 320 px (A = 2100) 1.9 ms for the block against 0.2 ms for the same arithmetic as
    Transpose to (b, 4, A, 16) -> Softmax(axis=-1) -> MatMul (16 x 1), a tenth of the INT8 model's latency.
    Outputs are identical. Graphs without this pattern (heads without DFL) are left as they are.
    """
    from onnx import numpy_helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = consumers_by_tensor(model)
    initializers = {init.name: init for init in graph.initializer}
    attrs = lambda node: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    rewritten = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        transpose = producers.get(softmax.input[0])
        after = consumers.get(softmax.output[0], [])
        if (attrs(softmax).get("axis") != 1 or transpose is None or transpose.op_type != "Transpose"
                or list(attrs(transpose).get("perm", [])) != [0, 2, 1, 3]
                or len(consumers.get(transpose.output[0], [])) != 1 or len(after) != 1 or after[0].op_type != "Conv"):
            continue
        conv = after[0]
        weight = initializers.get(conv.input[1])
        if (weight is None or len(conv.input) > 2 or attrs(conv).get("group", 1) != 1
                or not all(c.op_type == "Reshape" for c in consumers.get(conv.output[0], []))):
            continue
        w = numpy_helper.to_array(weight)
        if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
            continue
        for a in transpose.attribute:
            if a.name == "perm":
                a.ints[:] = [0, 1, 3, 2]
        for a in softmax.attribute:
            if a.name == "axis":
                a.i = -1
        matmul_weight = numpy_helper.from_array(w.reshape(w.shape[1], 1).astype(w.dtype), conv.input[1] + "_matmul")
        graph.initializer.append(matmul_weight)
        matmul = onnx.helper.make_node("MatMul", [softmax.output[0], matmul_weight.name], [conv.output[0]],
                                       name=conv.name + "_matmul")
        graph.node.insert(list(graph.node).index(conv), matmul)
        graph.node.remove(conv)
        stale = {transpose.output[0], softmax.output[0], conv.output[0]}  # their shapes changed
        for info in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(info)
        rewritten += 1
    if rewritten:
        used = {name for node in graph.node for name in node.input}
        unused = [i for i in graph.initializer if i.name not in used]
        for init in unused:
            graph.initializer.remove(init)
    return rewritten


def _simplify_keeping_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim, but never at the cost of the INT8 weights: constant folding a weight's
    DequantizeLinear would turn the weight back into float, so slimming is checked and undone then."""
    import onnxslim

    before = sum(1 for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    slim = onnxslim.slim(model)
    after = sum(1 for i in slim.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    return slim if after >= before else model


def finalize_int8(chosen_onnx: str | Path, fp32_onnx_with_metadata: str | Path, out_onnx: str | Path,
                  simplify: bool = True) -> dict:
    """The deployable INT8 ONNX: chosen graph, simplified, DFL's softmax on the last axis
    (`rewrite_dfl_softmax`), with the FP32 export's Ultralytics metadata.

    Verifies that the result still runs integer convs in ORT (slimming must not break the fusions)
    and returns the kernel counts before and after.
    """
    chosen_onnx, out_onnx = Path(chosen_onnx), Path(out_onnx)
    metadata = {p.key: p.value for p in load_onnx(fp32_onnx_with_metadata).metadata_props}
    if not metadata:
        raise Int8Error(f"{fp32_onnx_with_metadata}: has no metadata_props (expected Ultralytics' export)")
    model = load_onnx(chosen_onnx)
    metadata.update(int8_metadata(model))  # the target CPU the weights were quantized for travels with them
    kernels_before = count_integer_kernels(chosen_onnx)
    if simplify:
        model = _simplify_keeping_int8(model)
    dfl_rewritten = rewrite_dfl_softmax(model)
    _set_metadata(model, metadata)
    save_onnx_atomic(model, out_onnx)
    kernels_after = count_integer_kernels(out_onnx)
    if kernels_after["integer_convs"] < kernels_before["integer_convs"]:
        # Slimming broke fusions: ship the unslimmed graph rather than a slower one.
        model = load_onnx(chosen_onnx)
        dfl_rewritten = rewrite_dfl_softmax(model)
        _set_metadata(model, metadata)
        save_onnx_atomic(model, out_onnx)
        kernels_after = count_integer_kernels(out_onnx)
        simplify = False
    return {"path": str(out_onnx), "simplified": simplify, "dfl_softmax_rewritten": dfl_rewritten,
            "metadata_keys": sorted(metadata),
            "integer_convs_before": kernels_before["integer_convs"],
            "integer_convs_after": kernels_after["integer_convs"],
            "file_bytes": out_onnx.stat().st_size, **int8_metadata(load_onnx(out_onnx))}


PARITY_TOLERANCE = 0.005  # mAP50-95, half a point


def torch_accuracy_square(pt_path: str | Path, data_yaml: str | Path, params) -> dict:
    """mAP of a .pt on val with square letterboxed images, as a static ONNX is validated.

    Ultralytics validates a .pt with rectangular batches by default (`rect=True`) and a static ONNX
    without; that alone moved mAP50-95 by 0.7 to 2.7 points on the demo data, which would drown the
    quantization difference a parity check is after.
    """
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="val-square-") as tmp:
        results = YOLO(str(pt_path), task="detect").val(
            data=str(data_yaml), imgsz=params.train.imgsz, batch=params.evaluate.batch, conf=params.evaluate.conf,
            iou=params.evaluate.iou, device="cpu", workers=0, plots=False, verbose=False, rect=False,
            project=tmp, name="val", exist_ok=True)
    return {"map50_95": float(results.box.map), "map50": float(results.box.map50)}


def parity_check(int8_onnx: str | Path, qat_torch_artifact: str | Path, data_yaml: str | Path, params,
                 tolerance: float = PARITY_TOLERANCE) -> dict:
    """mAP50-95 on val of the INT8 ONNX (ORT, shared evaluator) and of the fake-quant QAT model (torch,
    same square images); pass when the ONNX loses at most `tolerance` (0.005 = half a point) against it.

    One-sided: the check is there to catch an export that loses what QAT learned. The quantized-SiLU
    candidate's graph also quantizes the Sigmoid and Mul its torch twin keeps float, so the two differ by
    design, and it has measured up to 0.9 points above its twin (320 px demo); the ONNX's own mAP is gated
    directly anyway."""
    from pipeline.evaluate import evaluate

    onnx_metrics = evaluate(str(int8_onnx), str(data_yaml), params, latency=False)
    torch_metrics = torch_accuracy_square(qat_torch_artifact, data_yaml, params)
    return {"int8_onnx_map50_95": onnx_metrics["map50_95"], "qat_torch_map50_95": torch_metrics["map50_95"],
            "int8_onnx_map50": onnx_metrics.get("map50"), "qat_torch_map50": torch_metrics["map50"],
            **parity_verdict(onnx_metrics["map50_95"], torch_metrics["map50_95"], tolerance)}


def parity_verdict(int8_map50_95: float, qat_torch_map50_95: float, tolerance: float = PARITY_TOLERANCE) -> dict:
    """The one-sided parity rule (see `parity_check`), also applied by the qat stage to its candidates."""
    shortfall = qat_torch_map50_95 - int8_map50_95
    return {"abs_diff": abs(shortfall), "shortfall": shortfall, "tolerance": tolerance,
            "passed": bool(shortfall <= tolerance)}
