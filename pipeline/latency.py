"""Latency on the CPU, the one timer: ONNX Runtime for `.onnx` files, OpenVINO for IR (`.xml`, or an
Ultralytics `*_openvino_model/` folder), at batch 1, in either runtime's latency mode.

Models compared with one another are timed interleaved: one session per model, then `rounds` rounds in
which each model runs `runs_per_round` times in turn, so the machine's noise (other jobs, frequency
changes) falls on every model alike. ONNX Runtime's sessions are made with thread spinning off: with it on,
an idle session's threads keep spinning after each call and steal the cores the next model runs on
(measured: every 2-thread timing doubled). The result of a model is the median of all its timed runs with
the 25th and 75th percentiles as spread.

`describe_cpu()` names the CPU (model, cores, VNNI) that every latency table must print: INT8 speed-ups
depend on it.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np


class LatencyError(RuntimeError):
    pass


def openvino_xml(path: str | Path) -> Path | None:
    """The IR file of an OpenVINO model given as its `.xml` or as a folder holding one; None for other paths."""
    path = Path(path)
    if path.suffix == ".xml":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.xml"))
        if len(found) != 1:
            raise LatencyError(f"{path}: an OpenVINO model folder holds exactly one .xml, found {len(found)}")
        return found[0]
    return None


def runner(model_path: str | Path, threads: int, runtime: str | None = None) -> Callable[[], object]:
    """A zero-argument callable that runs the model once on a fixed random batch-1 input. `runtime`
    ("onnxruntime" or "openvino") defaults to the model's own: OpenVINO for IR, ONNX Runtime for `.onnx`;
    OpenVINO also reads `.onnx` files directly."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise LatencyError(f"{model_path}: no such model")
    xml = openvino_xml(model_path)
    runtime = runtime or ("openvino" if xml is not None else "onnxruntime")
    if runtime not in {"onnxruntime", "openvino"} or (runtime == "onnxruntime" and xml is not None):
        raise LatencyError(f"{model_path}: cannot run in {runtime!r} (runtimes: onnxruntime for .onnx, openvino)")
    rng = np.random.default_rng(0)
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(str(xml or model_path), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_NUM_THREADS": threads})
        shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).get_partial_shape()]
        request = compiled.create_infer_request()
        x = rng.random(shape, dtype=np.float32)
        return lambda: request.infer({0: x})
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in model_input.shape]
    feed = {model_input.name: rng.random(shape, dtype=np.float32)}
    return lambda: session.run(None, feed)


def interleaved(models: dict[str, str | Path | tuple], threads: int, warmup: int = 5, runs: int = 30,
                rounds: int = 5) -> dict[str, dict]:
    """{name: {"median_ms", "p25_ms", "p75_ms", "runs"}} of every model, timed in turns.

    A model is a path, or (path, runtime) or [path, runtime] to choose the runtime. `runs` timed runs per model in all, spread
    over `rounds` rounds (at least one run per round)."""
    if not models:
        return {}
    runners = {name: runner(model[0], threads, model[1]) if isinstance(model, (tuple, list)) else runner(model, threads)
               for name, model in models.items()}
    for run in runners.values():
        for _ in range(warmup):
            run()
    rounds = max(1, min(rounds, runs))
    per_round = max(1, round(runs / rounds))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: summary(values) for name, values in times.items()}


def summary(times_ms: list[float]) -> dict:
    quartiles = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    return {"median_ms": statistics.median(times_ms), "p25_ms": quartiles[0], "p75_ms": quartiles[2],
            "runs": len(times_ms)}


def median_ms(model_path: str | Path, threads: int, warmup: int, runs: int) -> float:
    """Median latency of one model on its own (no comparison: a stage's own metric)."""
    return interleaved({"model": model_path}, threads, warmup, runs, rounds=1)["model"]["median_ms"]


def has_vnni() -> bool:
    """Whether this CPU has VNNI (8-bit dot products without the 16-bit saturation of AVX2's kernels)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def describe_cpu() -> str:
    """'x86_64 AMD EPYC (with VNNI), 2 cores': what a latency figure was measured on."""
    model = platform.processor() or "cpu"
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                      if line.startswith("model name")), model)
    except OSError:
        pass
    vnni = "with" if has_vnni() else "no"
    return f"{platform.machine()} {model} ({vnni} VNNI), {cpu_count()} cores"
