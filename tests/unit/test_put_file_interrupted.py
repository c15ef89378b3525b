"""A local `Storage.put_file` interrupted midway never leaves a partial destination.

The copy is cut deterministically by the kernel, with no mock: a child process runs
`put_file` of a 4 MiB file under RLIMIT_FSIZE = 1 MiB, so the write that crosses 1 MiB
either kills the process (SIGXFSZ, its default action: a process killed mid-copy, no
cleanup runs) or fails with EFBIG (SIGXFSZ ignored: put_file sees an I/O error). Either way
the destination must still hold the old complete content (or be absent if there was none).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMIT = 1 << 20
NEW_SIZE = 4 << 20

CHILD = textwrap.dedent("""
    import resource, signal, sys
    from pipeline.io import Storage
    out, src, rel, limit, mode = sys.argv[1:]
    storage = Storage(out)  # created before the limit: nothing else is written after it
    # Python ignores SIGXFSZ at startup (the write then fails with EFBIG); "killed" restores the
    # default action, which terminates the process at the write that crosses the limit
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL if mode == "killed" else signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
    try:
        storage.put_file(src, rel)
    except OSError as e:
        print("put_file raised", type(e).__name__, e.errno)
        sys.exit(3)
    print("put_file returned")
""")


def _put_limited(out: str, src: str, rel: str, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", CHILD, out, src, rel, str(LIMIT), mode], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def new_file(tmp_path) -> tuple[str, bytes]:
    data = os.urandom(NEW_SIZE)
    path = tmp_path / "new.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.mark.parametrize("mode", ["killed", "error"])
@pytest.mark.parametrize("old", [b"old complete content\n" * 10, None], ids=["replace", "create"])
def test_interrupted_local_put_leaves_old_or_nothing(tmp_path, new_file, mode, old):
    out = tmp_path / "out"
    dest = out / "shards" / "00000.parquet"
    dest.parent.mkdir(parents=True)
    if old is not None:
        dest.write_bytes(old)
    proc = _put_limited(str(out), new_file[0], "shards/00000.parquet", mode)
    if mode == "killed":
        assert proc.returncode == -signal.SIGXFSZ, (proc.returncode, proc.stdout, proc.stderr)
    else:
        assert proc.returncode == 3 and "put_file raised" in proc.stdout, (proc.stdout, proc.stderr)
    # the copy really was cut: nothing of the new content made it whole
    if old is None:
        assert not dest.exists(), f"a partial destination of {dest.stat().st_size} bytes is visible"
    else:
        assert dest.read_bytes() == old, f"destination changed to {dest.stat().st_size} bytes"
    left = [p.name for p in dest.parent.iterdir() if p.name != dest.name]
    if mode == "error":  # put_file removes its temporary file when the copy fails
        assert left == []
    # a retry without the limit then makes the new content visible whole
    from pipeline.io import Storage

    Storage(str(out)).put_file(new_file[0], "shards/00000.parquet")
    assert dest.read_bytes() == new_file[1]
