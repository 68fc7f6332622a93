"""Shared fixtures: one private stack (redis-server, moto S3 server, worker processes) per
test session, and a local HTTP server that records the callbacks it receives."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from devstack.stack import LocalStack
from producer.client import Client

# The files that take longest (seconds in one process, the suite's 2-core run in the working
# copy at 79e3eb5 on a slow day; docs/benchmarks.md, "The test suite's time"), first:
# `scripts/dev.sh test` runs two files at a time, and a long file started last keeps one
# process busy while the other has nothing left. The rest keep their order.
LONGEST_FIRST = (
    "test_refiner_life.py",  # 255
    "test_faults.py",  # 168
    "test_refiner_rollout.py",  # 76
    "test_gpu_script.py",  # 74
    "test_training.py",  # 66
    "test_node.py",  # 56
    "test_gateway_hostile.py",  # 37
    "test_monitoring.py",  # 35
    "test_failover.py",  # 34
    "test_drain.py",  # 32
    "test_demo.py",  # 29
    "test_evaluate.py",  # 27
    "test_gateway.py",  # 25
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the order is kept


def pytest_configure() -> None:
    # The test processes' own torch work is small networks (training steps, metrics, test
    # doubles), and two test files share the machine's two cores: two OpenMP threads there
    # spin at every barrier while the other file runs (a double's 150 training steps: 5 s
    # of CPU on one thread, 8-9 s on two alone, more beside another file). Worker processes
    # keep torch's default.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack")) as local:
        local.start_worker("worker")
        local.start_worker("callbacks", [local.settings.queue_callbacks])
        yield local


@pytest.fixture(scope="session")
def client(stack: LocalStack) -> Client:
    return Client(stack.settings)


class CallbackReceiver:
    """A local HTTP server recording every POST (and GET, so that a followed redirect shows):
    ``received`` (path, lower-cased headers, body) in arrival order, ``next`` to wait for the
    next of them, ``requests`` (bodies as text) for counting. It answers the first
    ``fail_first`` requests with 503, then ``status`` (with ``location`` as its Location
    header, if given), and waits ``delay_s`` before each answer."""

    def __init__(
        self, fail_first: int = 0, delay_s: float = 0.0, status: int = 204, location: str | None = None
    ) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.requests: list[str] = []
        self._unread: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with lock:
                    receiver.requests.append(body.decode())
                    receiver.received.append(request)
                    failing = len(receiver.requests) <= fail_first
                receiver._unread.put(request)
                time.sleep(delay_s)
                answer = 503 if failing else status
                self.send_response(answer)
                if location is not None and not failing:
                    self.send_header("Location", location)
                if answer != 204:
                    self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 60) -> tuple[str, dict[str, str], bytes]:
        return self._unread.get(timeout=timeout)


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., CallbackReceiver]]:
    """``make_receiver(fail_first=0, delay_s=0, status=204, location=None)``: receivers
    shut down after the test."""
    made: list[CallbackReceiver] = []

    def make(**behaviour: Any) -> CallbackReceiver:
        made.append(CallbackReceiver(**behaviour))
        return made[-1]

    yield make
    for receiver in made:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture
def receiver(make_receiver) -> CallbackReceiver:
    return make_receiver()
