"""The benchmark's table and target verdicts (the measurements themselves belong to `python -m pipeline bench`)."""
from pipeline.bench import markdown_table, target_lines


def row(name, mb, map_, ms1, ms2):
    return {"artifact": name, "file_mb": mb, "params": 1000, "gflops": None, "map50_95": map_, "map50": map_,
            "ms_1_thread": ms1, "ms_2_threads": ms2}


def test_table_has_ratios_to_fp32_and_targets_are_judged():
    rows = [row("fp32", 12.0, 0.80, 12.0, 8.0), row("ultra", 3.2, 0.79, 20.0, 14.0),
            row("pruned", 4.0, 0.79, 6.0, 4.0), row("ours", 1.2, 0.785, 3.5, 3.0)]
    table = markdown_table(rows)
    assert table.count("\n") == 5  # header, rule, four rows
    ours = table.splitlines()[-1]
    assert "| 0.100 |" in ours  # 1.2 / 12.0 MB
    assert "3.43x" in ours  # 12.0 / 3.5 ms
    verdicts = target_lines(rows)
    assert verdicts[0].startswith("- met: final file <= 1/8")
    assert verdicts[1].startswith("- met: mAP50-95 >= 97%")
    assert verdicts[2].startswith("- met: latency >= 3x faster than FP32 (1 thread)")
    assert verdicts[3].startswith("- NOT met: latency >= 3x faster than FP32 (2 threads)")  # 8.0 / 3.0 = 2.67
    assert verdicts[4].startswith("- met: latency >= 2x faster than Ultralytics INT8 (1 thread)")
