"""Shared fixtures: one private stack (redis-server, moto S3 server, worker processes) per
test session, and a local HTTP server that records the callbacks it receives."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from devstack.stack import LocalStack
from producer.client import Client


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of small CPU networks: the machine's two cores are shared, and two
    OpenMP threads competing with other processes can spin for seconds at each barrier;
    one thread runs tiny networks steadily."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """A local HTTP server recording every POST: ``received`` (path, headers, body) for
    ``next``, ``requests`` (bodies as text) for counting. It answers the first
    ``fail_first`` requests with 503 and waits ``delay_s`` before each answer."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.received: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
        self.requests: list[str] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    receiver.requests.append(body.decode())
                    failing = len(receiver.requests) <= fail_first
                receiver.received.put((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(delay_s)
                self.send_response(503 if failing else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 60) -> tuple[str, dict[str, str], bytes]:
        return self.received.get(timeout=timeout)


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., CallbackReceiver]]:
    """``make_receiver(fail_first=0, delay_s=0)``: receivers shut down after the test."""
    made: list[CallbackReceiver] = []

    def make(**behaviour: float) -> CallbackReceiver:
        made.append(CallbackReceiver(**behaviour))
        return made[-1]

    yield make
    for receiver in made:
        receiver.server.shutdown()


@pytest.fixture
def receiver(make_receiver) -> CallbackReceiver:
    return make_receiver()
