"""Command line: `python -m pipeline <stage>` runs one stage, `python -m pipeline run` runs them all."""
from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.params import DEFAULT_PARAMS, ParamsError


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=".", help="the workspace folder (default: the current folder)")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file, relative to the workspace")
    parser.add_argument("--data", help="a data.yaml to use instead of params' data.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params entry, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="one line per stage, no per-epoch progress")


def build_parser() -> argparse.ArgumentParser:
    from pipeline import registry_cli
    from pipeline.stages import RUN_STAGES, STAGES

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        add_common(commands.add_parser(stage.name, help=stage.help))
    run = commands.add_parser("run", help=f"run every stage in order ({' -> '.join(s.name for s in RUN_STAGES)}), "
                                          "stopping at the first failure")
    add_common(run)
    run.add_argument("--from", dest="start", help="start at this stage (earlier outputs must exist)")
    bench = commands.add_parser("bench", help="benchmark table: FP32, the fair FP32 control, Ultralytics' ONNX and "
                                              "OpenVINO exports, ours pruned and pruned + INT8 (runs the pipeline "
                                              "first if needed)")
    add_common(bench)
    bench.add_argument("--imgsz", type=int, nargs="+", metavar="N",
                       help="run the whole pipeline at each image size in bench/imgsz-N/ and benchmark each")
    bench.add_argument("--models", nargs="+", metavar="MODEL_YAML",
                       help="the family table instead: the pipeline once per model YAML (e.g. yolov5n.yaml "
                            "yolov8n.yaml yolov9t.yaml yolo11n.yaml yolo26n.yaml), FP32 ONNX vs final INT8")
    bench.add_argument("--runs", type=int, default=50, help="timed runs per model and thread count (default 50)")
    bench.add_argument("--fresh", action="store_true", help="rerun pipelines that already finished with the same params")
    bench.add_argument("--ablations", action="store_true",
                       help="instead: each compression technique on and off (pipeline/ablations.py)")
    bench.add_argument("--variant", action="append", default=None, help="with --ablations: only these variants")
    dvc_yaml = commands.add_parser("dvc-yaml", help="write dvc.yaml from the stage table (--check: only compare)")
    dvc_yaml.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs from the stage table")
    dvc_yaml.add_argument("--root", default=".", help="the repository folder holding dvc.yaml")
    registry = registry_cli.add_subparser(commands)
    add_common(registry)
    return parser


def run_stage(stage, ws) -> dict:
    from pipeline.progress import stage_log
    from pipeline.stages import run_stage as run

    stage_log.info("stage %s: start", stage.name)
    started = time.perf_counter()
    result = run(stage, ws)
    stage_log.info("stage %s: done in %.1fs", stage.name, time.perf_counter() - started)
    print(json.dumps(result, indent=2, default=str), flush=True)
    return result


def write_dvc_yaml(root: str, check: bool) -> int:
    from pathlib import Path

    from pipeline.stages import dvc_yaml_text

    path, text = Path(root) / "dvc.yaml", dvc_yaml_text()
    if check:
        same = path.is_file() and path.read_text() == text
        print(f"{path}: {'matches' if same else 'differs from'} the stage table")
        return 0 if same else 1
    from pipeline.io import write_text

    write_text(path, text)
    print(f"{path}: written from the stage table")
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipeline.dataset import DatasetError
    from pipeline.gates import GateFailed
    from pipeline.registry import RegistryError
    from pipeline.validate import ValidationFailed
    from pipeline.workspace import StageInputMissing, Workspace

    args = build_parser().parse_args(argv)
    if args.command == "dvc-yaml":
        return write_dvc_yaml(args.root, args.check)
    from pipeline.progress import configure_console

    configure_console(quiet=args.quiet)
    try:
        ws = Workspace.load(args.root, args.params, args.set, args.data)
        if args.command == "registry":
            from pipeline import registry_cli

            return registry_cli.main(args, ws.params, ws.root)
        if args.command == "bench" and args.ablations:
            from pipeline.ablations import run_ablations

            print(run_ablations(ws, args.variant)["markdown"])
            return 0
        if args.command == "bench":
            if args.models:
                from pipeline.families import bench_families

                print(bench_families(ws, args.models, args.runs, args.fresh)["markdown"])
                return 0
            from pipeline.bench import run_bench

            print(run_bench(ws, args.imgsz, args.runs, args.fresh)["markdown"])
            return 0
        from pipeline.stages import RUN_STAGES, stage_named

        if args.command == "run":
            names = [s.name for s in RUN_STAGES]
            if args.start and args.start not in names:
                raise ParamsError(f"--from {args.start}: not a stage of a run ({', '.join(names)})")
            for stage in RUN_STAGES[names.index(args.start) if args.start else 0:]:
                run_stage(stage, ws)
            from pipeline.progress import stage_log

            stage_log.info("all stages passed")
        else:
            run_stage(stage_named(args.command), ws)
        return 0
    except (ValidationFailed, GateFailed) as e:
        print(f"\n{e}", file=sys.stderr)
        return 1
    except (ParamsError, DatasetError, RegistryError, StageInputMissing, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # Our own stage errors (TrainError, QatError, ...) carry a message meant for people; anything
        # else is a bug, and its traceback is what a bug report needs.
        if type(e).__module__.startswith("pipeline."):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
