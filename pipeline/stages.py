"""The pipeline's stages bound to their standard paths under `outputs/`.

Each function here is one stage exactly as dvc.yaml, the CLI and the Prefect flow run it: it reads the
previous stage's outputs, calls the stage's own module, writes `outputs/<stage>/`, and publishes the
artifact to the registry through its gates. Nothing else decides where files go.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.io import read_json, write_json
from pipeline.params import DEMO_DATA_YAML, Params

DEMO_DIR = Path(DEMO_DATA_YAML).parent
OUTPUTS = Path("outputs")
TRAIN_DIR = OUTPUTS / "train"
SENSITIVITY_DIR = OUTPUTS / "sensitivity"
PRUNE_DIR = OUTPUTS / "prune"
QAT_DIR = OUTPUTS / "qat"
EXPORT_DIR = OUTPUTS / "export"
GATE_DIR = OUTPUTS / "gate"
VALIDATE_DIR = OUTPUTS / "validate"

STAGES = ["validate", "train", "sensitivity", "prune", "qat", "export", "gate"]
# The registry alias each model-producing stage moves when its gates pass, in lineage order.
ALIASES = {"train": "trained", "prune": "pruned", "qat": "qat", "export": "exported"}


class StageInputMissing(FileNotFoundError):
    pass


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageInputMissing(f"{path}: missing; run `python -m pipeline {stage}` first")
    return path


def data_yaml(params: Params) -> Path:
    """The dataset's data.yaml; the built-in demo dataset is generated on first use."""
    path = Path(params.data.yaml)
    if params.data.yaml == DEMO_DATA_YAML:
        from pipeline.demo_data import generate_demo

        return generate_demo(DEMO_DIR, params.data.demo)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data.yaml (set data.yaml in params.yaml or pass --data)")
    return path


def dataset_hash(params: Params) -> str:
    from pipeline.dataset import dataset_hash as content_hash, load_data_yaml

    return content_hash(load_data_yaml(data_yaml(params)))


def demo(params: Params) -> dict:
    """Always (re)writes the demo dataset in data/demo, whatever data.yaml points at: dvc.yaml's
    `demo` stage owns that folder."""
    from pipeline.demo_data import generate_demo

    return {"data_yaml": str(generate_demo(DEMO_DIR, params.data.demo))}


def validate(params: Params) -> dict:
    from pipeline.validate import validate as run_validation

    result = run_validation(data_yaml(params), params.validate_, VALIDATE_DIR)
    return {"success": result.success, "expectations": len(result.expectations), **result.stats}


def train(params: Params) -> dict:
    from pipeline.gates import publish
    from pipeline.train import train as run_training

    metrics = run_training(data_yaml(params), params, TRAIN_DIR)
    gate = publish(params, stage="train", alias=ALIASES["train"], files={"best.pt": TRAIN_DIR / "best.pt"},
                   primary="best.pt", metrics=metrics, gates=params.train.gates,
                   dataset_hash=dataset_hash(params), out_dir=TRAIN_DIR)
    return {"metrics": metrics, "gate": gate}


def _single_threaded_worker() -> None:
    import torch

    torch.set_num_threads(1)


def process_pool_map(workers: int):
    """A builtin-`map` stand-in over `workers` local processes, one torch thread each: small models
    evaluate faster side by side than one at a time with every core fighting over each."""
    def pool_map(function, *iterables):
        if workers <= 1:
            return list(map(function, *iterables))
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process that already runs torch's thread pools can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_single_threaded_worker) as pool:
            return list(pool.map(function, *iterables))

    return pool_map


def sensitivity(params: Params, map_fn=None) -> dict:
    """`map_fn(function, *iterables)` runs the independent evaluations: local processes from the CLI and
    DVC, Prefect's task mapping (threads or Dask) in the flow."""
    from pipeline.sensitivity import run_sensitivity

    map_fn = map_fn or process_pool_map(params.orchestration.max_workers)
    # Absolute paths: evaluations may run in other processes or on Dask workers elsewhere (same mount).
    result = run_sensitivity(_require(TRAIN_DIR / "best.pt", "train").resolve(), data_yaml(params).resolve(),
                             params, SENSITIVITY_DIR, map_fn=map_fn, granularity=params.sensitivity.granularity)
    plan = result["plan"]
    return {"baseline": result["baseline"], "evaluations": len(result["rows"]),
            "plan": {k: v for k, v in plan.items() if k not in ("model",)}}


def prune(params: Params) -> dict:
    from pipeline.gates import publish
    from pipeline.prune import run_prune

    metrics = run_prune(_require(TRAIN_DIR / "best.pt", "train"),
                        _require(SENSITIVITY_DIR / "plan.json", "sensitivity"), data_yaml(params), params, PRUNE_DIR)
    gate = publish(params, stage="prune", alias=ALIASES["prune"], files={"best.pt": PRUNE_DIR / "best.pt"},
                   primary="best.pt", metrics=metrics, gates=params.prune.gates, dataset_hash=dataset_hash(params),
                   out_dir=PRUNE_DIR, parent_alias=ALIASES["train"], reference=read_json(TRAIN_DIR / "metrics.json"))
    return {"metrics": metrics, "gate": gate}


def qat(params: Params) -> dict:
    from pipeline.gates import publish
    from pipeline.qat import run_qat

    trained = read_json(_require(TRAIN_DIR / "metrics.json", "train"))
    pruned = read_json(_require(PRUNE_DIR / "metrics.json", "prune"))
    metrics = run_qat(_require(PRUNE_DIR / "best.pt", "prune"), data_yaml(params), params, QAT_DIR, trained, pruned)
    gate = publish(params, stage="qat", alias=ALIASES["qat"], files={"model_int8.onnx": QAT_DIR / "model_int8.onnx"},
                   primary="model_int8.onnx", metrics=metrics, gates=params.qat.gates,
                   dataset_hash=dataset_hash(params), out_dir=QAT_DIR, parent_alias=ALIASES["prune"],
                   reference=trained, reference_latency_ms=metrics["reference_fp32_latency_ms"])
    return {"metrics": metrics, "gate": gate}


def export(params: Params) -> dict:
    """The deployable INT8 ONNX: the qat stage's choice, simplified, with Ultralytics' metadata, checked
    to load and predict in Ultralytics, and (for a QAT model) checked against its torch twin."""
    from pipeline.evaluate import evaluate
    from pipeline.export import check_loads_and_predicts
    from pipeline.gates import publish
    from pipeline.int8 import PARITY_TOLERANCE, finalize_int8, parity_check

    model = EXPORT_DIR / "model.onnx"
    qat_metrics = read_json(_require(QAT_DIR / "metrics.json", "qat"))
    kernels = finalize_int8(_require(QAT_DIR / "model_int8.onnx", "qat"), QAT_DIR / "pruned_fp32.onnx", model,
                            simplify=params.export.simplify)
    check_loads_and_predicts(model, data_yaml(params), params.train.imgsz)
    metrics = evaluate(model, data_yaml(params), params)
    metrics["integer_kernels"] = kernels
    extra_checks = []
    if qat_metrics.get("qat_torch_pt"):
        parity = parity_check(model, qat_metrics["qat_torch_pt"], data_yaml(params), params)
        metrics["parity"] = parity
        extra_checks.append({"gate": "parity_with_qat_torch_model", "value": round(parity["abs_diff"], 6),
                             "limit": PARITY_TOLERANCE, "passed": parity["passed"]})
    write_json(EXPORT_DIR / "metrics.json", metrics)
    gate = publish(params, stage="export", alias=ALIASES["export"], files={"model.onnx": model}, primary="model.onnx",
                   metrics=metrics, gates=params.export.gates, dataset_hash=dataset_hash(params),
                   out_dir=EXPORT_DIR, parent_alias=ALIASES["qat"], reference=read_json(TRAIN_DIR / "metrics.json"),
                   extra_checks=extra_checks)
    return {"metrics": metrics, "gate": gate}


def gate(params: Params) -> dict:
    """Acceptance: absolute thresholds, then champion/challenger against the current production model."""
    from pipeline.evaluate import evaluate
    from pipeline.gates import GateFailed, check, format_report
    from pipeline.params import StageGates
    from pipeline.registry import open_registry

    g = params.gate
    registry = open_registry(params.registry)
    candidate_version = registry.alias("exported")
    if candidate_version is None:
        raise StageInputMissing("registry has no 'exported' model; run `python -m pipeline export` first")
    candidate = registry.manifest(candidate_version)
    metrics = read_json(_require(EXPORT_DIR / "metrics.json", "export"))
    if metrics.get("file_bytes") != candidate.files[candidate.primary].bytes:
        raise StageInputMissing(f"{EXPORT_DIR / 'metrics.json'} does not describe registry version "
                                f"{candidate_version}; rerun `python -m pipeline export`")
    checks = check(metrics, StageGates(min_map50_95=g.min_map50_95, max_file_mb=g.max_file_mb,
                                       max_latency_ms=g.max_latency_ms))
    champion = registry.alias("production")
    champion_metrics = None
    if champion is not None and champion != candidate_version:
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
            files = registry.fetch(champion, Path(tmp))  # sha256-verified before anything loads it
            champion_manifest = registry.manifest(champion)
            champion_metrics = evaluate(files[champion_manifest.primary], data_yaml(params), params,
                                        latency=False)
        floor = champion_metrics["map50_95"] - g.champion_tolerance
        checks.append({"gate": f"not_worse_than_production_v{champion}", "value": metrics["map50_95"],
                       "limit": round(floor, 6), "passed": metrics["map50_95"] >= floor})
    report = {"stage": "gate", "alias": "production", "version": candidate_version,
              "passed": all(c["passed"] for c in checks), "checks": checks,
              "production_before": champion, "champion_metrics": champion_metrics, "candidate_metrics": metrics}
    write_json(GATE_DIR / "report.json", report)
    registry.set_alias("candidate", candidate_version, reason="acceptance gate evaluated")
    if not report["passed"]:
        raise GateFailed(report)
    if champion != candidate_version:
        registry.set_alias("production", candidate_version, reason=format_report(report))
    return report


def bench(params: Params) -> dict:
    """Benchmark table (pipeline/bench.py); runs the pipeline first where its outputs are missing."""
    from pipeline.bench import bench as run_bench

    needed = [TRAIN_DIR / "best.pt", PRUNE_DIR / "best.pt", EXPORT_DIR / "model.onnx"]
    if not all(path.exists() for path in needed):
        for name in STAGES[:STAGES.index("export") + 1]:
            STAGE_FUNCTIONS[name](params)
    result = run_bench(params, data_yaml(params), TRAIN_DIR, PRUNE_DIR, EXPORT_DIR / "model.onnx")
    print(result["markdown"])
    return {"rows": result["rows"]}


STAGE_FUNCTIONS = {"demo": demo, "validate": validate, "train": train, "sensitivity": sensitivity, "prune": prune,
                   "qat": qat, "export": export, "gate": gate}
