"""Stage `validate`: check a YOLO detection dataset with Great Expectations before anything trains on it.

The dataset is flattened into four small tables (images, boxes, splits, classes; see
pipeline.dataset) and each rule is one Great Expectations expectation on one column. Whatever the
outcome, out_dir gets summary.json (machine-readable) and report.html (for people); a failure then
raises ValidationFailed with a message that names the rules broken and the files that broke them.
"""
from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.dataset import (DatasetError, DatasetSpec, box_table, dataset_hash, image_table,
                              load_data_yaml)
from pipeline.io import write_text
from pipeline.params import ValidateParams
from pipeline.workspace import Workspace

# Labels written with 6 decimals can put an edge at 1.0000005; that is rounding, not a bad box.
EDGE_TOLERANCE = 1e-4


class ValidationFailed(ValueError):
    def __init__(self, message: str, result: ValidationResult):
        super().__init__(message)
        self.result = result


@dataclass
class ExpectationOutcome:
    name: str
    table: str  # images, boxes, splits, classes, or layout when data.yaml could not be loaded
    success: bool
    unexpected_count: int
    examples: list[str]  # one readable line per offending row, at most max_examples
    files: list[str]  # offending files (or folders), at most max_examples, first seen first


@dataclass
class ValidationResult:
    success: bool
    data_yaml: str
    expectations: list[ExpectationOutcome]
    stats: dict
    seconds: float
    summary_path: Path | None = None
    report_path: Path | None = None
    failed: list[ExpectationOutcome] = field(init=False)

    def __post_init__(self):
        self.failed = [e for e in self.expectations if not e.success]


def run(ws: Workspace) -> dict:
    """Stage `validate`: summary.json and report.html in outputs/validate; ValidationFailed on bad data."""
    result = validate(ws.data_yaml(), ws.params.validate_, ws.stage_dir())
    return {"success": result.success, "expectations": len(result.expectations), **result.stats}


def validate(data_yaml: Path, p: ValidateParams, out_dir: Path) -> ValidationResult:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    try:
        spec = load_data_yaml(data_yaml)
    except DatasetError as e:
        outcome = ExpectationOutcome(name="data.yaml and folder layout load", table="layout", success=False,
                                     unexpected_count=1, examples=[str(e)], files=[str(e.path)])
        result = ValidationResult(success=False, data_yaml=str(data_yaml), expectations=[outcome], stats={},
                                  seconds=time.perf_counter() - started)
        _write_outputs(result, out_dir)
        raise ValidationFailed(_failure_message(result), result) from e

    tables = build_tables(spec)
    outcomes = run_expectations(tables, spec, p)
    result = ValidationResult(success=all(o.success for o in outcomes), data_yaml=str(data_yaml),
                              expectations=outcomes, stats=dataset_stats(spec, tables),
                              seconds=0.0)
    result.seconds = round(time.perf_counter() - started, 3)
    _write_outputs(result, out_dir)
    if not result.success:
        raise ValidationFailed(_failure_message(result), result)
    return result


def build_tables(spec: DatasetSpec) -> dict[str, pd.DataFrame]:
    images = image_table(spec)
    # The same bytes in two splits leak training data into the metrics.
    splits_per_content = images.dropna(subset=["sha256"]).groupby("sha256")["split"].nunique()
    images["n_splits_with_content"] = images["sha256"].map(splits_per_content).fillna(1).astype("int64")
    paths_per_content = images.groupby("sha256")["path"].agg(list)
    images["same_content_as"] = [
        ", ".join(other for other in paths_per_content.get(sha, []) if other != path) if n > 1 else ""
        for sha, path, n in zip(images["sha256"], images["path"], images["n_splits_with_content"])
    ]

    boxes = box_table(spec)
    boxes["left"] = boxes["x"] - boxes["w"] / 2
    boxes["right"] = boxes["x"] + boxes["w"] / 2
    boxes["top"] = boxes["y"] - boxes["h"] / 2
    boxes["bottom"] = boxes["y"] + boxes["h"] / 2

    splits = pd.DataFrame({
        "split": list(spec.images),
        "folder": [", ".join(spec.relpath(s) for s in spec.sources[split]) for split in spec.images],
        "n_images": [len(images_of_split) for images_of_split in spec.images.values()],
    })

    train_counts = boxes[boxes["split"] == "train"]["class_id"].value_counts()
    classes = pd.DataFrame({
        "class_id": list(spec.names),
        "name": list(spec.names.values()),
        "train_instances": [int(train_counts.get(float(class_id), 0)) for class_id in spec.names],
    })
    train_labels = sorted({spec.relpath(spec.label_path(image).parent) for image in spec.images["train"]})
    classes["train_labels"] = ", ".join(train_labels)
    return {"images": images, "boxes": boxes, "splits": splits, "classes": classes}


def _expectations(spec: DatasetSpec, p: ValidateParams):
    """(name, table, GE expectation, how to describe one offending row, which file it names)."""
    import great_expectations as gx
    E = gx.expectations
    class_ids = sorted(float(c) for c in spec.names)
    n = p.min_instances_per_class
    return [
        ("images decode", "images",
         E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
         lambda r: f"{r.path}: {r.decode_error}", lambda r: r.path),
        ("label files are readable text", "images",
         E.ExpectColumnValuesToBeNull(column="label_error"),
         lambda r: f"{r.label_path}: {r.label_error}", lambda r: r.label_path),
        ("no image content in two splits", "images",
         E.ExpectColumnValuesToBeInSet(column="n_splits_with_content", value_set=[1]),
         lambda r: f"{r.path} has the same content as {r.same_content_as}", lambda r: r.path),
        ("label lines have 5 fields", "boxes",
         E.ExpectColumnValuesToBeInSet(column="n_fields", value_set=[5]),
         lambda r: f"{r.label}:{r.line} has {r.n_fields} fields: {r.raw.strip()!r}", lambda r: r.label),
        ("label fields are numbers", "boxes",
         E.ExpectColumnValuesToBeInSet(column="numeric", value_set=[True]),
         lambda r: f"{r.label}:{r.line} not all numbers: {r.raw.strip()!r}", lambda r: r.label),
        ("class ids in names", "boxes",
         E.ExpectColumnValuesToBeInSet(column="class_id", value_set=class_ids),
         lambda r: f"{r.label}:{r.line} class {r.class_id:g} (names has {_id_range(spec)})", lambda r: r.label),
        *[(f"box {column} in [0, 1]", "boxes",
           E.ExpectColumnValuesToBeBetween(column=column, min_value=0.0, max_value=1.0),
           lambda r, column=column: f"{r.label}:{r.line} {column}={getattr(r, column):g}", lambda r: r.label)
          for column in ["x", "y", "w", "h"]],
        *[(f"box {column} > 0", "boxes",
           E.ExpectColumnValuesToBeBetween(column=column, min_value=0.0, strict_min=True),
           lambda r, column=column: f"{r.label}:{r.line} {column}={getattr(r, column):g}", lambda r: r.label)
          for column in ["w", "h"]],
        *[(f"box {edge} edge inside image", "boxes",
           E.ExpectColumnValuesToBeBetween(column=edge, min_value=-EDGE_TOLERANCE)
           if edge in ("left", "top") else
           E.ExpectColumnValuesToBeBetween(column=edge, max_value=1.0 + EDGE_TOLERANCE),
           lambda r, edge=edge: f"{r.label}:{r.line} {edge} edge at {getattr(r, edge):g}", lambda r: r.label)
          for edge in ["left", "right", "top", "bottom"]],
        ("no split is empty", "splits",
         E.ExpectColumnValuesToBeBetween(column="n_images", min_value=1),
         lambda r: f"{r.split} has no images ({r.folder})", lambda r: r.folder),
        (f"each class has >= {n} train instances", "classes",
         E.ExpectColumnValuesToBeBetween(column="train_instances", min_value=n),
         lambda r: f"class {r.class_id} {r.name!r}: {r.train_instances} instances in {r.train_labels}",
         lambda r: r.train_labels),
    ]


def _id_range(spec: DatasetSpec) -> str:
    ids = sorted(spec.names)
    return f"ids {ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else f"ids {ids}"


def run_expectations(tables: dict[str, pd.DataFrame], spec: DatasetSpec,
                     p: ValidateParams) -> list[ExpectationOutcome]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # imported here: it takes seconds, and only this stage needs it
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("dataset")
    expectations = _expectations(spec, p)

    ge_results = {}
    for table_name, table in tables.items():
        suite = gx.ExpectationSuite(name=table_name)
        for name, on_table, expectation, _, _ in expectations:
            if on_table == table_name:
                expectation.meta = {"name": name}
                suite.add_expectation(expectation)
        batch = (source.add_dataframe_asset(table_name)
                 .add_batch_definition_whole_dataframe("all")
                 .get_batch(batch_parameters={"dataframe": table}))
        for one in batch.validate(suite, result_format={"result_format": "COMPLETE"}).results:
            ge_results[one.expectation_config.meta["name"]] = one

    outcomes = []
    for name, table_name, _, describe, file_of in expectations:
        one = ge_results[name]
        if one.exception_info and one.exception_info.get("raised_exception"):
            raise RuntimeError(f"Great Expectations could not evaluate {name!r}: "
                               f"{one.exception_info.get('exception_message')}")
        bad_rows = tables[table_name].loc[one.result.get("unexpected_index_list") or []]
        examples, files = [], []
        for row in bad_rows.itertuples():
            if len(examples) < p.max_examples:
                examples.append(describe(row))
            offending_file = file_of(row)
            if len(files) < p.max_examples and offending_file not in files:
                files.append(offending_file)
        outcomes.append(ExpectationOutcome(
            name=name, table=table_name, success=bool(one.success),
            unexpected_count=int(one.result.get("unexpected_count") or 0), examples=examples, files=files))
    return outcomes


def dataset_stats(spec: DatasetSpec, tables: dict[str, pd.DataFrame]) -> dict:
    images, boxes = tables["images"], tables["boxes"]
    per_split = {}
    for split in spec.images:
        split_images = images[images["split"] == split]
        split_boxes = boxes[boxes["split"] == split]
        per_split[split] = {
            "images": int(len(split_images)),
            "boxes": int(len(split_boxes)),
            "background_images": int((split_images["box_count"] == 0).sum()),
            "images_without_label_file": int(split_images["label_path"].isna().sum()),
            "instances_per_class": {name: int((split_boxes["class_id"] == class_id).sum())
                                    for class_id, name in spec.names.items()},
        }
    return {
        "root": str(spec.root),
        "names": {str(k): v for k, v in spec.names.items()},
        "splits": per_split,
        "instances_per_class": {name: int((boxes["class_id"] == class_id).sum())
                                for class_id, name in spec.names.items()},
        "dataset_hash": dataset_hash(spec),
    }


def _failure_message(result: ValidationResult) -> str:
    failed = result.failed
    lines = [f"validation failed: {len(failed)} of {len(result.expectations)} expectations ({result.data_yaml})"]
    for outcome in failed:
        rows = "row" if outcome.unexpected_count == 1 else "rows"
        count = "" if outcome.table == "layout" else f" ({outcome.unexpected_count} bad {rows})"
        lines.append(f"  - {outcome.name}{count}:")
        lines += [f"      {example}" for example in outcome.examples]
        if outcome.unexpected_count > len(outcome.examples):
            lines.append(f"      ... {outcome.unexpected_count - len(outcome.examples)} more")
    if result.report_path:
        lines.append(f"  full report: {result.report_path}")
    return "\n".join(lines)


def _write_outputs(result: ValidationResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result.summary_path = out_dir / "summary.json"
    result.report_path = out_dir / "report.html"
    summary = {
        "success": result.success,
        "data_yaml": result.data_yaml,
        "n_expectations": len(result.expectations),
        "n_failed": len(result.failed),
        "expectations": [
            {"name": o.name, "table": o.table, "success": o.success, "unexpected_count": o.unexpected_count,
             "files": o.files, "examples": o.examples}
            for o in result.expectations
        ],
        "stats": result.stats,
        "seconds": result.seconds,
    }
    write_text(result.summary_path, json.dumps(summary, indent=2) + "\n")
    write_text(result.report_path, _report_html(result))


def _report_html(result: ValidationResult) -> str:
    e = html.escape
    verdict = "PASSED" if result.success else f"FAILED ({len(result.failed)} of {len(result.expectations)})"
    rows = []
    for o in result.expectations:
        status = '<td class="pass">pass</td>' if o.success else '<td class="fail">FAIL</td>'
        examples = "<br>".join(e(x) for x in o.examples)
        if o.unexpected_count > len(o.examples):
            examples += f"<br>... {o.unexpected_count - len(o.examples)} more"
        rows.append(f"<tr>{status}<td>{e(o.name)}</td><td>{e(o.table)}</td>"
                    f"<td class=num>{o.unexpected_count}</td><td class=files>{examples}</td></tr>")

    stats = result.stats
    stat_rows = []
    for split, s in stats.get("splits", {}).items():
        per_class = ", ".join(f"{e(name)}: {count}" for name, count in s["instances_per_class"].items())
        stat_rows.append(f"<tr><td>{e(split)}</td><td class=num>{s['images']}</td><td class=num>{s['boxes']}</td>"
                         f"<td class=num>{s['background_images']}</td>"
                         f"<td class=num>{s['images_without_label_file']}</td><td>{per_class}</td></tr>")
    stats_html = ""
    if stats:
        stats_html = f"""
<h2>Dataset</h2>
<p>Root: <code>{e(stats['root'])}</code><br>Dataset hash: <code>{e(stats['dataset_hash'])}</code></p>
<table>
<tr><th>split</th><th>images</th><th>boxes</th><th>background images</th><th>no label file</th>
<th>instances per class</th></tr>
{''.join(stat_rows)}
</table>"""

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Dataset validation: {e(verdict)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }}
td.num {{ text-align: right; }}
td.files {{ font-family: monospace; font-size: 90%; }}
.pass {{ color: #1a7f37; font-weight: bold; }}
.fail {{ color: #fff; background: #cf222e; font-weight: bold; }}
</style></head>
<body>
<h1>Dataset validation: <span class="{'pass' if result.success else 'fail'}">{e(verdict)}</span></h1>
<p>data.yaml: <code>{e(result.data_yaml)}</code> &middot; {result.seconds:.2f} s</p>
<h2>Expectations</h2>
<table>
<tr><th>result</th><th>expectation</th><th>table</th><th>bad rows</th><th>offending rows (first ones)</th></tr>
{''.join(rows)}
</table>{stats_html}
</body></html>
"""
