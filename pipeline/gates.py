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
            extra_checks: list[dict] = (), alias: str | None = None, report_file: str = "gate.json") -> dict:
    """Register the running stage's files, check its gates, move its alias on a pass (the stage, its alias and
    the parent alias come from the stage table through `ws.stage`; `alias` replaces the stage's alias for a
    stage that publishes more than one artifact, e.g. one per deploy target, each with the same parent).
    Writes `report_file` in the stage's folder. Raises GateFailed (the registry keeps the version, the alias
    does not move) on a fail."""
    stage = ws.stage
    alias = alias or stage.alias
    registry = open_registry(ws.params.registry, base_dir=ws.root)
    parent = registry.alias(stage.parent_alias) if stage.parent_alias else None
    checks = check(metrics, gates, reference, reference_latency_ms) + list(extra_checks)
    passed = all(r["passed"] for r in checks)
    manifest = registry.register(stage=stage.name, files=files, primary=primary, metrics=metrics,
                                 params=ws.params.as_dict(), params_hash=ws.params.hash(),
                                 dataset_hash=workspace_dataset_hash(ws), parent=parent, git_commit=git_commit(ws.root))
    report = {"stage": stage.name, "alias": alias, "version": manifest.version, "passed": passed,
              "checks": checks}
    write_json(ws.stage_dir() / report_file, report)
    if not passed:
        raise GateFailed(report)
    registry.set_alias(alias, manifest.version, reason=format_report(report))
    return report


def combine_failures(reports: list[dict]) -> dict:
    """One failed report from several (one per deploy target): every check, named by its alias."""
    if len(reports) == 1:
        return reports[0]
    checks = [{**row, "gate": f"{r['alias']}: {row['gate']}"} for r in reports for row in r["checks"]]
    return {"stage": reports[0]["stage"], "passed": False, "checks": checks,
            "versions": {r["alias"]: r.get("version") for r in reports}}


# Deploy targets the acceptance gate promotes together: (target, candidate alias, production alias, metrics file).
ONNX_TARGET = ("onnx", "exported", "production", "outputs/export/metrics.json")
OPENVINO_TARGET = ("openvino", "exported-openvino", "production-openvino", "outputs/export/metrics_openvino.json")


def run_acceptance(ws: Workspace) -> dict:
    """Stage `gate`: absolute thresholds, then champion/challenger against the current production model on the
    same val data, for each deploy target (the ONNX Runtime model; the OpenVINO IR unless export.openvino is
    off), each in its own runtime. Promotes every target's candidate (`production`, `production-openvino`)
    only when every check of every target passes and all candidates derive from the same qat version, so the
    production aliases always name one lineage."""
    from pipeline.control import best_float_model

    registry = open_registry(ws.params.registry, base_dir=ws.root)
    # Accuracy is judged against the best float model of the run (the control, or the pruned FP32 model).
    reference_name, reference = best_float_model({
        "control": read_json(ws.input("outputs/control/metrics.json")),
        "pruned": read_json(ws.input("outputs/prune/metrics.json"))})
    targets = [("onnx", ws.stage.parent_alias, ws.stage.alias, ONNX_TARGET[3])]
    if ws.params.export.openvino != "off":
        targets.append(OPENVINO_TARGET)
    judged = {name: _judge_target(ws, registry, candidate_alias, production_alias, metrics_file, reference)
              for name, candidate_alias, production_alias, metrics_file in targets}
    if len(judged) > 1:
        origins = {name: j["qat_version"] for name, j in judged.items()}
        same = origins["onnx"] is not None and len(set(origins.values())) == 1
        judged["openvino"]["checks"].append({"gate": "same_qat_version_as_onnx", "value": origins["openvino"],
                                             "limit": origins["onnx"], "passed": same})
    for j in judged.values():
        for row in j["checks"]:
            if row["gate"] == "max_map_drop":
                row["gate"] = f"max_map_drop_vs_{reference_name}"
        j["passed"] = all(c["passed"] for c in j["checks"])
    onnx = judged["onnx"]
    # The ONNX target's fields stay at the top level (what the report held before there were targets).
    report = {"stage": "gate", "alias": onnx["alias"], "version": onnx["version"],
              "passed": all(j["passed"] for j in judged.values()),
              "checks": [{**row, "gate": row["gate"] if name == "onnx" else f"{name}: {row['gate']}"}
                         for name, j in judged.items() for row in j["checks"]],
              "accuracy_reference": {"model": reference_name, "map50_95": reference["map50_95"]},
              "production_before": onnx["production_before"], "champion_metrics": onnx["champion_metrics"],
              "candidate_metrics": onnx["candidate_metrics"], "targets": judged}
    write_json(ws.stage_dir() / "report.json", report)
    for name, j in judged.items():
        registry.set_alias("candidate" if name == "onnx" else f"candidate-{name}", j["version"],
                           reason="acceptance gate evaluated")
    if not report["passed"]:
        raise GateFailed(report)
    for j in judged.values():
        if j["production_before"] != j["version"]:
            registry.set_alias(j["alias"], j["version"], reason=format_report({**report, "alias": j["alias"],
                                                                               "version": j["version"]}))
    return report


def _qat_version(registry, version: int) -> int | None:
    """The qat stage's version a model derives from: itself when it is one (the registry returns the qat
    version for an export whose bytes equal the qat stage's file), else the nearest qat ancestor."""
    return next((m.version for m in registry.lineage(version) if m.stage == "qat"), None)


def _deployed_bytes(manifest) -> int:
    """What evaluate() counts as the artifact's size: the model file, or an IR's .xml + .bin."""
    return sum(f.bytes for name, f in manifest.files.items() if Path(name).suffix in {".onnx", ".xml", ".bin"})


def _judge_target(ws: Workspace, registry, candidate_alias: str, production_alias: str, metrics_file: str,
                  reference: dict) -> dict:
    """Thresholds and champion/challenger for one deploy target: its candidate (the registry version under
    `candidate_alias`, described by `metrics_file`) against the version under `production_alias`."""
    from pipeline.evaluate import evaluate

    g = ws.params.gate
    candidate_version = registry.alias(candidate_alias)
    if candidate_version is None:
        raise StageInputMissing(f"registry has no {candidate_alias!r} model; run the stage before this one")
    candidate = registry.manifest(candidate_version)
    metrics_path = ws.input(metrics_file)
    metrics = read_json(metrics_path)
    if metrics.get("file_bytes") != _deployed_bytes(candidate):
        raise StageInputMissing(f"{metrics_path} does not describe registry version {candidate_version} "
                                f"({candidate_alias}); rerun `python -m pipeline export`")
    checks = check(metrics, StageGates(min_map50_95=g.min_map50_95, max_file_mb=g.max_file_mb,
                                       max_latency_ms=g.max_latency_ms, max_map_drop=g.max_map_drop), reference)
    champion = registry.alias(production_alias)
    champion_metrics = None
    if champion is not None and champion != candidate_version:
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
            champion_manifest = registry.manifest(champion)
            # An IR must sit in a `*_openvino_model` folder for Ultralytics to load it.
            folder = Path(tmp) / ("champion_openvino_model" if champion_manifest.primary.endswith(".xml") else "champion")
            files = registry.fetch(champion, folder)  # sha256-verified before anything loads it
            artifact = folder if folder.name.endswith("_openvino_model") else files[champion_manifest.primary]
            champion_metrics = evaluate(artifact, ws.data_yaml(), ws.params, latency=False)
        floor = champion_metrics["map50_95"] - g.champion_tolerance
        checks.append({"gate": f"not_worse_than_production_v{champion}", "value": metrics["map50_95"],
                       "limit": round(floor, 6), "passed": metrics["map50_95"] >= floor})
    return {"alias": production_alias, "candidate_alias": candidate_alias, "version": candidate_version,
            "parent": candidate.parent, "qat_version": _qat_version(registry, candidate_version), "checks": checks, "production_before": champion,
            "champion_metrics": champion_metrics, "candidate_metrics": metrics}
