"""`dvc repro` end to end in a throwaway git + DVC repo: every stage runs, then nothing runs again."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, write_tiny_params

pytestmark = [pytest.mark.skipif(shutil.which("git") is None, reason="needs git"), pytest.mark.slow]


def run(cmd, cwd, check=True):
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_dvc_repro_runs_every_stage_then_nothing(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    write_tiny_params(repo)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "ci@example.com"], repo)
    run(["git", "config", "user.name", "ci"], repo)
    run(dvc + ["init", "-q"], repo)
    run(dvc + ["config", "core.analytics", "false"], repo)
    (repo / ".gitignore").write_text("/registry/\n")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline"], repo)

    first = run(dvc + ["repro"], repo)
    from pipeline.stages import STAGES

    for stage in ["demo", *STAGES]:
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    assert (repo / "outputs" / "export" / "model.onnx").exists()
    assert (repo / "dvc.lock").exists()
    report = json.loads((repo / "outputs" / "gate" / "report.json").read_text())
    assert report["passed"] is True

    second = run(dvc + ["repro"], repo)
    assert "Running stage" not in second.stdout, second.stdout
    assert "Data and pipelines are up to date" in second.stdout

    metrics = run(dvc + ["metrics", "show", "--json"], repo)
    shown = json.loads(metrics.stdout)
    flat = json.dumps(shown)
    assert "map50_95" in flat and "outputs/train/metrics.json" in flat

    plots = run(dvc + ["plots", "show", "--json"], repo)
    assert "curves.csv" in plots.stdout

    # A params change reruns from the stage that reads it, and not before.
    run(dvc + ["params", "diff"], repo)
    text = (repo / "params.yaml").read_text().replace("champion_tolerance: 1.0", "champion_tolerance: 0.5")
    (repo / "params.yaml").write_text(text)
    third = run(dvc + ["repro"], repo)
    assert "Running stage 'gate'" in third.stdout
    assert "Running stage 'train'" not in third.stdout
