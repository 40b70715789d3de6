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
from pipeline.registry import DamagedRecord, RegistryError, open_registry

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
    assert run(params, capsys, "list", "--json") == {"versions": [], "aliases": {}, "dangling": {}, "damaged": []}


def test_list_and_history_pages(params, three_versions, capsys):
    assert [m["version"] for m in run(params, capsys, "list", "--limit", "2", "--json")["versions"]] == [2, 3]
    history = run(params, capsys, "history", "--limit", "2", "--json")
    assert [(e["action"], e["version"]) for e in history] == [("register", 3), ("promote", 1)]


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


# ---------------------------------------------------------------- bad input


def test_only_ascii_digits_of_bounded_length_are_versions(params, three_versions):
    # '\u00b2' (superscript two) and '\u0661' (Arabic-Indic one) are digits to str.isdigit
    for text in ["\u00b2", "\u0661", "1" * 5000, "0", "-1", "1.0", "v 1"]:
        for argv in (["show", text], ["diff", "1", text], ["promote", text, "--to", "candidate"],
                     ["rollback", "--to", text]):
            with pytest.raises(RegistryError) as error:
                registry_cli.main(parse(*argv), params)
            assert len(str(error.value)) < 200 and "\n" not in str(error.value), (argv, error.value)
    assert three_versions.alias("production") == 1 and three_versions.alias("candidate") is None


def pipeline_main(tmp_path, capsys, *argv: str) -> tuple[int, list[str]]:
    """`python -m pipeline registry ...` in this process: its exit code and its stderr lines."""
    from pipeline.__main__ import main
    code = main(["registry", "--params", str(tmp_path / "none.yaml"), *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_bad_endpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert pipeline_main(tmp_path, capsys, "--set", "registry.uri=s3://models/x", "--set",
                         "registry.endpoint_url=notaurl", "list") == (
        2, ["error: registry.endpoint_url 'notaurl': expected http(s)://host[:port]"])


# ---------------------------------------------------------------- damaged records


def damage(params, key: str, data: bytes) -> Path:
    path = Path(params.registry.uri) / "detector" / key
    path.write_bytes(data)
    return path


def run_with_errors(params, capsys, *argv: str):
    """Run a command that meets damaged records: exit 2, its output, the error lines."""
    assert registry_cli.main(parse(*argv), params) == 2
    out, err = capsys.readouterr()
    return (json.loads(out) if "--json" in argv else out), err.splitlines()


def test_damaged_manifests_are_skipped_by_list_and_one_line_elsewhere(params, three_versions, capsys):
    index = damage(params, "index/0.json", b"\x00garbage")
    manifest = damage(params, "versions/2/manifest.json", b'{"model": "detector", "version": 2')
    listed, errors = run_with_errors(params, capsys, "list", "--json")
    assert [m["version"] for m in listed["versions"]] == [1, 3]  # from the manifests themselves
    assert len(errors) == 2 and all(line.startswith("error: skipped ") for line in errors)
    assert f"{index}: not a valid index page" in errors[0] and f"{manifest}: not valid JSON" in errors[1]
    assert listed["damaged"] == [line[len("error: skipped "):] for line in errors]

    for argv in (["show", "2"], ["diff", "1", "2"], ["promote", "2", "--to", "candidate"]):
        with pytest.raises(DamagedRecord, match="not valid JSON") as error:
            registry_cli.main(parse(*argv), params)
        assert str(error.value).startswith(f"{manifest}: ") and "\n" not in str(error.value)

    damage(params, "versions/3/manifest.json", b'{"model": "detector", "version": 3, "files": []}')
    with pytest.raises(DamagedRecord, match="versions/3/manifest.json: not a valid Manifest record"):
        registry_cli.main(parse("show", "3"), params)


def test_a_damaged_alias_is_one_line_and_list_shows_the_rest(params, three_versions, capsys):
    alias = damage(params, "aliases/production.json", b'{"alias": "production", "version": "one"}')
    for argv in (["promote", "2", "--to", "production"], ["rollback"], ["show", "production"]):
        with pytest.raises(DamagedRecord) as error:
            registry_cli.main(parse(*argv), params)
        assert str(error.value).startswith(f"{alias}: not a valid AliasDoc record: version:")
    listed, errors = run_with_errors(params, capsys, "list", "--json")
    assert [m["version"] for m in listed["versions"]] == [1, 2, 3] and listed["aliases"] == {}
    assert errors == [f"error: skipped {alias}: not a valid AliasDoc record: version: Input should be a "
                      f"valid integer"]
    history, errors = run_with_errors(params, capsys, "history", "--json")
    assert [e["action"] for e in history] == ["register"] * 3 + ["promote"] and len(errors) == 1


def test_a_damaged_event_is_skipped_by_history(params, three_versions, capsys):
    events = sorted((Path(params.registry.uri) / "detector" / "events").iterdir())
    events[1].write_text('{"action": "register", "version": 2}')
    history, errors = run_with_errors(params, capsys, "history", "--json")
    assert [(e["action"], e["version"]) for e in history] == [("register", 1), ("register", 3), ("promote", 1)]
    assert errors == [f"error: skipped {events[1]}: not a valid Event record: time: Field required "
                      f"(and 1 more problems)"]
    text, _ = run_with_errors(params, capsys, "history")
    assert "first release" in text


def test_a_dangling_alias_is_shown_not_hidden(params, three_versions, capsys):
    doc = json.loads((Path(params.registry.uri) / "detector" / "aliases" / "production.json").read_text())
    damage(params, "aliases/candidate.json", json.dumps({**doc, "alias": "candidate", "version": 9}).encode())
    assert run(params, capsys, "list", "--json")["dangling"] == {"candidate": 9}
    assert "dangling alias: candidate -> v9 (no such version)" in run(params, capsys, "list").splitlines()
    with pytest.raises(RegistryError, match="alias 'candidate' is dangling: it points at v9"):
        registry_cli.main(parse("show", "candidate"), params)


def test_damaged_records_through_python_dash_m_pipeline(params, three_versions, tmp_path, capsys):
    manifest = damage(params, "versions/2/manifest.json", b"[]")
    assert pipeline_main(tmp_path, capsys, "--set", f"registry.uri={params.registry.uri}", "show", "2") == (
        2, [f"error: {manifest}: not a valid Manifest record: the document: Input should be an object"])


# ---------------------------------------------------------------- gc


def test_gc_is_a_dry_run_unless_applied(params, three_versions, capsys):
    root = Path(params.registry.uri) / "detector"
    (root / "claims" / "4").write_text(json.dumps({"actor": "killed@host", "time": "2020-01-01T00:00:00+00:00"}))
    (root / "versions" / "4").mkdir()
    (root / "versions" / "4" / "best.pt").write_bytes(b"half a model")
    found = run(params, capsys, "gc", "--json")
    assert sorted(item["key"] for item in found["leftovers"]) == ["detector/claims/4", "detector/versions/4/best.pt"]
    assert (root / "claims" / "4").exists() and "would remove" in run(params, capsys, "gc")
    assert "removed: 2 leftovers" in run(params, capsys, "gc", "--older-than", "7d", "--apply")
    assert not (root / "claims" / "4").exists() and not (root / "versions" / "4").exists()
    assert run(params, capsys, "gc") == "no leftovers older than 24h\n"
    with pytest.raises(RegistryError, match="--older-than 'soon'"):
        registry_cli.main(parse("gc", "--older-than", "soon"), params)
