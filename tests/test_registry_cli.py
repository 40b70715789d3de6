"""`registry` CLI: each command called through its argparse parser and `registry_cli.main`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import registry_cli
from pipeline.params import Params, RegistryParams
from pipeline.registry import RegistryError, open_registry

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline")
    registry_cli.add_subparser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["registry", *argv])


@pytest.fixture
def params(tmp_path) -> Params:
    return Params(registry=RegistryParams(uri=str(tmp_path / "registry")))


@pytest.fixture
def three_versions(params, tmp_path):
    """train v1 -> prune v2 -> qat v3, production on v1."""
    reg = open_registry(params.registry)
    for version, stage in enumerate(["train", "prune", "qat"], start=1):
        weights = tmp_path / f"{stage}.pt"
        weights.write_text(f"weights {stage}")
        reg.register(stage=stage, files={"best.pt": weights}, primary="best.pt",
                     metrics={"map50_95": 0.5 + version / 100, "params": 1000, "latency_ms": {"cpu": 10}},
                     params={"train": {"epochs": 3, "imgsz": 160}, "prune": {"steps": version}},
                     params_hash=f"hash{version}", parent=version - 1 or None, actor="ci")
    reg.set_alias("production", 1, reason="first release")
    return reg


def run(params, capsys, *argv: str):
    """Run one command; return its stdout, parsed when --json was given."""
    assert registry_cli.main(parse(*argv), params) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv else out


def test_list(params, three_versions, capsys):
    listed = run(params, capsys, "list", "--json")
    assert [m["version"] for m in listed["versions"]] == [1, 2, 3]
    assert [m["stage"] for m in listed["versions"]] == ["train", "prune", "qat"]
    assert listed["aliases"] == {"production": 1}

    lines = run(params, capsys, "list").splitlines()
    assert lines[0].split() == ["version", "stage", "created", "parent", "sha256", "actor", "aliases"]
    assert lines[2].split()[:2] == ["1", "train"] and lines[2].split()[-1] == "production"
    assert len(lines) == 5


def test_list_of_an_empty_registry(params, capsys):
    assert run(params, capsys, "list") == "(no versions)\n"
    assert run(params, capsys, "list", "--json") == {"versions": [], "aliases": {}}


def test_show_prints_manifest_and_lineage(params, three_versions, capsys):
    shown = run(params, capsys, "show", "3", "--json")
    assert shown["manifest"]["version"] == 3 and shown["manifest"]["stage"] == "qat"
    assert shown["manifest"]["sha256"] == three_versions.manifest(3).sha256
    assert shown["lineage"] == [3, 2, 1]

    text = run(params, capsys, "show", "3")
    assert "lineage: v3 (qat) <- v2 (prune) <- v1 (train)" in text
    assert three_versions.manifest(3).sha256 in text and "latency_ms.cpu" in text

    assert run(params, capsys, "show", "production", "--json")["manifest"]["version"] == 1


def test_diff_lists_only_what_differs(params, three_versions, capsys):
    diff = run(params, capsys, "diff", "1", "3", "--json")
    assert diff["metrics"] == {"map50_95": {"a": 0.51, "b": 0.53}}
    assert diff["params"] == {"prune.steps": {"a": 1, "b": 3}}
    assert set(diff["manifest"]) == {"stage", "sha256", "params_hash", "parent"}

    text = run(params, capsys, "diff", "1", "3")
    assert "map50_95" in text and "prune.steps" in text and "train.epochs" not in text


def test_promote_rollback_and_history(params, three_versions, capsys):
    assert run(params, capsys, "promote", "3", "--to", "production", "--reason", "better map", "--json") == {
        "alias": "production", "version": 3, "previous": 1}
    assert three_versions.alias("production") == 3
    assert run(params, capsys, "promote", "2", "--to", "candidate") == "candidate: -> v2\n"

    assert run(params, capsys, "rollback", "--reason", "regression", "--json") == {
        "alias": "production", "version": 1, "previous": 3}
    assert run(params, capsys, "rollback", "--to", "2", "--json")["version"] == 2

    history = run(params, capsys, "history", "--json")
    moves = [(e["action"], e["alias"], e["version"], e["reason"]) for e in history if e["action"] != "register"]
    assert moves == [("promote", "production", 1, "first release"),
                     ("promote", "production", 3, "better map"),
                     ("promote", "candidate", 2, "promoted by hand"),
                     ("rollback", "production", 1, "regression"),
                     ("rollback", "production", 2, "rolled back by hand")]
    text = run(params, capsys, "history")
    assert text.splitlines()[0].split() == ["time", "actor", "action", "alias", "version", "reason"]
    assert "regression" in text


def test_errors_are_registry_errors(params, three_versions):
    with pytest.raises(RegistryError, match="no version 9"):
        registry_cli.main(parse("show", "9"), params)
    with pytest.raises(RegistryError, match="'staging' is neither a version number nor a set alias"):
        registry_cli.main(parse("promote", "staging", "--to", "production"), params)
    with pytest.raises(RegistryError, match="invalid alias 'prod/x'"):
        registry_cli.main(parse("promote", "1", "--to", "prod/x"), params)
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry_cli.main(parse("rollback"), params)
    with pytest.raises(SystemExit):
        parse("promote", "1")  # --to is required


@pytest.mark.skipif(not (REPO / "pipeline" / "__main__.py").exists(), reason="no `python -m pipeline` yet")
def test_python_dash_m_pipeline_registry(params, three_versions, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "registry", "--set",
                             f"registry.uri={tmp_path / 'registry'}", "--params", str(tmp_path / "none.yaml"),
                             "list", "--json"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [m["version"] for m in json.loads(result.stdout)["versions"]] == [1, 2, 3]

    result = subprocess.run([sys.executable, "-m", "pipeline", "registry", "--set",
                             f"registry.uri={tmp_path / 'registry'}", "--params", str(tmp_path / "none.yaml"),
                             "show", "42"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: detector: no version 42 in {tmp_path / 'registry'}"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_remote_for_a_local_registry(tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)

    params = Params(registry=RegistryParams(uri="registry"))
    shown = run(params, capsys, "dvc-remote", "--repo", str(repo), "--json")
    assert shown == {"remote": "registry", "url": "registry/dvc", "default": True}
    config = (repo / ".dvc" / "config").read_text()
    # Stored relative to .dvc/, so it means <repo>/registry/dvc in every checkout.
    assert "remote = registry" in config and "url = ../registry/dvc" in config
