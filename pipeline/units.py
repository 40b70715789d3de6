"""Pruning units: what the sensitivity stage measures and the plan gives a ratio to, and the pruner.

A unit is one Ultralytics layer (`model.6`: every channel group named by a conv inside layer 6, pruned at the
same ratio), except in the Detect head, where each box/class branch of each scale is its own unit
(`model.22.cv2.0`), because the branches behave very differently. That is 22 units for YOLOv8n. With
`granularity="group"` every Torch-Pruning group is its own unit (`model.6.cv1_a.conv`, see pipeline/surgery.py
for how groups are named); every function here accepts either kind of id.

Some units are never pruned, each for a stated reason (`skipped_units`): YOLO26's one-to-one head branches,
which the exported model does not contain, and any layer all of whose channels are kept whole (multi-head
attention, surgery.classify_groups). A layer partly kept whole is still a unit; `kept_whole` says which of
its convs stay as they are and why.

Depth units (`cached_depth_units`, pipeline/surgery.py) remove a block's last bottleneck ("model.4.m.1"), or
a whole block an identity can replace ("model.4:block"), operators and all; the latency plan picks them
beside channel units.

Pruning itself is Torch-Pruning's `MetaPruner` (`UnitPruner`): every group of a unit gets the unit's ratio as a
layer-specific ratio, ranked locally by group L2 magnitude, and iterative pruning (`steps`) aims each step
at a fraction of the width the pruner started from.
"""
from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

from pipeline import surgery
from pipeline.params import Params

# Channel structure does not depend on image size; a small trace is enough and fast.
TRACE_IMGSZ = 64
# Branches of YOLO26's end-to-end head that the exported model drops: Ultralytics exports and validates with
# external NMS by default (nms=None), which keeps the one-to-many branches, and `Detect.fuse()` then removes
# the one-to-one twins. Pruning them would change nothing that ships.
ONE_TO_ONE_BRANCHES = ("one2one_cv2", "one2one_cv3")
ONE_TO_ONE_REASON = ("YOLO26 one-to-one head branch: not in the exported model (exported with external NMS, "
                     "which keeps the one-to-many head; Detect.fuse() drops this branch)")


def unit_of(group_root: str, granularity: str = "layer") -> str:
    """The unit id a Torch-Pruning group (named by its conv) belongs to."""
    if granularity == "group":
        return group_root
    if granularity != "layer":
        raise ValueError(f"granularity must be 'layer' or 'group', got {granularity!r}")
    parts = group_root.split(".")  # model.<layer>.<submodule>...
    layer = ".".join(parts[:2])
    # Detect head: `model.22.cv2.0.1.conv` -> unit `model.22.cv2.0` (one box/class branch at one scale). Each
    # branch is a Sequential of Sequentials, so two indices follow the branch name; YOLOv9's ELAN blocks also
    # have a `cv2.0` (`model.4.cv2.0.cv1.conv`), but a named module follows it.
    if len(parts) >= 5 and parts[2] in surgery.HEAD_BRANCHES and parts[3].isdigit() and parts[4].isdigit():
        return ".".join(parts[:4])
    return layer


def in_unit(group_root: str, unit: str) -> bool:
    return group_root == unit or group_root.startswith(unit + ".")


def _one_to_one(group_root: str) -> bool:
    parts = group_root.split(".")
    return len(parts) > 2 and parts[2] in ONE_TO_ONE_BRANCHES


# ------------------------------------------------------------------------------------- models and their groups


@functools.lru_cache(maxsize=2)
def _load_cached(pt_path: str, mtime_ns: int, size: int):
    # One load per process and checkpoint version: every evaluation then deep-copies the rewritten model,
    # which is much cheaper than unpickling and rewriting it again.
    return surgery.load_detection_model(pt_path)


def load_model(trained_pt: str | Path):
    """(re-parameterized, rewritten FP32 model, checkpoint dict) for `trained_pt`; the model is a private copy."""
    path = Path(trained_pt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trained checkpoint not found")
    stat = path.stat()
    model, ckpt = _load_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return copy.deepcopy(model), ckpt


def _classify(model) -> tuple[dict[str, list[str]], dict[str, str]]:
    graph = surgery.build_dependency_graph(model, TRACE_IMGSZ)
    prunable, kept = surgery.classify_groups(model, graph)
    return {root: surgery.out_conv_names(model, graph, group) for root, group in prunable.items()}, kept


def channel_groups(model) -> dict[str, list[str]]:
    """{group name: names of the convs whose output channels it removes} for every prunable channel group, in
    model order (YOLO26's one-to-one branches left out)."""
    return {root: convs for root, convs in _classify(model)[0].items() if not _one_to_one(root)}


def group_roots(model) -> list[str]:
    """Names of every prunable channel group, in model order (YOLO26's one-to-one branches left out)."""
    return list(channel_groups(model))


def cached_channel_groups(trained_pt: str | Path) -> dict[str, list[str]]:
    """`channel_groups` of a checkpoint, computed once per process and checkpoint version."""
    return dict(_cached_structure(trained_pt)[0])


def cached_group_roots(trained_pt: str | Path) -> list[str]:
    """`group_roots` of a checkpoint, computed once per process and checkpoint version."""
    return list(_cached_structure(trained_pt)[0])


def _cached_structure(trained_pt: str | Path) -> tuple[dict[str, list[str]], list[str], dict[str, str]]:
    path = Path(trained_pt).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{trained_pt}: trained checkpoint not found")
    stat = path.stat()
    return _structure_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _structure_cached(pt_path: str, mtime_ns: int, size: int) -> tuple[dict[str, list[str]], list[str], dict[str, str]]:
    """(prunable channel groups, one-to-one group names, {conv kept whole: reason}) of a checkpoint."""
    model, _ = _load_cached(pt_path, mtime_ns, size)
    prunable, kept = _classify(copy.deepcopy(model))
    return ({r: convs for r, convs in prunable.items() if not _one_to_one(r)},
            [r for r in prunable if _one_to_one(r)], kept)


def list_groups(trained_pt: str | Path, granularity: str = "layer") -> list[str]:
    """Stable ids of the pruning units of a trained checkpoint, in model order (see the module docstring)."""
    units: list[str] = []
    for root in cached_group_roots(trained_pt):
        unit = unit_of(root, granularity)
        if unit not in units:
            units.append(unit)
    return units


def cached_depth_units(trained_pt: str | Path) -> list[str]:
    """The depth units of a checkpoint: `surgery.depth_units` (each block's last bottleneck), then
    `surgery.block_units` (whole blocks an identity can replace, "model.4:block")."""
    path = Path(trained_pt).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{trained_pt}: trained checkpoint not found")
    stat = path.stat()
    return list(_depth_cached(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=2)
def _depth_cached(pt_path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    model = copy.deepcopy(_load_cached(pt_path, mtime_ns, size)[0])  # the block check runs a forward pass
    return (*surgery.depth_units(model), *surgery.block_units(model, TRACE_IMGSZ))


def drop_depth_units(model, depth: list[str], ratios: dict[str, float]) -> tuple[int, dict[str, float]]:
    """Remove the depth units `depth` from `model` in place (before any channel pruning: each is named by
    the bottleneck index the unpruned model has), and return (parameters removed, the channel `ratios`
    left to apply). With group granularity a group inside a removed bottleneck is gone with it and leaves
    the ratios; a layer unit keeps its ratio for the convs that remain."""
    blocks = [u for u in depth if surgery.is_block_unit(u)]
    gone = [u.removesuffix(surgery.BLOCK_SUFFIX) for u in blocks]
    removed = 0
    for unit in depth:  # bottlenecks first: a block removed after them takes whatever is left
        if not surgery.is_block_unit(unit) and not any(in_unit(unit, layer) for layer in gone):
            removed += surgery.drop_bottleneck(model, unit, TRACE_IMGSZ)
    for unit in blocks:
        removed += surgery.remove_block(model, unit, TRACE_IMGSZ)
    left = {u: r for u, r in ratios.items()
            if not any(in_unit(u, d) for d in depth) and not any(in_unit(u, layer) for layer in gone)}
    return removed, left


def kept_whole(trained_pt: str | Path) -> dict[str, str]:
    """{conv name: reason} for the convs whose output channels are never pruned (besides Detect's outputs)."""
    return dict(_cached_structure(trained_pt)[2])


def skipped_units(trained_pt: str | Path, granularity: str = "layer") -> dict[str, str]:
    """{unit: reason} for the units of this model that are not measured or pruned (YOLO26's one-to-one
    branches, then units kept whole, each in model order)."""
    _, one_to_one, kept = _cached_structure(trained_pt)
    units = set(list_groups(trained_pt, granularity))
    skipped: dict[str, str] = {}
    for root in one_to_one:
        skipped.setdefault(unit_of(root, granularity), ONE_TO_ONE_REASON)
    for conv, reason in kept.items():
        unit = unit_of(conv, granularity)
        if unit not in units and not _one_to_one(conv):
            skipped.setdefault(unit, f"every channel kept whole: {reason}")
    return skipped


# ------------------------------------------------------------------------------------------------ pruning


class UnitPruner:
    """Torch-Pruning's MetaPruner set up for units: each group inside a unit of `ratios` is pruned to
    `ratio` of the width it had when the pruner was made (lowest group L2 magnitude first, ranked within the
    group), in `steps` equal steps; call `step()` once per step (fine-tuning in between is fine: importance
    is computed on the weights at each step). `groups` (from `channel_groups`) saves listing them again.

    Raises KeyError for a unit that matches no prunable group, ValueError for a ratio outside [0, 1).
    """

    def __init__(self, model, ratios: dict[str, float], steps: int = 1, groups: dict[str, list[str]] | None = None,
                 imgsz: int = TRACE_IMGSZ, round_to: int | None = None):
        import torch.nn as nn
        import torch_pruning as tp

        if groups is None:
            groups = channel_groups(model)
        per_root: dict[str, float] = {}
        for unit, ratio in ratios.items():
            members = [root for root in groups if in_unit(root, unit)]
            if not members:
                raise KeyError(f"pruning unit {unit!r} matches no prunable group of this model")
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"pruning unit {unit!r}: ratio {ratio} is outside [0, 1)")
            per_root.update({root: float(ratio) for root in members if ratio > 0})
        self.model = model
        self.convs = {root: model.get_submodule(root) for root in per_root}
        # Every conv outside the groups being pruned is passed as ignored: the pruner lists and ranks only
        # the groups it prunes. Listing all of them (its default) took ~1 s per pruning of one yolo26n unit,
        # three times the rest of the pruning, and the sensitivity stage prunes once per evaluation.
        pruned = {name for root in per_root for name in groups[root]}
        others = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name not in pruned]
        was_training = model.training
        model.eval()
        with surgery.traceable(model):
            # Keyed by each group's own conv: the pruner gives a group the ratio of the first of its members
            # it finds in this dict, and a group's named conv belongs to that group alone.
            self.pruner = tp.pruner.MetaPruner(
                model, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.0,
                pruning_ratio_dict={self.convs[root]: ratio for root, ratio in per_root.items()},
                iterative_steps=steps, round_to=round_to,
                ignored_layers=surgery.ignored_head_layers(model) + surgery.opaque_modules(model) + others,
                root_module_types=[nn.Conv2d], **surgery.pruner_setup(imgsz))
        model.train(was_training)

    def widths(self) -> dict[str, int]:
        return {root: conv.out_channels for root, conv in self.convs.items()}

    def step(self) -> int:
        """Prune one step; return the number of channels removed (summed over the groups)."""
        before = self.widths()
        self.pruner.step()
        after = self.widths()
        return sum(before[root] - after[root] for root in before)


def prune_units(model, ratios: dict[str, float], groups: dict[str, list[str]] | None = None,
                round_to: int | None = None) -> int:
    """Prune `model` in place in one step: each group inside a unit of `ratios` keeps (1 - ratio) of its
    channels. Returns the number of channels removed. See `UnitPruner`."""
    return UnitPruner(model, ratios, groups=groups, round_to=round_to).step()


# ------------------------------------------------------------------------------------------------ latency


def latency_model(model, ckpt: dict, out_onnx: str | Path, params: Params, calib_images: list[Path]) -> dict:
    """Export `model` to ONNX the way the latency plan and prune's check time it (sensitivity.LATENCY_METHOD):
    FP32 from Ultralytics' exporter, then a PTQ INT8 copy (pipeline.int8.quantize_onnx, calibrated on
    `calib_images`) when params.sensitivity.latency.graph is int8. Returns {"onnx", "params", "macs",
    "onnx_nodes"} (nodes of the FP32 graph: what a depth unit removes, which MACs do not show)."""
    import onnx

    from pipeline.evaluate import export_fp32_onnx
    from pipeline.int8 import quantize_onnx

    out_onnx = Path(out_onnx)
    n_params, macs = surgery.count_params_macs(model, params.train.imgsz)
    with tempfile.TemporaryDirectory(prefix="latency-model-") as tmp:
        pt = surgery.save_checkpoint(model, Path(tmp) / "model.pt", ckpt)
        fp32 = export_fp32_onnx(pt, Path(tmp) / "model.onnx", params.train.imgsz, params.export.opset,
                                simplify=False)
        nodes = len(onnx.load(str(fp32)).graph.node)
        if params.sensitivity.latency.graph == "int8":
            quantize_onnx(fp32, out_onnx, calib_images)
        else:
            out_onnx.parent.mkdir(parents=True, exist_ok=True)
            fp32.replace(out_onnx)
    return {"onnx": str(out_onnx), "params": n_params, "macs": macs, "onnx_nodes": nodes}
