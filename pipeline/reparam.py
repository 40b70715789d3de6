"""Re-parameterization: multi-branch blocks trained as several convolutions, deployed as one.

YOLOv9's RepNCSPELAN4 holds RepCSP blocks whose bottlenecks start with a `RepConv` (RepConvN in the paper):
a 3x3 conv + BatchNorm and a 1x1 conv + BatchNorm on the same input, summed before the activation. Both
branches are linear, so they equal one 3x3 conv with a bias: the 1x1 kernel padded to 3x3 and each branch's
BatchNorm folded in (Ultralytics' `RepConv.fuse_convs` does the arithmetic). `reparameterize` replaces every
such block by a plain Ultralytics `Conv` holding that one conv, so the rest of the pipeline sees the model it
will deploy: pruning removes channels of one conv instead of keeping two branches consistent, and QAT
fake-quantizes the weights the INT8 graph will hold (quantizing each branch separately and summing in float
is not what ONNX Runtime runs).

BatchNorm: the branches' BatchNorms are folded into the fused conv, because three normalizations cannot be
one with the statistics kept. Every other BatchNorm stays until the model stops training (QAT folds them
before fake quantization, the ONNX export folds them), since the prune stage still fine-tunes.

The other families (v5u, v8, 11, 26) have no re-parameterizable block; `reparameterize` finds none and the
model is unchanged. The ONNX export already fused RepConv on its own (Ultralytics' exporter calls
`model.fuse()`), so the FP32 ONNX latency does not change; what changes is the torch model every stage
prunes, fine-tunes and quantizes (`report` measures parameters and torch latency before and after).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

# Attributes Ultralytics' DetectionModel routing needs on a top-level layer (a RepConv never is one, but a
# replacement must not lose them if it were).
_LAYER_ATTRS = ("f", "i", "type", "np")


def fused_conv(block: nn.Module) -> nn.Module:
    """An Ultralytics `Conv` (conv with bias, no BatchNorm, the block's activation) equal to a RepConv block."""
    from ultralytics.nn.modules.conv import Conv

    kernel, bias = block.get_equivalent_kernel_bias()
    reference = block.conv1.conv
    conv = nn.Conv2d(reference.in_channels, reference.out_channels, reference.kernel_size, reference.stride,
                     reference.padding, reference.dilation, reference.groups, bias=True)
    conv.weight = nn.Parameter(kernel.detach().clone())
    conv.bias = nn.Parameter(bias.detach().clone())
    new = Conv(reference.in_channels, reference.out_channels)
    new.conv = conv
    del new.bn
    new.act = block.act
    new.forward = new.forward_fuse  # what Ultralytics' own fuse() does for a Conv without BatchNorm
    for attr in _LAYER_ATTRS:
        if hasattr(block, attr):
            setattr(new, attr, getattr(block, attr))
    new.train(block.training)
    return new


def reparameterize(model: nn.Module) -> int:
    """Replace every re-parameterizable block (RepConv) inside `model` by its one-conv equivalent, in place.

    Returns how many blocks were fused (0 for the families that have none)."""
    from ultralytics.nn.modules.conv import RepConv

    fused = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RepConv) and not hasattr(child, "conv"):  # `conv` exists once already fused
                setattr(parent, name, fused_conv(child))
                fused += 1
    return fused


def _torch_latency_ms(model: nn.Module, x: torch.Tensor, runs: int) -> float:
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def report(model: nn.Module, imgsz: int, runs: int = 20) -> dict:
    """Re-parameterize a copy of `model` and measure what that alone changes.

    Returns {"blocks_fused", "params_before", "params_after", "torch_ms_before", "torch_ms_after",
    "max_abs_diff"}: the largest output difference on one random image says the fused model computes the same
    function (float rounding only). Latencies are eager PyTorch on CPU at batch 1, median of `runs`; the ONNX
    export fuses these blocks itself, so ONNX Runtime latency does not change. No measurement when nothing is
    fused (the latencies are then None).
    """
    before = copy.deepcopy(model).float().eval()
    after = copy.deepcopy(before)
    fused = reparameterize(after)
    result = {"blocks_fused": fused,
              "params_before": sum(p.numel() for p in before.parameters()),
              "params_after": sum(p.numel() for p in after.parameters()),
              "torch_ms_before": None, "torch_ms_after": None, "max_abs_diff": 0.0}
    if not fused:
        return result
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_before, y_after = before(x), after(x)
    y_before = y_before[0] if isinstance(y_before, (tuple, list)) else y_before
    y_after = y_after[0] if isinstance(y_after, (tuple, list)) else y_after
    result["max_abs_diff"] = float((y_before - y_after).abs().max())
    result["torch_ms_before"] = round(_torch_latency_ms(before, x, runs), 3)
    result["torch_ms_after"] = round(_torch_latency_ms(after, x, runs), 3)
    return result


def checkpoint_report(pt_path, imgsz: int) -> dict:
    """`report` for an Ultralytics checkpoint as saved by training (its re-parameterizable blocks unfused)."""
    from pipeline.surgery import load_raw_model

    return report(load_raw_model(pt_path), imgsz)
