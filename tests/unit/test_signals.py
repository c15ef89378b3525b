"""The SIGTERM trap: installed for a block, the previous handler back after it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.signals import RunStopped, raise_stopped, trap_sigterm


def test_trap_sigterm_installs_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with trap_sigterm(raise_stopped):
        assert signal.getsignal(signal.SIGTERM) is raise_stopped
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as ray.init replaces it
        with pytest.raises(RunStopped, match="stopped by SIGTERM") as e:
            with trap_sigterm(raise_stopped):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by the handler's exception
        assert e.value.exit_status == 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is before
