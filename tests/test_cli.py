"""`python -m pipeline`: exit codes and one-line errors that name the file and the problem."""
import re
import subprocess
import sys

from pipeline.__main__ import main


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    from pipeline.stages import STAGE_NAMES

    for name in [*STAGE_NAMES, "run", "registry", "bench", "dvc-yaml"]:
        assert name in out.stdout


def test_missing_data_yaml_is_named(workdir, capsys):
    assert main(["train", "--data", "nope/data.yaml"]) == 2
    assert "nope/data.yaml: no such data.yaml" in capsys.readouterr().err


def test_stage_without_its_inputs_says_what_to_run(workdir, capsys):
    assert main(["prune"]) == 2
    assert re.search(r"outputs/train/[\w.]+: missing; run `python -m pipeline train` first", capsys.readouterr().err)


def test_bad_override_names_the_key(workdir, capsys):
    assert main(["validate", "--set", "validate.max_exampels=3"]) == 2
    assert "validate.max_exampels" in capsys.readouterr().err


def test_bad_dataset_stops_with_exit_1_naming_the_file(workdir, capsys):
    from pipeline.demo_data import generate_demo
    from pipeline.params import DemoParams

    data = generate_demo(workdir / "mine", DemoParams(n_train=6, n_val=3, n_empty=0, imgsz=64, max_objects=1))
    label = sorted((workdir / "mine" / "labels" / "train").glob("*.txt"))[0]
    label.write_text("0 1.7 0.5 0.1 0.1\n")
    assert main(["run", "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "validation failed" in err and label.name in err
    assert not (workdir / "outputs" / "train").exists()  # the run stopped before training


def test_long_stages_show_progress_and_quiet_keeps_one_line_per_stage(workdir, capsys):
    assert main(["validate"]) == 0
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    assert "stage train: start" in out and "stage train: done in" in out
    # Per epoch: i/N, loss, val mAP, time per epoch, elapsed and time left.
    assert re.search(r"train epoch 1/1: loss \d+\.\d+, val mAP50-95 \d\.\d+, \d+s/epoch \(\d+s elapsed, 0s left\)",
                     out), out
    assert main(["sensitivity", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stage sensitivity: done in" in out and "sensitivity evaluation" not in out
    assert main(["sensitivity"]) == 0
    out = capsys.readouterr().out
    units = len(__import__("json").loads((workdir / "outputs/sensitivity/sensitivity.json").read_text()))
    assert f"sensitivity evaluation {units}/{units}: " in out
