"""An object store that fails: an HTTP proxy on 127.0.0.1 in front of moto's S3 server that injects faults.

Clients (s3fs, deltalake's object_store) are pointed at the proxy's endpoint instead of the server's. Each request
that matches a rule (a method and a path pattern) is, at the rule's rate, answered by a fault instead of the
server; the decisions come from one seeded RNG, so a run's sequence of decisions is reproducible. The faults:

- `slowdown`: 503 with S3's `SlowDown` XML error body, what S3 answers when throttling; the server never sees it.
- `reset`: the connection is reset (RST) once the request has been read; the server never sees it.
- `cut`: the request is forwarded (the server applies it) and the connection is reset after the response's status
  line: the client cannot tell whether its write happened.
- `stall`: nothing is answered for `stall_s` seconds (longer than the client's timeout), then the connection is
  closed; the server never sees it.

The proxy runs on threads of the process that starts it: the processes under test (embed, query) are others, so a
client that holds its interpreter's lock while it waits on S3 (deltalake does) cannot stall the proxy.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import sys
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("slowdown", "reset", "cut", "stall")
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)
# Headers that describe one hop's connection, not the message: never forwarded.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_UPSTREAM_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FaultRule:
    """Which requests fail, how often and how.

    Attributes:
        rate: the share of matching requests that fail (0 to 1).
        kinds: the faults to draw from (`KINDS`), uniformly.
        method: a regular expression the request's method must match in full (None: any).
        path: a regular expression searched in the request's path, query string excluded (None: any).
    """

    rate: float
    kinds: tuple[str, ...] = KINDS
    method: str | None = None
    path: str | None = None

    def matches(self, method: str, path: str) -> bool:
        """Whether a request falls under this rule."""
        return (self.method is None or re.fullmatch(self.method, method) is not None) and (
            self.path is None or re.search(self.path, path) is not None
        )


# The request classes the fault matrix targets (path-style requests: /<bucket>/<key>).
AUDIO_READS = {"method": "GET|HEAD", "path": r"/catalog/audio/"}
STAGING_WRITES = {"method": "PUT|POST", "path": r"/_staging/"}
COMMITS = {"method": "PUT|GET|HEAD", "path": r"/_delta_log/"}
TABLE_READS = {"method": "GET|HEAD", "path": r"/(embeddings|windows|failures|runs|labels)/"}


class FaultProxy:
    """A fault-injecting proxy to an S3 endpoint, on a free loopback port.

    Args:
        upstream: the server's URL (`http://127.0.0.1:<port>`).
        seed: seeds the decisions.
        stall_s: how long a `stall` holds a request before closing its connection.

    Use as a context manager; `endpoint` is the URL clients use. `injected` counts the faults by kind, `matched` the
    requests a rule matched, `requests` every request seen.
    """

    def __init__(self, upstream: str, seed: int = 0, stall_s: float = 5.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.stall_s = stall_s
        self.rules: tuple[FaultRule, ...] = ()
        self.injected: Counter[str] = Counter()
        self.matched = 0
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy")

    @property
    def endpoint(self) -> str:
        """The URL clients reach the store through."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_rules(self, *rules: FaultRule) -> None:
        """Fail requests by `rules` from now on (the first matching rule decides); none: forward everything."""
        with self._lock:
            self.rules = rules

    def decide(self, method: str, path: str) -> str | None:
        """The fault for one request, or None to forward it; counts it."""
        with self._lock:
            self.requests += 1
            rule = next((r for r in self.rules if r.matches(method, path)), None)
            if rule is None:
                return None
            self.matched += 1
            if self._rng.random() >= rule.rate:
                return None
            kind = self._rng.choice(rule.kinds)
            self.injected[kind] += 1
            return kind

    def stall(self) -> None:
        """Hold a stalled request for `stall_s`, or until the proxy closes."""
        self._closing.wait(self.stall_s)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()  # stalls end now rather than after stall_s
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """Say nothing of a client that hung up (it gave up on a stalled or cut request, as it should); report
        anything else as the base class does."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            pass  # a request line per request would drown the test's output

        def _relay(self) -> None:
            body = self._body()
            path = urllib.parse.urlsplit(self.path).path
            fault = proxy.decide(self.command, path)
            if fault == "slowdown":
                self._answer(503, SLOWDOWN_BODY, {"Content-Type": "application/xml", "Retry-After": "1"})
                return
            if fault == "reset":
                self._reset()
                return
            if fault == "stall":
                proxy.stall()
                self.close_connection = True
                return
            status, reason, headers, payload = self._forward(body)
            if fault == "cut":
                self.wfile.write(f"HTTP/1.1 {status} {reason}\r\n".encode())
                self.wfile.flush()
                self._reset()
                return
            self._answer(status, payload, headers, reason)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=_UPSTREAM_TIMEOUT_S)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
                return response.status, response.reason, kept, payload
            finally:
                upstream.close()

        def _answer(self, status: int, payload: bytes, headers, reason: str | None = None) -> None:
            self.send_response(status, reason)
            pairs = headers.items() if isinstance(headers, dict) else headers
            for key, value in pairs:
                if key.lower() != "content-length":
                    self.send_header(key, value)
            # A HEAD's answer declares the object's length but carries no body.
            length = dict((k.lower(), v) for k, v in pairs).get("content-length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _reset(self) -> None:
            # SO_LINGER with a zero timeout makes close() send RST: the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    return Handler

