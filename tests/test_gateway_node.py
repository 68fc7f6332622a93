"""A Node.js client of the gateway (tests/node_client.mjs: only Node's own fetch, no npm
packages, no Python on its side) against a real stack: redis-server, moto's S3 server, one
`refinery worker` and one `refinery gateway`, default settings, tiny-schnell at 64 px."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devstack.stack import LocalStack, free_port, wait_until

pytestmark = pytest.mark.integration

NODE = shutil.which("node")
SCRIPT = Path(__file__).parent / "node_client.mjs"


@pytest.mark.skipif(NODE is None, reason="needs node (20 or later) on PATH")
def test_node_client_submits_follows_and_downloads(tmp_path):
    with LocalStack(tmp_path) as stack:
        stack.start_worker("worker")
        port = free_port()
        process = stack.spawn("gateway", [sys.executable, "-m", "cli", "gateway", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        log = stack.logs / "gateway.log"
        wait_until(
            lambda: httpx.get(f"{url}/readyz").status_code == 200,
            timeout_s=60,
            what="gateway",
            process=process,
            log=log,
        )
        created = stack.refinery("keys", "create", "--tenant", "nodejs", "--json")
        assert created.returncode == 0, created.stderr

        env = {"PATH": "/usr/bin:/bin", "GATEWAY_URL": url, "API_KEY": json.loads(created.stdout)["key"]}
        done = subprocess.run([str(NODE), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)

        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.splitlines()[-1])
        for kind in ("generate_and_refine", "refine_only"):
            job = report[kind]
            assert job["events"][-1] == "succeeded" and (job["width"], job["height"]) == (64, 64), job
        assert report["refine_only"]["job_id"] != report["generate_and_refine"]["job_id"]
