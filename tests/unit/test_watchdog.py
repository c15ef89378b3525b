"""The watchdog's verdicts, with the time passed in (no Ray)."""

from __future__ import annotations

import pytest

from pipeline.watchdog import Watchdog


def test_stalled_only_after_timeout_without_progress():
    w = Watchdog(timeout=10, interval=1)
    w.started(0, now=100)
    w.seen(0, 5, now=101)
    assert w.stalled({0}, now=109) == {}
    w.seen(0, 7, now=109)  # it moved: its clock restarts
    assert w.stalled({0}, now=118) == {}
    w.seen(0, 7, now=118)  # the same value: no progress
    assert w.stalled({0}, now=119.5) == {0: pytest.approx(10.5)}


def test_a_new_shard_restarts_the_clock_and_idle_slots_never_stall():
    w = Watchdog(timeout=10, interval=1)
    w.started(0, now=0)
    w.seen(0, 3, now=1)
    w.started(0, now=9)  # the shard before it returned; the counter has not moved yet
    assert w.stalled({0}, now=15) == {}
    assert w.stalled({0}, now=19.5) == {0: pytest.approx(10.5)}
    assert w.stalled(set(), now=1000) == {}  # slot 0 holds no shard: not stalled whatever its clock
    w.forget(0)
    assert w.stalled({0}, now=1000) == {}  # a replaced worker starts from now
    assert w.stalled({0}, now=1011) == {0: pytest.approx(11)}


def test_probes_are_rate_limited():
    w = Watchdog(timeout=600)
    assert w.interval == 10.0  # bounded, however long the timeout
    assert Watchdog(timeout=3).interval == 0.75
    assert w.probe_due(0) and not w.probe_due(5) and w.probe_due(10)


def test_shard_timeout_option():
    from pipeline.cli import _job_from_args, build_parser
    from pipeline.config import JobConfig, JobConfigError

    assert JobConfig(model="wintok-tiny").shard_timeout == 600
    a = build_parser().parse_args(["tokenize", "in.tar", "out", "--model", "wintok-tiny", "--shard-timeout", "2.5"])
    assert _job_from_args(a, teacher_only=False).shard_timeout == 2.5
    for bad in (0, -1):
        with pytest.raises(JobConfigError, match="shard_timeout"):
            JobConfig(model="wintok-tiny", shard_timeout=bad)
