"""How the registry fails: transient store failures are RegistryUnavailable (the flow retries exactly
those), everything else a plain RegistryError; a store whose conditional writes are not atomic is
noticed; endpoints are checked and credentials in them never shown or stored. S3 is moto's server over
HTTP, with errors injected by tests/s3server.py, or a socket that never answers."""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import free_port, moto_s3, nonatomic_s3, s3_faults  # noqa: E402,F401  (fixtures)

from pipeline import registry as registry_module  # noqa: E402
from pipeline.params import RegistryParams  # noqa: E402
from pipeline.registry import (RegistryError, RegistryUnavailable, StoreNotAtomic,  # noqa: E402
                               check_endpoint, open_registry)

MODEL = "detector"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def register(reg, tmp_path: Path, name: str, **extra):
    weights = write(tmp_path / "src" / f"{name}.pt", f"weights {name}")
    return reg.register(stage="train", files={"best.pt": weights}, primary="best.pt", **extra)


@pytest.fixture
def s3(moto_s3, monkeypatch) -> RegistryParams:
    """A fresh bucket, and one attempt per request: an injected error reaches the registry at once
    instead of after botocore's backoff (retries have their own test)."""
    monkeypatch.setattr(registry_module, "S3_MAX_ATTEMPTS", 1)
    bucket = moto_s3.create_bucket(f"fail-{uuid.uuid4().hex[:12]}")
    return RegistryParams(uri=f"s3://{bucket}/team", model_name=MODEL, endpoint_url=moto_s3.endpoint)


@pytest.fixture(scope="module")
def one_version(moto_s3, tmp_path_factory) -> RegistryParams:
    """A bucket holding v1, shared by tests that only read it or fail before writing."""
    bucket = moto_s3.create_bucket(f"fail-{uuid.uuid4().hex[:12]}")
    params = RegistryParams(uri=f"s3://{bucket}/team", model_name=MODEL, endpoint_url=moto_s3.endpoint)
    register(open_registry(params), tmp_path_factory.mktemp("one-version"), "a")
    return params


# ---------------------------------------------------------------- transient or not


@pytest.mark.parametrize("status, code", [(503, "SlowDown"), (503, "ServiceUnavailable"), (500, "InternalError"),
                                          (400, "RequestTimeout"), (400, "Throttling"), (502, "BadGateway"),
                                          (429, "TooManyRequests")])
def test_throttling_timeouts_and_5xx_are_registry_unavailable(one_version, s3_faults, monkeypatch, tmp_path,
                                                             status, code):
    monkeypatch.setattr(registry_module, "S3_MAX_ATTEMPTS", 1)
    reg = open_registry(one_version)
    operations = {"list": reg.versions, "alias": lambda: reg.alias("production"),
                  "fetch": lambda: reg.fetch(1, tmp_path / "out"), "register": lambda: register(reg, tmp_path, "b")}
    for operation in operations.values():
        s3_faults.fail_next(1, status, code)
        with pytest.raises(RegistryUnavailable, match=code):
            operation()
    assert [m.version for m in open_registry(one_version).versions()] == [1]  # nothing half-written


def test_a_registration_failing_half_way_is_retried_at_once(s3, s3_faults, tmp_path):
    reg = open_registry(s3)
    register(reg, tmp_path, "a")
    s3_faults.fail_next(1, 503, "SlowDown", after=7)  # its 8th request uploads the file
    with pytest.raises(RegistryUnavailable, match="SlowDown"):
        register(reg, tmp_path, "b")
    # It gave up its claim of the bytes, so the retry does not wait for it to expire.
    assert register(reg, tmp_path, "b").version == 3  # v2 was the failed attempt's number
    assert [m.version for m in open_registry(s3).versions()] == [1, 3]


@pytest.mark.parametrize("status, code", [(403, "AccessDenied"), (400, "InvalidArgument"), (404, "NoSuchBucket")])
def test_refusals_are_permanent_registry_errors(s3, s3_faults, status, code):
    s3_faults.fail_next(1, status, code)
    with pytest.raises(RegistryError, match=code) as error:
        open_registry(s3).versions()
    assert not isinstance(error.value, RegistryUnavailable)


def test_one_throttled_request_is_retried_by_the_client(moto_s3, s3_faults, tmp_path):
    bucket = moto_s3.create_bucket(f"retry-{uuid.uuid4().hex[:12]}")
    reg = open_registry(RegistryParams(uri=f"s3://{bucket}/t", model_name=MODEL, endpoint_url=moto_s3.endpoint))
    s3_faults.fail_next(1, 503, "SlowDown")
    assert register(reg, tmp_path, "a").version == 1  # S3_MAX_ATTEMPTS absorbed it


def test_an_endpoint_that_never_answers_times_out_as_unavailable(moto_s3, monkeypatch):
    monkeypatch.setattr(registry_module, "S3_MAX_ATTEMPTS", 1)
    monkeypatch.setattr(registry_module, "S3_READ_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # the kernel accepts connections; nobody ever reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RegistryUnavailable, match="timeout"):
            open_registry(RegistryParams(uri="s3://models/x", endpoint_url=endpoint)).versions()


def test_a_connection_dropped_mid_download_is_unavailable(moto_s3, monkeypatch, tmp_path):
    monkeypatch.setattr(registry_module, "S3_MAX_ATTEMPTS", 1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def answer_half():  # promises 1000 bytes, sends 10, hangs up
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: "x"\r\n'
                                   b"Content-Type: application/octet-stream\r\n\r\n0123456789")
    threading.Thread(target=answer_half, daemon=True).start()
    try:
        store = open_registry(RegistryParams(
            uri="s3://models/x", endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}")).store
        with pytest.raises(RegistryUnavailable):
            store.get("detector/versions/1/best.pt")
        with pytest.raises(RegistryUnavailable):
            store.download("detector/versions/1/best.pt", tmp_path / "best.pt")
    finally:
        server.close()


def test_a_full_local_disk_is_a_permanent_error(tmp_path, monkeypatch):
    reg = open_registry(RegistryParams(uri=str(tmp_path / "registry"), model_name=MODEL))

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RegistryError, match=os.strerror(errno.ENOSPC)) as error:
        register(reg, tmp_path, "a")
    assert str(tmp_path / "registry") in str(error.value)
    assert not isinstance(error.value, RegistryUnavailable)


# ---------------------------------------------------------------- a store whose conditional writes are not atomic


def race_on(server, key_suffix: str, *writers):
    """Run the writers at once on a store that checks a condition, then writes: both writes to the
    object ending in key_suffix pass their check before either is written, and both are written
    before either writer hears back. Returns (results, errors)."""
    both_checked, both_written = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)

    def pause(key: str, phase: str):
        if key.endswith(key_suffix):
            (both_checked if phase == "checked" else both_written).wait()
    results, errors = [], []

    def run(writer):
        try:
            results.append(writer())
        except Exception as e:
            errors.append(e)
    server.app.between_check_and_write = pause
    try:
        threads = [threading.Thread(target=run, args=(w,)) for w in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.app.between_check_and_write = None
    return results, errors


def test_one_version_number_taken_by_two_writers_is_detected(nonatomic_s3, tmp_path):
    bucket = nonatomic_s3.create_bucket(f"nonatomic-{uuid.uuid4().hex[:12]}")
    params = RegistryParams(uri=f"s3://{bucket}/t", model_name=MODEL, endpoint_url=nonatomic_s3.endpoint)
    results, errors = race_on(nonatomic_s3, f"/{MODEL}/claims/1",
                              lambda: register(open_registry(params), tmp_path, "a", actor="alice"),
                              lambda: register(open_registry(params), tmp_path, "b", actor="bob"))
    assert len(results) == 1 and len(errors) == 1, errors
    assert isinstance(errors[0], StoreNotAtomic) and "conditional writes atomically" in str(errors[0])
    survivor = results[0]
    reg = open_registry(params)
    assert [m.version for m in reg.versions()] == [survivor.version] == [1]
    assert reg.manifest(1).actor == survivor.actor
    survivor_weights = "weights a" if survivor.actor == "alice" else "weights b"
    assert reg.fetch(1, tmp_path / "out")["best.pt"].read_text() == survivor_weights


def test_an_alias_move_overwritten_unseen_is_detected(nonatomic_s3, tmp_path):
    bucket = nonatomic_s3.create_bucket(f"nonatomic-{uuid.uuid4().hex[:12]}")
    params = RegistryParams(uri=f"s3://{bucket}/t", model_name=MODEL, endpoint_url=nonatomic_s3.endpoint)
    reg = open_registry(params)
    for name in "abc":
        register(reg, tmp_path, name)
    reg.set_alias("production", 1, reason="first")
    results, errors = race_on(nonatomic_s3, f"/{MODEL}/aliases/production.json",
                              lambda: open_registry(params).set_alias("production", 2, reason="two") or 2,
                              lambda: open_registry(params).set_alias("production", 3, reason="three") or 3)
    assert len(results) == 1 and len(errors) == 1, errors
    assert isinstance(errors[0], StoreNotAtomic) and "'production'" in str(errors[0])
    reg = open_registry(params)
    assert reg.alias("production") == results[0]
    doc = json.loads(reg.store.get(f"{MODEL}/aliases/production.json")[0])
    assert doc["history"] == [1]
    assert [e["version"] for e in reg.events() if e["action"] == "promote"] == [1, results[0]]


# ---------------------------------------------------------------- endpoints and the credentials in them


@pytest.mark.parametrize("endpoint", ["notaurl", "ftp://127.0.0.1:9000", "http://", "http://host:port",
                                      "user:secret@host", "s3.amazonaws.com"])
def test_a_bad_endpoint_is_one_clear_line(endpoint):
    with pytest.raises(RegistryError) as error:
        open_registry(RegistryParams(uri="s3://models/x", endpoint_url=endpoint))
    message = str(error.value)
    assert message.startswith("registry.endpoint_url") and "http(s)://host[:port]" in message
    assert "\n" not in message and "secret" not in message


def test_credentials_in_the_endpoint_are_never_shown_or_stored(moto_s3, tmp_path, monkeypatch):
    bucket = moto_s3.create_bucket(f"creds-{uuid.uuid4().hex[:12]}")
    endpoint = moto_s3.endpoint.replace("http://", "http://AKIAUSER:s3cr3t-pass@")
    params = RegistryParams(uri=f"s3://{bucket}/t", model_name=MODEL, endpoint_url=endpoint)
    reg = open_registry(params)
    m = register(reg, tmp_path, "a", params={"registry": params.model_dump(), "note": "ftp://bob:pw2@h/x"})
    assert m.params["registry"]["endpoint_url"] == moto_s3.endpoint.replace("http://", "http://***@")
    assert m.params["note"] == "ftp://***@h/x"
    stored = b"".join(reg.store.get(key)[0] for key in reg.store.list(MODEL + "/"))
    assert b"s3cr3t" not in stored and b"pw2" not in stored
    assert "s3cr3t" not in reg.store.description
    assert check_endpoint(endpoint) == moto_s3.endpoint  # what boto3 and `dvc remote modify` get
    with pytest.raises(RegistryError) as missing:
        reg.manifest(9)
    assert "s3cr3t" not in str(missing.value)

    monkeypatch.setattr(registry_module, "S3_MAX_ATTEMPTS", 1)
    unreachable = RegistryParams(uri="s3://models/x", endpoint_url=f"http://u:s3cr3t@127.0.0.1:{free_port()}")
    with pytest.raises(RegistryUnavailable) as error:
        open_registry(unreachable).versions()
    assert "s3cr3t" not in str(error.value) and "127.0.0.1" in str(error.value)
