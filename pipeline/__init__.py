"""Edge YOLO pipeline: validate -> train -> sensitivity -> prune -> qat -> export -> gate."""
import os

# Nothing in this pipeline may reach the network at run time: Ultralytics otherwise probes DNS,
# tries to download fonts and sends usage events.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
