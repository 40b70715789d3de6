"""The registry's cost with a long history, against the tests' local moto S3 server (the README's figures).

    python tests/bench_registry.py [N]      # N versions (default 1000); prints requests and times

Registers N small versions one by one (requests and time per `register`), promotes with a fresh handle, then
times the CLI's `registry list`, `list --json` and `history` in fresh processes (the CLI's own start-up alone is
printed first, to tell it apart). Not a test: it takes minutes and its timings depend on the machine.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path[:0] = [str(TESTS), str(REPO)]

from s3server import MotoS3  # noqa: E402

from pipeline.params import RegistryParams  # noqa: E402
from pipeline.registry import open_registry  # noqa: E402


def cli(server, uri: str, *args: str, runs: int = 3) -> str:
    walls, requests = [], []
    for _ in range(runs):
        before, started = server.app.requests, time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pipeline", "registry", "--set", f"registry.uri={uri}",
                              "--set", f"registry.endpoint_url={server.endpoint}", *args],
                             cwd=REPO, capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        requests.append(server.app.requests - before)
        assert out.returncode == 0, out.stderr[-2000:]
    return f"{min(walls):.2f}-{max(walls):.2f} s wall, {requests[0]} requests, {out.stdout.count(chr(10))} lines"


def main(n: int) -> None:
    server = MotoS3().start()
    try:
        server.create_bucket("bench-registry")
        params = RegistryParams(uri="s3://bench-registry/team", endpoint_url=server.endpoint)
        registry = open_registry(params)
        with tempfile.TemporaryDirectory() as tmp:
            weights, metrics = Path(tmp) / "best.pt", Path(tmp) / "metrics.json"
            metrics.write_text(json.dumps({"map50_95": 0.5}))
            costs, seconds = [], []
            for version in range(1, n + 1):
                weights.write_bytes(f"weights {version} ".encode() * 200)
                before, started = server.app.requests, time.perf_counter()
                registry.register(stage="train", files={"best.pt": weights, "metrics.json": metrics},
                                  primary="best.pt", metrics={"map50_95": 0.5}, params={"train": {"epochs": 3}},
                                  actor="bench")
                seconds.append(time.perf_counter() - started)
                costs.append(server.app.requests - before)
                if version % 100 == 0:
                    print(f"{version} versions: register takes {min(costs[-100:])}-{max(costs[-100:])} requests, "
                          f"median {statistics.median(seconds[-100:]) * 1000:.0f} ms", flush=True)
        registry.set_alias("production", n, reason="bench")
        before = server.app.requests
        open_registry(params).set_alias("production", n - 1, reason="bench")
        print(f"promote with a fresh handle: {server.app.requests - before} requests")
        with tempfile.TemporaryDirectory() as empty:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline", "registry", "--set", f"registry.uri={empty}", "list"],
                           cwd=REPO, capture_output=True)
            print(f"CLI start-up alone (an empty local registry): {time.perf_counter() - started:.2f} s")
        for args in (["list"], ["list", "--json"], ["history"]):
            print(f"registry {' '.join(args)}: {cli(server, params.uri, *args)}")
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
