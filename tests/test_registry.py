"""The registry contract, run against both stores: a local folder and S3 (a moto server over HTTP)."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import pytest

# s3server.py sits next to this file; make it importable however pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import free_port, moto_s3  # noqa: E402,F401  (moto_s3 is a fixture)

from pipeline import registry as registry_module  # noqa: E402
from pipeline.params import RegistryParams  # noqa: E402
from pipeline.registry import (ChecksumError, DamagedRecord, Manifest, RegistryError,  # noqa: E402
                               RegistryUnavailable, configure_dvc_remote, dvc_remote_url, open_registry)

MODEL = "detector"


@dataclass
class Backend:
    name: str
    params: RegistryParams
    overwrite: Callable[[str, bytes], None]  # replace a stored object behind the registry's back


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        root = tmp_path / "registry"
        return Backend("local", RegistryParams(uri=str(root), model_name=MODEL),
                       lambda key, data: (root / key).write_bytes(data))
    server = request.getfixturevalue("moto_s3")
    bucket = server.create_bucket(f"models-{uuid.uuid4().hex[:12]}")  # a fresh bucket per test
    client = server.client()
    return Backend("s3", RegistryParams(uri=f"s3://{bucket}/team/models", model_name=MODEL,
                                        endpoint_url=server.endpoint),
                   lambda key, data: client.put_object(Bucket=bucket, Key=f"team/models/{key}", Body=data))


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def register_model(reg, tmp_path: Path, weights: str, stage: str = "train", parent=None, **extra) -> Manifest:
    best = write(tmp_path / "src" / stage / f"{weights}.pt", f"weights {weights}")
    metrics_file = write(tmp_path / "src" / stage / f"{weights}.json", json.dumps({"map50_95": 0.5}))
    return reg.register(stage=stage, files={"metrics.json": metrics_file, "best.pt": best}, primary="best.pt",
                        metrics=extra.pop("metrics", {"map50_95": 0.5}), parent=parent, **extra)


# ---------------------------------------------------------------- register, manifest, dedupe


def test_register_writes_a_complete_manifest(backend, tmp_path):
    reg = open_registry(backend.params)
    params = {"train": {"epochs": 3}, "registry": {"uri": "x"}}
    m = register_model(reg, tmp_path, "a", metrics={"map50_95": 0.61}, params=params, params_hash="p123",
                       dataset_hash="d456", git_commit="abc123", actor="alice@ci")

    best = (tmp_path / "src" / "train" / "a.pt").read_bytes()
    assert m.model == MODEL and m.version == 1 and m.stage == "train" and m.primary == "best.pt"
    assert m.sha256 == hashlib.sha256(best).hexdigest()
    assert m.files["best.pt"].sha256 == m.sha256 and m.files["best.pt"].bytes == len(best)
    assert set(m.files) == {"best.pt", "metrics.json"}
    assert (m.metrics, m.params, m.params_hash, m.dataset_hash) == ({"map50_95": 0.61}, params, "p123", "d456")
    assert (m.git_commit, m.parent, m.actor) == ("abc123", None, "alice@ci")
    assert datetime.fromisoformat(m.created_at).utcoffset().total_seconds() == 0

    # A second, fresh handle reads the same manifest back from the store (JSON round trip).
    again = open_registry(backend.params)
    assert again.manifest(1) == m
    assert json.loads(again.manifest(1).model_dump_json())["files"]["best.pt"]["sha256"] == m.sha256
    assert [v.version for v in again.versions()] == [1]
    assert again.find_by_sha256(m.sha256) == m
    assert again.find_by_sha256("0" * 64) is None
    assert [e["action"] for e in again.events()] == ["register"]


def test_default_actor_is_user_at_host(backend, tmp_path):
    m = register_model(open_registry(backend.params), tmp_path, "a")
    user, _, host = m.actor.partition("@")
    assert user and host


def test_same_primary_bytes_return_the_existing_version(backend, tmp_path):
    reg = open_registry(backend.params)
    first = register_model(reg, tmp_path, "a")
    second = register_model(reg, tmp_path, "b")
    again = register_model(reg, tmp_path, "a", stage="pruned", metrics={"map50_95": 0.9})
    assert again == first
    assert [m.version for m in reg.versions()] == [1, 2] and second.version == 2
    assert [e["action"] for e in reg.events()] == ["register", "register"]


def test_missing_version_and_bad_register_arguments(backend, tmp_path):
    reg = open_registry(backend.params)
    with pytest.raises(RegistryError, match="no version 7") as missing:
        reg.manifest(7)
    assert not isinstance(missing.value, RegistryUnavailable)  # retrying would not make it appear
    with pytest.raises(RegistryError, match="primary 'nope.pt'"):
        reg.register(stage="train", files={"best.pt": write(tmp_path / "x.pt", "x")}, primary="nope.pt")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.register(stage="train", files={"best.pt": tmp_path / "missing.pt"}, primary="best.pt")
    with pytest.raises(RegistryError, match="no version 3"):
        register_model(reg, tmp_path, "a", parent=3)
    assert reg.versions() == []


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "", "..", "x y", "best;rm", ".hidden", "dvc"])
def test_bad_model_names_are_rejected(backend, bad):
    with pytest.raises(RegistryError) as error:
        open_registry(backend.params.model_copy(update={"model_name": bad}))
    assert repr(bad) in str(error.value)


@pytest.mark.parametrize("kind, bad", [("stage", "../train"), ("stage", "a/b"), ("file", ".."),
                                       ("file", "sub/best.pt"), ("file", "a\\b.pt"), ("file", ""),
                                       ("file", "manifest.json"), ("alias", "prod/uction"),
                                       ("alias", ""), ("alias", "..")])
def test_bad_stage_file_and_alias_names_are_rejected(backend, tmp_path, kind, bad):
    reg = open_registry(backend.params)
    weights = write(tmp_path / "w.pt", "w")
    with pytest.raises(RegistryError) as error:
        if kind == "stage":
            reg.register(stage=bad, files={"best.pt": weights}, primary="best.pt")
        elif kind == "file":
            reg.register(stage="train", files={bad: weights}, primary=bad)
        else:
            reg.register(stage="train", files={"best.pt": weights}, primary="best.pt")
            reg.set_alias(bad, 1, reason="test")
    assert repr(bad) in str(error.value)
    assert [m.version for m in reg.versions()] == ([1] if kind == "alias" else [])


def test_unknown_uri_scheme_is_rejected():
    with pytest.raises(RegistryError, match="gs://bucket"):
        open_registry(RegistryParams(uri="gs://bucket/models"))


def test_relative_local_uri_is_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = register_model(open_registry(RegistryParams()), tmp_path, "a")
    assert (tmp_path / "registry" / "detector" / "versions" / "1" / "manifest.json").is_file()
    assert m.version == 1


# ---------------------------------------------------------------- concurrency


_start: threading.Barrier | None = None  # in the spawned processes, set by the pool's initializer


def _set_start(barrier) -> None:
    global _start
    _start = barrier


def register_and_promote(params: dict, workdir: str, writer: str, start=None) -> int:
    """One writer: register its own weights, then make them production. Runs in threads and in
    spawned processes, so it takes only plain arguments."""
    reg = open_registry(RegistryParams(**params))
    weights = write(Path(workdir) / f"{writer}.pt", f"weights of {writer}\n" * 100)
    (start or _start).wait(timeout=60)  # everyone starts at the same moment
    m = reg.register(stage="train", files={"best.pt": weights}, primary="best.pt", actor=writer)
    reg.set_alias("production", m.version, reason=f"promoted by {writer}", actor=writer)
    return m.version


def test_concurrent_threads_and_processes_register_and_promote(backend, tmp_path):
    threads, processes = 4, 3
    params = backend.params.model_dump()
    writers = [f"thread-{i}" for i in range(threads)] + [f"process-{i}" for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(writers))
    results: dict[str, int] = {}
    errors = []

    def in_thread(writer):
        try:
            results[writer] = register_and_promote(params, str(tmp_path), writer, start)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    with context.Pool(processes, initializer=_set_start, initargs=(start,)) as pool:
        pending = pool.starmap_async(register_and_promote,
                                     [(params, str(tmp_path), w) for w in writers[threads:]])
        running = [threading.Thread(target=in_thread, args=(w,)) for w in writers[:threads]]
        for t in running:
            t.start()
        for t in running:
            t.join()
        results.update(zip(writers[threads:], pending.get(timeout=120)))
    assert errors == []

    reg = open_registry(backend.params)
    everyone = len(writers)
    assert sorted(results.values()) == list(range(1, everyone + 1))  # distinct, no gaps
    assert [m.version for m in reg.versions()] == list(range(1, everyone + 1))
    for writer, version in results.items():
        m = reg.manifest(version)
        assert m.actor == writer
        fetched = reg.fetch(version, tmp_path / "fetched" / writer)
        assert fetched["best.pt"].read_text() == f"weights of {writer}\n" * 100

    # Production is one writer's version, and the alias's own history holds every other one exactly
    # once: every compare-and-swap took effect, none overwrote another.
    production = reg.alias("production")
    assert production in results.values()
    doc = json.loads(reg.store.get(f"{MODEL}/aliases/production.json")[0])
    assert sorted(doc["history"] + [production]) == list(range(1, everyone + 1))

    events = reg.events()
    registers = [e for e in events if e["action"] == "register"]
    promotes = [e for e in events if e["action"] == "promote"]
    assert len(events) == 2 * everyone and not any(e.get("restored") for e in events)
    assert sorted(e["version"] for e in registers) == list(range(1, everyone + 1))
    assert sorted((e["actor"], e["version"]) for e in promotes) == sorted(results.items())
    assert all(e["reason"] == f"promoted by {e['actor']}" for e in promotes)


def test_same_bytes_registered_at_once_become_one_version(backend, tmp_path):
    writers = 8
    start = threading.Barrier(writers)
    versions, errors = [], []

    def writer(i: int):
        try:
            reg = open_registry(backend.params)
            weights = write(tmp_path / f"copy-{i}.pt", "the same weights\n" * 1000)
            start.wait(timeout=30)
            versions.append(reg.register(stage="train", files={"best.pt": weights}, primary="best.pt",
                                         actor=f"writer-{i}").version)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    running = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    assert errors == [] and versions == [1] * writers
    reg = open_registry(backend.params)
    assert [m.version for m in reg.versions()] == [1]
    assert [e["action"] for e in reg.events()] == ["register"]


def claim_the_bytes(reg, sha: str, host: str, pid: int) -> None:
    """What a writer that started registering these bytes and then died leaves in the store."""
    claim = {"sha256": sha, "id": uuid.uuid4().hex, "actor": "gone", "host": host, "pid": pid}
    assert reg.store.put_if_absent(f"{MODEL}/sha256/{sha}.json", json.dumps(claim).encode())


def test_the_same_bytes_of_a_writer_that_died_are_taken_over(tmp_path, monkeypatch):
    params = RegistryParams(uri=str(tmp_path / "registry"), model_name=MODEL)
    reg = open_registry(params)
    weights = write(tmp_path / "w.pt", "weights of a writer that died")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()  # its pid belongs to no process now
    claim_the_bytes(reg, hashlib.sha256(weights.read_bytes()).hexdigest(), socket.gethostname(), exited.pid)
    assert reg.register(stage="train", files={"best.pt": weights}, primary="best.pt").version == 1

    # A writer on another host cannot be asked: its claim is taken over once not renewed for LEASE_S.
    monkeypatch.setattr(registry_module, "LEASE_S", 0.2)
    other = write(tmp_path / "other.pt", "weights of a writer on a host that went away")
    claim_the_bytes(reg, hashlib.sha256(other.read_bytes()).hexdigest(), "another-host", 1)
    assert reg.register(stage="train", files={"best.pt": other}, primary="best.pt").version == 2
    assert [m.version for m in open_registry(params).versions()] == [1, 2]


def test_a_registration_slower_than_its_lease_keeps_the_bytes(tmp_path, monkeypatch):
    """The lease is renewed while the files upload, so a writer of the same bytes waits for it."""
    monkeypatch.setattr(registry_module, "LEASE_S", 0.5)
    params = RegistryParams(uri=str(tmp_path / "registry"), model_name=MODEL)
    slow = open_registry(params)
    upload = slow.store.put_if_absent
    uploading = threading.Event()

    def slow_upload(key, data):
        if key.endswith("/best.pt"):
            uploading.set()
            time.sleep(1.5)  # three leases long
        return upload(key, data)
    slow.store.put_if_absent = slow_upload
    weights = write(tmp_path / "slow.pt", "the same weights")
    result = {}
    writer = threading.Thread(target=lambda: result.update(
        slow=slow.register(stage="train", files={"best.pt": weights}, primary="best.pt").version))
    writer.start()
    assert uploading.wait(timeout=30)
    copy = write(tmp_path / "copy.pt", "the same weights")
    fast = open_registry(params).register(stage="train", files={"best.pt": copy}, primary="best.pt")
    writer.join()
    assert result["slow"] == fast.version == 1
    assert [m.version for m in open_registry(params).versions()] == [1]


# ---------------------------------------------------------------- failures


def test_half_uploaded_version_is_invisible_and_skipped(backend, tmp_path):
    reg = open_registry(backend.params)
    # What a writer killed mid-upload leaves: its claim and part of its files, no manifest.
    assert reg.store.put_if_absent(f"{MODEL}/claims/1", b'{"actor": "killed"}')
    assert reg.store.put_if_absent(f"{MODEL}/versions/1/best.pt", b"half a model")
    assert reg.versions() == []
    with pytest.raises(RegistryError, match="no version 1"):
        reg.manifest(1)
    with pytest.raises(RegistryError, match="no version 1"):
        reg.fetch(1, tmp_path / "out")

    m = register_model(reg, tmp_path, "a")
    assert m.version == 2
    assert [v.version for v in reg.versions()] == [2]
    assert reg.fetch(2, tmp_path / "out")["best.pt"].read_text() == "weights a"


def test_killed_upload_process_leaves_no_version(backend, tmp_path):
    """A real writer process killed while uploading a large file."""
    big = write(tmp_path / "big.pt", os.urandom(1024 * 1024))
    script = (
        "import sys; from pathlib import Path; from pipeline.params import RegistryParams\n"
        "from pipeline.registry import open_registry\n"
        "reg = open_registry(RegistryParams.model_validate_json(sys.argv[1]))\n"
        "store_put = reg.store.put_if_absent\n"
        "def put(key, data):\n"
        "    if key.endswith('manifest.json'):\n"
        "        print('UPLOADED', flush=True); sys.stdin.readline()  # wait here until killed\n"
        "    return store_put(key, data)\n"
        "reg.store.put_if_absent = put\n"
        "reg.register(stage='train', files={'best.pt': Path(sys.argv[2])}, primary='best.pt')\n")
    writer = subprocess.Popen([sys.executable, "-c", script, backend.params.model_dump_json(), str(big)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert writer.stdout.readline().strip() == "UPLOADED"  # artifacts are up, manifest is not
    finally:
        writer.kill()
        writer.wait()
    reg = open_registry(backend.params)
    assert reg.versions() == []
    assert register_model(reg, tmp_path, "a").version == 2

    # `registry gc` finds what the killed writer left: its claim, its file and its claim of the bytes;
    # nothing younger than the age asked for, nothing of v2. A dry run removes nothing.
    assert reg.gc(older_than_s=3600)["leftovers"] == []
    two_hours_later = time.time() + 7200
    found = reg.gc(older_than_s=3600, now=two_hours_later)
    leftovers = {f"{MODEL}/claims/1", f"{MODEL}/versions/1/best.pt",
                 f"{MODEL}/sha256/{hashlib.sha256(big.read_bytes()).hexdigest()}.json"}
    assert {item["key"] for item in found["leftovers"]} == leftovers and not found["applied"]
    assert leftovers <= set(reg.store.list(MODEL + "/"))
    reg.gc(older_than_s=3600, apply=True, now=two_hours_later)
    assert not leftovers & set(reg.store.list(MODEL + "/"))
    assert json.loads(reg.store.get(f"{MODEL}/index/0.json")[0])["gone"] == [1]  # listing stops looking
    assert reg.fetch(2, tmp_path / "after-gc")["best.pt"].read_text() == "weights a"
    assert reg.events()[-1]["action"] == "gc" and "v1" in reg.events()[-1]["reason"]
    assert register_model(reg, tmp_path, "b").version == 3  # numbers are not reused


def test_gc_removes_temp_files_of_killed_writers_in_a_folder_store(tmp_path):
    reg = open_registry(RegistryParams(uri=str(tmp_path / "registry"), model_name=MODEL))
    register_model(reg, tmp_path, "a")
    old = write(tmp_path / "registry" / MODEL / "versions" / "2" / ".tmp-k1ll3d", os.urandom(1 << 20))
    young = write(tmp_path / "registry" / MODEL / "aliases" / ".production.json.x1y2.tmp", b"{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    found = reg.gc(older_than_s=3600)
    assert [(i["key"], i["kind"], i["bytes"]) for i in found["leftovers"]] == [
        (f"{MODEL}/versions/2/.tmp-k1ll3d", "temp", 1 << 20)]
    assert old.exists()
    reg.gc(older_than_s=3600, apply=True)
    assert not old.exists() and young.exists()
    assert [m.version for m in reg.versions()] == [1]


def test_a_registry_written_by_the_older_code_lists_registers_and_is_repaired_by_gc(backend, tmp_path):
    reg = open_registry(backend.params)
    register_model(reg, tmp_path, "a")
    register_model(reg, tmp_path, "b")
    # The older code wrote claims, versions, aliases and events, but no index, sha256 claims or
    # claims/latest.json.
    for key in reg.store.list(MODEL + "/"):
        if key.startswith((f"{MODEL}/index/", f"{MODEL}/sha256/")) or key == f"{MODEL}/claims/latest.json":
            reg.store.delete(key)
    old = open_registry(backend.params)
    assert [m.version for m in old.versions()] == [1, 2]
    assert register_model(old, tmp_path, "c").version == 3
    assert [m.version for m in open_registry(backend.params).versions()] == [1, 2, 3]
    found = old.gc(older_than_s=3600)
    assert (found["leftovers"], found["reindex"], found["claim_bytes"], found["latest"]) == ([], [1, 2], [1, 2], None)
    old.gc(older_than_s=3600, apply=True)
    assert json.loads(old.store.get(f"{MODEL}/index/0.json")[0])["versions"].keys() == {"1", "2", "3"}
    assert register_model(old, tmp_path, "a").version == 1  # the same bytes are found again
    again = old.gc(older_than_s=3600)
    assert (again["reindex"], again["claim_bytes"], again["latest"]) == ([], [], None)


def test_the_latest_number_only_goes_up(tmp_path):
    """A writer that took v2 but records it after another took v3 must not hide v3 from listing."""
    reg = open_registry(RegistryParams(uri=str(tmp_path / "registry"), model_name=MODEL))
    for name in "abc":
        register_model(reg, tmp_path, name)
    reg._raise_latest(2, None)  # late, and with a stale view: it must find 3 and leave it
    assert json.loads(reg.store.get(f"{MODEL}/claims/latest.json")[0]) == {"version": 3}
    assert [m.version for m in open_registry(RegistryParams(uri=str(tmp_path / "registry"),
                                                           model_name=MODEL)).versions()] == [1, 2, 3]


# ---------------------------------------------------------------- crashes between a write and its event


CRASH_SCRIPT = """
import sys
from pathlib import Path
from pipeline.params import RegistryParams
from pipeline.registry import open_registry
reg = open_registry(RegistryParams.model_validate_json(sys.argv[1]))
store, armed = reg.store, []
def stop_before_the_next_event(write):
    def call(key, *args):
        if armed and '/events/' in key:
            print('CRASH POINT', flush=True)
            sys.stdin.readline()  # killed here
        result = write(key, *args)
        if result and key.endswith(sys.argv[2]):
            armed.append(key)
        return result
    return call
store.put_if_absent = stop_before_the_next_event(store.put_if_absent)
store.put_if_match = stop_before_the_next_event(store.put_if_match)
exec(sys.argv[3])
"""


def kill_between_write_and_event(backend, written: str, code: str, *args: str) -> None:
    """Run `code` in a writer process and kill -9 it once it has written `written` and is about to
    write the event."""
    writer = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, backend.params.model_dump_json(), written,
                               code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert writer.stdout.readline().strip() == "CRASH POINT"
    finally:
        writer.kill()
        writer.wait()


def test_a_move_killed_before_its_event_is_still_in_the_history(backend, tmp_path):
    reg = open_registry(backend.params)
    register_model(reg, tmp_path, "a")
    register_model(reg, tmp_path, "b")
    reg.set_alias("production", 1, reason="first", actor="alice")
    kill_between_write_and_event(backend, "aliases/production.json",
                                 "reg.set_alias('production', 2, reason='second', actor='killed')")

    reg = open_registry(backend.params)
    assert reg.alias("production") == 2
    last = reg.events()[-1]
    assert (last["action"], last["version"], last.get("previous"), last["actor"], last["reason"],
            last.get("restored")) == ("promote", 2, 1, "killed", "second", True)
    # The next move writes the lost event for good, in its place in time.
    assert reg.rollback(reason="back", actor="bob") == 1
    moves = [(e["action"], e["version"], e["actor"], e.get("restored", False))
             for e in reg.events() if e["action"] != "register"]
    assert moves == [("promote", 1, "alice", False), ("promote", 2, "killed", False),
                     ("rollback", 1, "bob", False)]


# The folder store only: what restores the event is the same for both stores (the move's test runs on both).
@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_registration_killed_before_its_event_is_still_in_the_history(backend, tmp_path):
    weights = write(tmp_path / "w.pt", "weights")
    kill_between_write_and_event(
        backend, "manifest.json",
        "reg.register(stage='train', files={'best.pt': Path(sys.argv[4])}, primary='best.pt', actor='killed')",
        str(weights))
    reg = open_registry(backend.params)
    assert [m.version for m in reg.versions()] == [1]
    events = reg.events()
    assert [(e["action"], e["version"], e["actor"], e["reason"], e["restored"]) for e in events] == [
        ("register", 1, "killed", "stage train", True)]
    assert events[0]["time"] == reg.manifest(1).created_at
    assert reg.register(stage="train", files={"best.pt": weights}, primary="best.pt").version == 1


# ---------------------------------------------------------------- hostile or damaged records


def test_fetch_never_writes_outside_its_destination(backend, tmp_path):
    reg = open_registry(backend.params)
    m = register_model(reg, tmp_path, "a")
    hostile = json.loads(m.model_dump_json())
    hostile["files"]["../../../../payload"] = {"sha256": "0" * 64, "bytes": 3}
    backend.overwrite(f"{MODEL}/versions/1/manifest.json", json.dumps(hostile).encode())
    backend.overwrite(f"{MODEL}/versions/1/../../../../payload", b"pwn")

    dest = tmp_path / "a" / "b" / "c" / "dest"
    with pytest.raises(DamagedRecord) as error:
        open_registry(backend.params).fetch(1, dest)
    assert f"{MODEL}/versions/1/manifest.json" in str(error.value) and "../../../../payload" in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "a" / "payload").exists()
    assert not dest.exists() or list(dest.iterdir()) == []


@pytest.mark.parametrize("key, change", [
    ("versions/1/manifest.json", lambda doc: {**doc, "stage": "../train"}),
    ("versions/1/manifest.json", lambda doc: {**doc, "primary": "../best.pt",
                                              "files": {"../best.pt": doc["files"]["best.pt"]}}),
    ("versions/1/manifest.json", lambda doc: {**doc, "version": True}),
    ("aliases/production.json", lambda doc: {**doc, "alias": "../production"}),
    ("aliases/production.json", lambda doc: {**doc, "history": ["../../x"]}),
])
def test_names_in_stored_documents_are_checked_on_load(tmp_path, key, change):
    params = RegistryParams(uri=str(tmp_path / "registry"), model_name=MODEL)
    reg = open_registry(params)
    register_model(reg, tmp_path, "a")
    reg.set_alias("production", 1, reason="first")
    path = tmp_path / "registry" / MODEL / key
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    fresh = open_registry(params)
    with pytest.raises(DamagedRecord) as error:
        fresh.fetch(1, tmp_path / "dest") if key.startswith("versions") else fresh.alias("production")
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- cost at any history


def test_register_list_and_history_cost_the_same_at_any_history(moto_s3, tmp_path):
    bucket = moto_s3.create_bucket(f"cost-{uuid.uuid4().hex[:12]}")
    params = RegistryParams(uri=f"s3://{bucket}/team", model_name=MODEL, endpoint_url=moto_s3.endpoint)
    reg = open_registry(params)

    def requests(action) -> int:
        before = moto_s3.app.requests
        action()
        return moto_s3.app.requests - before

    registers, lists = {}, {}
    for n in range(1, 7):
        registers[n] = requests(lambda: register_model(reg, tmp_path, f"w{n}"))
        lists[n] = requests(lambda: open_registry(params).versions())
    assert registers[2] == registers[6]
    assert lists[2] == lists[6]
    assert [m.version for m in open_registry(params).versions()] == list(range(1, 7))

    def newest_events():
        assert len(open_registry(params).events(limit=5)) == 5
    reg.set_alias("production", 1, reason="first release")
    before = requests(newest_events)
    for n in range(2, 7):
        reg.set_alias("production", n, reason=f"release {n}")
    assert requests(newest_events) == before


def test_corrupted_object_fails_fetch_and_leaves_nothing(backend, tmp_path):
    reg = open_registry(backend.params)
    m = register_model(reg, tmp_path, "a")
    assert list(m.files) == ["metrics.json", "best.pt"]  # best.pt is fetched after metrics.json
    backend.overwrite(f"{MODEL}/versions/1/best.pt", b"weights b")  # same size, other bytes

    dest = tmp_path / "dest"
    with pytest.raises(ChecksumError) as error:
        reg.fetch(1, dest)
    assert "best.pt" in str(error.value) and m.sha256 in str(error.value)
    assert not isinstance(error.value, RegistryUnavailable)
    assert list(dest.iterdir()) == []  # not even the intact metrics.json


def test_fetch_verifies_and_returns_all_files(backend, tmp_path):
    reg = open_registry(backend.params)
    register_model(reg, tmp_path, "a")
    fetched = reg.fetch(1, tmp_path / "dest")
    assert set(fetched) == {"best.pt", "metrics.json"}
    assert fetched["best.pt"] == tmp_path / "dest" / "best.pt"
    assert fetched["best.pt"].read_text() == "weights a"
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["best.pt", "metrics.json"]


def test_unreachable_s3_endpoint_fails_quickly_and_clearly(moto_s3):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reg = open_registry(RegistryParams(uri="s3://models/team", endpoint_url=endpoint))
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as error:  # transient: the flow retries exactly these
        reg.versions()
    assert time.monotonic() - started < 15
    assert endpoint in str(error.value) and "cannot reach" in str(error.value)


def test_s3_write_conflicts_are_retried_and_precondition_failures_mean_taken(moto_s3):
    """Real S3 answers 409 ConditionalRequestConflict while a competing conditional write is in
    flight (moto never does), so those answers are played back with botocore's Stubber."""
    from botocore.stub import Stubber

    store = open_registry(RegistryParams(uri="s3://models/team", endpoint_url=moto_s3.endpoint)).store
    with Stubber(store.client) as stub:
        stub.add_client_error("put_object", "ConditionalRequestConflict", http_status_code=409)
        stub.add_response("put_object", {"ETag": '"abc"'})
        assert store.put_if_absent("detector/claims/1", b"claim") == '"abc"'  # the new ETag
        stub.add_client_error("put_object", "PreconditionFailed", http_status_code=412)
        assert store.put_if_absent("detector/claims/1", b"claim") is None
        stub.add_client_error("put_object", "PreconditionFailed", http_status_code=412)
        assert store.put_if_match("detector/aliases/production.json", b"{}", '"old"') is None
        stub.assert_no_pending_responses()


def test_missing_bucket_is_a_registry_error(moto_s3):
    reg = open_registry(RegistryParams(uri="s3://no-such-bucket-here/x", endpoint_url=moto_s3.endpoint))
    with pytest.raises(RegistryError, match="NoSuchBucket") as error:
        reg.versions()
    assert not isinstance(error.value, RegistryUnavailable)


# ---------------------------------------------------------------- aliases, rollback, lineage


def test_set_alias_requires_an_existing_version(backend, tmp_path):
    reg = open_registry(backend.params)
    with pytest.raises(RegistryError, match="no version 1"):
        reg.set_alias("candidate", 1, reason="x")
    register_model(reg, tmp_path, "a")
    assert reg.alias("candidate") is None
    reg.set_alias("candidate", 1, reason="looks good", actor="bob")
    assert reg.alias("candidate") == 1
    assert reg.aliases() == {"candidate": 1}
    last = reg.events()[-1]
    assert {k: last[k] for k in ("actor", "action", "version", "alias", "reason")} == {
        "actor": "bob", "action": "promote", "version": 1, "alias": "candidate", "reason": "looks good"}


def test_rollback_without_earlier_production_is_a_clear_error(backend, tmp_path):
    reg = open_registry(backend.params)
    with pytest.raises(RegistryError, match="'production' is not set"):
        reg.rollback(reason="nothing there")
    register_model(reg, tmp_path, "a")
    reg.set_alias("production", 1, reason="first")
    with pytest.raises(RegistryError, match="no earlier production version than v1"):
        reg.rollback(reason="still nothing")
    assert reg.alias("production") == 1


def test_rollback_after_two_promotions(backend, tmp_path):
    reg = open_registry(backend.params)
    for name in "abc":
        register_model(reg, tmp_path, name)
    reg.set_alias("production", 1, reason="first release")
    reg.set_alias("production", 2, reason="second release")
    reg.set_alias("production", 3, reason="third release")

    assert reg.rollback(reason="v3 misses small boxes", actor="oncall") == 2
    assert reg.alias("production") == 2
    last = reg.events()[-1]
    assert (last["action"], last["version"], last["previous"], last["reason"], last["actor"]) == (
        "rollback", 2, 3, "v3 misses small boxes", "oncall")

    assert reg.rollback(reason="v2 too") == 1  # walks further back, not back to 3
    with pytest.raises(RegistryError, match="no earlier"):
        reg.rollback(reason="nothing before v1")

    assert reg.rollback(reason="explicit", to=3) == 3
    assert reg.alias("production") == 3
    assert reg.rollback(reason="undo explicit") == 1
    assert [e["action"] for e in reg.events()][-5:] == ["promote", "rollback", "rollback", "rollback", "rollback"]


def test_lineage_follows_parents(backend, tmp_path):
    reg = open_registry(backend.params)
    trained = register_model(reg, tmp_path, "t", stage="train")
    pruned = register_model(reg, tmp_path, "p", stage="prune", parent=trained.version)
    qat = register_model(reg, tmp_path, "q", stage="qat", parent=pruned.version)
    exported = register_model(reg, tmp_path, "e", stage="export", parent=qat.version)
    chain = reg.lineage(exported.version)
    assert [(m.version, m.stage) for m in chain] == [(4, "export"), (3, "qat"), (2, "prune"), (1, "train")]
    assert [m.version for m in reg.lineage(trained.version)] == [1]


# ---------------------------------------------------------------- DVC remote on the same store


def test_dvc_remote_url_sits_next_to_the_models(tmp_path):
    assert dvc_remote_url(RegistryParams(uri="s3://bkt/team/models"), tmp_path) == "s3://bkt/team/models/dvc"
    assert dvc_remote_url(RegistryParams(uri="s3://bkt"), tmp_path) == "s3://bkt/dvc"
    assert dvc_remote_url(RegistryParams(uri="registry"), tmp_path) == "registry/dvc"
    assert dvc_remote_url(RegistryParams(uri="/srv/reg"), tmp_path) == "/srv/reg/dvc"


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_push_and_pull_through_the_registry_bucket(moto_s3, tmp_path):
    bucket = moto_s3.create_bucket(f"dvc-{uuid.uuid4().hex[:12]}")
    params = RegistryParams(uri=f"s3://{bucket}/team", endpoint_url=moto_s3.endpoint)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    assert configure_dvc_remote(params, repo) == f"s3://{bucket}/team/dvc"
    config = (repo / ".dvc" / "config").read_text()
    assert "remote = registry" in config and moto_s3.endpoint in config
    assert "testing" not in config  # credentials stay in the AWS chain

    data = write(repo / "data" / "labels.txt", "0 0.5 0.5 0.1 0.1\n")
    dvc(repo, "add", "-q", "data")
    dvc(repo, "push")
    stored = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert stored and all(key.startswith("team/dvc/") for key in stored)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    dvc(repo, "pull")
    assert data.read_text() == "0 0.5 0.5 0.1 0.1\n"
