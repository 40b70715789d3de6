"""Stage qat: quantization-aware fine-tuning of the pruned model, and the INT8 ONNX candidates.

Why the fake quantization here copies ONNX Runtime's scheme exactly: the deployable model is an ORT INT8
graph, and ORT's CPU provider is only fast for one scheme (measured: int8 weights symmetric per output
channel, uint8 activations asymmetric per tensor, Conv-only; int8 activations or QOperator int8 fuse badly
or run slower than FP32). So the torch model trains against the very rounding ORT will do:

  input  -> uint8 fake quant (one observer per ONNX tensor, shared by every conv reading that tensor)
  weight -> int8 symmetric per-channel fake quant, scale = max|w| / qmax: [-64, 64] (ORT's reduce_range) for
            AVX2 targets, [-127, 127] for VNNI and ARM64 (qat.target_cpu, see int8.WEIGHT_BITS)
  conv   -> float conv with the BatchNorm folded in (folded once, before QAT: no BN in the graph)
  output -> uint8 fake quant (ORT quantizes each QLinearConv's output), then the activation in float

Only Ultralytics `Conv` blocks with an activation are quantized. The Detect head's raw box/class convs,
the DFL and the box decode stay float (one 8-bit scale cannot hold pixel boxes and class scores).

The INT8 ONNX is then made by exporting the BN-folded float weights (Ultralytics' exporter, so the graph
is the same as the FP32 export) and quantizing that with ORT's static quantizer, with every activation's
(scale, zero_point) injected from the QAT observers (`TensorQuantOverrides`). Weights are quantized by ORT
from the same float weights with the same formula, so the integer graph reproduces the fake-quant model.

Candidates (all written, all measured, the gate picks):
  qat_int8.onnx          QAT, SiLU kept in float between integer convs
  qat_qsilu_int8.onnx    the same QAT model with Sigmoid and Mul quantized too (QLinearSigmoid/QLinearMul)
  qat_relu_int8.onnx     SiLU swapped for ReLU before QAT (a QAT-friendly activation, as TAO does)
  ptq_int8.onnx          ORT static quantization of the pruned FP32 model, MinMax calibration
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import distill, gates, int8, mixed_precision, sparsity, surgery
from pipeline.evaluate import evaluate, export_fp32_onnx
from pipeline import latency
from pipeline.control import best_float_model
from pipeline.io import copy_file, read_json, write_json
from pipeline.params import Params
from pipeline.progress import Progress, epoch_details
from pipeline.workspace import Workspace

ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations
# Symmetric int8 weight ranges by bit width, as ORT's quantizer uses them: 7 bits is its reduce_range
# (needed on x86 without VNNI, where u8s8 convs sum pairs of products in a saturating int16).
WEIGHT_RANGES = {7: (-64, 64), 8: (-127, 127)}
DEFAULT_WEIGHT_BITS = 7  # what checkpoints written before qat.target_cpu existed were trained with
EMA_MOMENTUM = 0.01  # how fast activation ranges follow the training batches
QAT_LR_FACTOR = 0.1  # QAT fine-tunes at a tenth of the training lr0 unless qat.lr0 says otherwise
_LAYER_ATTRS = ("f", "i", "type", "np")  # what DetectionModel._predict_once needs on a top-level layer


class QatError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Fake quantization modules (must stay importable as pipeline.qat.*: the QAT checkpoint pickles them)


class ActivationQuant(nn.Module):
    """uint8 asymmetric per-tensor fake quantization with a min/max observer, ORT's activation scheme."""

    def __init__(self):
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.observe = False  # update min/max from the tensors passing through
        self.momentum: float | None = None  # None: running min/max (calibration); else EMA (training)
        self.enabled = False  # apply the fake quantization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            with torch.no_grad():
                low, high = x.min().float(), x.max().float()
                if self.momentum is None or not torch.isfinite(self.min_val):
                    self.min_val.copy_(torch.minimum(self.min_val, low))
                    self.max_val.copy_(torch.maximum(self.max_val, high))
                else:
                    self.min_val.lerp_(low, self.momentum)
                    self.max_val.lerp_(high, self.momentum)
        if not self.enabled:
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(
            x, torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.int32),
            ACT_QMIN, ACT_QMAX)

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) computed like onnxruntime.quantization.quant_utils.compute_scale_zp."""
        if not torch.isfinite(self.min_val) or not torch.isfinite(self.max_val):
            raise QatError("activation range was never observed: calibrate before enabling fake quantization")
        rmin = min(float(self.min_val), 0.0)
        rmax = max(float(self.max_val), 0.0)
        scale = np.float32((rmax - rmin) / (ACT_QMAX - ACT_QMIN))
        if scale < np.finfo(np.float32).tiny:
            return 1.0, 0
        zero_point = int(np.clip(np.round(ACT_QMIN - np.float32(rmin) / np.float64(scale)), ACT_QMIN, ACT_QMAX))
        return float(scale), zero_point


def fake_quant_weight(weight: torch.Tensor, bits: int = DEFAULT_WEIGHT_BITS) -> torch.Tensor:
    """int8 symmetric per-output-channel fake quantization, ORT's weight scheme (scale = 2 max|w| / (qmax - qmin))."""
    if bits not in WEIGHT_RANGES:
        raise QatError(f"weight bits must be one of {sorted(WEIGHT_RANGES)}, got {bits!r}")
    qmin, qmax = WEIGHT_RANGES[bits]
    absmax = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).double()
    scale = (2 * absmax / (qmax - qmin)).float()
    scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, qmin, qmax)


class QuantConv(nn.Module):
    """An Ultralytics Conv block (BN folded into the conv) with ORT-matching fake quantization."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module, weight_bits: int = DEFAULT_WEIGHT_BITS):
        super().__init__()
        if conv.bias is None:
            raise QatError("QuantConv expects a conv with the BatchNorm folded into its bias")
        self.conv = conv
        self.act = act
        self.input_quant = ActivationQuant()  # replaced by a shared one when several convs read one tensor
        self.output_quant = ActivationQuant()
        self.quantize_weight = False
        self.weight_bits = weight_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        bits = getattr(self, "weight_bits", DEFAULT_WEIGHT_BITS)  # checkpoints pickled before it existed
        weight = fake_quant_weight(self.conv.weight, bits) if self.quantize_weight else self.conv.weight
        c = self.conv
        y = F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return self.act(self.output_quant(y))


def quant_convs(model: nn.Module) -> dict[str, QuantConv]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantConv)}


def activation_quants(model: nn.Module) -> list[ActivationQuant]:
    unique = {id(m): m for m in model.modules() if isinstance(m, ActivationQuant)}
    return list(unique.values())


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuantConv):
            m.quantize_weight = enabled
        if isinstance(m, ActivationQuant):
            m.enabled = enabled


def set_observers(model: nn.Module, observe: bool, momentum: float | None = None) -> None:
    for m in activation_quants(model):
        m.observe, m.momentum = observe, momentum


def insert_quant_convs(model: nn.Module, activation: str, weight_bits: int = DEFAULT_WEIGHT_BITS) -> int:
    """Fold BatchNorm into every conv, then replace each Ultralytics Conv block that has an activation by a
    QuantConv with `weight_bits` weights. activation "relu" swaps SiLU for ReLU on the way. Returns how many
    were replaced."""
    from ultralytics.nn.modules.conv import Conv, DWConv

    model.fuse(verbose=False)
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) not in (Conv, DWConv) or hasattr(module, "bn") or isinstance(module.act, nn.Identity):
            continue
        act = nn.ReLU() if activation == "relu" else module.act
        new = QuantConv(module.conv, act, weight_bits)
        for attr in _LAYER_ATTRS:
            if hasattr(module, attr):
                setattr(new, attr, getattr(module, attr))
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)
        replaced += 1
    if not replaced:
        raise QatError("the model has no Ultralytics Conv blocks with an activation to quantize")
    return replaced


# ----------------------------------------------------------------------------------------------
# Torch module <-> ONNX tensor mapping


def map_convs_to_onnx(model: nn.Module, onnx_path: Path) -> dict[str, tuple[str, str]]:
    """For each QuantConv: (ONNX input tensor, ONNX output tensor) of the Conv node holding its weights.

    Matched by weight values, not node names, so it holds for any structure and any exporter naming.
    """
    graph = int8.load_onnx(onnx_path).graph
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    nodes_by_shape: dict[tuple, list] = {}
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            nodes_by_shape.setdefault(weights[node.input[1]].shape, []).append(node)
    mapping = {}
    for name, qc in quant_convs(model).items():
        w = qc.conv.weight.detach().float().numpy()
        matches = [n for n in nodes_by_shape.get(w.shape, []) if np.allclose(weights[n.input[1]], w, rtol=1e-5, atol=1e-7)]
        if len(matches) != 1:
            raise QatError(f"{onnx_path}: found {len(matches)} Conv nodes with the weights of {name}, expected 1")
        mapping[name] = (matches[0].input[0], matches[0].output[0])
    return mapping


def share_input_observers(model: nn.Module, mapping: dict[str, tuple[str, str]]) -> int:
    """Convs reading the same ONNX tensor get one input observer: ORT gives that tensor one (scale, zp)."""
    convs = quant_convs(model)
    first_reader: dict[str, QuantConv] = {}
    shared = 0
    for name, (input_tensor, _) in mapping.items():
        if input_tensor in first_reader:
            convs[name].input_quant = first_reader[input_tensor].input_quant
            shared += 1
        else:
            first_reader[input_tensor] = convs[name]
    return shared


def activation_qparams(model: nn.Module, mapping: dict[str, tuple[str, str]]) -> dict[str, tuple[float, int]]:
    """ONNX tensor name -> (scale, zero_point) learned by the QAT observers."""
    convs = quant_convs(model)
    qparams: dict[str, tuple[float, int]] = {}
    for name, (input_tensor, output_tensor) in mapping.items():
        for tensor, quant in ((input_tensor, convs[name].input_quant), (output_tensor, convs[name].output_quant)):
            value = quant.qparams()
            if tensor in qparams and qparams[tensor] != value:
                raise QatError(f"ONNX tensor {tensor} would get two different quantization parameters")
            qparams[tensor] = value
    return qparams


# ----------------------------------------------------------------------------------------------
# Checkpoints and export


def save_checkpoint(model: nn.Module, path: Path, base_ckpt: dict, **extra) -> Path:
    """An Ultralytics-style checkpoint that `YOLO(path)` loads, kept in float32: halving the latent
    weights would move them across rounding boundaries and break parity with the INT8 ONNX."""
    return surgery.save_checkpoint(model, path, base_ckpt, half=False, **extra)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """(the fake-quant model in float32 eval mode, the checkpoint dict) of a `save_checkpoint` file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["model"].float().eval(), ckpt


def export_float_onnx(model: nn.Module, base_ckpt: dict, out_onnx: Path, params: Params) -> Path:
    """The QAT model's BN-folded float weights as an Ultralytics ONNX export (fake quantization off)."""

    float_model = copy.deepcopy(model)
    set_fake_quant(float_model, False)
    set_observers(float_model, False)
    with tempfile.TemporaryDirectory(prefix="qat-export-") as tmp:
        pt = save_checkpoint(float_model, Path(tmp) / "float.pt", base_ckpt)
        return export_fp32_onnx(pt, out_onnx, params.train.imgsz, params.export.opset, params.export.simplify)


# ----------------------------------------------------------------------------------------------
# Calibration and fine-tuning


@torch.no_grad()
def calibrate(model: nn.Module, calib_images: list[Path], imgsz: int) -> None:
    """Running min/max of every quantized tensor over the calibration images, fake quantization off."""
    model.eval()
    set_fake_quant(model, False)
    set_observers(model, True, momentum=None)
    for image in calib_images:
        model(torch.from_numpy(int8.letterboxed_input(image, imgsz, imgsz)))
    set_observers(model, False)


def finetune(model: nn.Module, data_yaml: Path, params: Params, log: list, what: str = "", teacher=None) -> None:
    """QAT: params.qat.epochs of training with fake quantization on, Ultralytics' dataset and loss (plus
    distillation from `teacher`, a pipeline.distill.Teacher, when given).

    Activation ranges follow the batches (EMA) in all but the last epoch and are frozen in the last one,
    so the weights settle on the ranges that will be exported. Mosaic is off, as in Ultralytics' final
    `close_mosaic` epochs: this is fine-tuning toward the deployment distribution.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    epochs = params.qat.epochs
    if epochs <= 0:
        return
    torch.manual_seed(params.train.seed)
    cfg = get_cfg(overrides={"imgsz": params.train.imgsz, "batch": params.train.batch, "mosaic": 0.0,
                             "workers": 0, "seed": params.train.seed})
    data = check_det_dataset(str(data_yaml))
    stride = int(max(model.stride.max(), 32))
    dataset = build_yolo_dataset(cfg, data["train"], params.train.batch, data, mode="train", stride=stride)
    loader = build_dataloader(dataset, params.train.batch, workers=0, shuffle=True, pin_memory=False, device="cpu")

    model.args = cfg  # v8DetectionLoss reads its box/cls/dfl gains from model.args
    model.criterion = None
    for name, p in model.named_parameters():
        p.requires_grad_(".dfl" not in name)  # DFL's conv is a fixed arange, never trained
    lr0 = params.qat.lr0 if params.qat.lr0 is not None else params.train.lr0 * QAT_LR_FACTOR
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr0, momentum=0.937,
                                nesterov=True)
    if params.prune.method != "structured":  # unstructured pruning's zeros must not regrow in QAT
        sparsity.keep_zeros(model, optimizer)
    if teacher is not None:
        adapters = list(distill.attach(model, teacher, params.distill).parameters())
        if adapters:
            optimizer.add_param_group({"params": adapters})
    steps = epochs * len(loader)
    step = 0
    set_fake_quant(model, True)
    progress = Progress(f"qat {what} epoch", epochs)
    for epoch in range(epochs):
        last = epoch == epochs - 1 and epochs > 1
        set_observers(model, not last, momentum=EMA_MOMENTUM)
        model.train()
        start, total = time.time(), 0.0
        for batch in loader:
            for group in optimizer.param_groups:  # cosine decay to 1% of lr0
                group["lr"] = lr0 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            batch["img"] = batch["img"].float() / 255
            loss, _ = model.loss(batch)
            loss = loss.sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            optimizer.step()
            total += float(loss.detach())
            step += 1
        log.append({"epoch": epoch + 1, "loss": total / max(len(loader), 1), "seconds": round(time.time() - start, 1),
                    "ranges_frozen": last, "lr0": lr0})
        progress.step(epoch_details(log[-1]["loss"], None, log[-1]["seconds"]))
    set_observers(model, False)
    model.criterion = None  # also drops a distilling criterion: the checkpoint must not pickle the teacher
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


# ----------------------------------------------------------------------------------------------
# Gates


# ----------------------------------------------------------------------------------------------
# The stage


def _measure_onnx(path: Path, data_yaml: Path, params: Params) -> dict:

    metrics = evaluate(path, data_yaml, params)
    kernels = int8.count_integer_kernels(path)
    e = params.evaluate
    metrics.update({
        "integer_convs": kernels["integer_convs"], "float_convs": kernels["float_convs"],
        "qlinear_sigmoid": kernels["QLinearSigmoid"], "qlinear_mul": kernels["QLinearMul"],
        **int8.int8_initializer_bytes(path),
        "latency_ms_1thr": latency.median_ms(path, 1, e.warmup, e.runs),
        "latency_ms_2thr": latency.median_ms(path, 2, e.warmup, e.runs),
    })
    return metrics


def _qat_variant(activation: str, pruned_pt: Path, data_yaml: Path, params: Params, calib_images: list[Path],
                 out_dir: Path, work: Path, weight_bits: int = DEFAULT_WEIGHT_BITS, teacher=None) -> dict:
    """QAT one activation variant; returns its torch checkpoint, float ONNX and activation qparams."""
    from pipeline.surgery import load_detection_model

    model, base_ckpt = load_detection_model(pruned_pt)
    insert_quant_convs(model, activation, weight_bits)
    # A first export only tells which convs read the same tensor, so they can share one observer.
    probe = export_float_onnx(model, base_ckpt, work / f"{activation}_probe.onnx", params)
    share_input_observers(model, map_convs_to_onnx(model, probe))
    calibrate(model, calib_images, params.train.imgsz)
    log: list = []
    finetune(model, data_yaml, params, log, what=activation, teacher=teacher)

    torch_pt = save_checkpoint(model, out_dir / f"qat_{activation}_model.pt", base_ckpt,
                               qat={"activation": activation, "epochs": params.qat.epochs,
                                    "weight_bits": weight_bits})
    float_onnx = export_float_onnx(model, base_ckpt, work / f"qat_{activation}_fp32.onnx", params)
    qparams = activation_qparams(model, map_convs_to_onnx(model, float_onnx))
    return {"torch_pt": torch_pt, "float_onnx": float_onnx, "qparams": qparams, "log": log}


def run(ws: Workspace) -> dict:
    """Stage `qat`: INT8 candidates and the chosen model_int8.onnx in outputs/qat; registers it as `qat`."""
    from pipeline.gates import publish

    float_models = {"control": read_json(ws.input("outputs/control/metrics.json")),
                    "pruned": read_json(ws.input("outputs/prune/metrics.json"))}
    out_dir = ws.stage_dir()
    metrics = run_qat(ws.input("outputs/prune/best.pt"), ws.data_yaml(), ws.params, out_dir, float_models,
                      teacher=distill.stage_teacher(ws))
    gate = publish(ws, files={"model_int8.onnx": out_dir / "model_int8.onnx"}, primary="model_int8.onnx",
                   metrics=metrics, gates=ws.params.qat.gates, reference=best_float_model(float_models)[1],
                   reference_latency_ms=metrics["reference_fp32_latency_ms"])
    return {"metrics": metrics, "gate": gate}


CHOICE_RULE = ("of the candidates that pass every gate, the fastest whose mAP50-95 is within choice_tolerance of "
               "the most accurate passing one; if none passes, the most accurate (and the stage fails)")


def choose_candidate(candidates: dict[str, dict], tolerance: float) -> tuple[str, dict]:
    """(chosen name, why) by CHOICE_RULE. Candidates need "passed" and metrics' "map50_95" and "latency_ms"."""
    passing = [n for n, c in candidates.items() if c["passed"]]
    accuracy = {n: c["metrics"]["map50_95"] for n, c in candidates.items()}
    if not passing:
        chosen = max(candidates, key=accuracy.get)
        return chosen, {"rule": CHOICE_RULE, "passing": [], "chosen": chosen,
                        "why": "no candidate passes its gates: the most accurate is kept for the record"}
    most_accurate = max(passing, key=accuracy.get)
    eligible = [n for n in passing if accuracy[n] >= accuracy[most_accurate] - tolerance]
    chosen = min(eligible, key=lambda n: (candidates[n]["metrics"]["latency_ms"], -accuracy[n]))
    why = (f"{chosen} is the most accurate passing candidate and the fastest within {tolerance} of it"
           if chosen == most_accurate else
           f"{chosen} is the fastest passing candidate within {tolerance} mAP50-95 of the most accurate, "
           f"{most_accurate} ({accuracy[chosen]:.4f} vs {accuracy[most_accurate]:.4f}; "
           f"{candidates[chosen]['metrics']['latency_ms']:.2f} vs "
           f"{candidates[most_accurate]['metrics']['latency_ms']:.2f} ms)")
    return chosen, {"rule": CHOICE_RULE, "tolerance": tolerance, "passing": passing, "eligible": eligible,
                    "most_accurate": most_accurate, "chosen": chosen, "why": why}


def run_qat(pruned_pt: str | Path, data_yaml: str | Path, params: Params, out_dir: str | Path,
            float_models: dict[str, dict], teacher=None) -> dict:
    """Fine-tune with fake quantization, build every INT8 candidate, measure them, pick the gate winner.

    Writes out_dir/{qat_int8.onnx, qat_qsilu_int8.onnx, qat_relu_int8.onnx, ptq_int8.onnx} (as the
    activation setting allows) and their torch twins qat_<activation>_model.pt, pruned_fp32.onnx (the
    reference), model_int8.onnx (the chosen candidate), qat_model.pt (its torch twin: the fake-quant QAT
    model export's parity check compares with; for a PTQ choice the pruned float model it quantized),
    candidates.json and metrics.json.
    Returns the metrics.json content; "passed" is False (with reasons) when no candidate passes.
    `teacher`: a pipeline.distill.Teacher the QAT fine-tuning distils from, recorded in the metrics.
    """

    pruned_pt, data_yaml, out_dir = Path(pruned_pt), Path(data_yaml), Path(out_dir)
    if not pruned_pt.is_file():
        raise QatError(f"{pruned_pt}: pruned checkpoint not found")
    if not float_models or any("map50_95" not in m for m in float_models.values()):
        raise QatError("float_models need their 'map50_95': the accuracy gate is relative to the best of them")
    reference_name, reference_float = best_float_model(float_models)
    q = params.qat
    out_dir.mkdir(parents=True, exist_ok=True)
    calib_images = int8.calibration_image_paths(data_yaml, q.calib_images)
    activations = {"auto": ["silu", "relu"], "silu": ["silu"], "relu": ["relu"]}[q.activation]
    target_cpu = int8.resolve_target_cpu(q.target_cpu)
    weight_bits = int8.weight_bits_for(target_cpu)
    quantization = {"weight_bits": weight_bits, "target_cpu": target_cpu}

    # The reference: the pruned model as FP32 ONNX, measured here under the same conditions as the candidates.
    reference_onnx = export_fp32_onnx(pruned_pt, out_dir / "pruned_fp32.onnx", params.train.imgsz,
                                      params.export.opset, params.export.simplify)
    reference = _measure_onnx(reference_onnx, data_yaml, params)

    candidates: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qat-", dir=out_dir) as tmp:
        work = Path(tmp)
        for activation in activations:
            variant = _qat_variant(activation, pruned_pt, data_yaml, params, calib_images, out_dir, work,
                                   weight_bits, teacher)
            torch_metrics = int8.torch_accuracy_square(variant["torch_pt"], data_yaml, params)
            builds = [("qat_int8" if activation == "silu" else f"qat_{activation}_int8", False)]
            if activation == "silu":
                builds.append(("qat_qsilu_int8", True))
            for name, quantize_silu in builds:
                path = out_dir / f"{name}.onnx"
                info = int8.quantize_onnx(variant["float_onnx"], path, calib_images,
                                          activation_qparams=variant["qparams"], quantize_silu=quantize_silu,
                                          **quantization)
                candidates[name] = {"path": str(path), "method": "qat", "activation": activation,
                                    "silu_quantized": quantize_silu, "quantization": info,
                                    "qat_torch_pt": str(variant["torch_pt"]),
                                    "qat_torch_map50_95": torch_metrics["map50_95"], "qat_log": variant["log"]}
        if q.ptq:
            path = out_dir / "ptq_int8.onnx"
            info = int8.quantize_onnx(reference_onnx, path, calib_images, **quantization)
            candidates["ptq_int8"] = {"path": str(path), "method": "ptq", "activation": "silu",
                                      "silu_quantized": False, "quantization": info, "qat_torch_pt": None}

    for name, candidate in candidates.items():
        candidate["metrics"] = _measure_onnx(Path(candidate["path"]), data_yaml, params)
        if candidate["method"] == "qat":  # what export's parity check will find (it is not a gate here)
            candidate["parity"] = int8.parity_verdict(candidate["metrics"]["map50_95"], candidate["qat_torch_map50_95"])
    # Adds a <base>_mixed candidate (some convs back in float) when the accuracy floor calls for it.
    mixed = mixed_precision.run_mixed_precision(candidates, reference_float, reference_onnx, data_yaml, params,
                                                out_dir, calib_images, _measure_onnx)
    # Gate and choice use latencies measured in turns: candidates differ by a few percent and measuring each
    # once, minutes apart, ranked them by the machine's load (seen: the same file at 5.9 and 13.8 ms). The
    # evaluator's own single measurement stays in the metrics as eval_latency_ms.
    e = params.evaluate
    paths = {"reference": reference_onnx, **{n: Path(c["path"]) for n, c in candidates.items()}}
    latencies = {name: m["median_ms"] for name, m in latency.interleaved(paths, e.threads, e.warmup, e.runs).items()}
    reference["eval_latency_ms"], reference["latency_ms"] = reference["latency_ms"], latencies["reference"]
    for name, candidate in candidates.items():
        m = candidate["metrics"]
        m["eval_latency_ms"], m["latency_ms"] = m["latency_ms"], latencies[name]
        checks = gates.check(m, q.gates, reference_float, reference["latency_ms"])
        candidate["gate_failures"] = gates.failures(checks)
        candidate["passed"] = not candidate["gate_failures"]

    chosen, choice = choose_candidate(candidates, q.choice_tolerance)
    model_int8 = copy_file(candidates[chosen]["path"], out_dir / "model_int8.onnx")
    copy_file(candidates[chosen]["qat_torch_pt"] or pruned_pt, out_dir / "qat_model.pt")

    write_json(out_dir / "candidates.json", {"reference_pruned_fp32": reference, "candidates": candidates})
    c = candidates[chosen]
    metrics = {
        **c["metrics"],
        "chosen": chosen,
        "passed": c["passed"],
        # qat.target_cpu as resolved on this machine, and the weight bits it implies (also in the ONNX metadata)
        "target_cpu": target_cpu,
        "target_cpu_param": q.target_cpu,
        "weight_bits": weight_bits,
        "gate_failures": c["gate_failures"],
        "why_none_passed": None if choice["passing"] else {n: cand["gate_failures"] for n, cand in candidates.items()},
        "model_int8": model_int8.name,
        # qat_model.pt is the fake-quant twin of model_int8.onnx only when a QAT candidate was chosen
        "qat_torch_pt": "qat_model.pt" if c["qat_torch_pt"] else None,
        "qat_torch_map50_95": c.get("qat_torch_map50_95"),  # square letterbox, as in export's parity check
        "parity": c.get("parity"),
        "choice": choice,
        "accuracy_reference": reference_name,  # the best float model, what max_map_drop is measured against
        "accuracy_reference_map50_95": reference_float["map50_95"],
        "map_drop_vs_reference": reference_float["map50_95"] - c["metrics"]["map50_95"],
        **{f"{name}_map50_95": m["map50_95"] for name, m in float_models.items()},
        "reference_fp32_latency_ms": reference["latency_ms"],
        "reference_fp32_file_mb": reference["file_mb"],
        # Every candidate quantizes the same convs; these stay float, and why (the family's head and attention).
        "float_layers": int8.float_conv_reasons(int8.load_onnx(reference_onnx)),
        "distill": distill.record(teacher, params.distill),
        "mixed_precision": mixed,
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics
