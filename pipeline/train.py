"""Stage `train`: Ultralytics training of a model built from a model YAML (no downloaded weights)."""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import yaml

from pipeline import prepare_ultralytics
from pipeline.evaluate import evaluate
from pipeline.io import atomic_write, copy_file, write_json, write_text
from pipeline.params import Params, TrainParams
from pipeline.progress import log_ultralytics_epochs
from pipeline.workspace import Workspace


class TrainError(RuntimeError):
    pass


def run(ws: Workspace) -> dict:
    """Stage `train`: best.pt, metrics and curves in outputs/train; registers best.pt as `trained`."""
    from pipeline.gates import publish

    out_dir = ws.stage_dir()
    metrics = train(ws.data_yaml(), ws.params, out_dir)
    gate = publish(ws, files={"best.pt": out_dir / "best.pt"}, primary="best.pt", metrics=metrics,
                   gates=ws.params.train.gates)
    return {"metrics": metrics, "gate": gate}


def model_yaml(p: TrainParams, out_dir: Path) -> Path:
    """The model YAML to build from; with width/depth overrides, a scaled copy written to `out_dir`."""
    from ultralytics.nn.tasks import yaml_model_load

    if p.depth_multiple is None and p.width_multiple is None:
        return Path(p.model)
    try:
        cfg = yaml_model_load(p.model)
    except (FileNotFoundError, OSError) as e:
        raise TrainError(f"train.model {p.model!r}: no such model YAML ({e})") from None
    scales = cfg.get("scales") or {"n": [cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), 1024]}
    # Every scale gets the override, so the result does not depend on which letter the file name implies.
    for name, (depth, width, max_channels) in scales.items():
        scales[name] = [p.depth_multiple or depth, p.width_multiple or width, max_channels]
    cfg["scales"] = scales
    cfg.pop("yaml_file", None)
    cfg.pop("scale", None)
    out = out_dir / f"{Path(p.model).stem}-scaled.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def plot_curves(results_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with results_csv.open() as f:
        rows = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss", "val/cls_loss"):
        if key in rows[0]:
            ax_loss.plot(epochs, [r[key] for r in rows], label=key)
    ax_loss.set_xlabel("epoch"), ax_loss.set_title("loss"), ax_loss.legend()
    for key in ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/precision(B)", "metrics/recall(B)"):
        if key in rows[0]:
            ax_map.plot(epochs, [r[key] for r in rows], label=key.split("/")[1])
    ax_map.set_xlabel("epoch"), ax_map.set_title("validation"), ax_map.set_ylim(0, 1), ax_map.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_curves(results_csv: Path, out_csv: Path) -> None:
    """A tidy copy of Ultralytics' results.csv (stripped headers) that `dvc plots` reads."""
    with results_csv.open() as f:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_csv, buffer.getvalue())


def train(data_yaml: str | Path, params: Params, out_dir: str | Path) -> dict:
    """Train, then write best.pt (stripped), metrics.json, curves.csv and curves.png to `out_dir`."""
    from ultralytics import YOLO

    prepare_ultralytics()
    p = params.train
    # Absolute, or Ultralytics files a relative project under its own global runs folder.
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "ultralytics"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cfg = model_yaml(p, run_dir)  # a scaled copy is a working file: it goes with run_dir, not into the outputs
    try:
        model = YOLO(str(cfg), task="detect")
    except FileNotFoundError as e:
        raise TrainError(f"train.model {p.model!r}: no such model YAML ({e})") from None
    log_ultralytics_epochs(model, "train")
    model.train(data=str(data_yaml), imgsz=p.imgsz, epochs=p.epochs, batch=p.batch, seed=p.seed,
                deterministic=True, device=p.device, patience=p.patience, workers=p.workers, lr0=p.lr0,
                optimizer=p.optimizer, mosaic=p.mosaic, close_mosaic=p.close_mosaic,
                warmup_epochs=p.warmup_epochs,
                project=str(out_dir), name="ultralytics", exist_ok=True, plots=False, amp=False,
                verbose=False, pretrained=False)
    best = run_dir / "weights" / "best.pt"
    if not best.exists():
        raise TrainError(f"{best}: training finished without a best checkpoint")
    copy_file(best, out_dir / "best.pt")  # Ultralytics stripped the optimizer from it at the end of training
    results_csv = run_dir / "results.csv"
    write_curves(results_csv, out_dir / "curves.csv")
    plot_curves(results_csv, out_dir / "curves.png")
    shutil.rmtree(run_dir, ignore_errors=True)

    metrics = evaluate(out_dir / "best.pt", data_yaml, params)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
