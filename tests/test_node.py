"""One host, the README's commands, default settings: ``refinery node`` runs and supervises
a node's workers; a lone ``refinery worker`` delivers its own callbacks.

Real processes throughout (redis-server, the S3 server, the node and the workers it
starts). On this machine there is no GPU, so the node runs one CPU model worker.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections import Counter

import psutil
import pytest
from standardwebhooks.webhooks import Webhook

from devstack.stack import TEST_CALLBACK_SECRET, LocalStack, wait_until
from producer.client import Client
from shared.contract import JobState

pytestmark = pytest.mark.integration

SIZE = 64
HOST = socket.gethostname()


def _node(stack: LocalStack, *args: str, env: dict[str, str] | None = None):
    return stack.spawn("node", [sys.executable, "-m", "cli", "node", *args], env)


def _live(stack: LocalStack) -> dict[str, dict[str, object]]:
    return Client(stack.settings).store.workers()


def _exited(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_node_serves_with_signed_callbacks_restarts_a_dead_worker_and_drains_on_sigterm(tmp_path, receiver):
    with LocalStack(tmp_path) as stack:
        node = _node(stack)
        client = Client(stack.settings)
        names = {f"cpu@{HOST}", f"callbacks@{HOST}"}
        wait_until(lambda: names <= set(_live(stack)), timeout_s=120, what="the node's workers", process=node)

        first = [
            client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE, callback_url=receiver.url)
            for s in range(3)
        ]
        records = [job.wait(120) for job in first]
        wait_until(lambda: len(receiver.received) >= 3, timeout_s=60, what="three callbacks")

        # A model worker killed outright comes back on its own.
        (model_worker,) = [
            p for p in psutil.Process(node.pid).children() if "--queues=generate,refine" in " ".join(p.cmdline())
        ]
        model_worker.kill()
        wait_until(
            lambda: any(
                "--queues=generate,refine" in " ".join(p.cmdline()) and p.pid != model_worker.pid
                for p in psutil.Process(node.pid).children()
            ),
            timeout_s=30,
            what="a new model worker",
        )
        after = client.submit_generate("portrait", seed=9, width=SIZE, height=SIZE).wait(120)

        in_flight = [client.submit_generate("portrait", seed=s, width=512, height=512) for s in range(4)]
        wait_until(
            lambda: any(client.status(j.job_id).state is JobState.running for j in in_flight),
            timeout_s=60,
            what="a job running",
        )
        children = psutil.Process(node.pid).children()
        stack.processes.pop("node").send_signal(signal.SIGTERM)
        status = node.wait(120)
        leftovers = [c for c in children if not _exited(c)]
        log = (stack.logs / "node.log").read_text()
        ended = Counter(client.status(j.job_id).state for j in in_flight)

    assert all(r.state is JobState.succeeded for r in records)
    for _, headers, body in receiver.received:
        Webhook(TEST_CALLBACK_SECRET).verify(body, headers)  # raises unless signed with the secret
    assert "restarting in" in log and "[cpu]" in log and "[callbacks]" in log
    assert after.state is JobState.succeeded and after.worker == f"cpu@{HOST}"
    assert status == 0, log[-3000:]
    assert leftovers == []
    # Drained: what ran finished, what waited went back to the queue; nothing failed.
    assert set(ended) <= {JobState.succeeded, JobState.queued}, ended


def test_node_gives_up_on_a_worker_that_keeps_dying(tmp_path):
    # A preset that does not exist: the worker exits at start, every time.
    with LocalStack(tmp_path) as stack:
        node = _node(
            stack, "--no-callbacks", env={"REFINERY_MODEL_PRESET": "no-such-preset", "REFINERY_NODE_MAX_CRASHES": "2"}
        )
        status = node.wait(120)
        log = (stack.logs / "node.log").read_text()

    assert status == 1
    # Status 2, the CLI's for bad input: the worker says why and exits, it does not abort
    # (-6 before: its parent-watching thread held stdin's lock as the interpreter ended).
    assert "cpu exited 2 times within 600 s (last status 2)" in log and "it stays down" in log
    assert "every worker gave up" in log


def test_lone_worker_delivers_its_callbacks_and_takes_them_down_with_it(tmp_path, receiver):
    with LocalStack(tmp_path) as stack:
        lone = stack.start_worker("lone", callbacks=True)
        client = Client(stack.settings)
        wait_until(lambda: "callbacks-lone@localstack" in _live(stack), timeout_s=60, what="the callbacks worker")
        record = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, callback_url=receiver.url).wait(
            120
        )
        _, headers, body = receiver.next()

        (sidecar,) = psutil.Process(lone.pid).children()
        lone.kill()
        # Orphaned, it is reaped by whoever adopts it, maybe later: exited is what counts.
        wait_until(lambda: _exited(sidecar), timeout_s=30, what="the callbacks worker to exit with its worker")

    assert record.state is JobState.succeeded
    assert Webhook(TEST_CALLBACK_SECRET).verify(body, headers)["type"] == "job.succeeded"
