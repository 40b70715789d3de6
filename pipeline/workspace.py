"""One workspace root: every file a stage reads or writes hangs off it, never off the process's working folder.

A workspace is a folder holding params.yaml, the dataset (the demo's in data/demo), outputs/<stage>/ and, by
default, the local registry. `Workspace` is that folder plus the params of one run. The CLI, `dvc repro`, the
Prefect flow and its workers (threads, processes, Dask workers on other machines sharing the mount) all build
paths from `root`, so they agree on where things are without anyone calling `os.chdir`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.params import DEFAULT_PARAMS, DEMO_DATA_YAML, Params, load_params

OUTPUTS = "outputs"


class StageInputMissing(FileNotFoundError):
    pass


class UndeclaredInput(RuntimeError):
    """A stage read a file of an earlier stage that its entry in the stage table does not declare: dvc.yaml,
    generated from that table, would then not rerun it when the file changes. A bug in the table."""


@dataclasses.dataclass(frozen=True)
class StageBinding:
    """What a running stage needs to know of its entry in the stage table (pipeline/stages.py)."""
    name: str
    reads: tuple[str, ...]  # the files of earlier stages it may read
    alias: str | None  # the registry alias it moves
    parent_alias: str | None  # the alias of the model its artifact derives from


@dataclasses.dataclass(frozen=True)
class Workspace:
    root: Path
    params: Params
    stage: StageBinding | None = None  # set while a stage runs (stages.run_stage)
    # Values computed once per run and shared by its stages (e.g. dataset.workspace_dataset_hash).
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, root: str | Path = ".", params_file: str | Path = DEFAULT_PARAMS, overrides=(),
             data: str | Path | None = None) -> "Workspace":
        """`params_file` and `data` (a data.yaml replacing params' data.yaml) are relative to `root`."""
        root = Path(root).expanduser().resolve()
        if data is not None:
            data = root / Path(data).expanduser()
        return cls(root, load_params(root / params_file, overrides, data))

    def path(self, relative: str | Path) -> Path:
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.root / path

    def outputs(self, stage: str) -> Path:
        """outputs/<stage>/: what that stage writes."""
        return self.root / OUTPUTS / stage

    def input(self, relative: str) -> Path:
        """A file an earlier stage wrote, e.g. "outputs/train/best.pt", checked against the running stage's
        declared reads and for existence."""
        if self.stage is not None and relative not in self.stage.reads:
            raise UndeclaredInput(f"stage {self.stage.name} reads {relative}, which its entry in the stage table "
                                  f"(pipeline/stages.py) does not declare")
        path = self.root / relative
        if not path.exists():
            producer = Path(relative).parts[1] if relative.startswith(OUTPUTS + "/") else "the stage that writes it"
            raise StageInputMissing(f"{path}: missing; run `python -m pipeline {producer}` first")
        return path

    def for_stage(self, binding: StageBinding) -> "Workspace":
        return dataclasses.replace(self, stage=binding)

    def stage_dir(self) -> Path:
        """outputs/<running stage>/"""
        if self.stage is None:
            raise RuntimeError("no stage is running in this workspace (use pipeline.stages.run_stage)")
        return self.outputs(self.stage.name)

    def with_params(self, params: Params) -> "Workspace":
        return dataclasses.replace(self, params=params, cache={})

    def data_yaml(self) -> Path:
        """The dataset's data.yaml; the built-in demo dataset is generated on first use."""
        data = self.params.data
        if data.yaml == DEMO_DATA_YAML:
            from pipeline.demo_data import generate_demo

            return generate_demo(self.path(data.yaml).parent, data.demo)
        path = self.path(data.yaml)
        if not path.is_file():
            raise StageInputMissing(f"{path}: no such data.yaml (set data.yaml in params.yaml or pass --data)")
        return path
