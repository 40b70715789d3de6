"""Model surgery that makes an Ultralytics YOLO detector prunable with Torch-Pruning, and the helpers the
sensitivity and prune stages share.

Why surgery is needed: Ultralytics' C2f block computes `cv1(x).chunk(2, 1)`, one convolution whose output is
split in two halves that go different ways (one straight into the final concat, one through the bottlenecks).
Torch-Pruning's dependency graph cannot follow that split, so `C2f` is rewritten as `C2fSplit`: two
convolutions, each producing one of the halves. The rewrite is exact (the two convolutions hold the two halves
of the original weights and BatchNorm statistics), so outputs match the original to float rounding.

`C2fSplit` must stay importable as `pipeline.surgery.C2fSplit`: pruned checkpoints pickle the module class by
its import path, so `YOLO("pruned.pt")` needs `pipeline` on the Python path.

A "group" is one set of channels Torch-Pruning must remove together (a convolution's outputs plus every layer
that consumes or is added to them). It is named by its root convolution's module name in the rewritten model,
e.g. "model.2.cv1_b.conv"; names are stable for a given model YAML/scale.
"""
from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.io import atomic_write

# Ultralytics attributes every layer of a DetectionModel carries (input index, layer index, type name, params):
# `_predict_once` routes tensors with `f` and `i`, so a replacement layer must keep them.
_LAYER_ATTRS = ("f", "i", "type", "np")


class C2fSplit(nn.Module):
    """C2f with its `cv1` split into two convolutions (`cv1_a` -> first half, `cv1_b` -> second half).

    Same computation as Ultralytics' C2f (and C3k2, which only differs in what `m` holds), but every tensor
    is produced by its own convolution, which Torch-Pruning can trace and prune.
    """

    def __init__(self, cv1_a: nn.Module, cv1_b: nn.Module, cv2: nn.Module, m: nn.ModuleList):
        super().__init__()
        self.cv1_a = cv1_a
        self.cv1_b = cv1_b
        self.cv2 = cv2
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1_a(x), self.cv1_b(x)]
        y.extend(block(y[-1]) for block in self.m)
        return self.cv2(torch.cat(y, 1))


def _slice_conv(conv_module: nn.Module, start: int, stop: int) -> nn.Module:
    """Copy of an Ultralytics `Conv` (conv + bn + act) keeping only output channels [start, stop)."""
    part = copy.deepcopy(conv_module)
    conv = part.conv
    conv.weight = nn.Parameter(conv.weight.data[start:stop].clone())
    if conv.bias is not None:  # fused models carry the BatchNorm in the conv bias
        conv.bias = nn.Parameter(conv.bias.data[start:stop].clone())
    conv.out_channels = stop - start
    bn = getattr(part, "bn", None)
    if isinstance(bn, nn.BatchNorm2d):
        bn.weight = nn.Parameter(bn.weight.data[start:stop].clone())
        bn.bias = nn.Parameter(bn.bias.data[start:stop].clone())
        bn.running_mean = bn.running_mean[start:stop].clone()
        bn.running_var = bn.running_var[start:stop].clone()
        bn.num_features = stop - start
    return part


def split_c2f(block: nn.Module) -> C2fSplit:
    """Build the exact two-convolution equivalent of one C2f block."""
    half = block.c
    total = block.cv1.conv.out_channels
    if total != 2 * half:
        raise ValueError(f"C2f block has cv1 with {total} outputs, expected 2 x {half}: already pruned or not a C2f")
    new = C2fSplit(_slice_conv(block.cv1, 0, half), _slice_conv(block.cv1, half, total), block.cv2, block.m)
    for attr in _LAYER_ATTRS:
        if hasattr(block, attr):
            setattr(new, attr, getattr(block, attr))
    new.train(block.training)
    return new


def rewrite_c2f(model: nn.Module) -> int:
    """Replace every C2f (and subclasses such as C3k2) inside `model` in place; return how many were replaced."""
    from ultralytics.nn.modules.block import C2f

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, C2f):
                setattr(parent, name, split_c2f(child))
                replaced += 1
    return replaced


def load_detection_model(pt_path: str | Path) -> tuple[nn.Module, dict]:
    """Load an Ultralytics checkpoint as an FP32 model on CPU in eval mode, C2f blocks rewritten.

    Returns (model, checkpoint dict). Raises FileNotFoundError/ValueError naming the file on bad input.
    """
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    pt_path = Path(pt_path)
    if not pt_path.is_file():
        raise FileNotFoundError(f"{pt_path}: checkpoint not found")
    try:
        model, ckpt = load_checkpoint(str(pt_path), device="cpu")
    except Exception as e:  # Ultralytics raises TypeError/RuntimeError/... for unreadable files
        raise ValueError(f"{pt_path}: not a loadable Ultralytics checkpoint: {e}") from e
    if not isinstance(model, DetectionModel):
        raise ValueError(f"{pt_path}: expected a YOLO detection model, got {type(model).__name__}")
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(True)  # stripped checkpoints freeze everything; pruning and training need gradients on
    rewrite_c2f(model)
    return model, ckpt


def ignored_head_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must never be pruned: the Detect head's final box/class convs and DFL.

    Their output channel counts are the box distribution bins and class count, fixed by the task.
    """
    from ultralytics.nn.modules.head import Detect

    ignored: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, Detect):
            for head_name in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
                head = getattr(m, head_name, None)
                if head is not None:
                    ignored.extend(branch[-1] for branch in head)
            ignored.append(m.dfl)
    return ignored


def _first_tensor(output):
    # Detect returns (decoded predictions, raw dict) in eval mode; tracing only needs the decoded tensor.
    return output[0] if isinstance(output, (tuple, list)) else output


def build_dependency_graph(model: nn.Module, imgsz: int):
    """Torch-Pruning dependency graph of `model` traced with one imgsz x imgsz image."""
    import torch_pruning as tp

    example = torch.randn(1, 3, imgsz, imgsz)
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=_first_tensor)
    model.train(was_training)
    return graph


def prunable_groups(model: nn.Module, graph) -> dict[str, object]:
    """{group id: Torch-Pruning group} for every channel group whose root convolution may be pruned."""
    module_names = {m: name for name, m in model.named_modules()}
    groups = {}
    for group in graph.get_all_groups(ignored_layers=ignored_head_layers(model), root_module_types=[nn.Conv2d]):
        root = group[0][0].target.module
        groups[module_names[root]] = group
    return groups


def prune_group(model: nn.Module, graph, group_id: str, keep: int) -> int:
    """Prune the group rooted at `group_id` down to `keep` channels (lowest L2 magnitude first); return removed."""
    import torch_pruning as tp

    root = dict(model.named_modules()).get(group_id)
    if root is None:
        raise KeyError(f"group {group_id!r} is not a module of this model")
    n_channels = root.out_channels
    n_remove = n_channels - max(1, min(keep, n_channels))
    if n_remove <= 0:
        return 0
    full_group = graph.get_pruning_group(root, tp.prune_conv_out_channels, list(range(n_channels)))
    importance = tp.importance.GroupMagnitudeImportance(p=2)(full_group)
    remove_idxs = torch.argsort(importance)[:n_remove].tolist()
    graph.get_pruning_group(root, tp.prune_conv_out_channels, remove_idxs).prune()
    return n_remove


def count_params_macs(model: nn.Module, imgsz: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates for one imgsz x imgsz image)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, imgsz, imgsz))
    model.train(was_training)
    return int(params), int(macs)


def save_checkpoint(model: nn.Module, path: str | Path, base_ckpt: dict | None = None, half: bool = True,
                    **extra) -> Path:
    """Write `model` as an Ultralytics-style stripped checkpoint (loads with `YOLO(path)`), atomically.

    FP16 like Ultralytics' own stripped checkpoints unless `half=False`. `base_ckpt` supplies train_args and
    other metadata (e.g. the checkpoint the model came from); `extra` keys are added at the top level
    (e.g. pruning info).
    """
    from ultralytics import __version__

    frozen = copy.deepcopy(model).eval()
    frozen = frozen.half() if half else frozen.float()
    for p in frozen.parameters():
        p.requires_grad_(False)
    if hasattr(frozen, "args") and not isinstance(frozen.args, dict):
        frozen.args = dict(vars(frozen.args)) if hasattr(frozen.args, "__dict__") else dict(frozen.args)
    if hasattr(frozen, "criterion"):
        frozen.criterion = None
    base_ckpt = base_ckpt or {}
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
        "model": frozen,
        "ema": None,
        "epoch": -1,
        "best_fitness": None,
        "optimizer": None,
        "train_args": dict(base_ckpt.get("train_args") or {}),
        **extra,
    }
    return atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
