"""The Prefect flow end to end against a real (temporary) Prefect API from Prefect's test harness."""
import asyncio

import pytest

from pipeline.registry import open_registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


async def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_flow_runs_every_stage_records_artifacts_and_promotes(prefect_api, workdir):
    from flows.pipeline_flow import pipeline_flow
    from pipeline.params import load_params

    state = pipeline_flow(params_path="params.yaml", overrides=["train.epochs=1"], return_state=True)
    assert state.is_completed(), state
    results = state.result()
    from pipeline.stages import RUN_STAGES

    STAGES = [stage.name for stage in RUN_STAGES]
    assert list(results) == STAGES
    assert results["gate"]["passed"] is True
    registry = open_registry(load_params("params.yaml").registry)
    assert registry.alias("production") == registry.alias("exported") == results["gate"]["version"]
    keys = {a.key for a in asyncio.run(_artifacts(state.state_details.flow_run_id))}
    assert {f"stage-{name}" for name in STAGES} <= keys


def test_flow_stops_at_validation_on_bad_data_without_retrying(prefect_api, workdir):
    from flows.pipeline_flow import pipeline_flow

    bad = workdir / "bad"
    (bad / "images" / "train").mkdir(parents=True)
    (bad / "images" / "val").mkdir(parents=True)
    (bad / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: a}\n")
    state = pipeline_flow(params_path="params.yaml", data=str(bad / "data.yaml"), return_state=True)
    assert state.is_failed()
    assert not (workdir / "outputs" / "train").exists()
    assert "labels" in str(state.result(raise_on_failure=False))
    task_runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert [(t.name.split("-")[0], t.run_count) for t in task_runs] == [("validate", 1)]


@pytest.mark.parametrize("error, runs", [
    ("RegistryUnavailable", 2),  # a store timing out or throttling: worth another try
    ("ConnectionResetError", 2),
    ("disk full", 1),  # OSError(ENOSPC): retrying cannot help
    ("ChecksumError", 1),
    ("ParamsError", 1),  # bad input
    ("GateFailed", 1),  # a verdict
])
def test_stage_tasks_retry_transient_errors_only(prefect_api, workdir, monkeypatch, error, runs):
    import errno

    from prefect import flow

    from flows import pipeline_flow
    from pipeline import stages
    from pipeline.gates import GateFailed
    from pipeline.params import ParamsError
    from pipeline.registry import ChecksumError, RegistryUnavailable
    from pipeline.workspace import Workspace

    errors = {"RegistryUnavailable": RegistryUnavailable("s3://bucket: 503 SlowDown"),
              "ConnectionResetError": ConnectionResetError("connection reset by peer"),
              "disk full": OSError(errno.ENOSPC, "No space left on device"),
              "ChecksumError": ChecksumError("versions/3/best.pt: sha256 mismatch"),
              "ParamsError": ParamsError("params.yaml: train.epochs: not an int"),
              "GateFailed": GateFailed({"stage": "train", "passed": False, "checks": []})}
    calls = []

    def fails_once(stage, ws, **kwargs):
        calls.append(stage.name)
        if len(calls) == 1:
            raise errors[error]
        return {"ok": True}

    monkeypatch.setattr(stages, "run_stage", fails_once)
    monkeypatch.setattr(pipeline_flow, "RETRY_DELAY_S", 0)
    train = pipeline_flow.stage_task(stages.stage_named("train")).with_options(retry_delay_seconds=0)

    @flow
    def one_stage():
        return train(Workspace.load(workdir))

    state = one_stage(return_state=True)
    assert len(calls) == runs
    assert state.is_completed() == (runs == 2)
