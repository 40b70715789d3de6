"""The change decision of scheduled retraining: retrain only when the data or the params moved away from the
production model's lineage.

The dataset hash and the params are compared with those recorded in the registry manifest of the current
`production` model. Settings that cannot change the model (the `orchestration` and `registry` sections) are left
out. A (dataset, params, production) combination that an earlier scheduled run already trained and saw rejected
is not retried (the verdict would be the same) unless forced.
"""
from __future__ import annotations

from pathlib import Path

from flows.run_notes import last_rejection
from pipeline.dataset import workspace_dataset_hash
from pipeline.params import Params, flatten, params_hash
from pipeline.registry import PRODUCTION, open_registry
from pipeline.workspace import Workspace

# How a run is scheduled or fanned out, and where the registry lives, cannot change the model it trains.
IGNORED_PARAM_SECTIONS = ("orchestration", "registry")


def model_params_hash(params_dict: dict) -> str:
    """Hash of the params that can change the model (what the skip rule compares and the notes key on)."""
    return params_hash(params_dict, exclude_sections=IGNORED_PARAM_SECTIONS)


def params_changes(before: dict, after: dict, limit: int = 20) -> list[str]:
    """Readable differences between two params dicts, ignoring IGNORED_PARAM_SECTIONS.

    A key the older params do not have at all, set now to its default, is no change: it is a setting added
    to the code since, whose default keeps the old behaviour."""
    def model_part(params_dict: dict) -> dict:
        return flatten({k: v for k, v in params_dict.items() if k not in IGNORED_PARAM_SECTIONS})

    old, new = model_part(before), model_part(after)
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


def decide(ws: Workspace, force: bool = False, notes_of: Path | None = None) -> dict:
    """Should a scheduled run retrain? Compares the workspace's dataset and params with the production lineage.

    Returns {"retrain", "reason", "changes", "dataset_hash", "params_hash", "model_params_hash",
    "production", "lineage"}. `notes_of`: the workspace whose run notes say what was already rejected (default:
    `ws.root`).
    """
    registry = open_registry(ws.params.registry, base_dir=ws.root)
    current = ws.params.as_dict()
    decision = {"dataset_hash": workspace_dataset_hash(ws), "params_hash": ws.params.hash(),
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
        return {**decision, "retrain": False, "reason": f"dataset and params unchanged since {production_text}"}
    if not changes:
        return {**decision, "retrain": True, "reason": f"forced; nothing changed since {production_text}"}
    if not force:
        rejected = last_rejection(notes_of or ws.root, decision)
        if rejected is not None:
            return {**decision, "retrain": False,
                    "reason": (f"this dataset and params were already trained by run {rejected.get('flow_run_id')} "
                               f"at {rejected.get('time')} and rejected ({rejected.get('reason')}); production "
                               f"is still v{production}. Change them, or run with force=true to retry")}
    return {**decision, "retrain": True, "reason": f"changed since {production_text}: " + "; ".join(changes)}
