"""Stage gates: register an artifact, check its thresholds, move the stage's alias only when they pass.

Every stage ends in `publish`, so the registry holds every artifact the pipeline produced (passing or
not, for the record), while aliases only ever point at versions whose gates passed.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.io import write_json
from pipeline.params import Params, StageGates


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


def publish(params: Params, *, stage: str, alias: str, files: dict[str, Path], primary: str, metrics: dict,
            gates: StageGates, dataset_hash: str, out_dir: Path, parent_alias: str | None = None,
            reference: dict | None = None, reference_latency_ms: float | None = None,
            extra_checks: list[dict] = ()) -> dict:
    """Register the stage's files, check its gates, move `alias` on a pass. Writes `out_dir/gate.json`.
    Raises GateFailed (the registry keeps the version, the alias does not move) on a fail."""
    from pipeline.registry import open_registry

    registry = open_registry(params.registry)
    parent = registry.alias(parent_alias) if parent_alias else None
    checks = check(metrics, gates, reference, reference_latency_ms) + list(extra_checks)
    passed = all(r["passed"] for r in checks)
    manifest = registry.register(stage=stage, files=files, primary=primary, metrics=metrics,
                                 params=params.as_dict(), params_hash=params.hash(),
                                 dataset_hash=dataset_hash, parent=parent, git_commit=git_commit())
    report = {"stage": stage, "alias": alias, "version": manifest.version, "passed": passed, "checks": checks}
    write_json(Path(out_dir) / "gate.json", report)
    if not passed:
        raise GateFailed(report)
    registry.set_alias(alias, manifest.version, reason=format_report(report))
    return report
