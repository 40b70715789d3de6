"""The stage table is the one declaration of the stages: dvc.yaml, the CLI and the flow agree with it, and it
tells the truth about what each stage reads."""
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline import stages
from pipeline.params import Params
from pipeline.workspace import StageBinding, StageInputMissing, UndeclaredInput, Workspace


def test_committed_dvc_yaml_is_the_one_generated_from_the_table():
    assert (REPO / "dvc.yaml").read_text() == stages.dvc_yaml_text(), (
        "dvc.yaml differs from the stage table: run `python -m pipeline dvc-yaml` and commit the result")


def test_dvc_yaml_check_command_says_when_it_differs(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    check = [sys.executable, "-m", "pipeline", "dvc-yaml", "--check", "--root", str(tmp_path)]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 1
    assert subprocess.run([sys.executable, "-m", "pipeline", "dvc-yaml", "--root", str(tmp_path)],
                          capture_output=True, text=True).returncode == 0
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    assert (tmp_path / "dvc.yaml").read_text() == stages.dvc_yaml_text()


def test_every_read_is_written_by_an_earlier_stage():
    written: dict[str, str] = {}
    for stage in stages.STAGES:
        for path in stage.reads:
            assert path in written, f"stage {stage.name} reads {path}, which no earlier stage writes"
        for plot in stage.plots:
            written[plot if isinstance(plot, str) else plot[0]] = stage.name
        for path in (*stage.outs, *stage.metrics, *stage.uncached):
            assert path not in written, f"{path} is written by {written[path]} and {stage.name}"
            written[path] = stage.name


def test_every_stage_writes_under_its_own_folder_and_moves_its_own_alias():
    aliases = [stage.alias for stage in stages.STAGES if stage.alias]
    assert len(aliases) == len(set(aliases))
    for stage in stages.STAGES:  # lineage: a model derives from one made by an earlier stage
        earlier = {s.alias for s in stages.STAGES[:stages.STAGES.index(stage)]}
        assert stage.parent is None or stage.parent in earlier, (stage.name, stage.parent)
    for stage in stages.STAGES:
        for path in (*stage.outs, *stage.metrics, *stage.uncached):
            assert path.startswith(f"outputs/{stage.name}/") or stage.name == "demo", (stage.name, path)


def test_code_deps_follow_imports_made_inside_functions_too():
    export_deps = stages.code_deps("pipeline.export")
    # export imports int8 and gates only inside its run(), qat only inside nncf_source(); gates imports the
    # registry at module level.
    assert {"pipeline/export.py", "pipeline/int8.py", "pipeline/gates.py", "pipeline/registry.py",
            "pipeline/qat.py", "pipeline/__init__.py"} <= set(export_deps)
    assert "pipeline/stages.py" not in export_deps and "pipeline/sensitivity.py" not in export_deps
    assert stages.code_deps("pipeline.demo_data") == [
        "pipeline/__init__.py", "pipeline/demo_data.py", "pipeline/params.py", "pipeline/workspace.py"]


def test_declared_params_exist():
    tree = Params().as_dict()
    for stage in stages.STAGES:
        for name in stage.params:
            node = tree
            for part in name.split("."):
                assert isinstance(node, dict) and part in node, f"stage {stage.name}: no params entry {name}"
                node = node[part]


def test_cli_and_flow_come_from_the_table():
    from flows import pipeline_flow
    from pipeline.__main__ import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(stages.STAGE_NAMES) <= set(subcommands)
    fanned_out = {stage.name for stage in stages.RUN_STAGES if stage.fans_out}
    assert set(pipeline_flow.STAGE_TASKS) | fanned_out == {stage.name for stage in stages.RUN_STAGES}
    assert fanned_out == {"sensitivity"}


def test_a_stage_may_read_only_what_it_declares(tmp_path):
    ws = Workspace(tmp_path, Params()).for_stage(StageBinding("prune", ("outputs/train/best.pt",), "pruned", "trained"))
    with pytest.raises(UndeclaredInput, match="outputs/qat/metrics.json"):
        ws.input("outputs/qat/metrics.json")
    with pytest.raises(StageInputMissing, match="outputs/train/best.pt: missing; run `python -m pipeline train`"):
        ws.input("outputs/train/best.pt")
    (tmp_path / "outputs" / "train").mkdir(parents=True)
    (tmp_path / "outputs" / "train" / "best.pt").write_bytes(b"x")
    assert ws.input("outputs/train/best.pt") == tmp_path / "outputs" / "train" / "best.pt"
