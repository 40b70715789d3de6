"""A workspace's scheduled-run state on disk: the lock that keeps one run at a time, and the run notes.

Both live in `<workspace>/.retraining/`. The lock is an flock (through `filelock`, native locks only): the
kernel drops it when the holding process exits or is killed, so a crashed run never leaves a stale lock; it
works on local disks and NFSv4 (a Kubernetes RWX volume). `runs.jsonl` records every run's start and outcome
and does not depend on the registry or on Prefect.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.io import write_json

STATE_DIR = ".retraining"
LOCK_FILE = "lock"
HOLDER_FILE = "holder.json"  # who holds the lock, for the "busy" message of the others
NOTES_FILE = "runs.jsonl"


def state_dir(workspace: Path) -> Path:
    folder = Path(workspace) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def workspace_lock(workspace: Path, holder: dict, wait_s: float = 0.0):
    """Yields True when this process holds the workspace's lock, False when another one does (after `wait_s`)."""
    # preserve_lock_file: a native flock only, never filelock's "soft" fallback, which a crash would leave behind.
    lock = FileLock(state_dir(workspace) / LOCK_FILE, preserve_lock_file=True, thread_local=False)
    try:
        lock.acquire(timeout=max(wait_s, 0.0), poll_interval=min(1.0, max(wait_s, 0.05)))
    except Timeout:
        yield False
        return
    try:
        write_json(state_dir(workspace) / HOLDER_FILE, holder)
        yield True
    finally:
        lock.release()


def lock_holder(workspace: Path) -> str:
    try:
        return (Path(workspace) / STATE_DIR / HOLDER_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def read_notes(workspace: Path) -> list[dict]:
    path = Path(workspace) / STATE_DIR / NOTES_FILE
    if not path.exists():
        return []
    notes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                notes.append(json.loads(line))
            except json.JSONDecodeError:
                # A line cut short by a crash mid-write: skip it rather than block every later run.
                print(f"{path}:{number}: not JSON, ignored", file=sys.stderr)
    return notes


def append_note(workspace: Path, note: dict) -> dict:
    note = {**note, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # when written
    line = json.dumps(note, sort_keys=True, default=str) + "\n"
    # One write() of one line in append mode: concurrent appenders cannot interleave inside a line.
    with open(state_dir(workspace) / NOTES_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return note


def last_rejection(workspace: Path, decision: dict) -> dict | None:
    """The latest finished run with the same data, params and production model, if it was rejected."""
    for note in reversed(read_notes(workspace)):
        if note.get("event") != "finished" or note.get("outcome") not in ("promoted", "unchanged", "rejected"):
            continue
        same = (note.get("dataset_hash") == decision["dataset_hash"]
                and note.get("model_params_hash") == decision["model_params_hash"]
                and note.get("production_before") == decision["production"])
        if same:
            return note if note["outcome"] == "rejected" else None
    return None


def unfinished_runs(workspace: Path) -> list[dict]:
    """Runs that noted a start but never an outcome: they crashed or were killed."""
    notes = read_notes(workspace)
    finished = {n.get("flow_run_id") for n in notes if n.get("event") == "finished"}
    return [n for n in notes if n.get("event") == "started" and n.get("flow_run_id") not in finished]
