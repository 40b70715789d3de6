"""Scheduled retraining: retrain only when the data or the params moved away from the production model.

Each run of the `scheduled-retraining` flow, in the working folder (`workspace`) that holds params.yaml,
outputs/ and (by default) the registry:

1. takes the workspace lock (an flock on `<workspace>/.retraining/lock`; another run holding it means this
   one is recorded as skipped, "busy"), and optionally a slot of a Prefect global concurrency limit for
   workspaces that live on several machines;
2. compares the dataset hash and the params with those recorded in the registry manifest of the current
   `production` model (`decide`). Nothing changed: it records a skipped run and stops. Settings that cannot
   change the model (the `orchestration` and `registry` sections) are left out of the comparison;
3. otherwise runs the whole pipeline flow (every stage, through every gate) with the task runner the params
   ask for (threads, or Dask), and records whether it promoted, was rejected (and why) or crashed.

Every run is recorded twice: a Prefect markdown artifact (key `scheduled-retraining`) plus the final state's
name and message (`Skipped`, `Completed`, `Failed`), and a line in `<workspace>/.retraining/runs.jsonl`,
which does not depend on the registry or on Prefect.

Crash safety comes from the pieces underneath: the flock is released by the kernel when the process dies; the
registry writes a version's manifest last and moves aliases by compare-and-swap, and only a passing gate moves
`production`, so a run killed half-way leaves production where it was and the next run simply retrains; this
flow never writes DVC state (dvc.lock changes only through `dvc repro`/`dvc commit`), so a crash cannot leave
dvc.lock describing half a run. A run that started but never recorded an outcome is reported by the next one.

    python -m flows.scheduled --check                     # would a run retrain now? why?
    python -m flows.scheduled --run                       # one scheduled run, now, in this process
    python -m flows.scheduled --serve                     # serve the deployment with its cron schedule
    python -m flows.scheduled --deploy --pool my-pool     # register it with a work pool (workers run it)
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed

from pipeline import stages
from pipeline.params import DEFAULT_PARAMS, Params, load_params
from pipeline.registry import PRODUCTION, open_registry

REPO = Path(__file__).resolve().parents[1]
FLOW_NAME = "scheduled-retraining"
DEPLOYMENT_NAME = "scheduled-retraining"
ENTRYPOINT = "flows/scheduled.py:scheduled_retraining"
ARTIFACT_KEY = "scheduled-retraining"

STATE_DIR = ".retraining"  # inside the workspace: the lock and the run notes
LOCK_FILE = "lock"
NOTES_FILE = "runs.jsonl"

# How a run is scheduled or fanned out, and where the registry lives, cannot change the model it trains.
IGNORED_PARAM_SECTIONS = ("orchestration", "registry")


class WorkspaceError(ValueError):
    pass


class RetrainingNotPromoted(RuntimeError):
    """The result of a scheduled run that was rejected or failed; `note` is what runs.jsonl recorded."""

    def __init__(self, message: str, note: dict):
        super().__init__(message)
        self.note = note


# ------------------------------------------------------------------------------------------- the change check


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def model_params(params_dict: dict) -> dict:
    return {k: v for k, v in params_dict.items() if k not in IGNORED_PARAM_SECTIONS}


def model_params_hash(params_dict: dict) -> str:
    """Hash of the params that can change the model (what the skip rule compares and the notes key on)."""
    return hashlib.sha256(json.dumps(model_params(params_dict), sort_keys=True).encode()).hexdigest()[:16]


def params_changes(before: dict, after: dict, limit: int = 20) -> list[str]:
    """Readable differences between two params dicts, ignoring IGNORED_PARAM_SECTIONS.

    A key the older params do not have at all, set now to its default, is no change: it is a setting added
    to the code since, whose default keeps the old behaviour."""
    old, new = flatten(model_params(before)), flatten(model_params(after))
    defaults = flatten(Params().as_dict())
    unset = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key, unset), new.get(key, unset)
        if was == now or (was is unset and key in defaults and now == defaults[key]):
            continue
        changes.append(f"{key}: {'(unset)' if was is unset else repr(was)} -> "
                       f"{'(unset)' if now is unset else repr(now)}")
    return changes[:limit] + ([f"... and {len(changes) - limit} more"] if len(changes) > limit else [])


def decide(params: Params, workspace: Path | None = None, force: bool = False) -> dict:
    """Should a scheduled run retrain? Compares the dataset and params with the production model's lineage.

    Returns {"retrain", "reason", "changes", "dataset_hash", "params_hash", "model_params_hash",
    "production", "lineage"}. A (dataset, params, production) combination that an earlier scheduled run already
    trained and saw rejected is not retried (the verdict would be the same) unless `force`.
    """
    registry = open_registry(params.registry)
    current = params.as_dict()
    decision = {"dataset_hash": stages.dataset_hash(params), "params_hash": params.hash(),
                "model_params_hash": model_params_hash(current), "production": registry.alias(PRODUCTION),
                "lineage": [], "changes": []}
    production = decision["production"]
    if production is None:
        return {**decision, "retrain": True, "reason": "no production model yet"}

    lineage = registry.lineage(production)
    decision["lineage"] = [f"v{m.version} ({m.stage})" for m in lineage]
    head = lineage[0]  # the production version itself; its parents were trained on the same data and params
    changes = []
    if head.dataset_hash != decision["dataset_hash"]:
        changes.append(f"dataset: {str(head.dataset_hash)[:12]} -> {decision['dataset_hash'][:12]}")
    if head.params:
        changes += params_changes(head.params, current)
    elif head.params_hash != decision["params_hash"]:  # a manifest without the params themselves
        changes.append(f"params hash: {head.params_hash} -> {decision['params_hash']}")
    decision["changes"] = changes
    production_text = f"production v{production} ({' <- '.join(decision['lineage'])})"

    if not changes and not force:
        return {**decision, "retrain": False,
                "reason": f"dataset and params unchanged since {production_text}"}
    if not changes:
        return {**decision, "retrain": True, "reason": f"forced; nothing changed since {production_text}"}
    if not force and workspace is not None:
        rejected = last_rejection(workspace, decision)
        if rejected is not None:
            return {**decision, "retrain": False,
                    "reason": (f"this dataset and params were already trained by run {rejected.get('flow_run_id')} "
                               f"at {rejected.get('time')} and rejected ({rejected.get('reason')}); production "
                               f"is still v{production}. Change them, or run with force=true to retry")}
    return {**decision, "retrain": True, "reason": f"changed since {production_text}: " + "; ".join(changes)}


# ------------------------------------------------------------------------------------- workspace state on disk


def state_dir(workspace: Path) -> Path:
    folder = Path(workspace) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_notes(workspace: Path) -> list[dict]:
    path = Path(workspace) / STATE_DIR / NOTES_FILE
    if not path.exists():
        return []
    notes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                notes.append(json.loads(line))
            except json.JSONDecodeError:
                # A line cut short by a crash mid-write: skip it rather than block every later run.
                print(f"{path}:{number}: not JSON, ignored", file=sys.stderr)
    return notes


def append_note(workspace: Path, note: dict) -> dict:
    note = {**note, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # when written
    line = json.dumps(note, sort_keys=True, default=str) + "\n"
    # One write() of one line in append mode: concurrent appenders cannot interleave inside a line.
    with open(state_dir(workspace) / NOTES_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return note


def last_rejection(workspace: Path, decision: dict) -> dict | None:
    """The latest finished run with the same data, params and production model, if it was rejected."""
    for note in reversed(read_notes(workspace)):
        if note.get("event") != "finished" or note.get("outcome") not in ("promoted", "unchanged", "rejected"):
            continue
        same = (note.get("dataset_hash") == decision["dataset_hash"]
                and note.get("model_params_hash") == decision["model_params_hash"]
                and note.get("production_before") == decision["production"])
        if same:
            return note if note["outcome"] == "rejected" else None
    return None


def unfinished_runs(workspace: Path) -> list[dict]:
    """Runs that noted a start but never an outcome: they crashed or were killed."""
    finished = {n.get("flow_run_id") for n in read_notes(workspace) if n.get("event") == "finished"}
    return [n for n in read_notes(workspace) if n.get("event") == "started" and n.get("flow_run_id") not in finished]


@contextlib.contextmanager
def workspace_lock(workspace: Path, holder: dict, wait_s: float = 0.0):
    """Yields True when this process holds `<workspace>/.retraining/lock`, False when another does.

    An flock, not a pid file: the kernel drops it when the holding process exits or is killed, so a crashed
    run never leaves a stale lock behind. Works on local disks and NFSv4 (a Kubernetes RWX volume).
    """
    path = state_dir(workspace) / LOCK_FILE
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(holder, default=str))  # who holds it, for the "busy" message of others
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(workspace: Path) -> str:
    try:
        return (Path(workspace) / STATE_DIR / LOCK_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def working_directory(path: Path):
    # The stages write relative paths (outputs/, registry/): they must run inside the workspace. Each
    # deployment run is its own process, so changing the process's directory affects nothing else.
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def global_limit_slot(name: str | None, wait_s: float):
    """A slot of the Prefect global concurrency limit `name` (none asked: nothing to hold). Yields False when
    it is taken. The slot is a lease that the server revokes if the holder dies, so crashes free it too."""
    if not name:
        yield True
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    # Ask first: under load the acquisition below can time out before the server answers "no such
    # limit", and a missing limit must be a setup error, never a silent "busy".
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise RuntimeError(f"the global concurrency limit {name!r} must be created before runs can hold it: "
                               f"prefect gcl create {name} --limit 1") from None
    with contextlib.ExitStack() as held:
        try:
            # strict: a limit that does not exist is a setup error, not a silent "no limit".
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=max(wait_s, 1.0), strict=True))
        except TimeoutError:
            yield False
            return
        yield True


# ------------------------------------------------------------------------------------------------ the flow


def run_pipeline(params_path: str, data: str | None, overrides: list[str]):
    """The pipeline flow, as a subflow, with the task runner from params (threads or Dask). Returns its state."""
    from flows.pipeline_flow import run_flow

    return run_flow(params_path, data, overrides)


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
        with working_directory(workspace_path):
            for crashed in unfinished_runs(workspace_path):
                logger.warning("run %s (started %s, pid %s on %s) never recorded an outcome: it crashed or was "
                               "killed; the registry's production alias only moves at a passing gate, so it is "
                               "unaffected", crashed.get("flow_run_id"), crashed.get("time"), crashed.get("pid"),
                               crashed.get("host"))
                append_note(workspace_path, {**crashed, "event": "finished", "outcome": "crashed",
                                             "reason": f"noticed by run {run_id}: no outcome was recorded"})
            params = load_params(params_path, overrides or [], data)
            decision = decide(params, workspace_path, force)
            note = {**base, "dataset_hash": decision["dataset_hash"], "params_hash": decision["params_hash"],
                    "model_params_hash": decision["model_params_hash"], "production_before": decision["production"],
                    "production_after": decision["production"], "changes": decision["changes"],
                    "lineage": decision["lineage"], "task_runner": task_runner_description(params)}
            if not decision["retrain"]:
                return finish(workspace_path, {**note, "outcome": "skipped", "reason": decision["reason"]})

            logger.info("retraining: %s", decision["reason"])
            append_note(workspace_path, {**note, "event": "started", "reason": decision["reason"]})
            try:
                pipeline_state = run_pipeline(params_path, data, overrides or [])
            except Exception as e:  # raised instead of returning a failed state: it could not even start
                return finish(workspace_path, {**note, "outcome": "failed", "reason": f"{type(e).__name__}: {e}"})
            registry = open_registry(params.registry)
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
           image: str | None = None, source: str | Path = REPO, paused: bool = False) -> str:
    """Register the deployment with a work pool; its workers run it. Returns the deployment id.

    Without `image` (a process pool) workers run the code in `source`, a folder on their machine. With `image`
    (kubernetes/docker pools) the code is the image's: the module entry point is importable wherever the
    package is installed, and nothing is built or pushed here (build the image with infra/Dockerfile).
    """
    from prefect.deployments.runner import EntrypointType

    options = dict(name=name, work_pool_name=pool, schedule=schedule_for(params, cron), parameters=parameters,
                   concurrency_limit=one_run_at_a_time(), tags=["retraining"], paused=paused,
                   print_next_steps=False)
    if image:
        deployment_id = scheduled_retraining.deploy(image=image, build=False, push=False,
                                                    entrypoint_type=EntrypointType.MODULE_PATH, **options)
    else:
        source_flow = scheduled_retraining.from_source(source=str(Path(source).resolve()), entrypoint=ENTRYPOINT)
        deployment_id = source_flow.deploy(**options)
    return str(deployment_id)


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
    parser.add_argument("--paused", action="store_true", help="--deploy: create the schedule paused")
    parser.add_argument("--json", action="store_true", help="--check: print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from pipeline.params import ParamsError
    from pipeline.registry import RegistryError

    workspace = Path(args.workspace).expanduser().resolve()
    try:
        if not workspace.is_dir():
            raise WorkspaceError(f"--workspace {workspace}: no such folder")
        with working_directory(workspace):
            params = load_params(args.params, args.set, args.data)
            if args.check:
                decision = decide(params, workspace, args.force)
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
            serve(params, parameters, args.name, args.cron)
            return 0
        if not args.pool:
            parser.error("--deploy needs --pool (create one: prefect work-pool create NAME --type process)")
        deployment_id = deploy(params, parameters, args.pool, args.name, args.cron, args.image, paused=args.paused)
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
