"""Scheduled retraining against a real Prefect server, work pool and worker; the Dask fan-out on a real cluster.

SLOW (about 3 minutes on 2 cores, most of it the one tiny pipeline run): the module starts
`prefect server start` on a free 127.0.0.1 port (PREFECT_HOME in a temporary folder), creates a process work
pool, starts a worker, creates the deployment with `python -m flows.scheduled --deploy` and triggers it with
`run_deployment`. Everything started here is stopped in fixture teardown, on failure too.

The cheap tests at the end (change rule, lock, crash bookkeeping) need no server.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, write_tiny_params

POOL = "retraining-test-pool"
DEPLOYMENT = "ci"
# The tiny pipeline, made cheaper still where the default tiny params spend the most time (sensitivity:
# one ratio instead of four) and with gates every tiny model passes: this module tests orchestration.
FAST_TINY = {
    "sensitivity": {"ratios": [0.5], "val_images": 8},
    "prune": {"steps": 1, "epochs_per_step": 1, "gates": {"max_map_drop": 1.0, "min_params_reduction": 0.0}},
    "qat": {"epochs": 1, "calib_images": 8, "gates": {"max_map_drop": 1.0, "max_file_mb": 20}},
    "orchestration": {"task_runner": "dask", "max_workers": 2},  # the fan-out on a real local cluster
}


# ------------------------------------------------------------------------------------------ processes we start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started in its own session, and its children (uvicorn, flow-run subprocesses)."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class PrefectServer:
    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "YOLO_OFFLINE": "1",
                    "PREFECT_UI_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(self.port)}
        self.env.pop("PREFECT_PROFILES_PATH", None)

    def prefect(self, *args: str, timeout: int = 120) -> str:
        """A `prefect` CLI command against this server; fails the test with its output."""
        return self.run([sys.executable, "-m", "prefect", *args], timeout)

    def run(self, command: list[str], timeout: int = 120) -> str:
        result = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        # Own session: stop() signals the whole group (the server's uvicorn, the worker's flow runs).
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    srv = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    process = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                     "--port", str(srv.port)], srv.env, srv.log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"prefect server exited:\n{tail(srv.log)}"
            try:
                with urllib.request.urlopen(f"{srv.url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy after 180 s:\n{tail(srv.log)}"
            time.sleep(1)
        # In-process clients and flows of this module talk to the same server.
        with temporary_settings(updates={PREFECT_API_URL: srv.url}):
            yield srv
    finally:
        stop(process)


@pytest.fixture(scope="module")
def worker(server):
    server.prefect("work-pool", "create", POOL, "--type", "process")
    log = server.home / "worker.log"
    process = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                     "--limit", "1"], server.env, log)
    try:
        yield log
    finally:
        stop(process)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retrain-workspace")
    write_tiny_params(folder, FAST_TINY)
    return folder


@pytest.fixture(scope="module")
def deployment(server, worker, workspace):
    out = server.run([sys.executable, "-m", "flows.scheduled", "--deploy", "--pool", POOL, "--name", DEPLOYMENT,
                      "--workspace", str(workspace)])
    assert f"scheduled-retraining/{DEPLOYMENT}" in out
    return f"scheduled-retraining/{DEPLOYMENT}"


# ----------------------------------------------------------------------------------------------- API helpers


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def trigger_and_wait(name: str, worker_log: Path, timeout_s: float = 420):
    """run_deployment, then wait for the worker to take it and for a final state."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name, timeout=0)
    deadline = time.monotonic() + timeout_s
    with client() as c:
        while True:
            flow_run = c.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            assert time.monotonic() < deadline, (f"flow run {flow_run.id} still {flow_run.state.name} after "
                                                 f"{timeout_s} s; worker log:\n{tail(worker_log, 60)}")
            time.sleep(2)


def artifacts_of(flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        only_this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        found = c.read_artifacts(artifact_filter=only_this_run)
    return {a.key: a for a in found}


def notes(workspace: Path) -> list[dict]:
    from flows.run_notes import read_notes

    return read_notes(workspace)


def registry_of(workspace: Path):
    from pipeline.params import load_params
    from pipeline.registry import open_registry

    return open_registry(load_params(workspace / "params.yaml").registry, base_dir=workspace)


# ------------------------------------------------------------------------------------------ the scheduled runs


@pytest.fixture(scope="module")
def first_run(deployment, worker):
    return trigger_and_wait(deployment, worker)


@pytest.mark.slow
def test_deployment_has_the_cron_schedule_and_one_run_at_a_time(deployment, workspace):
    with client() as c:
        d = c.read_deployment_by_name(deployment)
    assert [s.schedule.cron for s in d.schedules] == ["0 3 * * *"]
    assert d.schedules[0].schedule.timezone == "UTC"
    assert d.global_concurrency_limit.limit == 1
    assert d.concurrency_options.collision_strategy == "ENQUEUE"  # a run coming due waits, is not dropped
    assert d.parameters["workspace"] == str(workspace)
    assert d.work_pool_name == POOL


@pytest.mark.slow
def test_first_run_trains_every_stage_and_promotes(first_run, workspace, worker, monkeypatch):
    from pipeline import stages
    from pipeline.dataset import workspace_dataset_hash
    from pipeline.workspace import Workspace

    assert first_run.state.is_completed(), f"{first_run.state}\nworker log:\n{tail(worker, 80)}"
    assert first_run.state.message.startswith("promoted"), first_run.state.message
    registry = registry_of(workspace)
    production = registry.alias("production")
    assert production is not None and production == registry.alias("exported")
    manifest = registry.manifest(production)
    ws = Workspace.load(workspace)
    assert manifest.dataset_hash == workspace_dataset_hash(ws)
    assert manifest.params_hash == ws.params.hash()
    # Every stage ran, whatever the stage list is now.
    for stage in stages.RUN_STAGES:
        assert (workspace / "outputs" / stage.name).is_dir(), f"stage {stage.name} wrote nothing"
    finished = [n for n in notes(workspace) if n["event"] == "finished"]
    assert [n["outcome"] for n in finished] == ["promoted"]
    assert finished[0]["production_before"] is None and finished[0]["production_after"] == production
    artifact = artifacts_of(first_run.id)["scheduled-retraining"]
    assert "promoted" in artifact.data


@pytest.mark.slow
def test_second_run_with_unchanged_data_is_skipped_and_recorded(first_run, deployment, workspace, worker):
    registry = registry_of(workspace)
    versions_before = [m.version for m in registry.versions()]
    production_before = registry.alias("production")
    mtime_before = (workspace / "outputs" / "train" / "best.pt").stat().st_mtime_ns

    second = trigger_and_wait(deployment, worker, timeout_s=180)

    assert second.state.is_completed() and second.state.name == "Skipped", second.state
    assert "unchanged" in second.state.message
    assert registry.alias("production") == production_before
    assert [m.version for m in registry.versions()] == versions_before
    assert (workspace / "outputs" / "train" / "best.pt").stat().st_mtime_ns == mtime_before  # nothing retrained
    last = notes(workspace)[-1]
    assert (last["event"], last["outcome"], last["flow_run_id"]) == ("finished", "skipped", str(second.id))
    assert "Scheduled retraining: **skipped**" in artifacts_of(second.id)["scheduled-retraining"].data


@pytest.mark.slow
def test_check_cli_says_skip_and_why(first_run, workspace, server):
    def check(*extra):
        out = server.run([sys.executable, "-m", "flows.scheduled", "--check", "--json", "--workspace",
                          str(workspace), *extra])
        return json.loads(out)

    unchanged = check()
    assert unchanged["retrain"] is False and "unchanged" in unchanged["reason"]
    assert unchanged["production"] == registry_of(workspace).alias("production")
    changed = check("--set", "train.epochs=2", "--set", "orchestration.max_workers=1")
    assert changed["retrain"] is True and changed["changes"] == ["train.epochs: 1 -> 2"]


@pytest.mark.slow
def test_dask_fanout_gives_the_sequential_table(first_run, workspace, worker, tmp_path, monkeypatch):
    """The scheduled run fanned the sensitivity evaluations out over a real local Dask cluster (the workspace
    params say task_runner: dask): its table equals the sensitivity stage run one evaluation at a time."""
    from pipeline import stages
    from pipeline.workspace import Workspace

    assert first_run.state.is_completed()
    # The flow-run process's output goes to the worker's log: prefect-dask says which cluster it started.
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in worker.read_text()
    assert notes(workspace)[-1]["task_runner"] == "dask (local cluster, 2 workers)"
    dask_rows = json.loads((workspace / "outputs/sensitivity/sensitivity.json").read_text())

    for name in ("params.yaml", "data", "outputs"):
        source = workspace / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    sequential = stages.run_stage("sensitivity", Workspace.load(tmp_path), map_fn=map)
    sequential_rows = json.loads((tmp_path / "outputs/sensitivity/sensitivity.json").read_text())

    assert sequential["evaluations"] == len(dask_rows) > 0
    assert [(r["group"], r["ratio"]) for r in dask_rows] == [(r["group"], r["ratio"]) for r in sequential_rows]
    for got, want in zip(dask_rows, sequential_rows):
        assert {k: got[k] for k in ("params", "macs", "channels_removed")} == \
            {k: want[k] for k in ("params", "macs", "channels_removed")}, got["group"]
        # Dask workers run torch with one thread, this process with several: allow float noise, nothing more.
        for key in ("map50_95", "map50", "drop"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["group"], key)
    plan = json.loads((workspace / "outputs/sensitivity/plan.json").read_text())
    assert plan["ratios"] == sequential["plan"]["ratios"]


@pytest.mark.slow
def test_busy_workspace_is_recorded_as_skipped(first_run, workspace):
    """A second run while another holds the workspace: skipped as busy, nothing else touched."""
    from flows.run_notes import workspace_lock
    from flows.scheduled import scheduled_retraining

    registry = registry_of(workspace)
    production = registry.alias("production")
    with workspace_lock(workspace, {"who": "a run in progress"}) as held:
        assert held
        state = scheduled_retraining(workspace=str(workspace), return_state=True)
    assert state.name == "Skipped" and "a run in progress" in state.message, state
    assert notes(workspace)[-1]["outcome"] == "busy"
    assert registry.alias("production") == production


@pytest.mark.slow
def test_a_full_global_concurrency_limit_is_busy_and_a_missing_one_an_error(server, tmp_path):
    """For workspaces on several machines: the Prefect global concurrency limit named in the parameters."""
    from prefect.concurrency.sync import concurrency

    from flows.scheduled import scheduled_retraining

    server.prefect("gcl", "create", "edge-yolo-registry", "--limit", "1")
    with concurrency("edge-yolo-registry", occupy=1):  # another run holds the only slot
        state = scheduled_retraining(workspace=str(tmp_path), concurrency_limit_name="edge-yolo-registry",
                                     return_state=True)
    assert state.name == "Skipped" and "'edge-yolo-registry' is full" in state.message, state
    assert notes(tmp_path)[-1]["outcome"] == "busy"
    state = scheduled_retraining(workspace=str(tmp_path), concurrency_limit_name="no-such-limit", return_state=True)
    assert state.is_failed() and "must be created" in state.message, state


@pytest.mark.slow
def test_crash_midway_leaves_production_and_is_noticed_by_the_next_run(first_run, workspace, monkeypatch):
    """Changed params -> retrain; the real pipeline flow dies half-way (validate done, train crashes): production
    and the registry stay as they were, the lock is free, the failure is recorded; and a killed run's dangling
    'started' note is reported as crashed by the next run."""
    import flows.scheduled as scheduled
    import pipeline.train
    from flows.change_check import decide
    from flows.run_notes import append_note, workspace_lock
    from pipeline.workspace import Workspace

    registry = registry_of(workspace)
    production = registry.alias("production")
    versions = [m.version for m in registry.versions()]

    def crashes(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of training")

    monkeypatch.setattr(pipeline.train, "train", crashes)  # the train stage's run() looks it up at call time
    state = scheduled.scheduled_retraining(workspace=str(workspace), overrides=["train.lr0=0.02"],
                                           return_state=True)
    assert state.is_failed() and "simulated crash" in state.message, state
    assert registry.alias("production") == production
    assert [m.version for m in registry.versions()] == versions
    with workspace_lock(workspace, {"who": "test"}) as held:
        assert held, "the lock must be free after a failed run"
    assert notes(workspace)[-1]["outcome"] == "failed"

    # A run killed outright leaves only its 'started' note; the next run closes it as crashed.
    append_note(workspace, {"event": "started", "flow_run_id": "killed-run", "pid": 1})
    state = scheduled.scheduled_retraining(workspace=str(workspace), return_state=True)
    assert state.name == "Skipped", state  # nothing changed: unchanged params, production as before
    crashed = [n for n in notes(workspace) if n.get("outcome") == "crashed"]
    assert [n["flow_run_id"] for n in crashed] == ["killed-run"]
    decision = decide(Workspace.load(workspace, overrides=["train.lr0=0.02"]))
    assert decision["retrain"] and "train.lr0" in decision["reason"]


@pytest.mark.slow
def test_a_kubernetes_deployment_with_the_k8s_job_template_is_accepted_by_a_real_server(server):
    """`--deploy --image` onto a Kubernetes pool made as infra/README.md says (with
    infra/k8s/base-job-template.json, which the server validates). Nothing runs: no worker polls it."""
    server.prefect("work-pool", "create", "edge-yolo-k8s", "--type", "kubernetes",
                   "--base-job-template", str(REPO / "infra" / "k8s" / "base-job-template.json"))
    server.run([sys.executable, "-m", "flows.scheduled", "--deploy", "--pool", "edge-yolo-k8s", "--name", "k8s",
                "--workspace", str(REPO), "--image", "edge-yolo-pipeline:test", "--job-variable", "gpu_count=1",
                "--set", "registry.uri=s3://models/edge-yolo"])
    with client() as c:
        k8s = c.read_deployment_by_name("scheduled-retraining/k8s")
        pool = c.read_work_pool("edge-yolo-k8s")
    assert [s.schedule.cron for s in k8s.schedules] == ["0 3 * * *"]
    assert k8s.global_concurrency_limit.limit == 1
    assert k8s.job_variables == {"image": "edge-yolo-pipeline:test", "gpu_count": 1}
    assert k8s.parameters["overrides"] == ["registry.uri=s3://models/edge-yolo"]
    assert "gpu_count" in pool.base_job_template["variables"]["properties"]


# ------------------------------------------------------------------------------------ no server needed


def test_change_rule_ignores_settings_that_cannot_change_the_model():
    from flows.change_check import params_changes
    from pipeline.params import Params

    before = Params().as_dict()
    after = Params.model_validate({**before, "orchestration": {"task_runner": "dask"},
                                   "registry": {"uri": "s3://bucket/models"}}).as_dict()
    assert params_changes(before, after) == []
    after["train"]["epochs"] = 5
    assert params_changes(before, after) == [f"train.epochs: {before['train']['epochs']} -> 5"]
    # A setting added to the code since the production model was trained, left at its default: no change.
    older = Params().as_dict()
    del older["train"]["lr0"]
    assert params_changes(older, Params().as_dict()) == []
    assert params_changes(older, {**Params().as_dict(), "train": {**Params().as_dict()["train"], "lr0": 0.5}}) \
        == ["train.lr0: (unset) -> 0.5"]


def test_lock_is_exclusive_and_freed_when_its_holder_is_killed(tmp_path):
    from flows.run_notes import lock_holder, workspace_lock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from flows.run_notes import workspace_lock\n"
         f"with workspace_lock({str(tmp_path)!r}, {{'pid': 'holder'}}) as held:\n"
         "    print('held' if held else 'busy', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with workspace_lock(tmp_path, {"pid": "me"}) as held:
            assert not held
        assert "holder" in lock_holder(tmp_path)
        holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock
        holder.wait(30)
        with workspace_lock(tmp_path, {"pid": "me"}) as held:
            assert held
    finally:
        stop(holder)


def test_a_rejection_says_which_gates_failed_and_is_not_retried_every_night(tmp_path):
    from prefect.states import Failed

    from flows.run_notes import append_note, last_rejection
    from flows.scheduled import outcome_of
    from pipeline.gates import GateFailed

    report = {"stage": "gate", "version": 7, "passed": False,
              "checks": [{"gate": "min_map50_95", "value": 0.6, "limit": 0.5, "passed": True},
                         {"gate": "max_latency_ms", "value": 130.0, "limit": 100.0, "passed": False}]}
    outcome, reason, got = outcome_of(Failed(data=GateFailed(report)), registry=None, production_before=3)
    assert (outcome, reason, got) == ("rejected", "gate gate failed: max_latency_ms", report)

    decision = {"dataset_hash": "d1", "model_params_hash": "p1", "production": 3}
    assert last_rejection(tmp_path, decision) is None
    append_note(tmp_path, {"event": "finished", "outcome": "rejected", "reason": reason, "flow_run_id": "r1",
                           "dataset_hash": "d1", "model_params_hash": "p1", "production_before": 3})
    assert last_rejection(tmp_path, decision)["flow_run_id"] == "r1"
    assert last_rejection(tmp_path, {**decision, "dataset_hash": "d2"}) is None  # new data: try again
    assert last_rejection(tmp_path, {**decision, "production": 4}) is None  # another champion: try again
