"""Scheduled retraining: retrain only when the data or the params moved away from the production model.

Each run of the `scheduled-retraining` flow, in the working folder (`workspace`) that holds params.yaml,
outputs/ and (by default) the registry:

1. takes the workspace lock (flows/run_notes.py; another run holding it means this one is recorded as
   skipped, "busy"), and optionally a slot of a Prefect global concurrency limit (flows/concurrency.py) for
   workspaces that live on several machines;
2. compares the dataset hash and the params with those recorded in the registry manifest of the current
   `production` model (flows/change_check.py). Nothing changed: it records a skipped run and stops;
3. otherwise runs the whole pipeline flow (every stage, through every gate) with the task runner the params
   ask for (threads, or Dask), and records whether it promoted, was rejected (and why) or crashed.

Every run is recorded twice: a Prefect markdown artifact (key `scheduled-retraining`) plus the final state's
name and message (`Skipped`, `Completed`, `Failed`), and a line in `<workspace>/.retraining/runs.jsonl`.

Crash safety comes from the pieces underneath: the flock is released by the kernel when the process dies; the
registry writes a version's manifest last and moves aliases by compare-and-swap, and only a passing gate moves
`production`, so a run killed half-way leaves production where it was and the next run simply retrains; this
flow never writes DVC state (dvc.lock changes only through `dvc repro`/`dvc commit`), so a crash cannot leave
dvc.lock describing half a run. A run that started but never recorded an outcome is reported by the next one.

    python -m flows.scheduled --check                     # would a run retrain now? why?
    python -m flows.scheduled --run                       # one scheduled run, now, in this process
    python -m flows.scheduled --serve                     # serve the deployment with its cron schedule
    python -m flows.scheduled --deploy --pool my-pool     # register it with a work pool (workers run it)

The deployment is defined here, once: its schedule is params.yaml's orchestration.schedule_cron/timezone, its
parameters come from the command line, and `--image`/`--job-variable` fill a container work pool's job.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed

from flows.change_check import decide
from flows.concurrency import global_limit_slot
from flows.run_notes import append_note, lock_holder, unfinished_runs, workspace_lock
from pipeline.params import DEFAULT_PARAMS, ParamsError, Params
from pipeline.registry import PRODUCTION, open_registry
from pipeline.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
FLOW_NAME = "scheduled-retraining"
DEPLOYMENT_NAME = "scheduled-retraining"
ENTRYPOINT = "flows/scheduled.py:scheduled_retraining"
ARTIFACT_KEY = "scheduled-retraining"


class WorkspaceError(ValueError):
    pass


class RetrainingNotPromoted(RuntimeError):
    """The result of a scheduled run that was rejected or failed; `note` is what runs.jsonl recorded."""

    def __init__(self, message: str, note: dict):
        super().__init__(message)
        self.note = note


# ------------------------------------------------------------------------------------------------ the flow


def run_pipeline(workspace: Path, params_path: str, data: str | None, overrides: list[str]):
    """The pipeline flow, as a subflow, with the task runner from params (threads or Dask). Returns its state."""
    from flows.pipeline_flow import run_flow

    return run_flow(params_path, data, overrides, workspace=str(workspace))


def task_runner_description(params: Params) -> str:
    o = params.orchestration
    if o.task_runner == "dask":
        return f"dask ({o.dask_address})" if o.dask_address else f"dask (local cluster, {o.max_workers} workers)"
    return f"threads ({o.max_workers})"


def outcome_of(pipeline_state, registry, production_before: int | None) -> tuple[str, str, dict | None]:
    """(outcome, reason, gate report) of a finished pipeline run: promoted / unchanged / rejected / failed."""
    from pipeline.gates import GateFailed
    from pipeline.validate import ValidationFailed

    if pipeline_state.is_completed():
        results = pipeline_state.result()
        report = results.get("gate") or {}
        production_after = registry.alias(PRODUCTION)
        if production_after != production_before:
            return "promoted", f"production v{production_before} -> v{production_after}", report
        return "unchanged", (f"the gate passed, but the candidate v{report.get('version')} is the production "
                             f"model already (same bytes)"), report
    error = pipeline_state.result(raise_on_failure=False)
    if isinstance(error, GateFailed):
        failed = [c["gate"] for c in error.report.get("checks", []) if not c["passed"]]
        return "rejected", f"gate {error.report.get('stage')} failed: {', '.join(failed)}", error.report
    if isinstance(error, ValidationFailed):
        return "rejected", f"the data failed validation: {str(error)[:500]}", None
    return "failed", f"{type(error).__name__}: {str(error)[:1000]}", None


def decision_markdown(note: dict) -> str:
    lines = [f"# Scheduled retraining: **{note['outcome']}**", "", note["reason"], "",
             "| | |", "|---|---|",
             f"| workspace | `{note['workspace']}` |",
             f"| dataset hash | `{note.get('dataset_hash')}` |",
             f"| params hash | `{note.get('params_hash')}` (model params `{note.get('model_params_hash')}`) |",
             f"| production before | {note.get('production_before')} |",
             f"| production after | {note.get('production_after')} |",
             f"| task runner | {note.get('task_runner')} |"]
    if note.get("changes"):
        lines += ["", "Changes:", ""] + [f"- `{c}`" for c in note["changes"]]
    if note.get("gate_checks"):
        lines += ["", "| gate | value | limit | passed |", "|---|---|---|---|"]
        lines += [f"| {c['gate']} | {c['value']} | {c['limit']} | {c['passed']} |" for c in note["gate_checks"]]
    return "\n".join(lines)


def finish(workspace: Path, note: dict):
    """Record the outcome in the workspace notes and as a Prefect artifact; return the flow's final state."""
    note = append_note(workspace, {**note, "event": "finished"})
    get_run_logger().info("scheduled retraining: %s: %s", note["outcome"], note["reason"])
    create_markdown_artifact(decision_markdown(note), key=ARTIFACT_KEY,
                             description=f"scheduled retraining: {note['outcome']}")
    message = f"{note['outcome']}: {note['reason']}"
    if note["outcome"] in ("skipped", "busy"):
        return Completed(name="Skipped", message=message, data=note)
    if note["outcome"] in ("promoted", "unchanged"):
        return Completed(message=message, data=note)
    # A failed state's data must be an exception: calling the flow in-process then raises it.
    return Failed(name="Rejected" if note["outcome"] == "rejected" else "Failed", message=message,
                  data=RetrainingNotPromoted(message, note))


@flow(name=FLOW_NAME, log_prints=True)
def scheduled_retraining(workspace: str = ".", params_path: str = str(DEFAULT_PARAMS), data: str | None = None,
                         overrides: list[str] | None = None, force: bool = False, lock_wait_s: float = 0.0,
                         concurrency_limit_name: str | None = None):
    """One scheduled run: skip when nothing changed since the production model, else retrain through the gates.

    workspace: the working folder (params.yaml, outputs/, a local registry); params_path/data/overrides as for
    `pipeline_flow`, relative to the workspace. force: retrain even if nothing changed. lock_wait_s: how long
    to wait for another run to free the workspace before recording this one as skipped ("busy").
    concurrency_limit_name: a Prefect global concurrency limit (`prefect gcl create NAME --limit 1`) to hold as
    well, for workspaces that several machines share (e.g. one S3 registry, many pods).
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    workspace_path = Path(workspace).expanduser().resolve()
    if not workspace_path.is_dir():
        raise WorkspaceError(f"workspace {workspace_path}: no such folder (the deployment's `workspace` "
                             f"parameter must be a folder on the worker's machine)")
    run_id = str(flow_run.id) if flow_run.id else f"local-{os.getpid()}"
    base = {"flow_run_id": run_id, "workspace": str(workspace_path), "params_path": params_path, "data": data,
            "overrides": overrides or [], "host": socket.gethostname(), "pid": os.getpid()}
    holder = {**base, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    with global_limit_slot(concurrency_limit_name, lock_wait_s) as have_slot, \
            workspace_lock(workspace_path, holder, lock_wait_s) as have_lock:
        if not (have_slot and have_lock):
            what = (f"the workspace lock is held by {lock_holder(workspace_path)}" if have_slot else
                    f"the global concurrency limit {concurrency_limit_name!r} is full")
            return finish(workspace_path, {**base, "outcome": "busy",
                                           "reason": f"another run is in progress: {what}"})
        for crashed in unfinished_runs(workspace_path):
            logger.warning("run %s (started %s, pid %s on %s) never recorded an outcome: it crashed or was "
                           "killed; the registry's production alias only moves at a passing gate, so it is "
                           "unaffected", crashed.get("flow_run_id"), crashed.get("time"), crashed.get("pid"),
                           crashed.get("host"))
            append_note(workspace_path, {**crashed, "event": "finished", "outcome": "crashed",
                                         "reason": f"noticed by run {run_id}: no outcome was recorded"})
        ws = Workspace.load(workspace_path, params_path, overrides or [], data)
        decision = decide(ws, force)
        note = {**base, "dataset_hash": decision["dataset_hash"], "params_hash": decision["params_hash"],
                "model_params_hash": decision["model_params_hash"], "production_before": decision["production"],
                "production_after": decision["production"], "changes": decision["changes"],
                "lineage": decision["lineage"], "task_runner": task_runner_description(ws.params)}
        if not decision["retrain"]:
            return finish(workspace_path, {**note, "outcome": "skipped", "reason": decision["reason"]})

        logger.info("retraining: %s", decision["reason"])
        append_note(workspace_path, {**note, "event": "started", "reason": decision["reason"]})
        try:
            pipeline_state = run_pipeline(workspace_path, params_path, data, overrides or [])
        except Exception as e:  # raised instead of returning a failed state: it could not even start
            return finish(workspace_path, {**note, "outcome": "failed", "reason": f"{type(e).__name__}: {e}"})
        registry = open_registry(ws.params.registry, base_dir=ws.root)
        outcome, reason, report = outcome_of(pipeline_state, registry, decision["production"])
        return finish(workspace_path, {**note, "outcome": outcome, "reason": reason,
                                       "production_after": registry.alias(PRODUCTION),
                                       "gate_checks": (report or {}).get("checks", [])})


# ------------------------------------------------------------------------------------- deployments and CLI


def schedule_for(params: Params, cron: str | None = None):
    from prefect.schedules import Cron

    return Cron(cron or params.orchestration.schedule_cron, timezone=params.orchestration.timezone)


def deployment_parameters(workspace: str, params_path: str, data: str | None, overrides: list[str]) -> dict:
    return {"workspace": workspace, "params_path": params_path, "data": data, "overrides": overrides}


def one_run_at_a_time():
    """Deployment-level limit: a run that comes due while another is active waits for it (then usually finds
    nothing changed and skips) rather than racing it."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def serve(params: Params, parameters: dict, name: str = DEPLOYMENT_NAME, cron: str | None = None) -> None:
    """Create the deployment and run its schedule from this process (no work pool needed)."""
    from prefect.deployments.runner import EntrypointType

    scheduled_retraining.serve(name=name, schedule=schedule_for(params, cron), parameters=parameters,
                               global_limit=one_run_at_a_time(), tags=["retraining"],
                               entrypoint_type=EntrypointType.MODULE_PATH)


def deploy(params: Params, parameters: dict, pool: str, name: str = DEPLOYMENT_NAME, cron: str | None = None,
           image: str | None = None, source: str | Path = REPO, paused: bool = False,
           job_variables: dict | None = None) -> str:
    """Register the deployment with a work pool; its workers run it. Returns the deployment id.

    Without `image` (a process pool) workers run the code in `source`, a folder on their machine. With `image`
    (kubernetes/docker pools) the code is the image's: the module entry point is importable wherever the
    package is installed, and nothing is built or pushed here (build the image with infra/Dockerfile).
    `job_variables` fill the pool's job template (e.g. gpu_count for the Kubernetes one in infra/k8s).
    """
    from prefect.deployments.runner import EntrypointType

    options = dict(name=name, work_pool_name=pool, schedule=schedule_for(params, cron), parameters=parameters,
                   concurrency_limit=one_run_at_a_time(), tags=["retraining"], paused=paused,
                   job_variables=job_variables or {}, print_next_steps=False)
    if image:
        deployment_id = scheduled_retraining.deploy(image=image, build=False, push=False,
                                                    entrypoint_type=EntrypointType.MODULE_PATH, **options)
    else:
        source_flow = scheduled_retraining.from_source(source=str(Path(source).resolve()), entrypoint=ENTRYPOINT)
        deployment_id = source_flow.deploy(**options)
    return str(deployment_id)


def job_variables_from(assignments: list[str]) -> dict:
    import yaml

    variables = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ParamsError(f"--job-variable expects KEY=VALUE, got {assignment!r}")
        key, value = assignment.split("=", 1)
        variables[key.strip()] = yaml.safe_load(value) if value else ""
    return variables


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.scheduled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="say whether a run would retrain now, and why")
    mode.add_argument("--run", action="store_true", help="one scheduled run now, in this process")
    mode.add_argument("--serve", action="store_true", help="serve the deployment on its schedule")
    mode.add_argument("--deploy", action="store_true", help="register the deployment with a work pool")
    parser.add_argument("--workspace", default=".", help="working folder with params.yaml (default: .)")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file, relative to the workspace")
    parser.add_argument("--data", help="a data.yaml to use instead of params' data.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--force", action="store_true", help="--run: retrain even if nothing changed")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    parser.add_argument("--cron", help="schedule (default: orchestration.schedule_cron in params)")
    parser.add_argument("--pool", help="--deploy: work pool name")
    parser.add_argument("--image", help="--deploy: container image holding this project (docker/kubernetes pools)")
    parser.add_argument("--job-variable", action="append", default=[], metavar="KEY=VALUE",
                        help="--deploy: a job variable of the work pool's job template, e.g. gpu_count=1 "
                             "(YAML value; repeatable)")
    parser.add_argument("--paused", action="store_true", help="--deploy: create the schedule paused")
    parser.add_argument("--json", action="store_true", help="--check: print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from pipeline.registry import RegistryError

    workspace = Path(args.workspace).expanduser().resolve()
    try:
        if workspace.is_dir():
            ws = Workspace.load(workspace, args.params, args.set, args.data)
        elif args.deploy and args.image and Path(args.workspace).is_absolute():
            # The flow-run pods' folder, not this machine's: the schedule comes from the params found here.
            ws = Workspace.load(Path.cwd(), args.params, args.set)
        else:
            raise WorkspaceError(f"--workspace {workspace}: no such folder")
        if args.check:
            decision = decide(ws, args.force)
            print(json.dumps(decision, indent=2) if args.json else
                  f"{'retrain' if decision['retrain'] else 'skip'}: {decision['reason']}")
            return 0
        if args.run:
            state = scheduled_retraining(workspace=str(workspace), params_path=args.params, data=args.data,
                                         overrides=args.set, force=args.force, return_state=True)
            print(f"{state.name}: {state.message}")
            return 0 if state.is_completed() else 1
        # Deployments carry the workspace as an absolute path: workers start in their own folder.
        parameters = deployment_parameters(str(workspace), args.params, args.data, args.set)
        if args.serve:
            serve(ws.params, parameters, args.name, args.cron)
            return 0
        if not args.pool:
            parser.error("--deploy needs --pool (create one: prefect work-pool create NAME --type process)")
        job_variables = job_variables_from(args.job_variable)
        deployment_id = deploy(ws.params, parameters, args.pool, args.name, args.cron, args.image,
                               paused=args.paused, job_variables=job_variables)
        print(f"deployment {FLOW_NAME}/{args.name} ({deployment_id}) on work pool {args.pool!r}; "
              f"trigger a run: prefect deployment run '{FLOW_NAME}/{args.name}'")
        return 0
    except (ParamsError, RegistryError, WorkspaceError, FileNotFoundError, ValueError) as e:
        # ValueError: also Prefect's "work pool ... does not exist / does not support images" on --deploy.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the copy imported as `flows.scheduled`, not this `__main__` one: deployments record where the flow
    # lives, and `__main__.scheduled_retraining` would not be importable by a worker.
    from flows.scheduled import main as module_main

    sys.exit(module_main())
