"""Unstructured pruning: global magnitude sparsity of the conv weights, reached gradually over the prune steps
with fine-tuning, made permanent (plain zeros in the weights, no masks or hooks left in the model).

Global: one magnitude threshold over every prunable conv weight, so layers with many small weights give up
more than layers with few. Step k of N zeroes the smallest k/N * `prune.sparsity` of them (weights already
zero count first, so the set only grows); fine-tuning then runs with the zeros held by an optimizer
post-step hook, so neither momentum nor weight decay regrows them and the EMA the trainer keeps only ever
averages zeros there. Prunable: every Conv2d except the head's final box/class convs and the DFL, which
structured pruning leaves whole too (surgery.ignored_head_layers).

What it buys: the zeros survive export (ONNX initializers, INT8 weights quantize 0 to 0) and the file
compresses (gzip), but ONNX Runtime's CPU convolutions are dense, so there is no speed-up; measured numbers
are in the README.
"""
from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class SparsityError(RuntimeError):
    pass


def prunable_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    from pipeline.surgery import ignored_head_layers

    ignored = {id(m) for head in ignored_head_layers(model) for m in head.modules()}
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in ignored}


def measure(model: nn.Module) -> dict:
    """Zeros among the prunable conv weights."""
    weights = [m.weight.detach() for m in prunable_convs(model).values()]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"prunable_weights": total, "zero_weights": zeros, "sparsity": zeros / total if total else 0.0}


class Sparsifier:
    """Global magnitude masks for one model, recomputed at each step; `hold` keeps the zeros while training."""

    def __init__(self, model: nn.Module, target: float):
        if not 0 <= target < 1:
            raise SparsityError(f"prune.sparsity must be in [0, 1), got {target}")
        self.model, self.target = model, target
        self.masks: dict[str, torch.Tensor] = {}

    def step(self, step: int, steps: int) -> dict:
        """Zero the smallest step/steps * target of the prunable weights (global threshold); returns measure()."""
        convs = prunable_convs(self.model)  # looked up again: structured pruning may have replaced the weights
        fraction = self.target * step / steps
        magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in convs.values()])
        k = int(round(fraction * magnitudes.numel()))
        if k == 0:
            self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in convs.items()}
        else:
            # Rank, not a threshold value: ties (many exact zeros) must not push the count past k.
            order = torch.argsort(magnitudes, stable=True)
            keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
            keep[order[:k]] = False
            self.masks, offset = {}, 0
            for name, m in convs.items():
                n = m.weight.numel()
                self.masks[name] = keep[offset:offset + n].view_as(m.weight)
                offset += n
        self.apply()
        return measure(self.model)

    @torch.no_grad()
    def apply(self) -> None:
        convs = prunable_convs(self.model)
        for name, mask in self.masks.items():
            weight = convs[name].weight
            if weight.shape != mask.shape:
                raise SparsityError(f"{name}: weight shape {tuple(weight.shape)} changed since its mask was made")
            weight.mul_(mask.to(weight.dtype))

    def hold(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every optimizer step; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.apply())

    def attach_to_trainer(self, trainer) -> None:
        """Hold the zeros inside Ultralytics' trainer, whose optimizer exists once training starts."""
        trainer.add_callback("on_train_start", lambda tr: self.hold(tr.optimizer))


def keep_zeros(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Hold the zeros a sparse model already has (QAT after unstructured pruning): masks from its own weights."""
    sparsifier = Sparsifier(model, 0.0)
    sparsifier.masks = {name: m.weight.detach() != 0 for name, m in prunable_convs(model).items()}
    return sparsifier.hold(optimizer)


def onnx_zeros(onnx_path: str | Path) -> dict:
    """Zeros among the weight initializers (rank 4: conv kernels) of an ONNX file, float or int8."""
    import onnx

    model = onnx.load(str(onnx_path))
    total = zeros = 0
    for init in model.graph.initializer:
        if len(init.dims) == 4:
            array = onnx.numpy_helper.to_array(init)
            total += array.size
            zeros += int(np.count_nonzero(array == 0))
    return {"conv_weights": total, "zero_weights": zeros, "sparsity": zeros / total if total else 0.0}


def file_sizes(path: str | Path) -> dict:
    """Plain and gzip-compressed (level 9) size of a file: what sparsity saves is only the compressed one."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9))}


def report(pt_path: str | Path, params) -> dict:
    """Sparsity of a checkpoint and of its FP32 ONNX export, with the ONNX sizes plain and gzip-compressed."""
    from pipeline.evaluate import export_fp32_onnx
    from pipeline.surgery import load_detection_model

    model, _ = load_detection_model(pt_path)
    with tempfile.TemporaryDirectory(prefix="sparsity-") as tmp:
        onnx_path = export_fp32_onnx(Path(pt_path), Path(tmp) / "model.onnx", params.train.imgsz,
                                     params.export.opset, params.export.simplify)
        sizes = file_sizes(onnx_path)
        in_onnx = onnx_zeros(onnx_path)
    return {**measure(model), "onnx_sparsity": in_onnx["sparsity"], "onnx_bytes": sizes["bytes"],
            "onnx_gzip_bytes": sizes["gzip_bytes"]}
