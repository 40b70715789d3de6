"""requirements.lock ships what pyproject.toml allows: every dependency (and the dev extra) is pinned, on every
Python we support, within pyproject's range, and the lock pins nothing as ours that pyproject does not list."""
from __future__ import annotations

import re
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

SUPPORTED_PYTHONS = ["3.10.14", "3.11.9", "3.12.4"]
REFRESH_COMMAND = ("uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 "
                   "--generate-hashes -o requirements.lock")


def environment(python: str) -> dict[str, str]:
    """The marker environment of CPython `python` on x86-64 Linux."""
    env = default_environment()
    env.update(python_version=".".join(python.split(".")[:2]), python_full_version=python,
               implementation_name="cpython", implementation_version=python,
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               os_name="posix", platform_machine="x86_64")
    return env


def applies(requirement: Requirement, env: dict[str, str]) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({**env, "extra": ""})


def lock_entries(text: str, project: str) -> list[tuple[Requirement, bool]]:
    """(pinned requirement, is it a direct dependency of `project`) for each package in a uv/pip-compile lock."""
    entries, current = [], None
    direct = f"{project} (pyproject.toml)"
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith(("#", "-")):
            current = [Requirement(line.rstrip(" \\")), False]
            entries.append(current)
        elif current and line.strip() in (f"# via {direct}", f"#   {direct}"):
            current[1] = True
    return [(requirement, is_direct) for requirement, is_direct in entries]


def pinned_version(requirement: Requirement) -> str | None:
    specs = list(requirement.specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def lock_problems(pyproject: Path, lock: Path) -> list[str]:
    """Every way `lock` disagrees with `pyproject`'s dependencies and dev extra, one message each."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = [Requirement(line) for line in
              [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("dev", [])]]
    entries = lock_entries(lock.read_text(), project["name"])
    problems = []
    for python in SUPPORTED_PYTHONS:
        env = environment(python)
        pins: dict[str, list[Requirement]] = {}
        for requirement, _ in entries:
            if applies(requirement, env):
                pins.setdefault(canonicalize_name(requirement.name), []).append(requirement)
        for requirement in wanted:
            if not applies(requirement, env):
                continue
            found = pins.get(canonicalize_name(requirement.name), [])
            if not found:
                problems.append(f"{requirement.name}: in {pyproject.name}, not in {lock.name} (Python {python})")
            elif len(found) > 1:
                problems.append(f"{requirement.name}: pinned {len(found)} times in {lock.name} (Python {python})")
            elif pinned_version(found[0]) is None:
                problems.append(f"{found[0]}: not an exact pin in {lock.name}")
            elif not requirement.specifier.contains(pinned_version(found[0]), prereleases=True):
                problems.append(f"{requirement.name}=={pinned_version(found[0])} in {lock.name} is outside "
                                f"{pyproject.name}'s '{requirement}' (Python {python})")
    listed = {canonicalize_name(requirement.name) for requirement in wanted}
    for requirement, is_direct in entries:
        if is_direct and canonicalize_name(requirement.name) not in listed:
            problems.append(f"{requirement.name}: in {lock.name} as a dependency of {project['name']}, "
                            f"not in {pyproject.name}")
    return sorted(set(problems))


def test_the_lock_matches_pyproject():
    problems = lock_problems(REPO / "pyproject.toml", REPO / "requirements.lock")
    assert not problems, ("requirements.lock disagrees with pyproject.toml; refresh it with\n    "
                          + REFRESH_COMMAND + "\n" + "\n".join(problems))


def test_the_lock_pins_every_package_exactly_with_hashes():
    text = (REPO / "requirements.lock").read_text()
    entries = lock_entries(text, "edge-yolo-pipeline")
    assert len(entries) > 100, "requirements.lock: expected the whole environment, transitive packages included"
    for requirement, _ in entries:
        assert pinned_version(requirement), f"requirements.lock: {requirement} is not an exact pin"
    blocks = re.split(r"\n(?=[^\s#-])", text)[1:]
    assert len(blocks) == len(entries)
    for block in blocks:
        assert "--hash=sha256:" in block, f"requirements.lock: no hash for {block.splitlines()[0]}"


def test_the_lock_says_and_the_readme_documents_the_same_refresh_command():
    header = (REPO / "requirements.lock").read_text().splitlines()[:3]
    assert any(line.strip("# ").strip() == REFRESH_COMMAND for line in header), header
    assert REFRESH_COMMAND in (REPO / "README.md").read_text()


PYPROJECT = """\
[project]
name = "demo-app"
dependencies = [
    "requests>=2.30",
    "boto3>=1.35,<2",
    "tomli>=2; python_version < '3.11'",
    "Pillow>=10",
]
[project.optional-dependencies]
dev = ["pytest>=8"]
"""

LOCK = """\
# This file was autogenerated by uv via the following command:
#    uv pip compile pyproject.toml --extra dev -o requirements.lock
boto3==1.36.0 \\
    --hash=sha256:00
    # via demo-app (pyproject.toml)
pillow==11.0.0 \\
    --hash=sha256:00
    # via demo-app (pyproject.toml)
pytest==8.3.0 \\
    --hash=sha256:00
    # via demo-app (pyproject.toml)
requests==2.32.0 \\
    --hash=sha256:00
    # via
    #   demo-app (pyproject.toml)
    #   boto3
tomli==2.0.1 ; python_full_version < '3.11' \\
    --hash=sha256:00
    # via
    #   demo-app (pyproject.toml)
    #   pytest
urllib3==2.2.0 \\
    --hash=sha256:00
    # via requests
"""


def write_pair(folder: Path, pyproject: str, lock: str) -> tuple[Path, Path]:
    (folder / "pyproject.toml").write_text(pyproject)
    (folder / "requirements.lock").write_text(lock)
    return folder / "pyproject.toml", folder / "requirements.lock"


def test_a_matching_pair_has_no_problems(tmp_path):
    assert lock_problems(*write_pair(tmp_path, PYPROJECT, LOCK)) == []


def test_a_dependency_added_to_pyproject_only_is_reported(tmp_path):
    pyproject = PYPROJECT.replace('"Pillow>=10",', '"Pillow>=10",\n    "rich>=13",')
    problems = lock_problems(*write_pair(tmp_path, pyproject, LOCK))
    assert problems == [f"rich: in pyproject.toml, not in requirements.lock (Python {python})"
                        for python in SUPPORTED_PYTHONS]


def test_a_dependency_removed_from_pyproject_only_is_reported(tmp_path):
    pyproject = PYPROJECT.replace('    "requests>=2.30",\n', "")
    problems = lock_problems(*write_pair(tmp_path, pyproject, LOCK))
    assert problems == ["requests: in requirements.lock as a dependency of demo-app, not in pyproject.toml"]


def test_a_dev_dependency_missing_from_the_lock_is_reported(tmp_path):
    lock = LOCK.replace("pytest==8.3.0 \\\n    --hash=sha256:00\n    # via demo-app (pyproject.toml)\n", "")
    problems = lock_problems(*write_pair(tmp_path, PYPROJECT, lock))
    assert problems == [f"pytest: in pyproject.toml, not in requirements.lock (Python {python})"
                        for python in SUPPORTED_PYTHONS]


def test_a_pin_outside_the_range_is_reported(tmp_path):
    pyproject = PYPROJECT.replace('"boto3>=1.35,<2"', '"boto3>=1.35,<1.36"')
    problems = lock_problems(*write_pair(tmp_path, pyproject, LOCK))
    assert problems == [f"boto3==1.36.0 in requirements.lock is outside pyproject.toml's 'boto3<1.36,>=1.35' "
                        f"(Python {python})" for python in SUPPORTED_PYTHONS]


def test_a_pin_missing_for_one_python_is_reported(tmp_path):
    pyproject = PYPROJECT.replace("\"tomli>=2; python_version < '3.11'\"", '"tomli>=2"')
    problems = lock_problems(*write_pair(tmp_path, pyproject, LOCK))
    assert problems == [f"tomli: in pyproject.toml, not in requirements.lock (Python {python})"
                        for python in ("3.11.9", "3.12.4")]
