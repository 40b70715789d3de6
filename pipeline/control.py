"""Stage `control`: the fair FP32 baseline every compressed model is judged against.

Compression fine-tunes: pruning for `prune.steps x prune.epochs_per_step` epochs, QAT for `qat.epochs`. A
model that got those extra epochs is better than the trained one even with nothing removed, so "the pruned
model is 110% of the trained mAP" can hide a real loss. The control is the trained model fine-tuned for the
same number of extra epochs with the same recipe as pruning's fine-tuning (`prune.finetune`), nothing pruned
or quantized. The qat and acceptance gates, and the benchmark, measure accuracy against the best float model
of the run: this control or the pruned FP32 model, whichever is more accurate.

With `control.baseline: trained` the trained model itself is the baseline (train it to convergence instead:
many `train.epochs` and early stopping with `train.patience`); the stage then fine-tunes nothing and its
metrics are the trained model's.

Outputs in outputs/control: best.pt, metrics.json (with `extra_epochs` and `baseline`), gate.json.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.io import copy_file, read_json, write_json
from pipeline.params import Params
from pipeline.workspace import Workspace


def compression_epochs(params: Params) -> int:
    """Extra epochs a compressed model gets after training: every prune step's fine-tuning, then QAT."""
    return params.prune.steps * params.prune.epochs_per_step + params.qat.epochs


def run(ws: Workspace) -> dict:
    from pipeline.gates import publish

    out_dir = ws.stage_dir()
    trained = read_json(ws.input("outputs/train/metrics.json"))
    metrics = run_control(ws.input("outputs/train/best.pt"), ws.data_yaml(), ws.params, out_dir, trained)
    gate = publish(ws, files={"best.pt": out_dir / "best.pt"}, primary="best.pt", metrics=metrics,
                   gates=ws.params.control.gates)
    return {"metrics": metrics, "gate": gate}


def run_control(trained_pt: Path, data_yaml: Path, params: Params, out_dir: Path, trained_metrics: dict) -> dict:
    """Fine-tune `trained_pt` like pruning does, nothing removed; write out_dir/best.pt and metrics.json."""
    from pipeline import surgery
    from pipeline.evaluate import evaluate
    from pipeline.prune import finetune

    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = compression_epochs(params) if params.control.baseline == "control" else 0
    if epochs == 0:
        copy_file(trained_pt, out_dir / "best.pt")
        metrics = dict(trained_metrics)
    else:
        import tempfile

        model, ckpt = surgery.load_detection_model(trained_pt)
        with tempfile.TemporaryDirectory(prefix=".control-", dir=out_dir) as tmp:
            finetune(model, data_yaml, params, epochs, Path(tmp) / "finetune", trained_pt, what="control")
        surgery.save_checkpoint(model, out_dir / "best.pt", ckpt, control={"extra_epochs": epochs})
        metrics = evaluate(out_dir / "best.pt", data_yaml, params)
    metrics.update({"baseline": params.control.baseline, "extra_epochs": epochs,
                    "trained_map50_95": trained_metrics["map50_95"]})
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def best_float_model(metrics_by_model: dict[str, dict]) -> tuple[str, dict]:
    """(name, metrics) of the most accurate float model, e.g. of {"control": ..., "pruned": ...}: the accuracy
    reference of the qat and acceptance gates, so a fast candidate cannot spend accuracy fine-tuning bought."""
    name = max(metrics_by_model, key=lambda n: metrics_by_model[n]["map50_95"])
    return name, metrics_by_model[name]
