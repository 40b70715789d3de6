"""`python -m pipeline registry ...`: look at and move model versions by hand.

    registry list [--limit N]              versions, with the aliases that point at them
    registry show <v>                      one manifest and its lineage (v may be an alias name)
    registry diff <a> <b>                  metrics and params that differ
    registry promote <v> --to <alias>      move an alias (CAS, recorded in the event log)
    registry rollback [--to <v>]           production back to its previous version
    registry history [--limit N]           the event log (the newest 100 unless --limit says otherwise)
    registry gc [--older-than 24h] [--apply]  leftovers of killed writers (dry run unless --apply)
    registry dvc-remote [--repo DIR]       make the registry's store the default DVC remote

Every command takes --json for scripts. Errors are raised as RegistryError (one line, exit 2). `list`
and `history` show every record they can read and report each damaged one on stderr (exit 2).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.params import flatten
from pipeline.registry import (MAX_VERSION_DIGITS, PRODUCTION, DamagedRecord, Manifest, NoSuchVersion, Registry,
                               RegistryError, configure_dvc_remote, name_problem, open_registry, shorten)

HISTORY_LIMIT = 100
_AGE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add the `registry` command (with its own sub-commands) to a parent's subparsers."""
    parser = subparsers.add_parser("registry", help="list, inspect, promote and roll back model versions")
    commands = parser.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")

    listing = commands.add_parser("list", parents=[as_json], help="all versions")
    listing.add_argument("--limit", type=int, default=0, help="only the newest N versions (0: all)")
    show = commands.add_parser("show", parents=[as_json], help="one version's manifest and lineage")
    show.add_argument("version", help="version number or alias name")
    diff = commands.add_parser("diff", parents=[as_json], help="metrics and params that differ")
    diff.add_argument("a", help="version number or alias name")
    diff.add_argument("b", help="version number or alias name")
    promote = commands.add_parser("promote", parents=[as_json], help="point an alias at a version")
    promote.add_argument("version", help="version number or alias name")
    promote.add_argument("--to", required=True, dest="alias", help="alias to move, e.g. production")
    promote.add_argument("--reason", default="promoted by hand", help="recorded in the event log")
    rollback = commands.add_parser("rollback", parents=[as_json],
                                   help="production back to its previous version")
    rollback.add_argument("--to", default=None, dest="to_version",
                          help="this version (number or alias name) instead of the previous one")
    rollback.add_argument("--reason", default="rolled back by hand", help="recorded in the event log")
    history = commands.add_parser("history", parents=[as_json], help="the event log, oldest first")
    history.add_argument("--limit", type=int, default=HISTORY_LIMIT,
                         help=f"only the newest N events (default {HISTORY_LIMIT}; 0: all)")
    gc = commands.add_parser("gc", parents=[as_json],
                             help="find (with --apply: remove) what killed writers left behind")
    gc.add_argument("--older-than", default="24h",
                    help="only leftovers at least this old: 90s, 30m, 24h, 7d (default 24h)")
    gc.add_argument("--apply", action="store_true", help="remove them (default: only show them)")
    remote = commands.add_parser("dvc-remote", parents=[as_json],
                                 help="make the registry's store the default DVC remote")
    remote.add_argument("--repo", default=".", help="the DVC repo (default: current directory)")
    return parser


def main(args: argparse.Namespace, params, base_dir: Path | None = None) -> int:
    """Run one registry command with loaded Params (a local registry folder is relative to `base_dir`, the
    workspace root); prints the result, returns the exit code."""
    if args.registry_command == "dvc-remote":
        url = configure_dvc_remote(params.registry, Path(args.repo))
        emit(args, {"remote": "registry", "url": url, "default": True},
             f"DVC remote 'registry' -> {url} (default)")
        return 0

    reg = open_registry(params.registry, base_dir=base_dir)
    command = args.registry_command
    damaged: list[DamagedRecord] = []
    if command == "list":
        show_list(args, reg, damaged)
    elif command == "show":
        show_version(args, reg, resolve_version(reg, args.version))
    elif command == "diff":
        show_diff(args, reg, resolve_version(reg, args.a), resolve_version(reg, args.b))
    elif command == "promote":
        version = resolve_version(reg, args.version)
        before = reg.alias(args.alias)
        reg.set_alias(args.alias, version, reason=args.reason)
        emit(args, {"alias": args.alias, "version": version, "previous": before},
             f"{args.alias}: v{before} -> v{version}" if before else f"{args.alias}: -> v{version}")
    elif command == "rollback":
        to = resolve_version(reg, args.to_version) if args.to_version is not None else None
        before = reg.alias(PRODUCTION)
        version = reg.rollback(reason=args.reason, to=to)
        emit(args, {"alias": PRODUCTION, "version": version, "previous": before},
             f"{PRODUCTION}: v{before} -> v{version} (rolled back)")
    elif command == "history":
        show_history(args, reg, damaged)
    elif command == "gc":
        run_gc(args, reg)
    else:
        raise RegistryError(f"unknown registry command {command!r}")
    for record in damaged:
        print(f"error: skipped {record}", file=sys.stderr)
    return 2 if damaged else 0


def resolve_version(reg: Registry, text: str | int) -> int:
    """'3' -> 3; 'production' -> the version the alias points at, which must exist."""
    if isinstance(text, int):
        return text
    text = str(text)
    if re.fullmatch(r"[0-9]+", text):  # ASCII only: '²' and '١' are digits to str.isdigit, not versions
        if len(text) > MAX_VERSION_DIGITS:
            raise RegistryError(f"{shorten(text)} is not a version: at most {MAX_VERSION_DIGITS} digits")
        return int(text)
    if name_problem("alias", text):
        raise RegistryError(f"{shorten(text)} is neither a version number (ASCII digits 0-9) nor an alias name")
    version = reg.alias(text)
    if version is None:
        raise RegistryError(f"{text!r} is neither a version number nor a set alias")
    try:
        reg.manifest(version)
    except NoSuchVersion:
        raise RegistryError(f"alias {text!r} is dangling: it points at v{version}, which does not exist "
                            f"in {reg.store.description}") from None
    return version


def show_list(args, reg: Registry, damaged: list) -> None:
    every = reg.versions(damaged)
    manifests = every[-args.limit:] if args.limit and args.limit > 0 else every
    aliases = reg.aliases(damaged)
    known = {m.version for m in every}
    dangling = {name: version for name, version in aliases.items() if version not in known}
    by_version: dict[int, list[str]] = {}
    for name, version in aliases.items():
        by_version.setdefault(version, []).append(name)
    if args.json:
        print_json({"versions": [m.model_dump() for m in manifests], "aliases": aliases, "dangling": dangling,
                    "damaged": [str(record) for record in damaged]})
        return
    rows = [[m.version, m.stage, m.created_at[:19], m.parent, m.sha256[:12], m.actor,
             ", ".join(by_version.get(m.version, []))] for m in manifests]
    print(table(["version", "stage", "created", "parent", "sha256", "actor", "aliases"], rows)
          if rows else "(no versions)")
    for name, version in dangling.items():
        print(f"dangling alias: {name} -> v{version} (no such version)")


def show_history(args, reg: Registry, damaged: list) -> None:
    limit = args.limit if args.limit and args.limit > 0 else None
    events = reg.events(limit=limit, damaged=damaged)
    columns = ["time", "actor", "action", "alias", "version", "reason"]
    emit(args, events, table(columns, [[e.get(k) for k in columns] for e in events]) if events else "(no events)")
    if limit and len(events) == limit:
        print(f"(the newest {limit} events; --limit 0 shows all)", file=sys.stderr)


def parse_age(text: str) -> float:
    match = _AGE_RE.fullmatch(text.strip())
    if not match:
        raise RegistryError(f"--older-than {shorten(text)}: expected a number with s, m, h or d, e.g. 24h")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def run_gc(args, reg: Registry) -> None:
    found = reg.gc(parse_age(args.older_than), apply=args.apply)
    if args.json:
        print_json(found)
        return
    leftovers = found["leftovers"]
    verb = "removed" if args.apply else "would remove (dry run; --apply removes them)"
    if leftovers:
        total = sum(item["bytes"] for item in leftovers)
        print(f"{verb}: {len(leftovers)} leftovers, {total / 1e6:.1f} MB")
        print(table(["key", "kind", "bytes", "age", "what"],
                    [[i["key"], i["kind"], i["bytes"], f"{i['age_s'] / 3600:.1f} h", i["note"]] for i in leftovers]))
    else:
        print(f"no leftovers older than {args.older_than}")
    repairs = {"missing from the index": found["reindex"], "bytes without a sha256 claim": found["claim_bytes"]}
    for what, numbers in repairs.items():
        if numbers:
            print(f"{what} ({'repaired' if args.apply else '--apply repairs'}): "
                  + ", ".join(f"v{n}" for n in numbers))
    if found["latest"] is not None:
        print(f"claims/latest.json {'raised' if args.apply else 'to raise (--apply)'} to {found['latest']}")


def show_version(args, reg: Registry, version: int) -> None:
    manifest = reg.manifest(version)
    chain = reg.lineage(version)
    if args.json:
        print_json({"manifest": manifest.model_dump(), "lineage": [m.version for m in chain]})
        return
    print(f"{manifest.model} v{manifest.version}  stage={manifest.stage}  created={manifest.created_at}"
          f"  actor={manifest.actor}")
    print(f"primary {manifest.primary}  sha256={manifest.sha256}")
    print(f"params_hash={manifest.params_hash}  dataset_hash={manifest.dataset_hash}"
          f"  git_commit={manifest.git_commit}")
    print("\nfiles:")
    print(table(["name", "bytes", "sha256"],
                [[name, entry.bytes, entry.sha256] for name, entry in manifest.files.items()]))
    if manifest.metrics:
        print("\nmetrics:")
        print(table(["metric", "value"], sorted(flatten(manifest.metrics).items())))
    print("\nlineage: " + " <- ".join(f"v{m.version} ({m.stage})" for m in chain))


def show_diff(args, reg: Registry, a: int, b: int) -> None:
    ma, mb = reg.manifest(a), reg.manifest(b)
    differences = {
        "manifest": differing(fields_to_compare(ma), fields_to_compare(mb)),
        "metrics": differing(flatten(ma.metrics), flatten(mb.metrics)),
        "params": differing(flatten(ma.params), flatten(mb.params)),
    }
    if args.json:
        print_json({"a": a, "b": b, **{part: {k: {"a": va, "b": vb} for k, (va, vb) in diff.items()}
                                       for part, diff in differences.items()}})
        return
    for part, diff in differences.items():
        print(f"{part}: " + ("no differences" if not diff else ""))
        if diff:
            print(table(["key", f"v{a}", f"v{b}"], [[k, va, vb] for k, (va, vb) in sorted(diff.items())]))


def fields_to_compare(m: Manifest) -> dict[str, Any]:
    return {"stage": m.stage, "sha256": m.sha256, "params_hash": m.params_hash,
            "dataset_hash": m.dataset_hash, "git_commit": m.git_commit, "parent": m.parent}


def differing(a: dict, b: dict) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def cell(value, limit: int = 80) -> str:
    """One table cell: None as '-', long or multi-line text (gate reports as reasons) cut short;
    --json has the full text."""
    text = "-" if value is None else " / ".join(str(value).split("\n"))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def emit(args, data, text: str) -> None:
    if args.json:
        print_json(data)
    else:
        print(text)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))
