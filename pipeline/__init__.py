"""Edge YOLO pipeline: validate -> train -> sensitivity -> prune -> qat -> export -> gate."""
import os

# Nothing in this pipeline may reach the network at run time: Ultralytics otherwise probes DNS,
# tries to download fonts and sends usage events.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def keep_datasets_read_only() -> None:
    """Stop Ultralytics writing `labels/*.cache` into the dataset folder.

    The dataset is a DVC-tracked input; a cache file appearing in it changes its hash, so `dvc repro`
    would see new data after every training run. Parsing labels again is cheap next to training.
    """
    import ultralytics.data.dataset as ultralytics_dataset

    def skip_saving(prefix, path, cache: dict, version: str) -> None:
        cache["version"] = version  # the caller expects the saver to stamp the version

    ultralytics_dataset.save_dataset_cache_file = skip_saving
