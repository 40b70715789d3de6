"""The stage table: the one place that says which stages exist, in which order, and what each reads and writes.

The CLI's subcommands (`python -m pipeline <stage>`), the Prefect flow's tasks and dvc.yaml all come from
`STAGES`. A stage is its own module with a `run(ws: Workspace) -> dict` function, its section of params.yaml,
one entry here and its test; `python -m pipeline dvc-yaml` then rewrites dvc.yaml, whose code deps are the
modules the stage really imports (`code_deps`), and a test keeps the committed file equal to the generated one.

Paths in `reads`, `outs`, `metrics` and `plots` are relative to the workspace root. A stage may read a file of
an earlier stage only through `ws.input(path)`, which refuses paths missing from its `reads`; a test checks that
every read is an output of an earlier stage, so after `dvc pull` every stage finds what it reads.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path
from typing import Callable

from pipeline.workspace import StageBinding, Workspace

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR_DEP = "${data.dir}"  # dvc.yaml's reference to params' data.dir: the dataset folder


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function", imported when the stage runs so the CLI starts without torch
    help: str
    params: tuple[str, ...]  # params.yaml sections or keys it reads
    reads: tuple[str, ...] = ()  # files of earlier stages
    outs: tuple[str, ...] = ()  # large outputs, cached by DVC
    metrics: tuple[str, ...] = ()  # small JSON outputs kept in git
    plots: tuple[str | tuple[str, dict], ...] = ()  # path, or (path, dvc plot options)
    uncached: tuple[str, ...] = ()  # other small outputs kept in git (reports)
    alias: str | None = None  # the registry alias it moves when its gates pass
    parent: str | None = None  # the alias of the model its artifact is derived from (lineage)
    reads_data: bool = True  # depends on the dataset folder
    fans_out: bool = False  # its independent evaluations run as mapped tasks in the flow (`run(ws, map_fn)`)

    @property
    def module(self) -> str:
        return self.entry.split(":")[0]

    def function(self) -> Callable[..., dict]:
        module, name = self.entry.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: list[Stage] = [
    Stage("demo", "pipeline.demo_data:run", "generate the built-in demo dataset into data/demo",
          params=("data.demo",), outs=("data/demo",), reads_data=False),
    Stage("validate", "pipeline.validate:run", "check the dataset with Great Expectations; stops on bad data",
          params=("data.yaml", "validate"), metrics=("outputs/validate/summary.json",),
          uncached=("outputs/validate/report.html",)),
    Stage("train", "pipeline.train:run", "train a YOLO model from its model YAML; registers best.pt",
          params=("data.yaml", "train", "evaluate", "export.opset"),
          reads=("outputs/validate/summary.json",), outs=("outputs/train/best.pt",),
          metrics=("outputs/train/metrics.json", "outputs/train/gate.json"),
          plots=(("outputs/train/curves.csv", {"x": "epoch"}), "outputs/train/curves.png"), alias="trained"),
    Stage("control", "pipeline.control:run",
          "the fair FP32 baseline: the trained model fine-tuned as long as compression fine-tunes, nothing removed",
          params=("data.yaml", "train", "evaluate", "export.opset", "control", "prune.steps", "prune.epochs_per_step",
                  "prune.finetune", "qat.epochs"),
          reads=("outputs/train/best.pt", "outputs/train/metrics.json"), outs=("outputs/control/best.pt",),
          metrics=("outputs/control/metrics.json", "outputs/control/gate.json"), alias="control", parent="trained"),
    Stage("sensitivity", "pipeline.sensitivity:run",
          "prune each layer alone at each ratio, measure the mAP drop, write a pruning plan",
          params=("data.yaml", "train.imgsz", "evaluate", "export.opset", "sensitivity"),
          reads=("outputs/train/best.pt",), outs=("outputs/sensitivity/plan.json",),
          metrics=("outputs/sensitivity/sensitivity.json",),
          plots=(("outputs/sensitivity/sensitivity.csv", {"template": "scatter", "x": "ratio", "y": "drop"}),
                 "outputs/sensitivity/curves.csv", "outputs/sensitivity/plot.png"),
          fans_out=True),
    Stage("prune", "pipeline.prune:run",
          "apply the plan with Torch-Pruning in steps, fine-tuning after each; registers best.pt",
          params=("data.yaml", "train", "evaluate", "export.opset", "sensitivity.latency", "prune", "distill"),
          reads=("outputs/train/best.pt", "outputs/train/metrics.json", "outputs/sensitivity/plan.json"),
          outs=("outputs/prune/best.pt",),
          metrics=("outputs/prune/metrics.json", "outputs/prune/gate.json", "outputs/prune/steps.json"),
          alias="pruned", parent="trained"),
    Stage("qat", "pipeline.qat:run",
          "quantization-aware fine-tuning; INT8 ONNX candidates (QAT and PTQ), the gate picks one",
          params=("data.yaml", "train", "evaluate", "export.opset", "export.simplify", "qat", "distill",
                  "prune.method"),
          # train/best.pt: the default distillation teacher (distill.teacher: trained)
          reads=("outputs/control/metrics.json", "outputs/prune/best.pt", "outputs/prune/metrics.json",
                 "outputs/train/best.pt"),
          outs=("outputs/qat/model_int8.onnx", "outputs/qat/pruned_fp32.onnx", "outputs/qat/qat_model.pt"),
          metrics=("outputs/qat/metrics.json", "outputs/qat/gate.json", "outputs/qat/candidates.json"),
          alias="qat", parent="pruned"),
    Stage("export", "pipeline.export:run",
          "the deployable INT8 ONNX (simplified, Ultralytics metadata, loads and predicts, parity with QAT) and "
          "its OpenVINO IR; registers each under its own alias",
          params=("data.yaml", "train.imgsz", "evaluate", "export", "qat.calib_images"),
          reads=("outputs/train/metrics.json", "outputs/qat/model_int8.onnx", "outputs/qat/pruned_fp32.onnx",
                 "outputs/qat/qat_model.pt", "outputs/qat/metrics.json"),
          outs=("outputs/export/model.onnx", "outputs/export/model_openvino_model"),
          metrics=("outputs/export/metrics.json", "outputs/export/gate.json", "outputs/export/metrics_openvino.json",
                   "outputs/export/gate_openvino.json"),
          alias="exported", parent="qat"),  # and exported-openvino, parent qat (pipeline.export.OPENVINO_ALIAS)
    Stage("gate", "pipeline.gates:run_acceptance",
          "acceptance gate: thresholds and champion/challenger per deploy target, then promote to production "
          "(and production-openvino)",
          params=("data.yaml", "train.imgsz", "evaluate", "gate", "export.openvino"),
          reads=("outputs/control/metrics.json", "outputs/prune/metrics.json", "outputs/export/model.onnx",
                 "outputs/export/metrics.json", "outputs/export/model_openvino_model",
                 "outputs/export/metrics_openvino.json"),
          metrics=("outputs/gate/report.json",), alias="production", parent="exported"),
]

STAGE_NAMES = [stage.name for stage in STAGES]
# The stages a whole run goes through; `demo` only makes data, which `ws.data_yaml()` does on first use anyway.
RUN_STAGES = [stage for stage in STAGES if stage.name != "demo"]


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def run_stage(stage: Stage | str, ws: Workspace, **kwargs) -> dict:
    """Run one stage on `ws`, allowed to read exactly its declared inputs."""
    stage = stage_named(stage) if isinstance(stage, str) else stage
    binding = StageBinding(stage.name, stage.reads, stage.alias, stage.parent)
    return stage.function()(ws.for_stage(binding), **kwargs)


# -------------------------------------------------------------------------------------------- dvc.yaml


def module_file(module: str) -> Path:
    return PACKAGE_DIR.parent / (module.replace(".", "/") + ".py")


def _imported_modules(module: str) -> set[str]:
    """Modules of our package that `module` imports anywhere in its source (lazy imports inside functions too)."""
    tree = ast.parse(module_file(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import surgery` imports the module pipeline.surgery
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    package = module.split(".")[0]
    return {name for name in found if name.split(".")[0] == package and module_file(name).is_file()}


def code_deps(module: str) -> list[str]:
    """Source files of every module of our package that `module` needs, itself included, transitively;
    the package's __init__ (run by every import) too. Paths relative to the repository root, sorted."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(_imported_modules(name) - seen)
    package = module.split(".")[0]
    seen.add(package)  # pipeline/__init__.py
    files = {module_file(name) if name != package else PACKAGE_DIR.parent / package / "__init__.py" for name in seen}
    return sorted(str(path.relative_to(PACKAGE_DIR.parent)) for path in files)


def _out_entries(stage: Stage) -> tuple[list, list, list]:
    outs = [*stage.outs, *({path: {"cache": False}} for path in stage.uncached)]
    metrics = [{path: {"cache": False}} for path in stage.metrics]
    plots = []
    for plot in stage.plots:
        path, options = (plot, {}) if isinstance(plot, str) else plot
        plots.append({path: {"cache": False, **options}})
    return outs, metrics, plots


def dvc_stages() -> dict:
    """dvc.yaml's `stages:` mapping, from the table."""
    stages = {}
    for stage in STAGES:
        deps = ([DATA_DIR_DEP] if stage.reads_data else []) + code_deps(stage.module) + list(stage.reads)
        entry = {"cmd": f"bin/pipeline {stage.name}", "deps": deps, "params": list(stage.params)}
        outs, metrics, plots = _out_entries(stage)
        for key, value in (("outs", outs), ("metrics", metrics), ("plots", plots)):
            if value:
                entry[key] = value
        stages[stage.name] = entry
    return stages


DVC_PLOTS = [
    {"training mAP": {"template": "linear", "x": "epoch",
                      "y": {"outputs/train/curves.csv": ["metrics/mAP50-95(B)", "metrics/mAP50(B)"]}}},
    {"training loss": {"x": "epoch",
                       "y": {"outputs/train/curves.csv": ["train/box_loss", "train/cls_loss", "train/dfl_loss"]}}},
]

DVC_YAML_HEADER = """\
# Generated from the stage table in pipeline/stages.py by `python -m pipeline dvc-yaml`; do not edit by hand
# (tests/test_stages_table.py fails when this file and the table disagree).
# `dvc repro` runs the same stage functions as `python -m pipeline run`, through the same CLI; bin/pipeline
# picks the project's interpreter whatever `python` the shell would find. Each stage lists exactly the code it
# imports, the files of earlier stages it reads, the params it reads, and what it writes.
"""


def dvc_yaml_text() -> str:
    import yaml

    body = yaml.safe_dump({"stages": dvc_stages(), "plots": DVC_PLOTS}, sort_keys=False, width=120)
    return DVC_YAML_HEADER + body
