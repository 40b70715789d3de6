"""The benchmark's table and target verdicts, and the one latency timer on real ONNX Runtime and OpenVINO
sessions (the timings themselves belong to `python -m pipeline bench`, never to a test)."""
from pathlib import Path

import pytest

from pipeline import latency
from pipeline.bench import markdown_table, sub_workspace, target_lines

ROLES = ["fp32", "fp32_dfl", "control", "ultralytics_onnx_int8", "ultralytics_openvino", "ultralytics_openvino_int8",
         "ours_pruned", "ours_ort", "ours_openvino"]


def row(role, mb, map_, ms1, ms2, baseline=False, elsewhere=False):
    return {"artifact": role, "role": role, "runtime": "openvino" if "openvino" in role else "onnxruntime",
            "file_mb": mb, "params": 1000, "gflops": None, "map50_95": map_, "map50": map_,
            "map_measured_elsewhere": elsewhere, "baseline": baseline, "ms_1_thread": ms1, "ms_2_threads": ms2,
            "ms_1_thread_spread": (ms1 * 0.9, ms1 * 1.1), "ms_2_threads_spread": (ms2 * 0.9, ms2 * 1.1)}


def rows():
    return [row("fp32", 12.0, 0.60, 12.0, 8.0), row("fp32_dfl", 12.0, 0.60, 10.5, 7.5),
            row("control", 12.0, 0.70, 12.0, 8.0, baseline=True),
            row("ultralytics_onnx_int8", 3.2, 0.59, 20.0, 14.0), row("ultralytics_openvino", 12.0, 0.60, 8.0, 5.0),
            row("ultralytics_openvino_int8", 3.3, 0.60, 6.0, 4.0), row("ours_pruned", 4.0, 0.70, 6.0, 4.0),
            row("ours_ort", 1.2, 0.69, 3.5, 3.0), row("ours_openvino", 1.2, 0.69, 3.0, 2.0, elsewhere=True)]


def test_table_divides_accuracy_by_the_fair_baseline_and_speed_by_fp32():
    table = markdown_table(rows())
    assert table.count("\n") == 10  # header, rule, nine rows
    ours = next(line for line in table.splitlines() if line.startswith("| ours_ort |"))
    assert "| 0.690 | 98.6% |" in ours  # 0.69 / the control's 0.70, not / the undertrained 0.60
    assert "| 0.100 |" in ours  # 1.2 / 12.0 MB
    assert "3.43x / 2.67x" in ours  # 12.0 / 3.5 ms and 8.0 / 3.0 ms
    assert "3.50 (3.15-3.85)" in ours  # median with its spread
    assert "0.690* |" in table.splitlines()[-1]  # mAP taken from the ORT file


def test_targets_are_judged_against_their_own_references():
    verdicts = target_lines(rows())
    assert verdicts[0].startswith("- met: final INT8 file <= 1/8")
    assert verdicts[1].startswith("- met: mAP50-95 >= 97% of the fair FP32 baseline (measured 0.986")
    assert verdicts[2].startswith("- met: ONNX Runtime >= 3x faster than the FP32 ONNX (1 thread)")
    assert verdicts[3].startswith("- NOT met: ONNX Runtime >= 3x faster than the FP32 ONNX (2 threads)")
    assert verdicts[4].startswith("- met: OpenVINO >= 1.5x faster than Ultralytics' OpenVINO INT8 (1 thread) "
                                  "(measured 2.000")
    assert verdicts[5].startswith("- met: OpenVINO >= 1.5x faster than Ultralytics' OpenVINO INT8 (2 threads)")
    assert verdicts[6] == ("- for reference: ONNX Runtime speed-up vs the FP32 ONNX with the same DFL rewrite "
                           "3.00x (1 thread) / 2.50x (2 threads)")  # 10.5 / 3.5 and 7.5 / 3.0
    baseline_is_trained = rows()
    baseline_is_trained[0]["baseline"], baseline_is_trained[2]["baseline"] = True, False
    assert "(measured 1.150" in target_lines(baseline_is_trained)[1]


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("latency") / "conv.onnx"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU()).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(path), opset_version=17, dynamo=False)
    return path


def test_interleaved_times_onnx_runtime_and_openvino_in_the_same_rounds(conv_onnx, tmp_path):
    import openvino as ov

    ir_dir = tmp_path / "conv_openvino_model"
    ir_dir.mkdir()
    ov.save_model(ov.convert_model(str(conv_onnx)), str(ir_dir / "conv.xml"))
    measured = latency.interleaved({"ort": conv_onnx, "ov_ir": ir_dir, "ov_onnx": (conv_onnx, "openvino")},
                                   threads=1, warmup=1, runs=6, rounds=3)
    assert set(measured) == {"ort", "ov_ir", "ov_onnx"}
    for m in measured.values():
        assert m["runs"] == 6 and 0 < m["p25_ms"] <= m["median_ms"] <= m["p75_ms"]
    assert latency.median_ms(conv_onnx, 2, 1, 3) > 0


def test_timer_refuses_what_it_cannot_run(conv_onnx, tmp_path):
    with pytest.raises(latency.LatencyError, match="no such model"):
        latency.runner(tmp_path / "missing.onnx", 1)
    empty = tmp_path / "empty_openvino_model"
    empty.mkdir()
    with pytest.raises(latency.LatencyError, match="exactly one .xml, found 0"):
        latency.runner(empty, 1)
    with pytest.raises(latency.LatencyError, match="cannot run in 'tensorrt'"):
        latency.runner(conv_onnx, 1, "tensorrt")


def test_cpu_description_names_model_cores_and_vnni():
    text = latency.describe_cpu()
    assert "VNNI" in text and text.endswith(f"{latency.cpu_count()} cores")


def test_sub_workspace_changes_only_what_it_is_told(tmp_path):
    import yaml

    from conftest import write_tiny_params
    from pipeline.workspace import Workspace

    write_tiny_params(tmp_path)
    root = sub_workspace(Workspace.load(tmp_path), tmp_path / "bench" / "imgsz-96",
                         {"train.imgsz": 96, "data.demo.imgsz": 96})
    sub = Workspace.load(root)
    assert sub.params.train.imgsz == 96 and sub.params.data.demo.imgsz == 96
    assert sub.params.train.epochs == Workspace.load(tmp_path).params.train.epochs
    assert sub.params.registry.uri == "registry" and sub.data_yaml().parent == root / "data" / "demo"
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["model"] == "yolov8n.yaml"
