"""Shared fixtures: one private stack (redis-server, moto S3 server, worker processes) per
test session, and a local HTTP server that records the callbacks it receives."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producer.client import Client
from producer.local_stack import LocalStack


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
    """Records every POST it receives: (path, headers, body)."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.put((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 60) -> tuple[str, dict[str, str], bytes]:
        return self.received.get(timeout=timeout)


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    r = CallbackReceiver()
    yield r
    r.server.shutdown()
