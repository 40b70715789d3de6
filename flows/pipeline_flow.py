"""The Prefect flow: the stage table's stages (pipeline/stages.py), in its order, as Prefect tasks.

Run by hand:   python -m flows.pipeline_flow [--root folder] [--data my/data.yaml] [--set train.epochs=5]
Without PREFECT_API_URL, Prefect runs it against a temporary local API; with it, against that server.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import stages
from pipeline.params import DEFAULT_PARAMS, Params
from pipeline.workspace import Workspace

RETRIES = 2
RETRY_DELAY_S = 5


def is_transient(error: BaseException | None) -> bool:
    """Worth another try: the registry's store timing out, throttling or failing on its side, a dropped
    connection. Not: bad data, failed gates, bad input, a checksum mismatch, a full disk (OSError): a retry
    would only fail the same way, later."""
    from pipeline.registry import RegistryUnavailable

    return isinstance(error, (RegistryUnavailable, ConnectionError, TimeoutError))


def retry_only_transient(task, task_run, state) -> bool:
    return is_transient(state.result(raise_on_failure=False))


def stage_artifacts(name: str, result: dict | None, error: Exception | None = None) -> None:
    """Per stage run: a markdown artifact (metrics, outcome) and, for stages with gates, a table artifact."""
    lines = [f"# Stage `{name}`"]
    if error is not None:
        lines += ["**failed**", "", "```", str(error), "```"]
    result = result or {}
    metrics = result.get("metrics")
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
                  if not isinstance(v, (dict, list))]
    gate = result.get("gate") or (result if "checks" in result else None)
    if gate:
        lines += ["", f"Gate: **{'passed' if gate['passed'] else 'failed'}**, registry version {gate.get('version')}"]
        create_table_artifact(gate["checks"], key=f"gate-{name}", description=f"gate of stage {name}")
    create_markdown_artifact("\n".join(lines), key=f"stage-{name}", description=f"pipeline stage {name}")


class _ToRunLogger(logging.Handler):
    def __init__(self, run_logger):
        super().__init__()
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def progress_to_run_logs():
    """The stages' progress lines (logger `pipeline`) into this flow or task run's logs while it runs."""
    logger = logging.getLogger("pipeline")
    handler, level = _ToRunLogger(get_run_logger()), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_with_artifacts(stage: stages.Stage, ws: Workspace, **kwargs) -> dict:
    try:
        with progress_to_run_logs():
            result = stages.run_stage(stage, ws, **kwargs)
    except Exception as e:
        stage_artifacts(stage.name, getattr(e, "report", None), e)
        raise
    stage_artifacts(stage.name, result)
    return result


def stage_task(stage: stages.Stage):
    @task(name=stage.name, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S,
          retry_condition_fn=retry_only_transient, cache_policy=NO_CACHE)
    def run(ws: Workspace) -> dict:
        return run_with_artifacts(stage, ws)

    return run


def prefect_map(function, *iterables):
    """A builtin-`map` stand-in that runs each call as a mapped Prefect task on the flow's task runner."""
    mapped = task(function, name=function.__name__.replace("_", "-"), retries=RETRIES,
                  retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_only_transient, cache_policy=NO_CACHE)
    for future in mapped.map(*iterables):
        yield future.result()


STAGE_TASKS = {stage.name: stage_task(stage) for stage in stages.RUN_STAGES if not stage.fans_out}


def task_runner_for(params: Params):
    """Threads by default; Dask (a local cluster, or the scheduler at `dask_address`) when asked."""
    o = params.orchestration
    if o.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if o.dask_address:
            return DaskTaskRunner(address=o.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": o.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=o.max_workers)


@flow(name="edge-yolo-pipeline", log_prints=True)
def pipeline_flow(params_path: str = str(DEFAULT_PARAMS), data: str | None = None,
                  overrides: list[str] | None = None, workspace: str = ".") -> dict:
    """Every stage of a run, in the stage table's order. `workspace` is the folder holding params.yaml, the data
    and outputs/; `params_path` is relative to it; `overrides` are `section.key=value` entries over params."""
    ws = Workspace.load(workspace, params_path, overrides or [], data)
    get_run_logger().info("workspace %s, params %s (hash %s), data %s", ws.root, params_path, ws.params.hash(),
                          ws.params.data.yaml)
    results = {}
    for stage in stages.RUN_STAGES:
        # A fanned-out stage runs in the flow itself, so that its mapped tasks go through the flow's task runner.
        results[stage.name] = (run_with_artifacts(stage, ws, map_fn=prefect_map) if stage.fans_out
                               else STAGE_TASKS[stage.name](ws))
    return results


def run_flow(params_path: str = str(DEFAULT_PARAMS), data: str | None = None, overrides: list[str] | None = None,
             workspace: str = "."):
    """Run the flow with the task runner the workspace's params ask for; returns the final state."""
    params = Workspace.load(workspace, params_path, overrides or [], data).params
    configured = pipeline_flow.with_options(task_runner=task_runner_for(params))
    return configured(params_path=params_path, data=data, overrides=overrides, workspace=workspace,
                      return_state=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline_flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="the workspace folder (default: the current folder)")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--data")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    state = run_flow(args.params, args.data, args.set, args.root)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
