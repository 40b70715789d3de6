"""Edge YOLO pipeline: validate -> train -> sensitivity -> prune -> qat -> export -> gate."""
import os

# Nothing in this pipeline may reach the network at run time: Ultralytics otherwise probes DNS,
# tries to download fonts and sends usage events.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def prepare_ultralytics() -> None:
    """Make Ultralytics safe for a pipeline stage (idempotent, process-wide).

    - It must not write `labels/*.cache` into the dataset folder: the dataset is a DVC-tracked input, and
      a cache file appearing in it changes its hash, so `dvc repro` would see new data after every
      training run. Parsing labels again is cheap next to training.
    - It must not reach the network: `check_det_dataset`, which every train and val run calls, asks for
      Arial.ttf and sends a request to download it when it is not installed, whatever YOLO_OFFLINE says.
      Nothing here draws text (plots=False), so a missing font only means None, as offline.
    """
    import ultralytics.data.dataset as ultralytics_dataset
    import ultralytics.data.utils as data_utils

    if getattr(data_utils.check_font, "_local_only", False):
        return

    def skip_saving(prefix, path, cache: dict, version: str) -> None:
        cache["version"] = version  # the caller expects the saver to stamp the version

    def check_font_locally(font: str = "Arial.ttf"):
        from pathlib import Path

        from matplotlib import font_manager
        from ultralytics.utils import USER_CONFIG_DIR

        name = Path(font).name
        if (USER_CONFIG_DIR / name).exists():
            return USER_CONFIG_DIR / name
        matches = [f.fname for f in font_manager.fontManager.ttflist if font in f.fname]
        return matches[0] if matches else None

    check_font_locally._local_only = True
    ultralytics_dataset.save_dataset_cache_file = skip_saving
    data_utils.check_font = check_font_locally
