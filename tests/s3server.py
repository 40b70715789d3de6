"""A real S3 endpoint for tests: moto's server on 127.0.0.1, spoken to over HTTP like any S3.

Imported by the registry tests (not a conftest, so it only loads where it is used). Besides the plain
server it can count requests, answer with injected errors (503 SlowDown, 500 InternalError ...), and
run as a store whose conditional writes are NOT atomic, to test that the registry notices.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
import threading
from typing import Callable

import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

# Dummy credentials and no way to reach anything but 127.0.0.1: no real AWS profile, no instance
# metadata probing, no proxy.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "DVC_NO_ANALYTICS": "1",
}
UNSET_ENV = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTP_PROXY", "HTTPS_PROXY",
             "http_proxy", "https_proxy")
REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 412: "Precondition Failed",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_error(start_response, status: int, code: str, message: str = "injected by the test"):
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f'<RequestId>test</RequestId></Error>').encode()
    start_response(f"{status} {REASONS.get(status, 'Error')}",
                   [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class MotoApp:
    """moto's WSGI app, one request at a time, with a request counter and injected failures.

    moto checks If-None-Match / If-Match and then writes, as two steps; real S3 does both
    atomically. Serialising requests gives moto the same atomicity, so races between our writers
    are decided the way S3 decides them instead of by moto's threading. With `atomic=False` only
    each single moto call is serialised, and conditional PUTs are checked and written in two
    separate steps with `between_check_and_write(key, phase)` called in between ("checked") and
    after the write ("written"): a store whose conditional writes are not atomic.
    """

    def __init__(self, atomic: bool = True):
        self.app = DomainDispatcherApplication(create_backend_app)
        self.lock = threading.Lock()
        self.atomic = atomic
        self.requests = 0
        self.faults: list[list] = []  # [requests to let through first, requests to fail, status, code]
        self.between_check_and_write: Callable[[str, str], None] | None = None

    def fail_next(self, count: int, status: int, code: str, after: int = 0) -> None:
        """Answer `count` requests, after letting `after` through, with this S3 error instead of
        serving them."""
        self.faults.append([after, count, status, code])

    def _call(self, environ, start_response) -> list[bytes]:
        with self.lock:
            return list(self.app(environ, start_response))

    def __call__(self, environ, start_response):
        with self.lock:
            self.requests += 1
            fault = next((f for f in self.faults if f[1] > 0), None)
            if fault is not None and fault[0] > 0:
                fault[0] -= 1
                fault = None
            elif fault is not None:
                fault[1] -= 1
        if fault is not None:
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            return s3_error(start_response, fault[2], fault[3])
        conditional = environ.get("HTTP_IF_NONE_MATCH") or environ.get("HTTP_IF_MATCH")
        if self.atomic or environ["REQUEST_METHOD"] != "PUT" or not conditional:
            return self._call(environ, start_response)
        return self._check_then_write(environ, start_response)

    def _check_then_write(self, environ, start_response):
        length = environ.get("CONTENT_LENGTH")
        body = environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read()
        head = {k: v for k, v in environ.items() if k not in ("HTTP_IF_NONE_MATCH", "HTTP_IF_MATCH")}
        head.update({"REQUEST_METHOD": "HEAD", "CONTENT_LENGTH": "0", "wsgi.input": io.BytesIO(b"")})
        answer = {}

        def remember(status, headers, exc_info=None):
            answer["status"] = int(status.split()[0])
            answer["etag"] = dict((k.lower(), v) for k, v in headers).get("etag", "")
        self._call(head, remember)
        exists = answer["status"] == 200
        if environ.get("HTTP_IF_NONE_MATCH") == "*" and exists:
            return s3_error(start_response, 412, "PreconditionFailed", "At least one of the preconditions failed")
        if_match = environ.get("HTTP_IF_MATCH")
        if if_match and not exists:
            return s3_error(start_response, 404, "NoSuchKey", "The specified key does not exist.")
        if if_match and answer["etag"].strip('"') != if_match.strip('"'):
            return s3_error(start_response, 412, "PreconditionFailed", "At least one of the preconditions failed")
        key = environ["PATH_INFO"]
        if self.between_check_and_write:
            self.between_check_and_write(key, "checked")
        put = {k: v for k, v in environ.items() if k not in ("HTTP_IF_NONE_MATCH", "HTTP_IF_MATCH")}
        put.update({"CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)})
        status_and_headers = {}

        def hold(status, headers, exc_info=None):
            status_and_headers.update(status=status, headers=headers)
        response = self._call(put, hold)
        if self.between_check_and_write:
            self.between_check_and_write(key, "written")
        start_response(status_and_headers["status"], status_and_headers["headers"])
        return response


class AppServer(ThreadedMotoServer):
    """ThreadedMotoServer whose entry point serves a MotoApp (the rest of ThreadedMotoServer -
    start, stop, ready event - is used as is)."""

    def __init__(self, app: MotoApp, **kwargs):
        super().__init__(**kwargs)
        self.app = app

    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, self.app, threaded=True)
        self._server_ready_event.set()
        self._server.serve_forever()


class MotoS3:
    def __init__(self, atomic: bool = True):
        self.port = free_port()
        self.app = MotoApp(atomic=atomic)
        self.server = AppServer(self.app, ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._saved_env: dict[str, str | None] = {}
        self._client = None

    def start(self) -> "MotoS3":
        for name in (*TEST_ENV, *UNSET_ENV):
            self._saved_env[name] = os.environ.get(name)
        os.environ.update(TEST_ENV)
        # Empty AWS config files, so no real profile on this machine is ever read.
        self._saved_env["AWS_CONFIG_FILE"] = os.environ.get("AWS_CONFIG_FILE")
        self._saved_env["AWS_SHARED_CREDENTIALS_FILE"] = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
        self._aws_dir = tempfile.TemporaryDirectory(prefix="aws-empty-")
        for name, file in (("AWS_CONFIG_FILE", "config"), ("AWS_SHARED_CREDENTIALS_FILE", "credentials")):
            path = os.path.join(self._aws_dir.name, file)
            open(path, "w").close()
            os.environ[name] = path
        for name in UNSET_ENV:
            os.environ.pop(name, None)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self._aws_dir.cleanup()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def client(self):
        """A plain boto3 client on the server, to look at or tamper with objects directly."""
        if self._client is None:
            import boto3
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        return self._client

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def s3_faults(moto_s3):
    """The session's server, with any injected failure cleared after the test."""
    yield moto_s3.app
    moto_s3.app.faults.clear()


@pytest.fixture(scope="session")
def nonatomic_s3(moto_s3):
    """A second server on the same moto state whose conditional writes check, then write."""
    server = MotoS3(atomic=False)
    server.server.start()
    yield server
    server.server.stop()
