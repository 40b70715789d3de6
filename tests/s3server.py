"""A real S3 endpoint for tests: moto's server on 127.0.0.1, spoken to over HTTP like any S3.

Imported by the registry tests (not a conftest, so it only loads where it is used).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SerialApp:
    """Runs moto's WSGI app one request at a time.

    moto checks If-None-Match / If-Match and then writes, as two steps; real S3 does both
    atomically. Serialising requests gives moto the same atomicity, so races between our writers
    are decided the way S3 decides them instead of by moto's threading.
    """

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))


class SerialMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer whose entry point puts SerialApp in front of moto's app (the rest of
    ThreadedMotoServer - start, stop, ready event - is used as is)."""

    def _server_entry(self) -> None:
        app = SerialApp(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, threaded=True)
        self._server_ready_event.set()
        self._server.serve_forever()


class MotoS3:
    def __init__(self):
        self.port = free_port()
        self.server = SerialMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
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
