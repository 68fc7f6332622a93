"""An HTTP pass-through in front of moto's S3 server, for benchmarks: the endpoint every
client is given. It counts requests by method, reports each object S3 stored (``stored``,
for a subclass), and plays an outage: new connections refused, open ones closed unanswered,
while moto keeps its objects (stopping moto would lose them all, which no real outage does).

    proxy = S3Proxy()
    stack = LocalStack(workdir, s3_endpoint_url=f"http://127.0.0.1:{proxy.port}")
    proxy.upstream_port = stack.s3_port
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from devstack.stack import free_port

# Hop-by-hop or recomputed: never copied from one side to the other.
_REQUEST_SKIP = ("host", "content-length", "expect")
_REPLY_SKIP = ("content-length", "transfer-encoding", "connection", "content-encoding")


class S3Proxy:
    def __init__(self) -> None:
        self.port = free_port()
        self.upstream_port = 0  # moto's, once the stack has started it
        self.counts: Counter[str] = Counter()
        self.down = threading.Event()
        self._lock = threading.Lock()
        self._upstream = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64))
        self._server: ThreadingHTTPServer | None = None
        self.open()

    def stored(self, path: str, body: bytes) -> None:
        """An object S3 answered a PUT of with success (``path``: /<bucket>/<key>)."""

    def take(self) -> Counter[str]:
        """The requests by method since the last call."""
        with self._lock:
            taken = Counter(self.counts)
            self.counts.clear()
        return taken

    def outage(self, seconds: float) -> None:
        """S3 unreachable for ``seconds``: the listening socket closed, open connections cut."""
        self.down.set()
        self.close()
        time.sleep(seconds)
        self.down.clear()
        self.open()

    def open(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 answers boto3's "Expect: 100-continue" at once (1.0 makes it wait a second).
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                if proxy.down.is_set():
                    self.close_connection = True  # closed unanswered: what a dying server does
                    return
                body = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                with proxy._lock:
                    proxy.counts[self.command] += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _REQUEST_SKIP}
                url = f"http://127.0.0.1:{proxy.upstream_port}{self.path}"
                try:
                    reply = proxy._upstream.request(self.command, url, content=body, headers=headers)
                except httpx.HTTPError:
                    self.close_connection = True
                    return
                if self.command == "PUT" and reply.status_code == 200:
                    proxy.stored(self.path.split("?", 1)[0], body)
                self.send_response(reply.status_code)
                for name, value in reply.headers.items():
                    if name.lower() not in _REPLY_SKIP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.content)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, *_: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that went away mid-request (an outage cut it)

        self._server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
