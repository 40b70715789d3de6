"""Knowledge distillation: the loss itself on a random tiny YOLO, and a tiny prune + QAT run distilling."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline import distill
from pipeline.params import DistillParams

from tests.conftest import random_tiny_model

IMGSZ = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teacher(model) -> distill.Teacher:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return distill.Teacher(path="teacher.pt", sha256="0" * 64, source="path", model=model)


def _images(n=2) -> torch.Tensor:
    return torch.rand(n, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))


def _loss(student, teacher, cfg, images):
    """The distillation terms for the student's own forward pass (eval mode: fixed BatchNorm, comparable steps)."""
    loss = distill.DistillLoss(student, teacher.model, cfg)
    return loss, loss(student(images), images)


def test_loss_is_zero_for_a_copy_of_the_teacher_and_positive_otherwise():
    teacher = _teacher(random_tiny_model())
    cfg = DistillParams(enabled=True, feature=True)
    student = copy.deepcopy(teacher.model)
    loss, (total, terms) = _loss(student, teacher, cfg, _images())
    assert not list(loss.parameters())  # equal widths: no adapter, the maps are compared directly
    assert total.item() == pytest.approx(0.0, abs=1e-9)
    assert all(v.item() == pytest.approx(0.0, abs=1e-9) for v in terms.values())

    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.add_(0.3 * m.weight.std() * torch.randn(m.weight.shape, generator=generator))
    _, (total, terms) = _loss(student, teacher, cfg, _images())
    assert total.item() > 1e-5  # a random head is nearly flat: small, but 4 orders above the copy
    assert all(v.item() > 0 for v in terms.values()), terms


def test_pruned_student_gets_adapters_and_the_loss_falls_with_training():
    from pipeline.sensitivity import prune_units
    from pipeline.surgery import rewrite_blocks

    teacher = _teacher(random_tiny_model())
    student = copy.deepcopy(teacher.model)
    rewrite_blocks(student)  # the form pruning works on (exact: same outputs)
    for p in student.parameters():
        p.requires_grad_(True)
    prune_units(student, {"model.15": 0.5, "model.21": 0.5})  # two of the three neck maps the head reads
    cfg = DistillParams(enabled=True, feature=True)
    loss = distill.DistillLoss(student, teacher.model, cfg)
    assert sorted(loss.adapters) == ["0", "2"]
    images = _images(4)
    optimizer = torch.optim.Adam([*student.parameters(), *loss.parameters()], lr=1e-3)
    history = []
    for _ in range(15):
        total, _ = loss(student(images), images)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert history[-1] < 0.7 * history[0], history
    assert all(p.grad is None for p in teacher.model.parameters())  # the teacher stays frozen


def test_terms_vanish_only_for_equal_outputs_and_mismatched_teachers_are_refused():
    s, t = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    assert distill.binary_kl(s, s, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert distill.binary_kl(s, t, 1.0).item() > 0
    boxes_s, boxes_t = torch.randn(2, 64, 10), torch.randn(2, 64, 10)
    assert distill.dfl_kl(boxes_s, boxes_t, 16, 2.0).item() > 0
    assert distill.dfl_kl(boxes_s, boxes_s, 16, 2.0).item() == pytest.approx(0.0, abs=1e-7)

    other = _teacher(random_tiny_model(nc=3))
    with pytest.raises(distill.DistillError, match="teacher.pt.*nc=3"):
        distill.DistillLoss(random_tiny_model(), other.model, DistillParams(enabled=True), other.path)


def test_missing_or_broken_teacher_names_the_file(tmp_path):
    with pytest.raises(distill.DistillError, match="nothere.pt.*not found"):
        distill.load_teacher(tmp_path / "nothere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises((distill.DistillError, ValueError), match="bad.pt"):
        distill.load_teacher(bad)


def test_prune_and_qat_distil_and_record_their_teacher(tmp_path):
    """A tiny prune + QAT run with distillation on (features too): both fine-tunings run through the distilling
    criterion, and both metrics name the teacher by path and sha256."""
    from pipeline import prune, qat
    from pipeline.demo_data import generate_demo
    from pipeline.io import sha256_file, write_json
    from pipeline.params import DemoParams, Params

    from tests.test_prune import _plan, _tiny_checkpoint

    data_yaml = generate_demo(tmp_path / "data", DemoParams(n_train=4, n_val=4, n_empty=0, imgsz=IMGSZ, max_objects=2))
    trained_pt = _tiny_checkpoint(tmp_path / "trained.pt")
    write_json(tmp_path / "plan.json", _plan(trained_pt, {"model.15": 0.5, "model.8": 0.5}))
    params = Params.model_validate({
        "train": {"imgsz": IMGSZ, "batch": 4},
        "evaluate": {"batch": 4, "warmup": 1, "runs": 2},
        "prune": {"steps": 1, "epochs_per_step": 1, "max_drop": 1.0},
        "qat": {"epochs": 1, "calib_images": 2, "activation": "silu", "ptq": False,
                "gates": {"max_map_drop": 1.0, "max_file_mb": 20, "max_latency_ratio": None}},
        "distill": {"enabled": True, "feature": True},
    })
    teacher = distill.load_teacher(trained_pt, source="trained")

    calls = []
    original = distill.DistillCriterion.__call__

    def counting(self, preds, batch):
        result = original(self, preds, batch)
        calls.append(len(self.loss.adapters))
        return result

    distill.DistillCriterion.__call__ = counting
    try:
        pruned = prune.run_prune(trained_pt, tmp_path / "plan.json", data_yaml, params, tmp_path / "prune",
                                 {"map50_95": 0.0}, teacher=teacher)
        prune_calls = len(calls)
        metrics = qat.run_qat(tmp_path / "prune" / "best.pt", data_yaml, params, tmp_path / "qat",
                              {"control": {"map50_95": 0.0}, "pruned": pruned}, teacher=teacher)
    finally:
        distill.DistillCriterion.__call__ = original
    assert prune_calls > 0 and len(calls) > prune_calls  # both fine-tunings distilled
    assert calls[0] == 1  # the pruned P3 map (model.15) reaches the teacher through an adapter

    for m in (pruned, metrics, json.loads((tmp_path / "qat" / "metrics.json").read_text())):
        d = m["distill"]
        assert d["enabled"] and d["teacher"] == str(trained_pt) and d["teacher_sha256"] == sha256_file(trained_pt)
        assert d["teacher_source"] == "trained" and d["feature"] is True
    # The checkpoints do not carry the teacher along.
    ckpt = torch.load(tmp_path / "prune" / "best.pt", map_location="cpu", weights_only=False)
    assert getattr(ckpt["model"], "criterion", None) is None


def test_teacher_from_a_path_or_the_registry_is_named_in_the_record(tmp_path):
    from pipeline.io import sha256_file
    from pipeline.params import Params
    from pipeline.registry import open_registry
    from pipeline.workspace import Workspace

    from tests.test_prune import _tiny_checkpoint

    pt = _tiny_checkpoint(tmp_path / "teacher_s.pt")

    def workspace(teacher: str, enabled: bool = True) -> Workspace:
        return Workspace(tmp_path, Params.model_validate({"distill": {"enabled": enabled, "teacher": teacher}}))

    assert distill.stage_teacher(workspace("teacher_s.pt", enabled=False)) is None
    teacher = distill.stage_teacher(workspace("teacher_s.pt"))  # relative to the workspace root
    assert (teacher.path, teacher.source, teacher.sha256) == (tmp_path / "teacher_s.pt", "path", sha256_file(pt))

    registry = open_registry(Params().registry, base_dir=tmp_path)
    version = registry.register("train", {"best.pt": pt}, "best.pt").version
    registry.set_alias("trained", version, "test")
    for spec in ("registry:trained", f"registry:{version}"):
        ws = workspace(spec)
        teacher = distill.stage_teacher(ws)
        assert teacher.source == "registry" and teacher.registry_version == version
        assert teacher.sha256 == sha256_file(pt) and teacher.model is not None
        record = teacher.record(ws.params.distill)
        assert record["teacher_registry_version"] == version and record["teacher_sha256"] == sha256_file(pt)
    with pytest.raises(distill.DistillError, match="no alias 'nosuch'"):
        distill.stage_teacher(workspace("registry:nosuch"))
