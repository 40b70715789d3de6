"""Progress lines for long work (training epochs, fine-tuning, QAT, sensitivity evaluations).

Everything goes through the standard `logging` logger `pipeline.progress` (stage start/done lines through
`pipeline`): the CLI prints them (`--quiet` silences the progress ones), and the Prefect flow ships them to the
run's logs (flows/__init__.py names `pipeline` as an extra logger). Stage code never prints.
"""
from __future__ import annotations

import logging
import time

stage_log = logging.getLogger("pipeline")
log = logging.getLogger("pipeline.progress")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """A k/N counter: each `step()` logs `<what> k/N[: details] (elapsed, time left)`."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.started = time.monotonic()

    def step(self, details: str = "") -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * max(self.total - self.done, 0)
        log.info("%s %d/%d%s (%s elapsed, %s left)", self.what, self.done, self.total,
                 f": {details}" if details else "", duration(elapsed), duration(left))


def epoch_details(loss: float, map50_95: float | None, seconds: float) -> str:
    text = f"loss {loss:.4f}"
    if map50_95 is not None:
        text += f", val mAP50-95 {map50_95:.4f}"
    return text + f", {duration(seconds)}/epoch"


def log_ultralytics_epochs(trainer, what: str) -> None:
    """Attach epoch lines to an Ultralytics trainer (or a YOLO model, which forwards callbacks to its trainer)."""
    state: dict = {}

    def on_train_start(trainer) -> None:
        state["progress"] = Progress(what + " epoch", trainer.epochs)
        state["epoch_started"] = time.monotonic()

    def on_fit_epoch_end(trainer) -> None:
        losses = trainer.tloss.values() if isinstance(trainer.tloss, dict) else trainer.tloss
        loss = float(sum(float(v) for v in losses)) if trainer.tloss is not None else float("nan")
        map50_95 = (trainer.metrics or {}).get("metrics/mAP50-95(B)")
        now = time.monotonic()
        seconds, state["epoch_started"] = now - state["epoch_started"], now
        progress = state["progress"]
        progress.total = trainer.epochs  # Ultralytics may change it (time-limited training)
        progress.step(epoch_details(loss, None if map50_95 is None else float(map50_95), seconds))

    trainer.add_callback("on_train_start", on_train_start)
    trainer.add_callback("on_fit_epoch_end", on_fit_epoch_end)


def configure_console(quiet: bool = False) -> None:
    """CLI output: `[pipeline HH:MM:SS] message` on stdout; `quiet` keeps only the stage lines."""
    import sys

    logger = logging.getLogger("pipeline")
    for old in [h for h in logger.handlers if getattr(h, "_pipeline_console", False)]:
        logger.removeHandler(old)  # bound to an earlier sys.stdout (a test's capture, closed by now)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[pipeline %(asctime)s] %(message)s", "%H:%M:%S"))
    handler._pipeline_console = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
