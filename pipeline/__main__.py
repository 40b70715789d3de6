"""Command line: `python -m pipeline <stage>` runs one stage, `python -m pipeline run` runs them all."""
from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.params import DEFAULT_PARAMS, ParamsError, load_params

STAGE_HELP = {
    "demo": "generate the built-in demo dataset into data/demo",
    "validate": "check the dataset with Great Expectations; stops on bad data",
    "train": "train a YOLO model from its model YAML; registers best.pt",
    "sensitivity": "prune each layer alone at each ratio, measure the mAP drop, write a pruning plan",
    "prune": "apply the plan with Torch-Pruning in steps, fine-tuning after each; registers best.pt",
    "qat": "quantization-aware fine-tuning; INT8 ONNX candidates (QAT and PTQ), the gate picks one",
    "export": "export to ONNX, check it loads in Ultralytics, evaluate, register",
    "gate": "acceptance gate: thresholds and champion/challenger, then promote to production",
}


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--data", help="a data.yaml to use instead of params' data.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params entry, e.g. --set train.epochs=3 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from pipeline import registry_cli
    from pipeline.stages import STAGE_FUNCTIONS

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_FUNCTIONS:
        add_common(commands.add_parser(name, help=STAGE_HELP.get(name, name)))
    add_common(commands.add_parser("bench", help="benchmark table: FP32, Ultralytics INT8, ours pruned, ours "
                                                 "pruned + INT8 (runs the pipeline first if needed)"))
    run = commands.add_parser("run", help="run every stage in order, stopping at the first failure")
    add_common(run)
    run.add_argument("--from", dest="start", help="start at this stage (earlier outputs must exist)")
    registry = registry_cli.add_subparser(commands)
    add_common(registry)
    return parser


def log(message: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_stage(name: str, params) -> dict:
    from pipeline.stages import STAGE_FUNCTIONS

    log(f"stage {name}: start")
    started = time.perf_counter()
    result = STAGE_FUNCTIONS[name](params)
    log(f"stage {name}: done in {time.perf_counter() - started:.1f}s")
    print(json.dumps(result, indent=2, default=str), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    from pipeline.dataset import DatasetError
    from pipeline.gates import GateFailed
    from pipeline.registry import RegistryError
    from pipeline.stages import STAGES, StageInputMissing
    from pipeline.validate import ValidationFailed

    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.set, args.data)
        if args.command == "registry":
            from pipeline import registry_cli

            return registry_cli.main(args, params)
        if args.command == "bench":
            from pipeline.stages import bench

            bench(params)
            return 0
        if args.command == "run":
            stages = STAGES[STAGES.index(args.start):] if args.start else STAGES
            for name in stages:
                run_stage(name, params)
            log("all stages passed")
        else:
            run_stage(args.command, params)
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
