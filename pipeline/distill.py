"""Knowledge distillation for the compression fine-tuning: a frozen float teacher guides the pruned student
(prune.finetune) and the fake-quant student (qat.finetune).

What is matched, on the detection head's raw training outputs (Ultralytics' Detect returns, in training
mode, {"boxes": (B, 4*reg_max, A), "scores": (B, nc, A), "feats": [neck maps]}; end-to-end heads a
"one2many"/"one2one" pair of those):
  class scores   binary KL per class between sigmoid(teacher/T) and sigmoid(student/T), times T^2. Sigmoid,
                 not softmax: YOLO's classes are independent (BCE), a softmax over them would invent competition.
  box            KL between the teacher's and the student's DFL distributions (softmax over the reg_max
                 bins at T), times T^2; a head without DFL (reg_max 1) regresses directly: L1 instead.
  neck features  optional: MSE between the teacher's neck maps (the Detect inputs) and the student's, through
                 a learned 1x1 adapter on levels whose channel counts differ (pruning narrowed the student);
                 levels with equal widths are compared directly, so an unpruned copy has zero loss.
The student's total loss is weights.detection * detection loss + batch * (weights.cls * cls + weights.box *
box + weights.feature * feature): the batch factor matches Ultralytics' own loss, which is summed per image.

The teacher runs in eval mode (BatchNorm on its running statistics) without gradients, on the very batch the
student trains on. `teacher`: "trained" (this run's outputs/train/best.pt), a checkpoint path (relative to the
workspace root), or "registry:<version or alias>" (fetched and checked by the registry). What trained a
student is recorded in its metrics.json, and so in its registry manifest: path, sha256, registry version.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.io import sha256_file

TRAINED_TEACHER = "outputs/train/best.pt"
REGISTRY_PREFIX = "registry:"


class DistillError(RuntimeError):
    pass


@dataclasses.dataclass
class Teacher:
    path: Path
    sha256: str
    source: str  # "trained", "path" or "registry"
    registry_version: int | None = None
    model: nn.Module | None = dataclasses.field(default=None, repr=False)

    def record(self, cfg) -> dict:
        """What metrics.json says trained the student."""
        return {"enabled": True, "teacher": str(self.path), "teacher_sha256": self.sha256,
                "teacher_source": self.source, "teacher_registry_version": self.registry_version,
                "temperature": cfg.temperature, "feature": cfg.feature, "weights": cfg.weights.model_dump()}


def record(teacher: Teacher | None, cfg) -> dict:
    return teacher.record(cfg) if teacher is not None else {"enabled": False}


def load_teacher(path: str | Path, source: str = "path", registry_version: int | None = None) -> Teacher:
    """A frozen FP32 teacher on CPU. Raises DistillError naming the file when it is not a detection checkpoint."""
    from pipeline.surgery import load_detection_model

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: distillation teacher checkpoint not found")
    try:
        model, _ = load_detection_model(path)
    except (ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise DistillError(f"{path}: not a loadable Ultralytics detection checkpoint for a teacher: {e}") from None
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(path=path, sha256=sha256_file(path), source=source, registry_version=registry_version,
                   model=model)


def stage_teacher(ws) -> Teacher | None:
    """The teacher params.distill names for this workspace's run, loaded; None when distillation is off.

    "trained" goes through `ws.input`, so a stage distilling from it must declare outputs/train/best.pt."""
    cfg = ws.params.distill
    if not cfg.enabled:
        return None
    spec = cfg.teacher.strip()
    if spec == "trained":
        return load_teacher(ws.input(TRAINED_TEACHER), source="trained")
    if spec.startswith(REGISTRY_PREFIX):
        from pipeline.registry import open_registry

        ref = spec[len(REGISTRY_PREFIX):].strip()
        registry = open_registry(ws.params.registry, base_dir=ws.root)
        version = int(ref) if ref.isdigit() else registry.alias(ref)
        if version is None:
            raise DistillError(f"distill.teacher {spec!r}: the registry has no alias {ref!r}")
        manifest = registry.manifest(version)
        if not manifest.primary.endswith(".pt"):
            raise DistillError(f"distill.teacher {spec!r}: version {version} holds {manifest.primary}, "
                               "not a torch checkpoint")
        files = registry.fetch(version, ws.root / ".teachers" / f"v{version}")
        return load_teacher(files[manifest.primary], source="registry", registry_version=version)
    return load_teacher(ws.path(spec), source="path")


# ---------------------------------------------------------------------------------------------- the loss


def head_branches(preds) -> list[dict]:
    """The raw output dicts of a Detect head, whatever mode the model ran in (train: the dict; eval: (y, dict))."""
    if isinstance(preds, (tuple, list)):
        preds = preds[1]
    if not isinstance(preds, dict):
        raise DistillError(f"unexpected head output {type(preds).__name__}: expected Ultralytics' prediction dict")
    if "one2many" in preds:
        return [preds[k] for k in ("one2many", "one2one") if preds.get(k)]
    return [preds]


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of independent Bernoulli class scores at `temperature`, times T^2; summed over
    classes, mean over images and anchors."""
    t, s = teacher_logits / temperature, student_logits / temperature
    pt = torch.sigmoid(t)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(1).mean() * temperature ** 2


def dfl_kl(student_boxes: torch.Tensor, teacher_boxes: torch.Tensor, reg_max: int, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each box side's distribution over the reg_max bins, times T^2; mean over
    sides, images and anchors. L1 of the raw regression when the head has no distribution (reg_max 1)."""
    if reg_max <= 1:
        return (student_boxes - teacher_boxes).abs().mean()
    b, _, a = student_boxes.shape
    s = F.log_softmax(student_boxes.view(b, 4, reg_max, a) / temperature, dim=2)
    t = F.log_softmax(teacher_boxes.view(b, 4, reg_max, a) / temperature, dim=2)
    return (t.exp() * (t - s)).sum(2).mean() * temperature ** 2


def _detect(model: nn.Module):
    return model.model[-1]


class DistillLoss(nn.Module):
    """The distillation terms of one student against one teacher. Its parameters are the feature adapters."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg, teacher_path: str | Path = "teacher"):
        super().__init__()
        self.teacher = [teacher]  # a list: not a submodule, so .parameters() and state_dict() leave it out
        self.cfg = cfg
        s, t = _detect(student), _detect(teacher)
        for attr in ("nc", "reg_max", "nl"):
            if getattr(s, attr) != getattr(t, attr):
                raise DistillError(f"{teacher_path}: teacher's head has {attr}={getattr(t, attr)}, the student's "
                                   f"{getattr(s, attr)}: it cannot teach this model (same dataset and head needed)")
        if not torch.equal(s.stride.float(), t.stride.float()):
            raise DistillError(f"{teacher_path}: teacher's strides {t.stride.tolist()} differ from the student's "
                               f"{s.stride.tolist()}")
        if cfg.temperature <= 0:
            raise DistillError(f"distill.temperature must be > 0, got {cfg.temperature}")
        self.reg_max = int(s.reg_max)
        self.adapters = nn.ModuleDict()
        if cfg.feature:
            for level, (cs, ct) in enumerate(zip(_head_in_channels(s), _head_in_channels(t))):
                if cs != ct:
                    adapter = nn.Conv2d(cs, ct, 1, bias=False)
                    self.adapters[str(level)] = adapter

    @torch.no_grad()
    def teacher_preds(self, images: torch.Tensor) -> list[dict]:
        teacher = self.teacher[0]
        teacher.eval()
        return head_branches(teacher(images.float()))

    def forward(self, student_preds, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted distillation loss per image, {"cls", "box", "feature"} unweighted terms)."""
        cfg, w = self.cfg, self.cfg.weights
        students, teachers = head_branches(student_preds), self.teacher_preds(images)
        terms = {"cls": 0.0, "box": 0.0, "feature": 0.0}
        for sb, tb in zip(students, teachers):
            terms["cls"] = terms["cls"] + binary_kl(sb["scores"], tb["scores"], cfg.temperature) / len(students)
            terms["box"] = terms["box"] + dfl_kl(sb["boxes"], tb["boxes"], self.reg_max, cfg.temperature) / len(students)
        if cfg.feature:
            # The neck maps are shared by both branches of an end-to-end head: the first branch's suffice.
            sf, tf = students[0]["feats"], teachers[0]["feats"]
            for level, (s, t) in enumerate(zip(sf, tf)):
                adapter = self.adapters[str(level)] if str(level) in self.adapters else None
                s = adapter(s.to(adapter.weight.dtype)) if adapter is not None else s
                terms["feature"] = terms["feature"] + F.mse_loss(s, t) / len(sf)
        total = w.cls * terms["cls"] + w.box * terms["box"] + w.feature * terms["feature"]
        device = images.device
        return (torch.as_tensor(total, device=device),
                {k: torch.as_tensor(v, device=device).detach() for k, v in terms.items()})


def _head_in_channels(detect: nn.Module) -> list[int]:
    # cv2[i] is the box branch of level i; its first conv reads the neck map of that level.
    return [_first_conv(branch).in_channels for branch in detect.cv2]


def _first_conv(module: nn.Module) -> nn.Conv2d:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise DistillError("a Detect branch without a Conv2d: unknown head layout")


class DistillCriterion:
    """Ultralytics' detection criterion plus the distillation terms; same call and return as the criterion it
    wraps, so the trainer's loss items (box, cls, dfl) keep their names and count."""

    def __init__(self, detection, loss: DistillLoss):
        self.detection = detection
        self.loss = loss

    def __call__(self, preds, batch: dict):
        det, items = self.detection(preds, batch)
        kd, _ = self.loss(preds, batch["img"])
        return self.loss.cfg.weights.detection * det + kd * batch["img"].shape[0], items

    def update(self) -> None:  # end-to-end criteria shift their one2many/one2one balance each epoch
        if hasattr(self.detection, "update"):
            self.detection.update()


def attach(student: nn.Module, teacher: Teacher, cfg) -> DistillLoss:
    """Make `student.loss()` distil from `teacher`; returns the loss module, whose adapters must be optimized.
    The student's `args` (loss gains) must be set first. Undo with `detach`."""
    loss = DistillLoss(student, teacher.model, cfg, teacher.path)
    device = next(student.parameters()).device
    loss.to(device)
    teacher.model.to(device)
    student.criterion = DistillCriterion(student.init_criterion(), loss)
    return loss


def detach(student: nn.Module) -> None:
    """Drop the distilling criterion: a saved checkpoint must not pickle the teacher."""
    if isinstance(getattr(student, "criterion", None), DistillCriterion):
        student.criterion = None


def attach_to_trainer(trainer, teacher: Teacher, cfg) -> None:
    """Distil inside Ultralytics' trainer: once the model, its args and the optimizer exist (on_train_start),
    wrap the model's criterion and give the adapters their own parameter group."""

    def on_train_start(tr):
        model = tr.model.module if hasattr(tr.model, "module") else tr.model
        loss = attach(model, teacher, cfg)
        adapters = list(loss.parameters())
        if adapters:
            lr = tr.optimizer.param_groups[0].get("initial_lr", tr.args.lr0)
            # initial_lr: the trainer's warm-up reads it from every group
            tr.optimizer.add_param_group({"params": adapters, "lr": lr, "initial_lr": lr, "weight_decay": 0.0})
            # The trainer's LambdaLR keeps one base lr and schedule per group (and zips them strictly)
            scheduler = tr.scheduler
            scheduler.base_lrs.append(lr)
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr.append(lr)

    trainer.add_callback("on_train_start", on_train_start)
