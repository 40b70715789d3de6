"""Model registry: immutable, checksummed model versions, movable aliases and an append-only event log.

One registry logic sits on top of a tiny object-store interface with two implementations:

- `LocalStore`: a folder (the default, `registry.uri: registry` -> `./registry`);
- `S3Store`: an S3 bucket/prefix through boto3 (AWS S3, R2, MinIO, moto ...).

Both stores offer: put_if_absent, put_if_match (compare-and-swap on an etag), put, get, download,
entries/list and delete. Everything that must be safe under concurrent writers is built from the two
conditional writes, so threads, processes and machines can register and promote at the same time.
After each conditional write that decides something (a version number, an alias move) the writer
reads the object back: a store that does not apply its conditions atomically is reported instead of
silently giving one number to two writers.

Layout under `<root or s3 prefix>/<model>/`:

    sha256/<hex>.json            which writer registers these primary bytes, and as which version;
                                 renewed while the upload runs (a lease), so the same bytes
                                 registered at the same time become one version
    claims/<n>                   who took version number n (created exclusively, then read back)
    claims/latest.json           the highest number taken, only ever raised (compare-and-swap) and
                                 before any manifest: where the next writer starts, where listing stops
    versions/<n>/<file>          the artifacts
    versions/<n>/manifest.json   written after the artifacts: a version exists once its manifest exists
    index/<n // 100>.json        the manifests of up to 100 versions, so listing does not read every
                                 manifest; only a cache: a version missing from it is read directly
    aliases/<name>.json          {version, history, event, replaced}, moved by compare-and-swap; it
                                 carries the event of the move that wrote it
    events/<time_ns>-<id>.json   one immutable object per event, read back sorted by name

A register event missing because its writer died after the manifest is restored from the manifest, a
move's event from the alias document (and written by the next move), so history is complete after any
crash. A writer killed half-way leaves a claim and some files but no manifest: that number is skipped,
never shown, and `registry gc` removes the leftovers. Every name read back from a stored document is
checked as strictly as on register: a damaged or hostile document is a DamagedRecord naming its key.
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.io import atomic_write, sha256_file

MANIFEST_FILE = "manifest.json"
PRODUCTION = "production"
DVC_REMOTE_NAME = "registry"
# The DVC cache lives next to the models, under `<prefix>/dvc`, so "dvc" cannot also be a model name.
RESERVED_NAMES = {MANIFEST_FILE, "dvc"}

# Bounded network behaviour for S3: an unreachable endpoint must fail within seconds, not hang.
S3_MAX_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 3
S3_READ_TIMEOUT_S = 30
# How many times a compare-and-swap is retried when other writers keep winning.
CAS_ATTEMPTS = 50
# Versions are 1 to 9 ASCII digits: anything longer is a typo or an attack, not a version.
MAX_VERSION_DIGITS = 9
MAX_VERSION = 10 ** MAX_VERSION_DIGITS - 1
INDEX_PAGE = 100  # versions per index object
# A registration in progress renews its sha256 claim every LEASE_S / 3; one not renewed for LEASE_S
# (or whose process is gone, on this host) is dead and the next writer of the same bytes takes over.
LEASE_S = 30.0
DEDUPE_WAIT_S = 3600.0  # longest wait for a live registration of the same bytes
ETAG_CHAIN = 20  # how many replaced ETags an alias document remembers, to tell a later move from a lost one
FETCH_THREADS = 16  # concurrent reads when listing

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_VERSION_KEY_RE = re.compile(r"[1-9][0-9]{0,%d}" % (MAX_VERSION_DIGITS - 1))
_SHA256_RE = r"^[0-9a-f]{64}$"
# scheme://user:password@host -> the user:password part, wherever it appears in a string
_URL_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]*@")
# S3 error codes that mean "try again later"; any 5xx and 429 are transient too.
TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                      "RequestTimeoutException", "ServiceUnavailable", "InternalError",
                      "RequestLimitExceeded", "TooManyRequestsException", "ConditionalRequestConflict"}


class RegistryError(Exception):
    """Anything the user can act on: bad names, missing versions, damaged records, unreachable store ..."""


class RegistryUnavailable(RegistryError):
    """The store failed in a way that passes: timeout, refused or dropped connection, HTTP 5xx,
    throttling, writers that keep conflicting. Retrying later is the fix; nothing else is transient."""


class ChecksumError(RegistryError):
    """A stored file does not match the sha256 its manifest promises."""


class NoSuchVersion(RegistryError):
    """The version was never registered (or its manifest is gone)."""


class DamagedRecord(RegistryError):
    """A stored document is not valid JSON, not the expected shape, or names something unsafe."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class StoreNotAtomic(RegistryError):
    """The store let two conditional writes of the same object both succeed."""


def shorten(value: Any, limit: int = 40) -> str:
    """repr() of a value for an error message, cut short: a 5,000-digit 'version' is not echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def name_problem(kind: str, value: Any) -> str | None:
    """Names end up in object keys and file paths, so only a safe, boring alphabet is allowed."""
    if (not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value
            or (value in RESERVED_NAMES and kind != "stage")):
        return (f"invalid {kind} {shorten(value, 60)}: use 1-128 letters, digits, '.', '_', '-', '+', "
                f"starting with a letter or digit, no '..', not one of {sorted(RESERVED_NAMES)}")
    return None


def check_name(kind: str, value: Any) -> str:
    problem = name_problem(kind, value)
    if problem:
        raise RegistryError(problem)
    return value


def _safe_name(kind: str) -> Callable[[Any], Any]:
    """A pydantic validator: the same name rules for documents read back as for register."""
    def check(value):
        problem = name_problem(kind, value)
        if problem:
            raise ValueError(problem)
        return value
    return check


Version = Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION)]
Sha256 = Annotated[str, Field(pattern=_SHA256_RE)]
EventId = Annotated[str, Field(pattern=r"^[0-9]{20}-[0-9a-f]{32}$")]  # <time_ns>-<uuid>: events/<id>.json


class FileEntry(BaseModel):
    sha256: Sha256
    bytes: Annotated[int, Field(strict=True, ge=0)]


class Manifest(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), extra="ignore")

    model: str
    version: Version
    stage: str
    files: dict[str, FileEntry]
    primary: str
    sha256: Sha256  # of the primary file; what de-duplication and find_by_sha256 look at
    metrics: dict[str, Any] = {}
    params_hash: str | None = None
    params: dict[str, Any] = {}
    dataset_hash: str | None = None
    git_commit: str | None = None
    parent: Version | None = None
    created_at: str
    actor: str
    event: EventId | None = None  # id of its register event; None in older manifests

    _model_name = field_validator("model")(_safe_name("model name"))
    _stage_name = field_validator("stage")(_safe_name("stage"))

    @model_validator(mode="after")
    def _files_are_safe(self):
        if not self.files:
            raise ValueError("no files")
        for name in self.files:
            problem = name_problem("file name", name)
            if problem:
                raise ValueError(problem)
        if self.primary not in self.files:
            raise ValueError(f"primary {shorten(self.primary)} is not one of the files")
        if self.files[self.primary].sha256 != self.sha256:
            raise ValueError("sha256 is not the primary file's sha256")
        return self


class ShaClaim(BaseModel):
    """sha256/<hex>.json: the writer registering these primary bytes, and the version it took."""
    model_config = ConfigDict(extra="ignore")

    sha256: Sha256
    version: Version | None = None
    id: str
    actor: str = ""
    host: str = ""
    pid: int = 0
    time: str = ""
    beat: int = 0
    released: bool = False  # its writer failed and gave the bytes up


class Event(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: EventId | None = None  # older events have it only in their key
    time: str
    actor: str
    action: Annotated[str, Field(pattern=r"^[a-z][a-z_-]{0,31}$")]
    version: Version | None = None
    alias: str | None = None
    reason: str | None = None

    @field_validator("alias")
    @classmethod
    def _alias_name(cls, value):
        return value if value is None else _safe_name("alias")(value)


class AliasDoc(BaseModel):
    model_config = ConfigDict(extra="ignore")

    alias: str
    version: Version
    history: list[Version] = []  # the versions it pointed at before, newest last
    updated_at: str = ""
    actor: str = ""
    reason: str | None = None
    event: Event | None = None  # the event of the move that wrote this document
    replaced: list[str] = []  # ETags of the documents this one replaced, newest last

    _alias_name = field_validator("alias")(_safe_name("alias"))


def parse_record(model: type[BaseModel], data: bytes, where: str):
    """Validate a stored document; anything wrong is one DamagedRecord line naming the key."""
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            problem = f"not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
        else:
            location = ".".join(str(part) for part in first["loc"]) or "the document"
            more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
            problem = f"not a valid {model.__name__} record: {location}: {first['msg']}{more}"
        raise DamagedRecord(where, problem) from None


# ---------------------------------------------------------------- small helpers


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry, e.g. some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return iso_time(time.time_ns())


def iso_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="milliseconds")


def to_json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def redact(text: str) -> str:
    """'http://user:secret@host' -> 'http://***@host': credentials are never shown nor stored."""
    return _URL_USERINFO_RE.sub("***@", text)


def redact_params(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: redact_params(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_params(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def same_etag(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip('"') == b.strip('"')


def concurrently(function: Callable, items) -> list:
    """function over items with up to FETCH_THREADS at once, results in order; errors propagate."""
    items = list(items)
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


# ---------------------------------------------------------------- local folder store


class LocalStore:
    """Objects are files under `root`; keys are relative paths with '/' separators.

    put_if_absent writes a hidden temp file, fsyncs it and hard-links it to the final name: the link
    either creates the name with the complete content or fails because the name exists, so readers
    never see half a file and exactly one writer wins. Compare-and-swap holds an flock on a side
    lock file (works across threads and processes) and uses the content's sha256 as the etag.
    Every OSError (a full disk, no permission) is a RegistryError naming the file: none is transient.
    """

    TEMP_PREFIX = ".tmp-"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.description = str(self.root)

    def where(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise RegistryError(f"{self.description}: refusing unsafe key {shorten(key)}")
        return self.root / key

    @contextmanager
    def _errors(self, key: str):
        try:
            yield
        except OSError as e:
            raise RegistryError(f"{self.where(key)}: {e.strerror or e}") from None

    @staticmethod
    def _write_synced(path: str | Path, data: bytes | Path) -> None:
        with open(path, "wb") as out:
            if isinstance(data, Path):
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                out.write(data)
            out.flush()
            os.fsync(out.fileno())

    @staticmethod
    def _etag(data: bytes | Path) -> str:
        return sha256_file(data) if isinstance(data, Path) else hashlib.sha256(data).hexdigest()

    def put_if_absent(self, key: str, data: bytes | Path) -> str | None:
        """Create `key` unless it exists; the new etag, or None when it existed.

        Not pipeline.io.atomic_write: its rename would replace an existing object, and this one must
        fail instead. A hard link creates the name only if it is free, with the content complete."""
        final = self._path(key)
        with self._errors(key):
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=self.TEMP_PREFIX)
            os.close(fd)
            try:
                self._write_synced(tmp, data)
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return None
            finally:
                os.unlink(tmp)
        return self._etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str | None:
        """Write only if the current etag is `etag` (None: only if the key does not exist)."""
        lock_path = self.root / ".locks" / (key + ".lock")
        with self._errors(key):
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.get(key)
                if (current[1] if current else None) != etag:
                    return None
                atomic_write(self._path(key), lambda tmp: self._write_synced(tmp, data))
        return self._etag(data)

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            atomic_write(self._path(key), lambda tmp: self._write_synced(tmp, data))

    def get(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        with self._errors(key):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
        return data, self._etag(data)

    def download(self, key: str, dest: Path) -> None:
        with self._errors(key):
            try:
                shutil.copyfile(self._path(key), dest)
            except FileNotFoundError:
                raise RegistryError(f"{self.description}: {key} is missing") from None

    def entries(self, prefix: str) -> list[tuple[str, float, int]]:
        """(key, modified time, size) under prefix, sorted; hidden and temporary files left out."""
        return [e for e in self._walk(prefix) if not e[0].rsplit("/", 1)[-1].startswith(".")]

    def temp_files(self, prefix: str) -> list[tuple[str, float, int]]:
        """Temporary files of writers that were killed (put_if_absent's, atomic_write's)."""
        return [e for e in self._walk(prefix) if e[0].rsplit("/", 1)[-1].startswith(".")]

    def _walk(self, prefix: str) -> list[tuple[str, float, int]]:
        base = self.root / prefix
        found = []
        with self._errors(prefix):
            if not base.is_dir():
                return []
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    path = Path(dirpath, name)
                    try:
                        stat = path.stat()
                    except FileNotFoundError:  # removed since listed
                        continue
                    found.append((path.relative_to(self.root).as_posix(), stat.st_mtime, stat.st_size))
        return sorted(found)

    def list(self, prefix: str) -> list[str]:
        return [key for key, _, _ in self.entries(prefix)]

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            for parent in path.parents:  # drop folders left empty, up to the root
                if parent == self.root or self.root not in parent.parents:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break


# ---------------------------------------------------------------- S3 store


_boto_session = None
_boto_session_lock = threading.Lock()


def check_endpoint(endpoint_url: str) -> str:
    """The endpoint to give boto3: an http(s) URL, without any user:password@ in it (S3 requests are
    signed with the AWS credential chain; credentials in the URL are never used, shown or stored)."""
    shown = redact(endpoint_url) if "://" in endpoint_url else re.sub(r"^[^@/]*@", "***@", endpoint_url)
    problem = f"registry.endpoint_url {shorten(shown, 80)}: expected http(s)://host[:port]"
    try:
        parts = urlsplit(endpoint_url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number)
    except ValueError:
        raise RegistryError(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(problem)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class S3Store:
    """Objects under s3://bucket/prefix/. Exclusive create and compare-and-swap use S3's
    conditional writes (put_object IfNoneMatch='*' / IfMatch=etag); see the README for the stores
    that document applying them atomically."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = check_endpoint(endpoint_url) if endpoint_url else None
        where = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.description = f"{where} (endpoint {self.endpoint_url})" if self.endpoint_url else where
        # total_max_attempts counts the first try too ("max_attempts" would be retries, one more).
        config = Config(retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                        connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                        max_pool_connections=FETCH_THREADS)
        # Credentials come only from boto3's standard chain (env, profile, instance role ...).
        # One shared session makes every client after the first cheap (the service model is loaded
        # once); sessions are not thread-safe, so clients are made under a lock. Clients are.
        global _boto_session
        with _boto_session_lock:
            if _boto_session is None:
                _boto_session = boto3.session.Session()
            try:
                self.client = _boto_session.client("s3", endpoint_url=self.endpoint_url, config=config)
            except ValueError as e:  # botocore's own endpoint and region checks
                raise RegistryError(f"{self.description}: {redact(str(e))}") from None

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _failure(self, operation: str, key: str, error: Exception) -> RegistryError:
        """The RegistryError for a failed call: RegistryUnavailable when retrying later can help."""
        from botocore import exceptions as boto

        if isinstance(error, boto.ClientError):
            info = error.response.get("Error", {})
            code = info.get("Code", "")
            status = self._status(error)
            text = f"{self.description}: {operation} {key} failed: {code} {info.get('Message', '')}".rstrip()
            transient = status >= 500 or status == 429 or code in TRANSIENT_S3_CODES
            return RegistryUnavailable(text) if transient else RegistryError(text)
        if isinstance(error, boto.NoCredentialsError):
            return RegistryError(f"{self.description}: no AWS credentials found (set them the usual "
                                 f"boto3 way: AWS_ACCESS_KEY_ID/..., a profile or an instance role)")
        if isinstance(error, boto.SSLError):  # a certificate problem does not go away by waiting
            return RegistryError(f"{self.description}: {operation} {key} failed: {redact(str(error))}")
        if isinstance(error, (boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError)):
            # refused, timed out, DNS, proxy, connection dropped mid-response
            return RegistryUnavailable(f"{self.description}: cannot reach the S3 endpoint after "
                                       f"{S3_MAX_ATTEMPTS} attempts: {redact(str(error))}")
        return RegistryError(f"{self.description}: {operation} {key} failed: {redact(str(error))}")

    def _call(self, operation: str, key: str, **kwargs):
        """One client call. A ClientError that is not transient is raised as is (callers decide what a
        404/409/412 means); everything else becomes a RegistryError with the place named."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            failure = self._failure(operation, key, e)
            if isinstance(failure, RegistryUnavailable) and self._code(e) != "ConditionalRequestConflict":
                raise failure from None
            raise
        except BotoCoreError as e:
            raise self._failure(operation, key, e) from None

    def _read(self, operation: str, key: str, read: Callable):
        """Read a response body: a connection dropped half-way is as transient as a refused one."""
        from botocore.exceptions import BotoCoreError
        try:
            return read()
        except BotoCoreError as e:
            raise self._failure(operation, key, e) from None

    @staticmethod
    def _status(error) -> int:
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)

    @staticmethod
    def _code(error) -> str:
        return error.response.get("Error", {}).get("Code", "")

    def _conditional_put(self, key: str, data: bytes | Path, condition: dict) -> str | None:
        from botocore.exceptions import ClientError
        for attempt in range(CAS_ATTEMPTS):
            try:
                if isinstance(data, Path):
                    with open(data, "rb") as body:
                        response = self._call("put_object", key, Key=self._key(key), Body=body, **condition)
                else:
                    response = self._call("put_object", key, Key=self._key(key), Body=data, **condition)
                return response["ETag"]
            except ClientError as e:
                status = self._status(e)
                if status == 412 or (status == 404 and "IfMatch" in condition):
                    return None  # someone else's write came first (or the object is gone)
                if status == 409:  # ConditionalRequestConflict: a concurrent write is in flight
                    time.sleep(random.uniform(0.01, 0.05 * (attempt + 1)))
                    continue
                raise self._failure("put_object", key, e) from None
        raise RegistryUnavailable(f"{self.description}: put {key} kept conflicting with other writers")

    def put_if_absent(self, key: str, data: bytes | Path) -> str | None:
        return self._conditional_put(key, data, {"IfNoneMatch": "*"})

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        return self._conditional_put(key, data, condition)

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import ClientError
        try:
            self._call("put_object", key, Key=self._key(key), Body=data)
        except ClientError as e:
            raise self._failure("put_object", key, e) from None

    def get(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError
        try:
            response = self._call("get_object", key, Key=self._key(key))
        except ClientError as e:
            if self._status(e) == 404 and self._code(e) != "NoSuchBucket":
                return None
            raise self._failure("get_object", key, e) from None
        return self._read("get_object", key, response["Body"].read), response["ETag"]

    def download(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError
        try:
            response = self._call("get_object", key, Key=self._key(key))
        except ClientError as e:
            raise self._failure("get_object", key, e) from None

        def copy():
            with open(dest, "wb") as out:
                for block in response["Body"].iter_chunks(1 << 20):
                    out.write(block)
        try:
            self._read("get_object", key, copy)
        except OSError as e:  # the local side: a full disk, no permission
            raise RegistryError(f"{dest}: {e.strerror or e}") from None

    def entries(self, prefix: str) -> list[tuple[str, float, int]]:
        from botocore.exceptions import ClientError
        found = []
        token = None
        strip = len(self._key(""))
        while True:
            extra = {"ContinuationToken": token} if token else {}
            try:
                page = self._call("list_objects_v2", prefix, Prefix=self._key(prefix), **extra)
            except ClientError as e:
                raise self._failure("list_objects_v2", prefix, e) from None
            found += [(item["Key"][strip:], item["LastModified"].timestamp(), item["Size"])
                      for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(found)
            token = page["NextContinuationToken"]

    def temp_files(self, prefix: str) -> list[tuple[str, float, int]]:
        return []  # a PUT is all or nothing: S3 keeps no partial objects

    def list(self, prefix: str) -> list[str]:
        return [key for key, _, _ in self.entries(prefix)]

    def delete(self, key: str) -> None:
        from botocore.exceptions import ClientError
        try:
            self._call("delete_object", key, Key=self._key(key))
        except ClientError as e:
            raise self._failure("delete_object", key, e) from None


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
        raise RegistryError(f"registry uri {redact(uri)!r}: use a local folder or s3://bucket/prefix")
    root = Path(uri).expanduser()
    return LocalStore(root if root.is_absolute() else Path(base_dir or Path.cwd()) / root)


def open_registry(params, base_dir: Path | None = None) -> "Registry":
    """`params` is a RegistryParams (uri, model_name, endpoint_url). A relative local uri is taken
    relative to `base_dir`, default the current directory."""
    store = open_store(params.uri, getattr(params, "endpoint_url", None), base_dir)
    return Registry(store, params.model_name)


def register_event(manifest: Manifest) -> dict:
    """The register event of a manifest: written after it, and rebuilt from it when its writer died
    in between (the manifest holds all of it)."""
    return {"id": manifest.event, "time": manifest.created_at, "actor": manifest.actor,
            "action": "register", "version": manifest.version, "alias": None,
            "reason": f"stage {manifest.stage}"}


def _holder_is_gone(claim: ShaClaim) -> bool:
    """True when the claim's writer ran on this host and its process no longer exists."""
    if claim.released:
        return True
    if claim.host != socket.gethostname() or claim.pid <= 0:
        return False
    try:
        os.kill(claim.pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, under another user
        return False
    return False


class _Lease:
    """Holds sha256/<hex>.json for a registration: every LEASE_S / 3 the document is rewritten (its
    ETag changes), which tells writers waiting for the same bytes that this one is alive."""

    def __init__(self, registry: "Registry", key: str, claim: ShaClaim, etag: str):
        self.store, self.key, self.claim, self.etag = registry.store, key, claim, etag
        self.lost = False  # another writer took the bytes over (it believed this one dead)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def point_at(self, version: int) -> None:
        """Record the version number taken for these bytes, then keep renewing."""
        self.claim.version = version
        self._renew()
        self._thread = threading.Thread(target=self._run, name=f"lease {self.key}", daemon=True)
        self._thread.start()

    def _renew(self, **changes) -> None:
        with self._lock:
            if self.lost:
                return
            self.claim = self.claim.model_copy(update={"beat": self.claim.beat + 1, **changes})
            etag = self.store.put_if_match(self.key, to_json(self.claim.model_dump()), self.etag)
            if etag:
                self.etag = etag
            else:
                self.lost = True

    def _run(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            try:
                self._renew()
            except RegistryError:
                pass  # a missed renewal; the next one may get through before the lease runs out
            if self.lost:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """The registration failed: say so, so waiting writers take over now instead of after LEASE_S."""
        self.stop()
        try:
            self._renew(released=True)
        except RegistryError:
            pass  # they will take over once the lease runs out


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

    def _number(self, key: str, folder: str) -> int | None:
        """n from '<model>/<folder>/<n>[/...]', for canonical version numbers only."""
        parts = key.split("/")
        if len(parts) >= 3 and parts[1] == folder and _VERSION_KEY_RE.fullmatch(parts[2]):
            return int(parts[2])
        return None

    # ---- conditional writes, read back

    def _create(self, key: str, data: bytes) -> str | None:
        """Exclusive create of a small document. A request that the client retried after its first
        attempt had in fact succeeded answers 'exists': identical bytes count as ours."""
        etag = self.store.put_if_absent(key, data)
        if etag:
            return etag
        found = self.store.get(key)
        return found[1] if found is not None and found[0] == data else None

    def _swap(self, key: str, data: bytes, etag: str | None) -> str | None:
        """Compare-and-swap, with the same rule for a retried request as _create."""
        new_etag = self.store.put_if_match(key, data, etag)
        if new_etag:
            return new_etag
        found = self.store.get(key)
        return found[1] if found is not None and found[0] == data else None

    def _confirm(self, key: str, data: bytes, what: str, found: tuple[bytes, str] | None = None) -> None:
        """Read back what a conditional write just created: on a store that checks the condition and
        writes in two steps, two writers can both 'win' and the later one overwrites the earlier."""
        found = found or self.store.get(key)
        if found is None or found[0] != data:
            raise StoreNotAtomic(
                f"{self.store.where(key)}: {what} was overwritten by a concurrent writer right after this "
                f"one created it: {self.store.description} does not apply conditional writes atomically "
                f"(see the README for the stores known to)")

    # ---- versions

    def manifest(self, version: int) -> Manifest:
        version = self._check_version(version)
        with self._cache_lock:
            if version in self._manifests:
                return self._manifests[version]
        manifest = self._read_manifest(version)
        if manifest is None:
            raise NoSuchVersion(f"{self.model}: no version {version} in {self.store.description}")
        return manifest

    def _manifest_if_any(self, version: int) -> Manifest | None:
        with self._cache_lock:
            if version in self._manifests:
                return self._manifests[version]
        return self._read_manifest(version)

    def _read_manifest(self, version: int) -> Manifest | None:
        key = self._key("versions", version, MANIFEST_FILE)
        found = self.store.get(key)
        if found is None:
            return None
        manifest = self._check_manifest(parse_record(Manifest, found[0], self.store.where(key)), version,
                                        self.store.where(key))
        with self._cache_lock:
            self._manifests[version] = manifest
        return manifest

    def _check_manifest(self, manifest: Manifest, version: int, where: str) -> Manifest:
        if manifest.version != version or manifest.model != self.model:
            raise DamagedRecord(where, f"describes {manifest.model} v{manifest.version}, "
                                       f"not {self.model} v{version}")
        return manifest

    def _claimed_numbers(self) -> list[int]:
        numbers = (self._number(key, "claims") for key in self.store.list(self._key("claims") + "/"))
        return sorted(n for n in numbers if n is not None)

    def _latest(self) -> tuple[int | None, str | None]:
        """claims/latest.json: no version with a manifest has a higher number (None: not there, as
        in registries written before it, or damaged) and its etag."""
        found = self.store.get(self._key("claims", "latest.json"))
        if found is None:
            return None, None
        try:
            latest = json.loads(found[0])["version"]
        except (ValueError, TypeError, KeyError):
            return None, found[1]
        valid = isinstance(latest, int) and not isinstance(latest, bool) and 0 <= latest <= MAX_VERSION
        return (latest if valid else None), found[1]

    def _raise_latest(self, version: int, etag: str | None) -> None:
        """Make claims/latest.json at least `version`, by compare-and-swap so that it never goes back:
        a reader that trusts it then never misses a version."""
        key = self._key("claims", "latest.json")
        for attempt in range(CAS_ATTEMPTS):
            if self._swap(key, to_json({"version": version}), etag):
                return
            latest, etag = self._latest()
            if latest is not None and latest >= version:
                return
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))
        raise RegistryUnavailable(f"{self.store.where(key)}: {CAS_ATTEMPTS} attempts to record v{version} "
                                  f"lost to concurrent writers")

    def versions(self, damaged: list[DamagedRecord] | None = None) -> list[Manifest]:
        """Every registered version, oldest first. Numbers run from 1 to claims/latest.json; their
        manifests come from the index, one object per 100 versions. A number missing from it (a
        registration in progress, a writer that died, an older registry) is read directly unless gc
        recorded it as gone. A damaged record raises, or with `damaged` given is appended there and
        left out."""
        latest, _ = self._latest()
        numbers = self._claimed_numbers() if latest is None else list(range(1, latest + 1))
        found: dict[int, Manifest] = {}
        gone: set[int] = set()
        pages = sorted({n // INDEX_PAGE for n in numbers})
        page_keys = [self._key("index", f"{page}.json") for page in pages]
        for key, stored in zip(page_keys, concurrently(self.store.get, page_keys)):
            if stored is not None:
                entries, removed = self._index_entries(key, stored[0], damaged)
                found.update(entries)
                gone |= removed
        wanted = set(numbers) - gone
        found = {n: m for n, m in found.items() if n in wanted}

        def read(n: int) -> Manifest | None:
            try:
                return self._read_manifest(n)
            except DamagedRecord as e:
                self._report(damaged, e)
                return None
        missing = [n for n in numbers if n in wanted and n not in found]
        for n, manifest in zip(missing, concurrently(read, missing)):
            if manifest is not None:
                found[n] = manifest
        return [found[n] for n in sorted(found)]

    def _index_entries(self, key: str, data: bytes, damaged) -> tuple[dict[int, Manifest], set[int]]:
        """An index page: {"versions": {"<n>": manifest}, "gone": [numbers gc removed]}."""
        where = self.store.where(key)
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or not isinstance(raw.get("versions"), dict):
                raise ValueError("expected {\"versions\": {...}}")
            gone = {n for n in raw.get("gone", []) if isinstance(n, int) and not isinstance(n, bool)}
        except (ValueError, TypeError) as e:
            self._report(damaged, DamagedRecord(where, f"not a valid index page ({e})"))
            return {}, set()
        entries = {}
        for name, entry in raw["versions"].items():
            try:
                if not _VERSION_KEY_RE.fullmatch(name):
                    raise DamagedRecord(f"{where} entry {shorten(name)}", "not a version number")
                manifest = parse_record(Manifest, json.dumps(entry), f"{where} entry {name}")
                entries[int(name)] = self._check_manifest(manifest, int(name), f"{where} entry {name}")
            except DamagedRecord as e:
                self._report(damaged, e)  # the version is then read from its manifest
        return entries, gone

    @staticmethod
    def _report(damaged: list | None, error: DamagedRecord) -> None:
        if damaged is None:
            raise error
        damaged.append(error)

    def find_by_sha256(self, sha: str) -> Manifest | None:
        found = self.store.get(self._key("sha256", f"{sha}.json"))
        if found is None:
            return None
        claim = parse_record(ShaClaim, found[0], self.store.where(self._key("sha256", f"{sha}.json")))
        if claim.version is None:
            return None
        try:
            manifest = self.manifest(claim.version)
        except NoSuchVersion:
            return None
        return manifest if manifest.sha256 == sha else None

    def register(self, stage: str, files: dict[str, Path], primary: str, metrics: dict | None = None,
                 params: dict | None = None, params_hash: str | None = None,
                 dataset_hash: str | None = None, parent: int | None = None,
                 git_commit: str | None = None, actor: str | None = None) -> Manifest:
        """Upload the files as a new version, or return the version already holding the same primary
        bytes (also when another writer is registering them at this moment). Credentials inside URLs
        in `params` (scheme://user:password@host) are not stored."""
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

        entries = {name: FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
                   for name, path in paths.items()}
        actor = actor or default_actor()
        existing, lease = self._claim_sha256(entries[primary].sha256, actor)
        if existing is not None:
            return existing  # same model bytes: versions are immutable, hand back the one we have
        try:
            version, claim_key, claim = self._claim_version_number(actor, entries[primary].sha256)
            lease.point_at(version)
            for name, path in paths.items():
                self._put_artifact(self._key("versions", version, name), path, entries[name].sha256)
            created_ns = time.time_ns()
            manifest = Manifest(
                model=self.model, version=version, stage=stage, files=entries, primary=primary,
                sha256=entries[primary].sha256, metrics=metrics or {}, params_hash=params_hash,
                params=redact_params(params or {}), dataset_hash=dataset_hash, git_commit=git_commit,
                parent=parent, created_at=iso_time(created_ns), actor=actor,
                event=f"{created_ns:020d}-{uuid.uuid4().hex}")
            # Still ours: not removed by gc while uploading, not overwritten by a second 'winner'.
            found = self.store.get(claim_key)
            if found is None:
                raise RegistryError(f"{self.store.where(claim_key)}: the claim of v{version} was removed "
                                    f"while its files uploaded (registry gc with too short --older-than?)")
            self._confirm(claim_key, claim, f"the claim of version {version}", found)
            # The manifest goes last: until it exists the version is invisible to every reader.
            manifest_key = self._key("versions", version, MANIFEST_FILE)
            if not self._create(manifest_key, manifest.model_dump_json(indent=2).encode()):
                raise RegistryError(f"{self.model}: version {version} already has another manifest")
        except BaseException:
            lease.release()
            raise
        lease.stop()
        with self._cache_lock:
            self._manifests[version] = manifest
        self._add_to_index(manifest)
        self._write_event(register_event(manifest))
        return manifest

    def _claim_sha256(self, sha: str, actor: str) -> tuple[Manifest | None, _Lease | None]:
        """Become the one writer registering these primary bytes, or return the version holding them:
        wait while another live writer registers them, take over from a dead one."""
        key = self._key("sha256", f"{sha}.json")
        where = self.store.where(key)
        mine = ShaClaim(sha256=sha, id=uuid.uuid4().hex, actor=actor, host=socket.gethostname(),
                        pid=os.getpid(), time=utc_now())
        data = to_json(mine.model_dump())
        watched, since = None, time.monotonic()
        deadline = since + DEDUPE_WAIT_S
        pause = 0.02
        while True:
            found = self.store.get(key)
            expected = None
            if found is not None:
                holder = parse_record(ShaClaim, found[0], where)
                if holder.sha256 != sha:
                    raise DamagedRecord(where, f"is about sha256 {holder.sha256[:12]}..., not {sha[:12]}...")
                if holder.version is not None:
                    existing = self._manifest_if_any(holder.version)
                    if existing is not None:
                        if existing.sha256 != sha:
                            raise DamagedRecord(where, f"points at v{holder.version}, whose primary file is "
                                                       f"another (sha256 {existing.sha256[:12]}...)")
                        return existing, None
                if not same_etag(found[1], watched):
                    watched, since = found[1], time.monotonic()  # renewed: its writer is alive
                if time.monotonic() - since <= LEASE_S and not _holder_is_gone(holder):
                    if time.monotonic() > deadline:
                        raise RegistryUnavailable(f"{where}: still being registered by {holder.actor} "
                                                  f"after {DEDUPE_WAIT_S:.0f} s")
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
                    continue
                expected = found[1]  # its writer is gone: take the bytes over
            etag = self._swap(key, data, expected)
            if etag:  # not read back: on a non-atomic store the worst is the same bytes in two versions
                return None, _Lease(self, key, mine, etag)

    def _claim_version_number(self, actor: str, sha: str) -> tuple[int, str, bytes]:
        """The next free number, taken with an exclusive create and read back. Numbers are never
        reused; the search starts after claims/latest.json, so it costs the same at any history."""
        latest, latest_etag = self._latest()
        if latest is None:  # a registry from before claims/latest.json: the claims themselves
            latest = max(self._claimed_numbers(), default=0)
        claim = to_json({"actor": actor, "time": utc_now(), "id": uuid.uuid4().hex, "sha256": sha,
                         "host": socket.gethostname(), "pid": os.getpid()})
        version = latest + 1
        # Another writer taking the same number makes us try the next one. (No _create here: a retried
        # request of ours answered 'exists' only costs a skipped number, which gc then removes.)
        while not self.store.put_if_absent(self._key("claims", version), claim):
            version += 1
            if version > MAX_VERSION:
                raise RegistryError(f"{self.model}: no version numbers left (at most {MAX_VERSION})")
        claim_key = self._key("claims", version)
        self._confirm(claim_key, claim, f"the claim of version {version}")
        self._raise_latest(version, latest_etag)  # before the manifest: readers count up to it
        return version, claim_key, claim

    def _put_artifact(self, key: str, path: Path, sha: str) -> None:
        if self.store.put_if_absent(key, path):
            return
        # Our claim makes the key ours, so it can only exist already when a request that the client
        # retried had in fact succeeded the first time: accept identical content.
        found = self.store.get(key)
        if found is None or hashlib.sha256(found[0]).hexdigest() != sha:
            raise RegistryError(f"{self.store.where(key)} exists with other content")

    @staticmethod
    def _index_page(found: tuple[bytes, str] | None) -> dict:
        try:
            page = json.loads(found[0]) if found else {}
            if isinstance(page, dict) and isinstance(page.get("versions"), dict) and isinstance(
                    page.get("gone", []), list):
                return {"versions": page["versions"],
                        "gone": [n for n in page.get("gone", []) if isinstance(n, int) and not isinstance(n, bool)]}
        except ValueError:
            pass
        # The index is a cache of the manifests: a damaged page starts afresh (the versions it loses
        # are read from their manifests; `registry gc --apply` re-indexes them).
        return {"versions": {}, "gone": []}

    def _mark_gone(self, numbers: list[int]) -> None:
        """Record in the index that gc removed these numbers' claims: listing stops looking for them.
        Best effort: should every attempt lose to other writers, listing just keeps reading them."""
        for page_number in sorted({n // INDEX_PAGE for n in numbers}):
            key = self._key("index", f"{page_number}.json")
            removed = {n for n in numbers if n // INDEX_PAGE == page_number}
            for attempt in range(CAS_ATTEMPTS):
                found = self.store.get(key)
                page = self._index_page(found)
                page["gone"] = sorted(set(page["gone"]) | removed)
                if self._swap(key, json.dumps(page, sort_keys=True, separators=(",", ":")).encode(),
                              found[1] if found else None):
                    break
                time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))

    def _add_to_index(self, manifest: Manifest) -> None:
        key = self._key("index", f"{manifest.version // INDEX_PAGE}.json")
        entry = json.loads(manifest.model_dump_json())
        for attempt in range(CAS_ATTEMPTS):
            found = self.store.get(key)
            page = self._index_page(found)
            page["versions"][str(manifest.version)] = entry
            if self._swap(key, json.dumps(page, sort_keys=True, separators=(",", ":")).encode(),
                          found[1] if found else None):
                return
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))
        raise RegistryUnavailable(f"{self.store.where(key)}: {CAS_ATTEMPTS} attempts to index "
                                  f"v{manifest.version} lost to concurrent writers")

    def fetch(self, version: int, dest_dir: Path) -> dict[str, Path]:
        """Download every file of a version into a temporary folder inside dest_dir, check each
        file's size and sha256, and only then rename them into place: a corrupted version leaves
        nothing behind. File names come from the manifest and were checked when it was read."""
        manifest = self.manifest(version)
        dest_dir = Path(dest_dir)
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".fetch-"))
        except OSError as e:
            raise RegistryError(f"{dest_dir}: {e.strerror or e}") from None
        try:
            for name, entry in manifest.files.items():
                local = staging / name
                if local.parent != staging:  # cannot happen with a checked name; never write elsewhere
                    raise DamagedRecord(self.store.where(self._key("versions", version, MANIFEST_FILE)),
                                        f"unsafe file name {shorten(name)}")
                self.store.download(self._key("versions", manifest.version, name), local)
                sha, size = sha256_file(local), local.stat().st_size
                if sha != entry.sha256 or size != entry.bytes:
                    raise ChecksumError(
                        f"{self.model} v{manifest.version} {name}: stored file has sha256 {sha} "
                        f"({size} bytes), manifest says {entry.sha256} ({entry.bytes} bytes)")
            fetched = {}
            for name in manifest.files:
                try:
                    os.replace(staging / name, dest_dir / name)
                except OSError as e:
                    raise RegistryError(f"{dest_dir / name}: {e.strerror or e}") from None
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

    def _alias_doc(self, name: str) -> tuple[AliasDoc | None, str | None]:
        key = self._key("aliases", f"{check_name('alias', name)}.json")
        found = self.store.get(key)
        if found is None:
            return None, None
        doc = parse_record(AliasDoc, found[0], self.store.where(key))
        if doc.alias != name:
            raise DamagedRecord(self.store.where(key), f"is about alias {doc.alias!r}, not {name!r}")
        return doc, found[1]

    def alias(self, name: str) -> int | None:
        doc, _ = self._alias_doc(name)
        return doc.version if doc else None

    def _alias_docs(self, damaged: list | None = None) -> dict[str, AliasDoc]:
        names = []
        for key in self.store.list(self._key("aliases") + "/"):
            name = key.rsplit("/", 1)[1]
            if key.count("/") == 2 and name.endswith(".json"):
                names.append(name[:-len(".json")])

        def read(name):
            try:
                problem = name_problem("alias", name)
                if problem:
                    raise DamagedRecord(self.store.where(self._key("aliases", f"{name}.json")), problem)
                return self._alias_doc(name)[0]
            except DamagedRecord as e:
                self._report(damaged, e)
                return None
        docs = dict(zip(names, concurrently(read, names)))
        return {name: doc for name, doc in sorted(docs.items()) if doc is not None}

    def aliases(self, damaged: list[DamagedRecord] | None = None) -> dict[str, int]:
        """Every set alias and its version, including an alias whose version does not exist."""
        return {name: doc.version for name, doc in self._alias_docs(damaged).items()}

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

        The alias document carries `history`, the versions it pointed at before, newest last, updated
        in the same CAS as `version`: under concurrent moves it is exactly the order in which they took
        effect; rollback pops from it. It also carries the move's event, so a crash between the swap
        and the event object loses nothing (history shows it; the next move writes it), and the ETags
        it replaced, so the writer can confirm by reading back that no one overwrote its move unseen.
        """
        check_name("alias", name)
        if version is not None:
            self.manifest(version)  # only registered versions can be promoted
        actor = actor or default_actor()
        key = self._key("aliases", f"{name}.json")
        for attempt in range(CAS_ATTEMPTS):
            doc, etag = self._alias_doc(name)
            previous = doc.version if doc else None
            history = list(doc.history) if doc else []
            if go_back:
                if previous is None:
                    raise RegistryError(f"{self.model}: alias {name!r} is not set; nothing to roll back")
                if not history:
                    raise RegistryError(f"{self.model}: no earlier {name} version than v{previous} "
                                        f"to roll back to")
                target = history.pop()
                self.manifest(target)
            else:
                target = version
                if previous is not None and previous != target:
                    history.append(previous)
            if doc is not None and doc.event is not None and doc.event.id is not None:
                self._write_event(doc.event.model_dump())  # the previous move's, if its writer died first
            now_ns = time.time_ns()
            event = {"id": f"{now_ns:020d}-{uuid.uuid4().hex}", "time": iso_time(now_ns), "actor": actor,
                     "action": action, "version": target, "alias": name, "reason": reason,
                     "previous": previous}
            replaced = ((doc.replaced if doc else []) + ([etag.strip('"')] if etag else []))[-ETAG_CHAIN:]
            new_doc = AliasDoc(alias=name, version=target, history=history, updated_at=event["time"],
                               actor=actor, reason=reason, event=event, replaced=replaced)
            data = to_json(new_doc.model_dump())
            new_etag = self._swap(key, data, etag)
            if new_etag:
                self._confirm_move(key, data, new_etag, name, target)
                self._write_event(event)
                return target
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))  # lost the race: re-read
        raise RegistryUnavailable(f"{self.model}: could not update alias {name!r}: {CAS_ATTEMPTS} "
                                  f"attempts lost to concurrent writers")

    def _confirm_move(self, key: str, data: bytes, etag: str, name: str, target: int) -> None:
        """After the swap the document is ours, or a later move's that replaced ours (our ETag is in
        its `replaced` chain). Anything else means another writer overwrote our move without seeing
        it, which only a store whose If-Match is not atomic allows."""
        found = self.store.get(key)
        if found is not None and found[0] == data:
            return
        current = parse_record(AliasDoc, found[0], self.store.where(key)) if found is not None else None
        if current is not None and etag.strip('"') in current.replaced:
            return
        raise StoreNotAtomic(
            f"{self.store.where(key)}: the move of {name!r} to v{target} was overwritten by a concurrent "
            f"writer that never saw it: {self.store.description} does not apply conditional writes "
            f"atomically (see the README for the stores known to)")

    # ---- events

    def _write_event(self, event: dict) -> None:
        """events/<id>.json, created once: a second write of the same event (a retried request, or the
        next move writing this one for a writer that died) finds it there and leaves it."""
        self.store.put_if_absent(self._key("events", f"{event['id']}.json"), to_json(event))

    def events(self, limit: int | None = None, damaged: list[DamagedRecord] | None = None) -> list[dict]:
        """The event log, oldest first (only the newest `limit` with a limit). Events whose writer died
        before writing them are restored from the manifest or alias document they belong to, marked
        "restored": true."""
        keys = {key.rsplit("/", 1)[1][:-len(".json")]: key for key in self.store.list(self._key("events") + "/")
                if key.endswith(".json") and key.count("/") == 2}
        restored = {}
        for manifest in self.versions(damaged):
            if manifest.event and manifest.event not in keys:
                restored[manifest.event] = register_event(manifest)
        for doc in self._alias_docs(damaged).values():
            if doc.event is not None and doc.event.id is not None and doc.event.id not in keys:
                restored[doc.event.id] = doc.event.model_dump()
        ids = sorted(set(keys) | set(restored))
        if limit:
            ids = ids[-limit:]

        def read(event_id: str) -> dict | None:
            if event_id in restored:
                return {**restored[event_id], "restored": True}
            key = keys[event_id]
            with self._cache_lock:
                if key in self._events:
                    return self._events[key]
            found = self.store.get(key)
            if found is None:
                return None
            try:
                event = {**parse_record(Event, found[0], self.store.where(key)).model_dump(), "id": event_id}
            except DamagedRecord as e:
                self._report(damaged, e)
                return None
            with self._cache_lock:
                self._events[key] = event
            return event
        return [event for event in concurrently(read, ids) if event is not None]

    # ---- leftovers of killed writers

    def gc(self, older_than_s: float, apply: bool = False, now: float | None = None) -> dict:
        """What killed writers left behind: claims older than `older_than_s` without a manifest, with
        the files uploaded under their number and the sha256 claim pointing at them, and (local store)
        temporary files. Also what a registry written by older code lacks: versions missing from the
        index, versions whose bytes have no sha256 claim (so registering them again would not find
        them), claims/latest.json. Removes and repairs only with `apply`. Returns {"leftovers": [{key,
        kind, bytes, age_s, note}], "reindex": [versions], "claim_bytes": [versions], "latest": the
        number claims/latest.json is raised to or None, "applied": apply}."""
        now = time.time() if now is None else now
        version_entries = self.store.entries(self._key("versions") + "/")
        with_manifest = {self._number(key, "versions") for key, _, _ in version_entries
                         if key.endswith("/" + MANIFEST_FILE)}
        leftovers = []
        for key, modified, size in self.store.entries(self._key("claims") + "/"):
            number = self._number(key, "claims")
            if number is None or number in with_manifest:
                continue
            found = self.store.get(key)
            try:
                claim = json.loads(found[0]) if found else {}
            except ValueError:
                claim = {}
            claim = claim if isinstance(claim, dict) else {}
            try:
                taken = datetime.fromisoformat(claim["time"]).timestamp()  # the writer's own clock
            except (ValueError, TypeError, KeyError):
                taken = modified
            age = now - taken
            if age < older_than_s:
                continue  # maybe still uploading
            note = f"v{number} claimed by {claim.get('actor', '?')}, no manifest"
            files = [(k, m, s) for k, m, s in version_entries if self._number(k, "versions") == number]
            leftovers += [{"key": k, "kind": "object", "bytes": s, "age_s": now - m, "note": f"file of {note}"}
                          for k, m, s in files]
            sha = claim.get("sha256")
            if isinstance(sha, str) and re.fullmatch(_SHA256_RE, sha):
                sha_key = self._key("sha256", f"{sha}.json")
                held = self.store.get(sha_key)
                try:
                    holder = ShaClaim.model_validate_json(held[0]) if held else None
                except ValidationError:
                    holder = None
                if holder is not None and holder.version == number:
                    leftovers.append({"key": sha_key, "kind": "sha256", "bytes": len(held[0]), "age_s": age,
                                      "note": f"points at {note}"})
            leftovers.append({"key": key, "kind": "claim", "bytes": size, "age_s": age, "note": note})
        for key, modified, size in self.store.temp_files(self.model + "/"):
            if now - modified >= older_than_s:
                leftovers.append({"key": key, "kind": "temp", "bytes": size, "age_s": now - modified,
                                  "note": "temporary file of a killed writer"})

        numbers = sorted(n for n in with_manifest if n is not None)
        indexed: dict[int, Manifest] = {}
        page_keys = [self._key("index", f"{page}.json") for page in sorted({n // INDEX_PAGE for n in numbers})]
        for key, stored in zip(page_keys, concurrently(self.store.get, page_keys)):
            if stored is not None:
                indexed.update(self._index_entries(key, stored[0], damaged=[])[0])
        reindex = [n for n in numbers if n not in indexed]
        manifests = dict(indexed)
        for number in reindex:
            try:
                manifests[number] = self.manifest(number)
            except DamagedRecord:
                pass  # listing reports it; nothing to index
        claimed_bytes = {key.rsplit("/", 1)[1][:-len(".json")] for key in self.store.list(self._key("sha256") + "/")}
        claim_bytes, seen = [], set()
        for number, manifest in sorted(manifests.items()):
            if manifest.sha256 not in claimed_bytes and manifest.sha256 not in seen:
                claim_bytes.append(number)
                seen.add(manifest.sha256)
        latest, latest_etag = self._latest()
        highest = max([*numbers, *(self._number(k, "claims") or 0 for k, _, _ in self.store.entries(
            self._key("claims") + "/"))], default=0)
        raise_latest = highest if latest is None or latest < highest else None

        if apply:
            # Files first and the claim last: a gc killed half-way leaves a claim, found next time.
            for item in leftovers:
                self.store.delete(item["key"])
            for number in reindex:
                if number in manifests:
                    self._add_to_index(manifests[number])
            for number in claim_bytes:  # finished registrations, as register leaves them
                claim = ShaClaim(sha256=manifests[number].sha256, version=number, id=uuid.uuid4().hex,
                                 actor="registry gc", time=utc_now())
                self.store.put_if_absent(self._key("sha256", f"{claim.sha256}.json"), to_json(claim.model_dump()))
            if raise_latest is not None:
                self._raise_latest(raise_latest, latest_etag)
            removed = sorted({self._number(i["key"], "claims") for i in leftovers if i["kind"] == "claim"})
            self._mark_gone(removed)
            if leftovers:
                now_ns = time.time_ns()
                self._write_event({"id": f"{now_ns:020d}-{uuid.uuid4().hex}", "time": iso_time(now_ns),
                                   "actor": default_actor(), "action": "gc", "version": None, "alias": None,
                                   "reason": f"removed {len(leftovers)} leftovers of killed writers"
                                             + (f" (claims of v{', v'.join(map(str, removed))})" if removed
                                                else "")})
        return {"leftovers": leftovers, "reindex": reindex, "claim_bytes": claim_bytes, "latest": raise_latest,
                "applied": apply}

    # ---- misc

    def _check_version(self, version: Any) -> int:
        if (isinstance(version, bool) or not isinstance(version, int) or version < 1
                or version > MAX_VERSION):
            raise RegistryError(f"{self.model}: invalid version {shorten(version)}: expected an integer "
                                f"from 1 to {MAX_VERSION}")
        return version


# ---------------------------------------------------------------- DVC remote on the same store


def dvc_remote_url(params, repo_dir: Path) -> str:
    """Where DVC keeps its cache: `<registry>/dvc` (a folder, or the same bucket/prefix)."""
    if params.uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(params.uri)
        return f"s3://{bucket}/{prefix}/dvc" if prefix else f"s3://{bucket}/dvc"
    if "://" in params.uri:
        raise RegistryError(f"registry uri {redact(params.uri)!r}: use a local folder or s3://bucket/prefix")
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
        commands.append(["remote", "modify", name, "endpointurl", check_endpoint(endpoint)])
    for args in commands:
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo_dir,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RegistryError(f"dvc {' '.join(args)} failed in {repo_dir}: "
                                f"{(result.stderr or result.stdout).strip()}")
    return url
