"""Gates: every stage's thresholds (`publish`) and the acceptance gate that promotes to production.

Every model-producing stage ends in `publish`, so the registry holds every artifact the pipeline produced (passing or
not, for the record), while aliases only ever point at versions whose gates passed.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from pipeline.dataset import workspace_dataset_hash
from pipeline.io import read_json, write_json
from pipeline.params import StageGates
from pipeline.registry import open_registry
from pipeline.workspace import StageInputMissing, Workspace


class GateFailed(RuntimeError):
    def __init__(self, report: dict):
        self.report = report
        super().__init__(format_report(report))


def check(metrics: dict, gates: StageGates, reference: dict | None = None,
          reference_latency_ms: float | None = None) -> list[dict]:
    """One row per configured threshold: name, value, limit, passed. `reference` is the trained model's
    metrics, against which drops and reductions are measured; `reference_latency_ms` is what
    `max_latency_ratio` compares with."""
    rows = []

    def row(name: str, value, limit, passed: bool):
        rows.append({"gate": name, "value": value, "limit": limit, "passed": bool(passed)})

    if gates.min_map50_95 is not None:
        row("min_map50_95", metrics["map50_95"], gates.min_map50_95, metrics["map50_95"] >= gates.min_map50_95)
    if gates.max_file_mb is not None:
        row("max_file_mb", metrics["file_mb"], gates.max_file_mb, metrics["file_mb"] <= gates.max_file_mb)
    if gates.max_latency_ms is not None:
        value = metrics.get("latency_ms")
        row("max_latency_ms", value, gates.max_latency_ms, value is not None and value <= gates.max_latency_ms)
    if gates.max_map_drop is not None or gates.min_params_reduction is not None:
        if reference is None:
            raise ValueError("gates relative to the trained model need the trained model's metrics")
    if gates.max_map_drop is not None:
        drop = round(reference["map50_95"] - metrics["map50_95"], 6)
        row("max_map_drop", drop, gates.max_map_drop, drop <= gates.max_map_drop)
    if gates.min_params_reduction is not None:
        reduction = round(1 - metrics["params"] / reference["params"], 6)
        row("min_params_reduction", reduction, gates.min_params_reduction, reduction >= gates.min_params_reduction)
    if gates.max_latency_ratio is not None:
        if reference_latency_ms is None:
            raise ValueError("max_latency_ratio needs a reference latency")
        value = metrics.get("latency_ms")
        ratio = round(value / reference_latency_ms, 4) if value is not None else None
        row("max_latency_ratio", ratio, gates.max_latency_ratio, ratio is not None and ratio <= gates.max_latency_ratio)
    return rows


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['gate']}: {_fmt(r['value'])} (limit {_fmt(r['limit'])})" for r in rows if not r["passed"]]


def format_report(report: dict) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    version = report.get("version")
    lines = [f"gate {report['stage']}: {verdict}" + (f" (registry version {version})" if version else "")]
    for r in report["checks"]:
        mark = "ok  " if r["passed"] else "FAIL"
        lines.append(f"  {mark} {r['gate']}: {_fmt(r['value'])} (limit {_fmt(r['limit'])})")
    if not report["checks"]:
        lines.append("  (no gates configured)")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def publish(ws: Workspace, *, files: dict[str, Path], primary: str, metrics: dict, gates: StageGates,
            reference: dict | None = None, reference_latency_ms: float | None = None,
            extra_checks: list[dict] = ()) -> dict:
    """Register the running stage's files, check its gates, move its alias on a pass (the stage, its alias and
    the parent alias come from the stage table through `ws.stage`). Writes `gate.json` in the stage's folder.
    Raises GateFailed (the registry keeps the version, the alias does not move) on a fail."""
    stage = ws.stage
    registry = open_registry(ws.params.registry, base_dir=ws.root)
    parent = registry.alias(stage.parent_alias) if stage.parent_alias else None
    checks = check(metrics, gates, reference, reference_latency_ms) + list(extra_checks)
    passed = all(r["passed"] for r in checks)
    manifest = registry.register(stage=stage.name, files=files, primary=primary, metrics=metrics,
                                 params=ws.params.as_dict(), params_hash=ws.params.hash(),
                                 dataset_hash=workspace_dataset_hash(ws), parent=parent, git_commit=git_commit(ws.root))
    report = {"stage": stage.name, "alias": stage.alias, "version": manifest.version, "passed": passed,
              "checks": checks}
    write_json(ws.stage_dir() / "gate.json", report)
    if not passed:
        raise GateFailed(report)
    registry.set_alias(stage.alias, manifest.version, reason=format_report(report))
    return report


def run_acceptance(ws: Workspace) -> dict:
    """Stage `gate`: absolute thresholds, then champion/challenger against the current production model on the
    same val data; promotes the exported model to production when every check passes."""
    from pipeline.control import best_float_model
    from pipeline.evaluate import evaluate

    g = ws.params.gate
    registry = open_registry(ws.params.registry, base_dir=ws.root)
    candidate_version = registry.alias(ws.stage.parent_alias)
    if candidate_version is None:
        raise StageInputMissing(f"registry has no {ws.stage.parent_alias!r} model; run the stage before this one")
    candidate = registry.manifest(candidate_version)
    metrics_path = ws.input("outputs/export/metrics.json")
    metrics = read_json(metrics_path)
    if metrics.get("file_bytes") != candidate.files[candidate.primary].bytes:
        raise StageInputMissing(f"{metrics_path} does not describe registry version {candidate_version}; "
                                f"rerun `python -m pipeline export`")
    # Accuracy is judged against the best float model of the run (the control, or the pruned FP32 model).
    reference_name, reference = best_float_model({
        "control": read_json(ws.input("outputs/control/metrics.json")),
        "pruned": read_json(ws.input("outputs/prune/metrics.json"))})
    checks = check(metrics, StageGates(min_map50_95=g.min_map50_95, max_file_mb=g.max_file_mb,
                                       max_latency_ms=g.max_latency_ms, max_map_drop=g.max_map_drop), reference)
    for row in checks:
        if row["gate"] == "max_map_drop":
            row["gate"] = f"max_map_drop_vs_{reference_name}"
    champion = registry.alias(ws.stage.alias)
    champion_metrics = None
    if champion is not None and champion != candidate_version:
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
            files = registry.fetch(champion, Path(tmp))  # sha256-verified before anything loads it
            champion_metrics = evaluate(files[registry.manifest(champion).primary], ws.data_yaml(), ws.params,
                                        latency=False)
        floor = champion_metrics["map50_95"] - g.champion_tolerance
        checks.append({"gate": f"not_worse_than_production_v{champion}", "value": metrics["map50_95"],
                       "limit": round(floor, 6), "passed": metrics["map50_95"] >= floor})
    report = {"stage": "gate", "alias": ws.stage.alias, "version": candidate_version,
              "passed": all(c["passed"] for c in checks), "checks": checks,
              "accuracy_reference": {"model": reference_name, "map50_95": reference["map50_95"]},
              "production_before": champion, "champion_metrics": champion_metrics, "candidate_metrics": metrics}
    write_json(ws.stage_dir() / "report.json", report)
    registry.set_alias("candidate", candidate_version, reason="acceptance gate evaluated")
    if not report["passed"]:
        raise GateFailed(report)
    if champion != candidate_version:
        registry.set_alias(ws.stage.alias, candidate_version, reason=format_report(report))
    return report
