"""A fault-injecting HTTP reverse proxy for S3 tests: 127.0.0.1 in front of a moto server.

Every request (method, path, query, headers including Host and Authorization, body) is
forwarded unchanged to the backend, so SigV4 signatures made for the proxy's address stay
valid; the response comes back unchanged unless a rule matches. A rule matches on method,
a regex searched in the URL path (percent-decoded) and optionally a query parameter that
must be present (``uploadId`` on a POST = CompleteMultipartUpload). Actions:

``slowdown``  503 with an S3 ``SlowDown`` XML error body (request not forwarded)
``error500``  500 with an S3 ``InternalError`` XML error body (request not forwarded)
``reset``     forward, send the headers and part of the body, then reset the connection (RST;
              an empty body: reset before any byte of the response)
``truncate``  forward, send the headers (full Content-Length) and part of the body, then close
``short``     forward, answer a self-consistent but short body (Content-Length = what is sent;
              ``strip_checksums=True`` also drops the object's checksum headers, so only the
              client's own size check can notice)
``delay``     wait ``delay`` seconds, then forward normally

``after_backend`` says whether the backend performs the request before the fault: by default
no for ``slowdown``/``error500`` (rejected up front) and yes for ``reset``/``truncate``/``short``
(the response is damaged); ``error500`` with ``after_backend=True`` is a lost response, and
``reset`` with ``after_backend=False`` a connection reset while the request is uploaded.
A rule lets its first ``skip`` matching requests through, applies to the next ``times``
(``None``: all of them) and counts those in ``hits``.

Bounded and self-stopping: daemon handler threads, idle keep-alive connections time out,
``stop()`` closes the listener and never waits for handlers.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

ACTIONS = ("slowdown", "error500", "reset", "truncate", "short", "delay")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "expect", "proxy-connection"}
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "error500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Rule:
    action: str
    method: str | None = None        # None: any method
    path: str = ""                   # regex searched in the decoded URL path ("" matches all)
    query: str | None = None         # a query parameter that must be present, e.g. "uploadId"
    times: int | None = 1            # first N matching requests; None: every one
    skip: int = 0                    # let this many matching requests through first
    delay: float = 0.0               # seconds, for "delay"
    keep: float = 0.5                # fraction of the body sent by "reset"/"truncate"/"short"
    after_backend: bool | None = None  # forward before the fault (default: see the module doc)
    strip_checksums: bool = False    # drop x-amz-checksum-* response headers (as S3 does on ranged GETs)
    on_hit: Callable[[str, str], None] | None = None  # called (method, target) before the fault acts
    hits: int = 0                    # matching requests the fault was applied to
    seen: int = 0                    # matching requests, skipped ones included
    log: list[str] = field(default_factory=list)  # "METHOD path?query" of each hit

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {ACTIONS}")
        self._re = re.compile(self.path)
        if self.after_backend is None:
            self.after_backend = self.action not in ("slowdown", "error500")

    def matches(self, method: str, path: str, query: dict[str, list[str]]) -> bool:
        if self.method is not None and method != self.method.upper():
            return False
        if self.query is not None and self.query not in query:
            return False
        return self._re.search(path) is not None


@dataclass
class Exchange:
    method: str
    target: str
    status: int | None
    fault: str | None
    at: float


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end by themselves
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    # every method goes the same way
    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _serve(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query, keep_blank_values=True)
        rule = proxy._claim(self.command, path, query, self.path)
        action = rule.action if rule else None
        if rule is not None and rule.on_hit is not None:
            try:
                rule.on_hit(self.command, self.path)
            except Exception as e:  # noqa: BLE001 - reported, never breaks the exchange
                proxy.hook_errors.append(f"{type(e).__name__}: {e}")
        if action == "delay":
            proxy._stopping.wait(rule.delay)
        if rule is not None and not rule.after_backend and action != "delay":
            proxy._record(self.command, self.path, None, f"{action} before backend")
            if action in _ERRORS:
                return self._send_error(action)
            return self._abort(reset=action == "reset")
        try:
            status, reason, headers, data = self._forward(body)
        except OSError as e:
            proxy._record(self.command, self.path, 502, f"backend: {e}")
            return self._send_error("error500")
        if action in _ERRORS:
            proxy._record(self.command, self.path, _ERRORS[action][0], f"{action} after backend {status}")
            return self._send_error(action)
        proxy._record(self.command, self.path, status, action)
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        if rule is not None and rule.strip_checksums:
            headers = [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum")]
        if action in ("reset", "truncate", "short") and not no_body:
            cut = max(0, min(len(data) - 1, int(len(data) * rule.keep)))
            if action == "short":
                self._start(status, reason, headers, cut)
                self.wfile.write(data[:cut])
                return
            if not data:
                return self._abort(reset=action == "reset")
            self._start(status, reason, headers, len(data))
            self.wfile.write(data[:cut])
            self.wfile.flush()
            return self._abort(reset=action == "reset")
        if action in ("reset", "truncate"):  # nothing to cut: drop the connection instead of answering
            return self._abort(reset=action == "reset")
        self._start(status, reason, headers, None if no_body else len(data))
        if not no_body:
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        host, port = self.server.proxy.backend
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    conn.putheader(k, v)  # Host and Authorization as signed by the client
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _start(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        for k, v in headers:
            low = k.lower()
            if low in HOP_BY_HOP or (length is not None and low == "content-length"):
                continue
            lines.append(f"{k}: {v}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _send_error(self, action: str) -> None:
        status, reason, code, message = _ERRORS[action]
        rid = uuid.uuid4().hex[:16].upper()
        xml = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{rid}</RequestId>"
               f"<HostId>{rid}</HostId></Error>").encode()
        self._start(status, reason, [("Content-Type", "application/xml"), ("x-amz-request-id", rid)], len(xml))
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _abort(self, reset: bool) -> None:
        """Close the client connection now: RST (linger 0) or an orderly FIN, mid-body either way."""
        self.close_connection = True
        sock = self.connection
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for f in (self.wfile, self.rfile):
            try:
                f.close()
            except OSError:
                pass
        sock.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    proxy: S3FaultProxy

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away mid-exchange is expected here


class S3FaultProxy:
    """``S3FaultProxy(backend_url).start()``; ``.url`` is the endpoint to give s3fs/botocore."""

    def __init__(self, backend_url: str, history: int = 10_000) -> None:
        u = urlsplit(backend_url)
        self.backend = (u.hostname or "127.0.0.1", u.port or 80)
        self.rules: list[Rule] = []
        self.exchanges: deque[Exchange] = deque(maxlen=history)
        self.hook_errors: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "proxy not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3FaultProxy:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ rules
    def add(self, action: str, **kw: object) -> Rule:
        rule = Rule(action, **kw)  # type: ignore[arg-type]
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.exchanges.clear()

    def _claim(self, method: str, path: str, query: dict[str, list[str]], target: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if (rule.times is None or rule.hits < rule.times) and rule.matches(method, path, query):
                    rule.seen += 1
                    if rule.seen <= rule.skip:
                        continue
                    rule.hits += 1
                    rule.log.append(f"{method} {target}")
                    return rule
        return None

    def _record(self, method: str, target: str, status: int | None, fault: str | None) -> None:
        with self._lock:
            self.exchanges.append(Exchange(method, target, status, fault, time.monotonic()))

    def requests(self, method: str | None = None, path: str = "") -> list[Exchange]:
        """Exchanges seen so far (optionally of one method, path regex searched in the target)."""
        rx = re.compile(path)
        with self._lock:
            return [e for e in self.exchanges
                    if (method is None or e.method == method) and rx.search(unquote(e.target))]
