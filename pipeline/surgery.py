"""Model surgery that makes an Ultralytics YOLO detector prunable with Torch-Pruning, the dependency graph,
and the channel groups the sensitivity and prune stages work on. Covers the v5u, v8, v9, 11 and 26 families.

Why surgery is needed: several Ultralytics blocks split one tensor's channels with `chunk`/`split` and send
the halves different ways. Torch-Pruning's split handling assumes the halves keep their sizes and pairs them
with consumers in tracing order, not in split order (YOLOv9's RepNCSPELAN4 failed with an IndexError that
way), and the block's own `chunk(2, 1)` would cut a pruned tensor in the wrong place anyway. So each such
block is rewritten into an exact equivalent without channel splits (outputs equal to float rounding):

  C2f, C3k2 (v8, 11, 26)          cv1(x).chunk(2)      -> C2fSplit: two convs, one per half
  RepNCSPELAN4, ELAN1 (v9)         cv1(x).chunk(2)      -> ELANSplit: two convs, one per half
  C2PSA (11, 26)                   cv1(x).split(c, c)   -> C2PSASplit: two convs, one per half
  ADown (v9c, v9e)                 x.chunk(2) (input)   -> ADownSplit: two slices sized by the convs reading them
  C2 (v8-p6)                       cv1(x).chunk(2)      -> C2Split: two convs, one per half
  CBLinear (v9e)                   conv(x).split(sizes) -> CBLinearSplit: one conv per output

C3 (v5u), SPPF, SPPELAN, AConv, CBFuse, Bottleneck and the Detect heads have no split and need no rewrite.
RepConv (v9) is fused into one conv first (pipeline/reparam.py).

Multi-head attention (`Attention` in C2PSA and in YOLO26's attention C3k2) views its qkv conv's output as
heads x (query, key, value) and multiplies tensors; Torch-Pruning traces those reshapes and matmuls as if
they kept channels, and its index mapping through them grew without bound (yolo11n's dependency graph did
not finish listing its groups in 10 minutes). While the graph is traced, each attention runs as one opaque
operation (`traceable`), registered with a pruner that refuses to prune: the attention's channels, and
every channel tied to them (the residual stream around it), are left whole, and its convs stay out of the
graph. The rest of those blocks (their feed-forward convs, the other half of C2PSA) stays prunable.

The classes here must stay importable as `pipeline.surgery.*`: pruned checkpoints pickle the module classes
by their import path, so `YOLO("pruned.pt")` needs `pipeline` on the Python path.

A "group" is one set of channels Torch-Pruning must remove together (a convolution's outputs plus every layer
that consumes or is added to them). It is named by the convolution that produces those channels: the first,
in model order, of the group's non-depthwise convolutions whose outputs are removed, e.g.
"model.2.cv1_b.conv"; names are stable for a given model YAML/scale.
"""
from __future__ import annotations

import contextlib
import copy
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.io import atomic_write

# Ultralytics attributes every layer of a DetectionModel carries (input index, layer index, type name, params):
# `_predict_once` routes tensors with `f` and `i`, so a replacement layer must keep them.
_LAYER_ATTRS = ("f", "i", "type", "np")
# Detect's per-scale branches (one-to-many, and YOLO26's one-to-one twins).
HEAD_BRANCHES = ("cv2", "cv3", "one2one_cv2", "one2one_cv3")


# ---------------------------------------------------------------------------------------- split-free blocks


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


class C2Split(nn.Module):
    """C2 (YOLOv8-p6's neck) with `cv1` split: `cv1_a` feeds the bottlenecks `m`, `cv1_b` goes to the concat."""

    def __init__(self, cv1_a: nn.Module, cv1_b: nn.Module, cv2: nn.Module, m: nn.Sequential):
        super().__init__()
        self.cv1_a = cv1_a
        self.cv1_b = cv1_b
        self.cv2 = cv2
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.m(self.cv1_a(x)), self.cv1_b(x)), 1))


class ELANSplit(nn.Module):
    """RepNCSPELAN4 / ELAN1 (YOLOv9) with `cv1` split into `cv1_a` and `cv1_b`; `cv2`, `cv3`, `cv4` as before."""

    def __init__(self, cv1_a: nn.Module, cv1_b: nn.Module, cv2: nn.Module, cv3: nn.Module, cv4: nn.Module):
        super().__init__()
        self.cv1_a = cv1_a
        self.cv1_b = cv1_b
        self.cv2 = cv2
        self.cv3 = cv3
        self.cv4 = cv4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1_a(x), self.cv1_b(x)]
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


class C2PSASplit(nn.Module):
    """C2PSA (YOLO11, YOLO26) with `cv1` split: `cv1_a` passes straight to the concat, `cv1_b` feeds the
    attention blocks `m`."""

    def __init__(self, cv1_a: nn.Module, cv1_b: nn.Module, cv2: nn.Module, m: nn.Sequential):
        super().__init__()
        self.cv1_a = cv1_a
        self.cv1_b = cv1_b
        self.cv2 = cv2
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv1_a(x), self.m(self.cv1_b(x))), 1))


class ADownSplit(nn.Module):
    """ADown (YOLOv9 c/e) with its input halves taken as two slices whose sizes are the input widths of the
    convs that read them, so they follow pruning (Torch-Pruning maps channels through a slice exactly)."""

    def __init__(self, cv1: nn.Module, cv2: nn.Module):
        super().__init__()
        self.cv1 = cv1
        self.cv2 = cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2, 1, 0, False, True)
        first = self.cv1.conv.in_channels
        x1 = self.cv1(x[:, :first])
        x2 = self.cv2(F.max_pool2d(x[:, first:], 3, 2, 1))
        return torch.cat((x1, x2), 1)


class CBLinearSplit(nn.Module):
    """CBLinear (YOLOv9-e's auxiliary branches) with its one conv split into one conv per output."""

    def __init__(self, convs: nn.ModuleList):
        super().__init__()
        self.convs = convs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(conv(x) for conv in self.convs)


def _slice_conv2d(conv: nn.Conv2d, start: int, stop: int) -> nn.Conv2d:
    """Copy of a plain conv keeping only output channels [start, stop)."""
    part = copy.deepcopy(conv)
    part.weight = nn.Parameter(conv.weight.data[start:stop].clone())
    if conv.bias is not None:  # fused models carry the BatchNorm in the conv bias
        part.bias = nn.Parameter(conv.bias.data[start:stop].clone())
    part.out_channels = stop - start
    return part


def _slice_conv(conv_module: nn.Module, start: int, stop: int) -> nn.Module:
    """Copy of an Ultralytics `Conv` (conv + bn + act) keeping only output channels [start, stop)."""
    part = copy.deepcopy(conv_module)
    part.conv = _slice_conv2d(conv_module.conv, start, stop)
    bn = getattr(part, "bn", None)
    if isinstance(bn, nn.BatchNorm2d):
        bn.weight = nn.Parameter(bn.weight.data[start:stop].clone())
        bn.bias = nn.Parameter(bn.bias.data[start:stop].clone())
        bn.running_mean = bn.running_mean[start:stop].clone()
        bn.running_var = bn.running_var[start:stop].clone()
        bn.num_features = stop - start
    return part


def _halves(block: nn.Module, half: int) -> tuple[nn.Module, nn.Module]:
    total = block.cv1.conv.out_channels
    if total != 2 * half:
        raise ValueError(f"{type(block).__name__} block has cv1 with {total} outputs, expected 2 x {half}: "
                         "already pruned, or not the Ultralytics block")
    return _slice_conv(block.cv1, 0, half), _slice_conv(block.cv1, half, total)


def _keep_layer_attrs(old: nn.Module, new: nn.Module) -> nn.Module:
    for attr in _LAYER_ATTRS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new.train(old.training)
    return new


def split_c2f(block: nn.Module) -> C2fSplit:
    """The exact two-convolution equivalent of one C2f (or C3k2) block."""
    return _keep_layer_attrs(block, C2fSplit(*_halves(block, block.c), block.cv2, block.m))


def split_c2(block: nn.Module) -> C2Split:
    """The exact split equivalent of one C2 block."""
    return _keep_layer_attrs(block, C2Split(*_halves(block, block.c), block.cv2, block.m))


def split_cblinear(block: nn.Module) -> CBLinearSplit:
    """The exact one-conv-per-output equivalent of one CBLinear block."""
    bounds = [0]
    for size in block.c2s:
        bounds.append(bounds[-1] + size)
    if bounds[-1] != block.conv.out_channels:
        raise ValueError(f"CBLinear block has {block.conv.out_channels} outputs, expected {bounds[-1]}: already pruned?")
    convs = nn.ModuleList(_slice_conv2d(block.conv, a, b) for a, b in zip(bounds, bounds[1:]))
    return _keep_layer_attrs(block, CBLinearSplit(convs))


def split_elan(block: nn.Module) -> ELANSplit:
    """The exact split equivalent of one RepNCSPELAN4 (or ELAN1) block."""
    return _keep_layer_attrs(block, ELANSplit(*_halves(block, block.c), block.cv2, block.cv3, block.cv4))


def split_c2psa(block: nn.Module) -> C2PSASplit:
    """The exact split equivalent of one C2PSA block."""
    return _keep_layer_attrs(block, C2PSASplit(*_halves(block, block.c), block.cv2, block.m))


def split_adown(block: nn.Module) -> ADownSplit:
    """The exact slicing equivalent of one ADown block."""
    return _keep_layer_attrs(block, ADownSplit(block.cv1, block.cv2))


def _rewrites() -> list[tuple[type, object]]:
    from ultralytics.nn.modules.block import ADown, C2, C2f, C2PSA, CBLinear, RepNCSPELAN4

    # Subclasses are covered: C3k2 is a C2f, ELAN1 a RepNCSPELAN4. C2fPSA (a C2f) is not in these families.
    return [(C2f, split_c2f), (C2, split_c2), (RepNCSPELAN4, split_elan), (C2PSA, split_c2psa),
            (ADown, split_adown), (CBLinear, split_cblinear)]


def rewrite_blocks(model: nn.Module) -> int:
    """Replace every block that splits channels (see the module docstring) inside `model` in place; return
    how many were replaced."""
    rewrites = _rewrites()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            for block_type, rewrite in rewrites:
                if isinstance(child, block_type):
                    setattr(parent, name, rewrite(child))
                    replaced += 1
                    break
    return replaced


rewrite_c2f = rewrite_blocks  # the name tests/test_int8.py imports


def load_raw_model(pt_path: str | Path) -> nn.Module:
    """An Ultralytics checkpoint's model as saved, FP32 on CPU in eval mode, gradients on.
    Raises FileNotFoundError/ValueError naming the file on bad input."""
    return _load(pt_path)[0]


def _load(pt_path: str | Path) -> tuple[nn.Module, dict]:
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
    return model, ckpt


def load_detection_model(pt_path: str | Path) -> tuple[nn.Module, dict]:
    """Load an Ultralytics checkpoint as an FP32 model on CPU in eval mode, re-parameterized (pipeline/reparam.py)
    and with its split blocks rewritten: the form every stage after training works on.

    Returns (model, checkpoint dict). Raises FileNotFoundError/ValueError naming the file on bad input.
    """
    from pipeline.reparam import reparameterize

    model, ckpt = _load(pt_path)
    reparameterize(model)
    rewrite_blocks(model)
    return model, ckpt


# ------------------------------------------------------------------------------------------------ depth units

# Depth units remove operators, not channels: the last bottleneck (or C3k / attention pair) of a block's `m`,
# or a whole block where an identity can replace it. At the demo's sizes much of a layer's latency is
# per-operator overhead, which channel pruning keeps.
DEPTH_UNIT_REASON = "n -> n-1: drops the block's last bottleneck and its share of the concat"


def _depth_blocks() -> tuple[type, ...]:
    return (C2fSplit, C2Split)


def _is_plain_c3(block: nn.Module) -> bool:
    # Exactly C3 (v5u): its subclasses (C3k, C3x, C3Ghost, C3TR, RepC3) have other insides.
    from ultralytics.nn.modules.block import C3

    return type(block) is C3


def depth_units(model: nn.Module) -> list[str]:
    """Names of the bottlenecks that may be removed, one per block, in model order: the last element of the
    `m` of every top-level C2f/C3k2 (rewritten as C2fSplit), C2 and C3 layer that still has one, e.g.
    "model.4.m.1". Removing it takes the block from n to n-1 bottlenecks (0 is a valid block: its concat
    then holds only the two halves of cv1, or C3's m is an identity). YOLOv9's ELAN blocks keep their
    depth (their bottlenecks sit inside RepCSP, inside a Sequential with a conv)."""
    layers = getattr(model, "model", None)
    if layers is None:
        return []
    found = []
    for i, layer in enumerate(layers):
        if (isinstance(layer, _depth_blocks()) or _is_plain_c3(layer)) and len(layer.m) > 0:
            found.append(f"model.{i}.m.{len(layer.m) - 1}")
    return found


def _split_depth_unit(model: nn.Module, unit: str) -> tuple[nn.Module, int]:
    parts = unit.split(".")
    if len(parts) != 4 or parts[0] != "model" or parts[2] != "m" or not (parts[1].isdigit() and parts[3].isdigit()):
        raise ValueError(f"depth unit {unit!r}: expected 'model.<layer>.m.<index>'")
    block = model.get_submodule(".".join(parts[:2]))
    if not (isinstance(block, _depth_blocks()) or _is_plain_c3(block)):
        raise ValueError(f"depth unit {unit!r}: layer {parts[1]} is a {type(block).__name__}, which has no "
                         "removable bottlenecks")
    index = int(parts[3])
    if index != len(block.m) - 1:
        raise ValueError(f"depth unit {unit!r}: only the last bottleneck of a block can be removed (this block "
                         f"has {len(block.m)}; already removed?)")
    return block, index


def _output_channels(model: nn.Module, module: nn.Module, imgsz: int) -> tuple[int, int]:
    """(input, output) channels of `module` in one forward pass of `model`: a bottleneck's width is whatever
    pruning left it, and C3k / attention pairs have no single attribute for it."""
    shapes = _io_shapes(model, [module], imgsz)
    if module not in shapes:
        raise ValueError(f"{type(module).__name__} did not run in the model's forward pass")
    (inputs, output) = shapes[module]
    return inputs[1], output[1]


def drop_bottleneck(model: nn.Module, unit: str, imgsz: int = 64) -> int:
    """Remove the depth unit `unit` (see `depth_units`) from `model` in place; return the number of
    parameters removed. C2f/C3k2: the bottleneck's output was the last part of the concat, so the input
    channels of the block's cv2 that read it are cut too. C2/C3: the bottlenecks map a width onto itself in a
    chain, so the chain just gets shorter. Raises ValueError naming the unit for anything else."""
    block, index = _split_depth_unit(model, unit)
    dropped = block.m[index]
    width_in, width_out = _output_channels(model, dropped, imgsz)
    removed = sum(p.numel() for p in dropped.parameters())
    if isinstance(block, C2fSplit):
        conv = block.cv2.conv
        keep = conv.in_channels - width_out
        if conv.groups != 1 or keep <= 0:
            raise ValueError(f"depth unit {unit!r}: cannot cut {width_out} inputs of a conv with "
                             f"{conv.in_channels} inputs and groups={conv.groups}")
        removed += conv.weight[:, keep:].numel()
        conv.weight = nn.Parameter(conv.weight.data[:, :keep].clone())
        conv.in_channels = keep
        block.m = nn.ModuleList(list(block.m)[:index])
    else:
        if width_in != width_out:
            raise ValueError(f"depth unit {unit!r}: the bottleneck maps {width_in} to {width_out} channels; "
                             "removing it from a chain needs equal widths")
        block.m = nn.Sequential(*list(block.m)[:index])
    return removed


BLOCK_SUFFIX = ":block"


class RemovedBlock(nn.Identity):
    """What a removed block leaves in `model.model`: its input passes through. Keeps the layer attributes
    Ultralytics routes tensors by (`f`, `i`), so the layers after it and the concats reading it still work."""


def block_units(model: nn.Module, imgsz: int = 64) -> list[str]:
    """Whole blocks that may be removed, e.g. "model.4:block": every top-level C2f/C3k2, C2 or C3 layer that
    reads only the layer before it and gives a tensor of the shape it reads (channels and size), so that an
    identity can stand in for it. In YOLOv8n that is the backbone's four C2f; the neck's C2f change widths."""
    layers = getattr(model, "model", None)
    if layers is None:
        return []
    candidates = [layer for layer in layers
                  if (isinstance(layer, _depth_blocks()) or _is_plain_c3(layer)) and getattr(layer, "f", None) == -1]
    shapes = _io_shapes(model, candidates, imgsz)
    return [f"model.{layer.i}{BLOCK_SUFFIX}" for layer in candidates if shapes.get(layer) and
            shapes[layer][0] == shapes[layer][1]]


def _io_shapes(model: nn.Module, modules: list[nn.Module], imgsz: int) -> dict[nn.Module, tuple]:
    shapes: dict[nn.Module, tuple] = {}
    handles = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, (tuple(i[0].shape), tuple(o.shape))))
               for m in modules]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def remove_block(model: nn.Module, unit: str, imgsz: int = 64) -> int:
    """Replace the block of `unit` ("model.<layer>:block", see `block_units`) with an identity in place;
    return the number of parameters removed. Raises ValueError naming the unit where that is not valid."""
    layer_name = unit.removesuffix(BLOCK_SUFFIX)
    parts = layer_name.split(".")
    if not unit.endswith(BLOCK_SUFFIX) or len(parts) != 2 or parts[0] != "model" or not parts[1].isdigit():
        raise ValueError(f"block unit {unit!r}: expected 'model.<layer>{BLOCK_SUFFIX}'")
    index = int(parts[1])
    block = model.model[index]
    if isinstance(block, RemovedBlock):
        raise ValueError(f"block unit {unit!r}: already removed")
    if unit not in block_units(model, imgsz):
        raise ValueError(f"block unit {unit!r}: a {type(block).__name__} that an identity cannot replace (it "
                         "reads other layers or changes the tensor's shape)")
    removed = sum(p.numel() for p in block.parameters())
    model.model[index] = _keep_layer_attrs(block, RemovedBlock())
    model.model[index].np = 0
    return removed


def is_block_unit(unit: str) -> bool:
    return unit.endswith(BLOCK_SUFFIX)


# ------------------------------------------------------------------------------------------ dependency graph


def ignored_head_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must never be pruned: the Detect head's final box/class convs and DFL.

    Their output channel counts are the box distribution bins and class count, fixed by the task.
    """
    from ultralytics.nn.modules.head import Detect

    ignored: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, Detect):
            for head_name in HEAD_BRANCHES:
                head = getattr(m, head_name, None)
                if head is not None:
                    ignored.extend(branch[-1] for branch in head)
            ignored.append(m.dfl)
    return ignored


def opaque_modules(model: nn.Module) -> list[nn.Module]:
    """Modules traced as one operation whose channels are never pruned: multi-head attention."""
    from ultralytics.nn.modules.block import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


class _Opaque(torch.autograd.Function):
    """Runs a module's forward as one autograd node, so the tracer sees its input and output, nothing inside.
    Only used while the dependency graph is traced; nothing ever back-propagates through it."""

    @staticmethod
    def forward(ctx, x, module):
        return type(module).forward(module, x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("surgery._Opaque is for dependency-graph tracing only")


@contextlib.contextmanager
def traceable(model: nn.Module):
    """Within this block the model's attention modules run as opaque operations (see the module docstring)."""
    patched = {m: m.__dict__.get("forward") for m in opaque_modules(model)}  # an instance-level forward, if any
    for m in patched:
        m.forward = lambda x, m=m: _Opaque.apply(x, m)
    try:
        yield
    finally:
        for m, own_forward in patched.items():
            del m.forward
            if own_forward is not None:
                m.forward = own_forward


def _kept_whole_pruner():
    """Torch-Pruning pruner for opaque modules: reports their width, ties input and output channels (the
    residual stream around an attention is one set of channels), and refuses to prune."""
    import torch_pruning as tp

    class KeptWhole(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            raise RuntimeError(f"{type(layer).__name__} is kept whole and must not be pruned")

        prune_in_channels = prune_out_channels  # one channel set: in and out are pruned together or not at all

        def get_out_channels(self, layer):
            return layer.proj.conv.out_channels

        def get_in_channels(self, layer):
            return layer.qkv.conv.in_channels

    return KeptWhole()


def head_outputs(output) -> list[torch.Tensor]:
    """The raw box and class tensors of every Detect branch in an eval-mode output `(decoded, raw)`.

    Tracing the decoded predictions would see only one of YOLO26's two heads (one-to-many or one-to-one,
    whichever the model decodes with; the other would lose its inputs' channels unnoticed) and trace an
    end-to-end head's top-k and gather as if they kept channels.
    """
    raw = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else output
    found: list[torch.Tensor] = []

    def collect(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("boxes", "scores") and isinstance(item, torch.Tensor):
                    found.append(item)
                elif isinstance(item, dict):
                    collect(item)

    collect(raw)
    if not found:  # not a Detect output: trace whatever tensor comes first
        first = output[0] if isinstance(output, (tuple, list)) else output
        found = [first]
    return found


def pruner_setup(imgsz: int) -> dict:
    """Keyword arguments every Torch-Pruning graph is built with (DependencyGraph.build_dependency and the
    pruners take the same names). Build the graph inside `traceable(model)`."""
    from ultralytics.nn.modules.block import Attention

    return {"example_inputs": torch.randn(1, 3, imgsz, imgsz), "output_transform": head_outputs,
            "customized_pruners": {Attention: _kept_whole_pruner()}}


def build_dependency_graph(model: nn.Module, imgsz: int):
    """Torch-Pruning dependency graph of `model` traced with one imgsz x imgsz image."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with traceable(model):
        graph = tp.DependencyGraph().build_dependency(model, verbose=False, **pruner_setup(imgsz))
    model.train(was_training)
    return graph


def _out_members(graph, group) -> list[nn.Module]:
    """Modules whose output channels the group removes."""
    return [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def out_conv_names(model: nn.Module, graph, group) -> list[str]:
    """Names of the convs whose output channels `group` removes, in model order."""
    members = set(_out_members(graph, group))
    return [name for name, m in model.named_modules() if m in members and isinstance(m, nn.Conv2d)]


def classify_groups(model: nn.Module, graph) -> tuple[dict[str, object], dict[str, str]]:
    """({group id: Torch-Pruning group} for every group that may be pruned, in model order,
        {conv name: reason} for every conv whose output channels are kept whole, except Detect's outputs).

    A group may not be pruned when it removes output channels of a Detect output conv or DFL (fixed by the
    task) or of an opaque module (multi-head attention: its channels are laid out per head). The convs
    inside an attention are not in the graph at all and are reported as kept whole too.
    """
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: name for name, m in model.named_modules()}
    head_outputs_ = set(ignored_head_layers(model))
    opaque = opaque_modules(model)
    opaque_set = set(opaque)
    prunable: dict[str, object] = {}
    kept: dict[str, str] = {}
    for group in graph.get_all_groups(ignored_layers=[], root_module_types=[nn.Conv2d]):
        members = _out_members(graph, group)
        convs = sorted((m for m in members if isinstance(m, nn.Conv2d) and m in order), key=order.get)
        if any(m in head_outputs_ for m in members):
            continue  # Detect's box/class outputs and DFL: fixed by the task, not worth a note
        if any(m in opaque_set for m in members):
            for conv in convs:
                kept[names[conv]] = "residual stream of a multi-head attention block (channels laid out per head)"
            continue
        if not convs:
            continue
        producer = next((m for m in convs if not _is_depthwise(m)), convs[0])
        prunable[names[producer]] = group
    for block in opaque:
        for name, m in block.named_modules():
            if isinstance(m, nn.Conv2d):
                kept[f"{names[block]}.{name}"] = ("inside a multi-head attention (its qkv output is viewed as "
                                                  "heads x query/key/value)")
    ordered_kept = dict(sorted(kept.items(), key=lambda item: order[model.get_submodule(item[0])]))
    return dict(sorted(prunable.items(), key=lambda item: order[model.get_submodule(item[0])])), ordered_kept


def prunable_groups(model: nn.Module, graph) -> dict[str, object]:
    """{group id: Torch-Pruning group} for every channel group that may be pruned, in model order."""
    return classify_groups(model, graph)[0]


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
