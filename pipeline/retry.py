"""Retrying: the one backoff formula, and which storage errors are worth another try.

`RetryPolicy` is the project's one retry policy: `retries` extra tries after the first, the
n-th retry waiting `delay(n)` = min(backoff * 2**(n-1), backoff_max) times a jitter factor in
[0.5, 1.5). The storage layer retries each operation under one (`with_retries`, and
`io.ResilientInput` per read position); the driver builds one from `--max-retries` /
`--retry-backoff` / `retry_backoff_max` for shard retries and for workers that die while
starting. How the storage layers add up per operation: see pipeline/io.py's docstring.

`is_transient` says which errors a retry can help: throttling, 5xx, connection resets,
timeouts, truncated or checksum-failing bodies, short reads. Not found, access denied, bad
requests, TLS errors and an input that changed while it was read are persistent.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from .urls import redact_text

log = logging.getLogger("wintok")
T = TypeVar("T")


class StorageIOError(OSError):
    """A storage operation failed for good (a transient error that outlived its retries)."""


class ShortReadError(StorageIOError):
    """An input stream ended before the object's size: never taken as the end of the data."""


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` extra tries after the first; the n-th waits `delay(n)` seconds (see the module)."""

    retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 10.0

    @property
    def tries(self) -> int:
        return self.retries + 1

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (1 for the first): the project's one backoff formula."""
        return min(self.backoff * 2 ** (retry - 1), self.backoff_max) * (0.5 + random.random())


TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequestsException", "ProvisionedThroughputExceededException",
                   "BandwidthLimitExceeded", "RequestThrottled", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "OperationAborted",
                   # an upload body damaged or cut in transit: sending it again is the fix
                   "XAmzContentSHA256Mismatch", "BadDigest", "IncompleteBody"}
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
PERSISTENT_NAMES = {"SSLError", "SSLCertVerificationError", "ClientSSLError", "ClientConnectorSSLError",
                    "ClientConnectorCertificateError", "FileExpired"}
TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT,
                    errno.EAGAIN, errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [TimeoutError, ConnectionError, ShortReadError]
    try:
        import botocore.exceptions as bx

        types += [bx.HTTPClientError, bx.ConnectionError, bx.IncompleteReadError]
        # a body that does not match its checksum (e.g. cut short with a consistent length)
        types += [getattr(bx, n) for n in ("FlexibleChecksumError", "ChecksumError") if hasattr(bx, n)]
    except ImportError:  # pragma: no cover - only with s3fs
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from http.client import IncompleteRead

        from fsspec.exceptions import FSTimeoutError

        types += [IncompleteRead, FSTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from urllib3.exceptions import ProtocolError

        types.append(ProtocolError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT: tuple[type[BaseException], ...] | None = None


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__


def service_error(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) of a botocore ClientError in exc's cause chain."""
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return (int(status) if status else None), resp["Error"].get("Code")
    return None, None


def is_transient(exc: BaseException, *, upload: bool = False) -> bool:
    """True for errors worth retrying: throttling, 5xx, resets, timeouts, short reads.

    Not found, access denied, bad requests, TLS errors and an input that changed while it
    was read are persistent. With `upload=True` a vanished multipart upload (NoSuchUpload,
    e.g. after a lost CompleteMultipartUpload response) is retried too: the whole upload
    is redone under the same key.
    """
    global _TRANSIENT
    if _TRANSIENT is None:
        _TRANSIENT = _transient_types()
    status, code = service_error(exc)
    if code is not None or status is not None:
        if upload and code == "NoSuchUpload":
            return True
        return code in TRANSIENT_CODES or status in TRANSIENT_STATUS
    for e in _chain(exc):
        if type(e).__name__ in PERSISTENT_NAMES:
            return False
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, _TRANSIENT):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
    return False


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy, *, upload: bool = False) -> T:
    """fn() with transient errors retried under `policy`; the last error is raised as an OSError."""
    retry = 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified right here
            if not is_transient(e, upload=upload):
                raise
            if retry >= policy.retries:
                err = StorageIOError(getattr(e, "errno", None) or errno.EIO,
                                     f"{what} failed after {retry + 1} tries: {type(e).__name__}: "
                                     f"{redact_text(str(e))}")
                raise err from e
            retry += 1
            wait = policy.delay(retry)
            log.warning("transient storage error on %s (try %d of %d), retrying in %.2fs: %s: %s",
                        what, retry, policy.tries, wait, type(e).__name__, redact_text(str(e))[:300])
            time.sleep(wait)
