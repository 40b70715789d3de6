"""The Prefect flow: the same stage functions as `python -m pipeline run`, in the same order.

Run by hand:   python -m flows.pipeline_flow [--data my/data.yaml] [--set train.epochs=5]
Without PREFECT_API_URL, Prefect runs it against a temporary local API; with it, against that server.
"""
from __future__ import annotations

import argparse
import json
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import stages
from pipeline.params import DEFAULT_PARAMS, Params, load_params

# Bad data and failed gates are verdicts, not accidents: retrying them only wastes the machine.
# Disk, network and registry hiccups are worth another try.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, OSError)
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def retry_only_transient(task, task_run, state) -> bool:
    error = state.result(raise_on_failure=False)
    return isinstance(error, TRANSIENT_ERRORS) and not isinstance(error, PERMANENT_ERRORS)


def stage_artifact(name: str, result: dict | None, error: Exception | None = None) -> None:
    """One markdown artifact per stage run: its metrics and its gate outcome."""
    lines = [f"# Stage `{name}`"]
    if error is not None:
        lines += ["**failed**", "", "```", str(error), "```"]
    result = result or {}
    metrics = result.get("metrics")
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    gate = result.get("gate") or (result if "checks" in result else None)
    if gate:
        lines += ["", f"Gate: **{'passed' if gate['passed'] else 'failed'}**, registry version {gate.get('version')}",
                  "", "| gate | value | limit | passed |", "|---|---|---|---|"]
        lines += [f"| {c['gate']} | {c['value']} | {c['limit']} | {c['passed']} |" for c in gate["checks"]]
    if not metrics and not gate and error is None:
        lines += ["", "```json", json.dumps(result, indent=2, default=str)[:4000], "```"]
    create_markdown_artifact("\n".join(lines), key=f"stage-{name}", description=f"pipeline stage {name}")


def make_stage_task(name: str):
    function = stages.STAGE_FUNCTIONS[name]

    @task(name=name, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_only_transient,
          cache_policy=NO_CACHE)
    def stage_task(params: Params) -> dict:
        try:
            result = function(params)
        except Exception as e:
            stage_artifact(name, getattr(e, "report", None), e)
            raise
        stage_artifact(name, result)
        return result

    return stage_task


# The sensitivity stage fans out from the flow itself, so its evaluations go through the flow's task runner.
MAPPED_STAGES = {"sensitivity"}
STAGE_TASKS = {name: make_stage_task(name) for name in stages.STAGES if name not in MAPPED_STAGES}


@task(name="sensitivity-evaluation", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_only_transient,
      cache_policy=NO_CACHE)
def sensitivity_evaluation(trained_pt: str, data_yaml: str, params: Params, group: str, ratio: float) -> dict:
    from pipeline.sensitivity import evaluate_group

    return evaluate_group(trained_pt, data_yaml, params, group, ratio)


def prefect_map(function, *iterables) -> list:
    """A builtin-`map` stand-in that runs each evaluation as a mapped Prefect task."""
    futures = sensitivity_evaluation.map(*iterables)
    return [future.result() for future in futures]


def run_sensitivity_stage(params: Params) -> dict:
    try:
        result = stages.sensitivity(params, map_fn=prefect_map)
    except Exception as e:
        stage_artifact("sensitivity", None, e)
        raise
    stage_artifact("sensitivity", result)
    return result


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
                  overrides: list[str] | None = None) -> dict:
    """validate -> train -> sensitivity -> prune -> ... -> gate. `overrides` are `section.key=value`
    entries over params.yaml."""
    logger = get_run_logger()
    params = load_params(params_path, overrides or [], data)
    logger.info("params %s (hash %s), data %s", params_path, params.hash(), params.data.yaml)
    results = {}
    for name in stages.STAGES:
        results[name] = run_sensitivity_stage(params) if name in MAPPED_STAGES else STAGE_TASKS[name](params)
    return results


def run_flow(params_path: str = str(DEFAULT_PARAMS), data: str | None = None, overrides: list[str] | None = None):
    """Run the flow with the task runner params.yaml asks for; returns the final state."""
    params = load_params(params_path, overrides or [], data)
    configured = pipeline_flow.with_options(task_runner=task_runner_for(params))
    return configured(params_path=params_path, data=data, overrides=overrides, return_state=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline_flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--data")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    state = run_flow(args.params, args.data, args.set)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
