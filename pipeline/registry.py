"""Model registry: immutable, checksummed model versions, movable aliases and an append-only event log.

One registry logic sits on top of a tiny object-store interface with two implementations:

- `LocalStore`: a folder (the default, `registry.uri: registry` -> `./registry`);
- `S3Store`: an S3 bucket/prefix through boto3 (AWS S3, MinIO, moto ...).

Both stores offer only: put_if_absent, get, put_if_match (compare-and-swap on an etag), download and
list. Everything that must be safe under concurrent writers is built from those two conditional
writes, so threads, processes and machines can register and promote at the same time.

Layout under `<root or s3 prefix>/<model>/`:

    claims/<n>                   who took version number n (written first, exclusively)
    versions/<n>/<file>          the artifacts
    versions/<n>/manifest.json   written LAST: a version exists only once its manifest exists
    aliases/<name>.json          {version, history, ...}, updated by compare-and-swap
    events/<time_ns>-<uuid>.json one immutable object per event, read back sorted by name

A writer killed half-way leaves a claim and some files but no manifest: that number is simply
skipped and never shown.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

MANIFEST_FILE = "manifest.json"
PRODUCTION = "production"
DVC_REMOTE_NAME = "registry"
# The DVC cache lives next to the models, under `<prefix>/dvc`, so "dvc" cannot also be a model name.
RESERVED_NAMES = {MANIFEST_FILE, "dvc"}

# Bounded network behaviour for S3: an unreachable endpoint must fail within seconds, not hang.
S3_MAX_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 3
S3_READ_TIMEOUT_S = 30
# How many times a compare-and-swap on an alias is retried when other writers keep winning.
CAS_ATTEMPTS = 50

CHUNK = 1024 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class RegistryError(Exception):
    """Anything the user can act on: bad names, missing versions, unreachable store ..."""


class RegistryUnavailable(RegistryError):
    """The store failed in a way a later try may not: a timeout, a dropped connection, throttling, a 5xx."""


class ChecksumError(RegistryError):
    """A stored file does not match the sha256 its manifest promises."""


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class Manifest(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), extra="ignore")

    model: str
    version: int
    stage: str
    files: dict[str, FileEntry]
    primary: str
    sha256: str  # of the primary file; what de-duplication and find_by_sha256 look at
    metrics: dict[str, Any] = {}
    params_hash: str | None = None
    params: dict[str, Any] = {}
    dataset_hash: str | None = None
    git_commit: str | None = None
    parent: int | None = None
    created_at: str
    actor: str


# ---------------------------------------------------------------- small helpers


def check_name(kind: str, value: Any) -> str:
    """Names end up in object keys and file paths, so only a safe, boring alphabet is allowed."""
    if (not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value
            or (value in RESERVED_NAMES and kind != "stage")):
        raise RegistryError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '.', '_', '-', '+', "
            f"starting with a letter or digit, no '..', not one of {sorted(RESERVED_NAMES)}")
    return value


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry, e.g. some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def to_json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


# ---------------------------------------------------------------- local folder store


class LocalStore:
    """Objects are files under `root`; keys are relative paths with '/' separators.

    put_if_absent writes a hidden temp file, fsyncs it and hard-links it to the final name: the link
    either creates the name with the complete content or fails because the name exists, so readers
    never see half a file and exactly one writer wins. Compare-and-swap holds an flock on a side
    lock file (works across threads and processes) and uses the content's sha256 as the etag.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.description = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _write_temp(self, final: Path, data: bytes | Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data, Path):
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, out, CHUNK)
                else:
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    def put_if_absent(self, key: str, data: bytes | Path) -> bool:
        final = self._path(key)
        tmp = self._write_temp(final, data)
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        """Write only if the current etag is `etag` (None: only if the key does not exist)."""
        lock_path = self.root / ".locks" / (key + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.get(key)
            if (current[1] if current else None) != etag:
                return False
            tmp = self._write_temp(self._path(key), data)
            os.replace(tmp, self._path(key))
            return True

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise RegistryError(f"{self.description}: {key} is missing") from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".tmp-"):
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)


# ---------------------------------------------------------------- S3 store


_boto_session = None
_boto_session_lock = threading.Lock()


class S3Store:
    """Objects under s3://bucket/prefix/. Exclusive create and compare-and-swap use S3's
    conditional writes (put_object IfNoneMatch='*' / IfMatch=etag), which S3 applies atomically."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        where = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.description = f"{where} (endpoint {endpoint_url})" if endpoint_url else where
        config = Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                        connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S)
        # Credentials come only from boto3's standard chain (env, profile, instance role ...).
        # One shared session makes every client after the first cheap (the service model is loaded
        # once); sessions are not thread-safe, so clients are made under a lock. Clients are.
        global _boto_session
        with _boto_session_lock:
            if _boto_session is None:
                _boto_session = boto3.session.Session()
            self.client = _boto_session.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, operation: str, key: str, **kwargs):
        """Run one client call; turn botocore's failures into RegistryError with the place named."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as EndpointUnreachable
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError:
            raise  # callers decide what a 404/409/412 means
        except NoCredentialsError:
            raise RegistryError(f"{self.description}: no AWS credentials found (set them the usual "
                                f"boto3 way: AWS_ACCESS_KEY_ID/..., a profile or an instance role)") from None
        except EndpointUnreachable as e:  # refused, timed out, DNS, proxy
            raise RegistryError(f"{self.description}: cannot reach the S3 endpoint after "
                                f"{S3_MAX_ATTEMPTS} attempts: {e}") from None
        except BotoCoreError as e:
            raise RegistryError(f"{self.description}: {operation} {key} failed: {e}") from None

    def _client_error(self, operation: str, key: str, error) -> RegistryError:
        info = error.response.get("Error", {})
        return RegistryError(f"{self.description}: {operation} {key} failed: "
                             f"{info.get('Code')} {info.get('Message', '')}".rstrip())

    @staticmethod
    def _status(error) -> int:
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)

    def _conditional_put(self, key: str, data: bytes | Path, condition: dict) -> bool:
        from botocore.exceptions import ClientError
        for attempt in range(CAS_ATTEMPTS):
            try:
                if isinstance(data, Path):
                    with open(data, "rb") as body:
                        self._call("put_object", key, Key=self._key(key), Body=body, **condition)
                else:
                    self._call("put_object", key, Key=self._key(key), Body=data, **condition)
                return True
            except ClientError as e:
                status = self._status(e)
                if status == 412 or (status == 404 and "IfMatch" in condition):
                    return False  # someone else's write came first (or the object is gone)
                if status == 409:  # ConditionalRequestConflict: a concurrent write is in flight
                    time.sleep(random.uniform(0.01, 0.05 * (attempt + 1)))
                    continue
                raise self._client_error("put_object", key, e) from None
        raise RegistryError(f"{self.description}: put {key} kept conflicting with other writers")

    def put_if_absent(self, key: str, data: bytes | Path) -> bool:
        return self._conditional_put(key, data, {"IfNoneMatch": "*"})

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        return self._conditional_put(key, data, condition)

    def get(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError
        try:
            response = self._call("get_object", key, Key=self._key(key))
            return response["Body"].read(), response["ETag"]
        except ClientError as e:
            if self._status(e) == 404:
                if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    raise self._client_error("get_object", key, e) from None
                return None
            raise self._client_error("get_object", key, e) from None

    def download(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError
        try:
            response = self._call("get_object", key, Key=self._key(key))
        except ClientError as e:
            raise self._client_error("get_object", key, e) from None
        with open(dest, "wb") as out:
            for block in response["Body"].iter_chunks(CHUNK):
                out.write(block)

    def list(self, prefix: str) -> list[str]:
        from botocore.exceptions import ClientError
        keys = []
        token = None
        strip = len(self._key(""))
        while True:
            extra = {"ContinuationToken": token} if token else {}
            try:
                page = self._call("list_objects_v2", prefix, Prefix=self._key(prefix), **extra)
            except ClientError as e:
                raise self._client_error("list_objects_v2", prefix, e) from None
            keys += [item["Key"][strip:] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]


# ---------------------------------------------------------------- the registry


def parse_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise RegistryError(f"registry uri {uri!r}: expected s3://bucket[/prefix]")
    return bucket, prefix.strip("/")


def open_store(uri: str, endpoint_url: str | None = None, base_dir: Path | None = None):
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)
    if "://" in uri:
        raise RegistryError(f"registry uri {uri!r}: use a local folder or s3://bucket/prefix")
    root = Path(uri).expanduser()
    return LocalStore(root if root.is_absolute() else Path(base_dir or Path.cwd()) / root)


def open_registry(params, base_dir: Path | None = None) -> "Registry":
    """`params` is a RegistryParams (uri, model_name, endpoint_url). A relative local uri is taken
    relative to `base_dir`, default the current directory."""
    store = open_store(params.uri, getattr(params, "endpoint_url", None), base_dir)
    return Registry(store, params.model_name)


class Registry:
    """All versions, aliases and events of one model in one store."""

    def __init__(self, store, model_name: str):
        self.store = store
        self.model = check_name("model name", model_name)
        # Manifests and events never change once written, so caching them is always correct.
        self._manifests: dict[int, Manifest] = {}
        self._events: dict[str, dict] = {}
        self._cache_lock = threading.Lock()

    def _key(self, *parts: str | int) -> str:
        return "/".join([self.model, *map(str, parts)])

    # ---- versions

    def manifest(self, version: int) -> Manifest:
        version = self._check_version(version)
        with self._cache_lock:
            if version in self._manifests:
                return self._manifests[version]
        found = self.store.get(self._key("versions", version, MANIFEST_FILE))
        if found is None:
            raise RegistryError(f"{self.model}: no version {version} in {self.store.description}")
        manifest = Manifest.model_validate_json(found[0])
        with self._cache_lock:
            self._manifests[version] = manifest
        return manifest

    def versions(self) -> list[Manifest]:
        numbers = []
        for key in self.store.list(self._key("versions") + "/"):
            parts = key.split("/")  # model/versions/<n>/manifest.json
            if len(parts) == 4 and parts[3] == MANIFEST_FILE and parts[2].isdigit():
                numbers.append(int(parts[2]))
        return [self.manifest(n) for n in sorted(numbers)]

    def find_by_sha256(self, sha: str) -> Manifest | None:
        return next((m for m in self.versions() if m.sha256 == sha), None)

    def register(self, stage: str, files: dict[str, Path], primary: str, metrics: dict | None = None,
                 params: dict | None = None, params_hash: str | None = None,
                 dataset_hash: str | None = None, parent: int | None = None,
                 git_commit: str | None = None, actor: str | None = None) -> Manifest:
        check_name("stage", stage)
        if not files:
            raise RegistryError("register: no files given")
        for name in files:
            check_name("file name", name)
        if primary not in files:
            raise RegistryError(f"register: primary {primary!r} is not one of the files {sorted(files)}")
        paths = {name: Path(path) for name, path in files.items()}
        for name, path in paths.items():
            if not path.is_file():
                raise RegistryError(f"register: file {name!r} -> {path} does not exist")
        if parent is not None:
            self.manifest(parent)  # raises if the parent is not a registered version

        entries = {}
        for name, path in paths.items():
            sha, size = sha256_file(path)
            entries[name] = FileEntry(sha256=sha, bytes=size)
        existing = self.find_by_sha256(entries[primary].sha256)
        if existing is not None:
            return existing  # same model bytes: versions are immutable, hand back the one we have

        actor = actor or default_actor()
        version = self._claim_version_number(actor)
        for name, path in paths.items():
            self._put_artifact(self._key("versions", version, name), path, entries[name].sha256)
        manifest = Manifest(
            model=self.model, version=version, stage=stage, files=entries, primary=primary,
            sha256=entries[primary].sha256, metrics=metrics or {}, params_hash=params_hash,
            params=params or {}, dataset_hash=dataset_hash, git_commit=git_commit, parent=parent,
            created_at=utc_now(), actor=actor)
        # The manifest goes last: until it exists the version is invisible to every reader.
        manifest_key = self._key("versions", version, MANIFEST_FILE)
        manifest_bytes = manifest.model_dump_json(indent=2).encode()
        if not self.store.put_if_absent(manifest_key, manifest_bytes):
            found = self.store.get(manifest_key)
            if found is None or found[0] != manifest_bytes:  # see _put_artifact for the benign case
                raise RegistryError(f"{self.model}: version {version} already has another manifest")
        self._append_event(actor=actor, action="register", version=version, alias=None,
                           reason=f"stage {stage}")
        return manifest

    def _claim_version_number(self, actor: str) -> int:
        claimed = [int(k.rsplit("/", 1)[1]) for k in self.store.list(self._key("claims") + "/")
                   if k.rsplit("/", 1)[1].isdigit()]
        version = max(claimed, default=0) + 1
        claim = to_json({"actor": actor, "time": utc_now(), "id": uuid.uuid4().hex})
        # Another writer taking the same number makes us try the next one; numbers are never reused.
        while not self.store.put_if_absent(self._key("claims", version), claim):
            version += 1
        return version

    def _put_artifact(self, key: str, path: Path, sha: str) -> None:
        if self.store.put_if_absent(key, path):
            return
        # Our claim makes the key ours, so it can only exist already when a request that the client
        # retried had in fact succeeded the first time: accept identical content.
        found = self.store.get(key)
        if found is None or hashlib.sha256(found[0]).hexdigest() != sha:
            raise RegistryError(f"{self.store.description}: {key} exists with other content")

    def fetch(self, version: int, dest_dir: Path) -> dict[str, Path]:
        """Download every file of a version into dest_dir; each file's sha256 is checked before any
        of them appears in dest_dir, so a corrupted version leaves nothing behind."""
        manifest = self.manifest(version)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".fetch-"))
        try:
            for name, entry in manifest.files.items():
                local = staging / name
                self.store.download(self._key("versions", manifest.version, name), local)
                sha, size = sha256_file(local)
                if sha != entry.sha256 or size != entry.bytes:
                    raise ChecksumError(
                        f"{self.model} v{manifest.version} {name}: stored file has sha256 {sha} "
                        f"({size} bytes), manifest says {entry.sha256} ({entry.bytes} bytes)")
            fetched = {}
            for name in manifest.files:
                os.replace(staging / name, dest_dir / name)
                fetched[name] = dest_dir / name
            return fetched
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def lineage(self, version: int) -> list[Manifest]:
        chain = [self.manifest(version)]
        while chain[-1].parent is not None:
            if any(m.version == chain[-1].parent for m in chain):
                raise RegistryError(f"{self.model}: lineage of v{version} loops at v{chain[-1].parent}")
            chain.append(self.manifest(chain[-1].parent))
        return chain

    # ---- aliases

    def _alias_doc(self, name: str) -> tuple[dict | None, str | None]:
        found = self.store.get(self._key("aliases", f"{check_name('alias', name)}.json"))
        return (json.loads(found[0]), found[1]) if found else (None, None)

    def alias(self, name: str) -> int | None:
        doc, _ = self._alias_doc(name)
        return doc["version"] if doc else None

    def aliases(self) -> dict[str, int]:
        names = [k.rsplit("/", 1)[1][:-len(".json")] for k in self.store.list(self._key("aliases") + "/")
                 if k.endswith(".json")]
        current = {name: self.alias(name) for name in names}
        return {name: v for name, v in sorted(current.items()) if v is not None}

    def set_alias(self, name: str, version: int, reason: str, actor: str | None = None) -> None:
        self._move_alias(name, version, reason, actor, action="promote", go_back=False)

    def rollback(self, reason: str, to: int | None = None, actor: str | None = None) -> int:
        """Point production back at the version it had before (or at `to`)."""
        if to is not None:
            return self._move_alias(PRODUCTION, to, reason, actor, action="rollback", go_back=False)
        return self._move_alias(PRODUCTION, None, reason, actor, action="rollback", go_back=True)

    def _move_alias(self, name: str, version: int | None, reason: str, actor: str | None,
                    action: str, go_back: bool) -> int:
        """Compare-and-swap loop on aliases/<name>.json.

        The alias document carries `history`, the versions it pointed at before, newest last. It is
        updated in the same CAS as `version`, so under concurrent promotions it is exactly the order
        in which the promotions took effect; rollback pops from it. The event log records the same
        moves for people, but event timestamps of concurrent writers need not match that order.
        """
        check_name("alias", name)
        if version is not None:
            self.manifest(version)  # only registered versions can be promoted
        actor = actor or default_actor()
        key = self._key("aliases", f"{name}.json")
        for attempt in range(CAS_ATTEMPTS):
            doc, etag = self._alias_doc(name)
            previous = doc["version"] if doc else None
            history = list(doc.get("history", [])) if doc else []
            if go_back:
                if previous is None:
                    raise RegistryError(f"{self.model}: alias {name!r} is not set; nothing to roll back")
                if not history:
                    raise RegistryError(f"{self.model}: no earlier {name} version than v{previous} "
                                        f"to roll back to")
                target = history.pop()
            else:
                target = version
                if previous is not None and previous != target:
                    history.append(previous)
            new_doc = {"alias": name, "version": target, "history": history, "updated_at": utc_now(),
                       "actor": actor, "reason": reason}
            if self.store.put_if_match(key, to_json(new_doc), etag):
                self._append_event(actor=actor, action=action, version=target, alias=name,
                                   reason=reason, previous=previous)
                return target
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))  # lost the race: re-read
        raise RegistryError(f"{self.model}: could not update alias {name!r}: {CAS_ATTEMPTS} "
                            f"attempts lost to concurrent writers")

    # ---- events

    def _append_event(self, **event) -> None:
        event = {"time": utc_now(), **event}
        key = self._key("events", f"{time.time_ns():020d}-{uuid.uuid4().hex}.json")
        # The uuid makes the key ours alone; False can only mean a retried request had already
        # written this very event.
        self.store.put_if_absent(key, to_json(event))

    def events(self) -> list[dict]:
        events = []
        for key in self.store.list(self._key("events") + "/"):
            with self._cache_lock:
                event = self._events.get(key)
            if event is None:
                found = self.store.get(key)
                if found is None:
                    continue
                event = json.loads(found[0])
                with self._cache_lock:
                    self._events[key] = event
            events.append(event)
        return events

    # ---- misc

    def _check_version(self, version: Any) -> int:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistryError(f"{self.model}: invalid version {version!r}: expected an integer >= 1")
        return version


# ---------------------------------------------------------------- DVC remote on the same store


def dvc_remote_url(params, repo_dir: Path) -> str:
    """Where DVC keeps its cache: `<registry>/dvc` (a folder, or the same bucket/prefix)."""
    if params.uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(params.uri)
        return f"s3://{bucket}/{prefix}/dvc" if prefix else f"s3://{bucket}/dvc"
    if "://" in params.uri:
        raise RegistryError(f"registry uri {params.uri!r}: use a local folder or s3://bucket/prefix")
    # A relative folder stays relative; DVC stores it relative to .dvc/config, so the
    # configuration works in any checkout of the repo.
    return (Path(params.uri) / "dvc").as_posix()


def configure_dvc_remote(params, repo_dir: Path, name: str = DVC_REMOTE_NAME) -> str:
    """Make `name` the default DVC remote of the repo at repo_dir, on the registry's store.

    Only the url and endpoint are written (into .dvc/config, fit to commit); credentials are left
    to the AWS chain, exactly as for the registry itself. Returns the remote url.
    """
    url = dvc_remote_url(params, repo_dir)
    commands = [["remote", "add", "-f", "-d", name, url]]
    endpoint = getattr(params, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith("s3://") and endpoint:
        commands.append(["remote", "modify", name, "endpointurl", endpoint])
    for args in commands:
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo_dir,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RegistryError(f"dvc {' '.join(args)} failed in {repo_dir}: "
                                f"{(result.stderr or result.stdout).strip()}")
    return url
