"""moto S3 behind a request-counting proxy, in its own process (so that neither costs the
driver's CPU): `python -m benchmarks.scale.s3server` prints the proxy's URL, then answers
``counts`` (JSON: requests by type and by top-level prefix) and ``reset`` lines on stdin.

The proxy is the fault tests' (tests/faults/s3proxy.py) with its history replaced by counters.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from urllib.parse import parse_qs, unquote, urlsplit

from moto.server import ThreadedMotoServer

from tests.faults.s3proxy import S3FaultProxy


def kind(method: str, target: str) -> str:
    """LIST / HEAD / GET / PUT / DELETE / POST of one S3 request, as a bucket bills it."""
    query = parse_qs(urlsplit(target).query, keep_blank_values=True)
    if method == "GET" and ("list-type" in query or "prefix" in query or "delimiter" in query):
        return "LIST"
    return method


def prefix(target: str) -> str:
    """The key's first component below OUTPUT (`_manifest`, `shards`, `_lease.json` ...)."""
    parts = unquote(urlsplit(target).path).lstrip("/").split("/")
    if len(parts) <= 1:  # the bucket itself: a listing, its prefix in the query
        q = parse_qs(urlsplit(target).query).get("prefix", [""])[0].split("/")
        return "list:" + (q[1] if len(q) > 1 and q[1] else q[0])
    return parts[2] if len(parts) > 2 and parts[1] in ("out",) else parts[1]


class CountingProxy(S3FaultProxy):
    def __init__(self, backend_url: str) -> None:
        super().__init__(backend_url, history=1)
        self.by_kind: Counter[str] = Counter()
        self.by_prefix: Counter[str] = Counter()

    def _record(self, method: str, target: str, status: int | None, fault: str | None) -> None:
        k = kind(method, target)
        with self._lock:
            self.by_kind[k] += 1
            self.by_prefix[f"{k} {prefix(target)}"] += 1


def main() -> None:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto._server.server_address[:2]  # port 0: the one it got
    proxy = CountingProxy(f"http://{host}:{port}").start()
    print(proxy.url, f"http://{host}:{port}", flush=True)  # counted, and moto itself (for seeding)
    lock = threading.Lock()
    for line in sys.stdin:
        cmd = line.strip()
        with lock, proxy._lock:
            if cmd == "counts":
                print(json.dumps({"by_kind": proxy.by_kind, "by_prefix": proxy.by_prefix}), flush=True)
            elif cmd == "reset":
                proxy.by_kind.clear()
                proxy.by_prefix.clear()
                print("{}", flush=True)
    proxy.stop()
    moto.stop()


if __name__ == "__main__":
    main()
