"""The failure classification: which shard failures are permanent (no Ray, real exceptions)."""

from __future__ import annotations

import errno

import pytest

from pipeline.io import StorageIOError
from pipeline.protocol import PERMANENT, Reason, failure_reason
from pipeline.shard.errors import ShardReadError


@pytest.mark.parametrize(("exc", "reason"), [
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), Reason.NOT_FOUND),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), Reason.NOT_FOUND),
    (PermissionError(errno.EACCES, "Permission denied"), Reason.PERMISSION),
    (ShardReadError("x.tar: not a readable tar: bad checksum"), Reason.SHARD_READ),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), Reason.SHARD_READ),
    (StorageIOError(errno.EIO, "reading x failed after 6 tries"), Reason.IO),
    (ConnectionResetError(errno.ECONNRESET, "reset"), Reason.IO),
    (RuntimeError("boom"), Reason.WORKER_ERROR),
])
def test_failure_reason(exc, reason):
    assert failure_reason(exc) is reason
    transient = {Reason.IO, Reason.WORKER_ERROR}
    assert (reason in PERMANENT) == (reason not in transient)


def test_only_not_found_permission_and_malformed_are_permanent():
    assert PERMANENT == {Reason.NOT_FOUND, Reason.PERMISSION, Reason.SHARD_READ}
    assert "not_found" in PERMANENT and "timeout" not in PERMANENT  # the strings results carry
