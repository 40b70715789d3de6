"""DVC as a fresh clone sees it, end to end: a throwaway git repo holding what `git ls-files` holds, a local DVC
remote, and a PATH whose `python` and `python3` are not ours (they fail), so every stage must find the
project's interpreter through bin/pipeline. One pipeline run in all, on the tiny params."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_tiny_params

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="needs git")


def run(cmd, cwd, env, check=True):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(result) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", result.stdout)


# ------------------------------------------------------------------------------------------------ dvc.yaml's graph


def dvc_stages(repo: Path) -> dict[str, dict]:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


def interpolate(text: str, params: dict) -> str:
    def value(match):
        node = params
        for key in match[1].split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def paths(entries, params: dict) -> list[str]:
    """dvc.yaml's deps/outs/metrics/plots entries (a path, or {path: options}) as plain paths."""
    names = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]
    return [interpolate(name, params).rstrip("/") for name in names]


def produced(stage: dict, params: dict) -> list[str]:
    return [path for key in ("outs", "metrics", "plots") for path in paths(stage.get(key), params)]


def downstream(stages: dict[str, dict], params: dict, start: set[str]) -> set[str]:
    """`start` and every stage that depends, directly or not, on what they write."""
    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    found, changed = set(start), True
    while changed:
        changed = False
        for name, stage in stages.items():
            if name not in found and any(overlaps(dep, out) for dep in paths(stage.get("deps"), params)
                                         for upstream in found for out in produced(stages[upstream], params)):
                found.add(name)
                changed = True
    return found


def cheapest_module_dep(stages: dict[str, dict], params: dict) -> tuple[str, set[str]]:
    """A pipeline/*.py dep and the stages a change to it must rerun: the one listed by the fewest stages, and
    of those the one that reruns the least (one tiny pipeline run per test suite is enough)."""
    listing: dict[str, set[str]] = {}
    for name, stage in stages.items():
        for dep in paths(stage.get("deps"), params):
            if re.fullmatch(r"pipeline/\w+\.py", dep):
                listing.setdefault(dep, set()).add(name)
    assert listing, "dvc.yaml lists no pipeline/*.py module as a dep"
    module = min(listing, key=lambda m: (len(listing[m]), len(downstream(stages, params, listing[m])), m))
    return module, downstream(stages, params, listing[module])


# ------------------------------------------------------------------------------------------------ the repo


def hostile_path(folder: Path, log: Path) -> str:
    """A PATH whose `python` and `python3` record that they were called and fail, then git's and the system's."""
    folder.mkdir()
    for name in ("python", "python3"):
        fake = folder / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 1\n')
        fake.chmod(0o755)
    return os.pathsep.join([str(folder), str(Path(GIT).parent), "/usr/bin", "/bin"])


def clean_env(path: str) -> dict[str, str]:
    """A fresh shell's environment: no active virtual environment, no PYTHONPATH, nothing pointing at ours."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"VIRTUAL_ENV", "CONDA_PREFIX", "PIPELINE_PYTHON", "PYTHONPATH", "PYTHONHOME"}}
    env["PATH"] = path
    return env


def give_interpreter(checkout: Path, env: dict[str, str]) -> None:
    """What the README's install leaves in a checkout: .venv (here a link to the one running the tests)."""
    if sys.prefix != sys.base_prefix:
        (checkout / ".venv").symlink_to(sys.prefix)
    else:  # not a virtual environment (e.g. conda): name the interpreter instead
        env["PIPELINE_PYTHON"] = sys.executable


def copy_tracked_files(source: Path, target: Path) -> None:
    listed = subprocess.run([GIT, "ls-files", "-z"], cwd=source, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"{source} is not a git checkout")
    for name in filter(None, listed.stdout.split("\0")):
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


@needs_git
@pytest.mark.slow
def test_dvc_repro_in_a_fresh_clone(tmp_path):
    fake_log = tmp_path / "fake-python-calls.log"
    env = clean_env(hostile_path(tmp_path / "fakebin", fake_log))
    dvc = [sys.executable, "-m", "dvc"]
    git = [GIT, "-c", "user.email=ci@example.com", "-c", "user.name=ci"]

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_tracked_files(REPO, repo)
    write_tiny_params(repo)
    give_interpreter(repo, env)
    run([GIT, "init", "-q"], repo, env)
    run([GIT, "add", "-A"], repo, env)
    run(git + ["commit", "-qm", "the project"], repo, env)
    assert (repo / ".dvc" / "config").is_file(), "no .dvc/ committed: a fresh clone is not a DVC repository"
    assert run([GIT, "status", "--porcelain"], repo, env).stdout == ""

    stages = dvc_stages(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())

    # Every stage runs, each with the project's interpreter: the PATH's python and python3 only fail.
    first = run(dvc + ["repro"], repo, env)
    assert stages_run(first) == list(stages), first.stdout
    assert not fake_log.exists(), f"a stage ran the PATH's python: {fake_log.read_text()}"
    assert json.loads((repo / "outputs" / "gate" / "report.json").read_text())["passed"] is True

    second = run(dvc + ["repro"], repo, env)
    assert stages_run(second) == [] and "Data and pipelines are up to date" in second.stdout, second.stdout

    shown = json.dumps(json.loads(run(dvc + ["metrics", "show", "--json"], repo, env).stdout))
    assert "map50_95" in shown and "outputs/train/metrics.json" in shown
    assert "curves.csv" in run(dvc + ["plots", "show", "--json"], repo, env).stdout

    # A change to a module reruns exactly the stages that list it and those downstream of them.
    module, expected = cheapest_module_dep(stages, params)
    with (repo / module).open("a") as f:
        f.write("\n# changed by tests/test_dvc.py\n")
    third = run(dvc + ["repro"], repo, env)
    assert set(stages_run(third)) == expected, (module, third.stdout)

    # A params change reruns from the stage that reads it, and not before.
    text = (repo / "params.yaml").read_text()
    assert "champion_tolerance: 1.0" in text
    (repo / "params.yaml").write_text(text.replace("champion_tolerance: 1.0", "champion_tolerance: 0.5"))
    fourth = run(dvc + ["repro"], repo, env)
    assert "gate" in stages_run(fourth) and "train" not in stages_run(fourth), fourth.stdout

    # Commit the results as a user would, push the cached outputs to a local remote.
    run(dvc + ["remote", "add", "-d", "local", str(tmp_path / "remote")], repo, env)
    run([GIT, "add", "-A"], repo, env)
    run(git + ["commit", "-qm", "results"], repo, env)
    run(dvc + ["push"], repo, env)
    assert not fake_log.exists(), f"a stage ran the PATH's python: {fake_log.read_text()}"

    # A fresh clone + dvc pull is up to date: nothing to run, nothing changed, git clean.
    clone = tmp_path / "clone"
    run([GIT, "clone", "-q", str(repo), str(clone)], tmp_path, env)
    give_interpreter(clone, env)
    run(dvc + ["pull"], clone, env)
    status = run(dvc + ["status"], clone, env)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    again = run(dvc + ["repro"], clone, env)
    assert stages_run(again) == [], again.stdout
    assert run([GIT, "status", "--porcelain"], clone, env).stdout == ""


# ------------------------------------------------------------------------------------------------ bin/pipeline

CANDIDATES = ["PIPELINE_PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX", ".venv", "python3 on PATH"]


def launcher_setup(tmp_path: Path, working_from: int) -> tuple[Path, dict[str, str], Path]:
    """bin/pipeline in a throwaway repo, and one fake interpreter per candidate: those before `working_from`
    fail the import check, the others pass it. Each records its arguments in the returned log."""
    log = tmp_path / "calls.log"
    project = tmp_path / "project"
    (project / "bin").mkdir(parents=True)
    shutil.copy2(REPO / "bin" / "pipeline", project / "bin" / "pipeline")
    places = {"PIPELINE_PYTHON": tmp_path / "chosen" / "python",
              "VIRTUAL_ENV": tmp_path / "venv" / "bin" / "python",
              "CONDA_PREFIX": tmp_path / "conda" / "bin" / "python",
              ".venv": project / ".venv" / "bin" / "python",
              "python3 on PATH": tmp_path / "pathbin" / "python3"}
    for index, (name, place) in enumerate(places.items()):
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit {1 if index < working_from else 0}\n')
        place.chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": os.pathsep.join([str(places["python3 on PATH"].parent), "/usr/bin", "/bin"]),
           "PIPELINE_PYTHON": str(places["PIPELINE_PYTHON"]), "VIRTUAL_ENV": str(tmp_path / "venv"),
           "CONDA_PREFIX": str(tmp_path / "conda")}
    return project, env, log


@pytest.mark.parametrize("working_from", range(len(CANDIDATES)), ids=CANDIDATES)
def test_the_launcher_takes_the_first_interpreter_that_imports_the_project(tmp_path, working_from):
    project, env, log = launcher_setup(tmp_path, working_from)
    result = subprocess.run([str(project / "bin" / "pipeline"), "train", "--set", "train.epochs=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    chosen = CANDIDATES[working_from]
    assert log.read_text().splitlines() == [
        *[f"{name} -c import pipeline.params" for name in CANDIDATES[:working_from + 1]],
        f"{chosen} -m pipeline train --set train.epochs=1"]


def test_the_launcher_says_what_to_do_when_no_interpreter_imports_the_project(tmp_path):
    project, env, log = launcher_setup(tmp_path, working_from=len(CANDIDATES))
    result = subprocess.run([str(project / "bin" / "pipeline"), "train"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "PIPELINE_PYTHON" in result.stderr and "requirements.lock" in result.stderr, result.stderr
    assert [line.split(" -")[0] for line in log.read_text().splitlines()] == CANDIDATES


def test_dvc_yaml_runs_every_stage_through_the_launcher():
    for name, stage in dvc_stages(REPO).items():
        assert stage["cmd"] == f"bin/pipeline {name}", f"dvc.yaml: stage {name}: cmd {stage['cmd']!r}"
