"""The io layer's backoff: delays double per retry up to the cap, jitter stays in its bounds,
and `with_retries` really waits those growing delays between tries."""

from __future__ import annotations

import errno
import random

import pytest

from pipeline import io as pio

POLICY = pio.RetryPolicy(retries=6, backoff=0.5, backoff_max=10.0)


def _base(retry: int) -> float:
    """The documented un-jittered delay: backoff * 2**(n-1), capped at backoff_max."""
    return min(POLICY.backoff * 2 ** (retry - 1), POLICY.backoff_max)


def test_same_jitter_delays_double_until_the_cap():
    """With the jitter drawn from one seed, delay(n+1) = 2 x delay(n) while uncapped, then flat."""
    for seed in range(20):
        delays = []
        for n in range(1, 9):
            random.seed(seed)
            delays.append(POLICY.delay(n))
        jitter = delays[0] / _base(1)
        for n, d in enumerate(delays, start=1):
            assert d == pytest.approx(_base(n) * jitter, rel=1e-12), (seed, n, delays)
        uncapped = [d for n, d in enumerate(delays, start=1) if POLICY.backoff * 2 ** n <= POLICY.backoff_max]
        assert all(b == pytest.approx(2 * a) for a, b in zip(uncapped, uncapped[1:], strict=False)), delays
        assert delays[-1] == delays[-2] <= 1.5 * POLICY.backoff_max  # capped


def test_jitter_bounds_and_average_growth():
    """Over many draws each delay(n) lies in [0.5, 1.5) x its base and the mean roughly doubles."""
    rng_state = random.getstate()
    try:
        random.seed(1234)
        means = []
        for n in range(1, 6):
            draws = [POLICY.delay(n) for _ in range(400)]
            assert min(draws) >= 0.5 * _base(n) and max(draws) < 1.5 * _base(n), n
            assert max(draws) - min(draws) > 0.5 * _base(n)  # there is jitter at all
            means.append(sum(draws) / len(draws))
        for n in range(1, 5):
            if _base(n + 1) < POLICY.backoff_max:
                assert means[n] > 1.7 * means[n - 1], means
    finally:
        random.setstate(rng_state)


def test_with_retries_sleeps_growing_delays(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(pio.time, "sleep", slept.append)  # record instead of waiting
    tries = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) <= 4:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return "ok"

    assert pio.with_retries(flaky, "reading x", POLICY) == "ok"
    assert len(tries) == 5 and len(slept) == 4
    for n, s in enumerate(slept, start=1):
        assert 0.5 * _base(n) <= s < 1.5 * _base(n), (n, slept)
    assert slept[3] > slept[0]  # 8x the base: larger whatever the jitter


def test_permanent_errors_are_not_retried(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(pio.time, "sleep", slept.append)
    with pytest.raises(FileNotFoundError):
        pio.with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "reading x", POLICY)
    assert slept == []


def test_storage_layers_are_bounded_by_default():
    """botocore's attempts x s3fs's tries x this module's tries: 3 x 1 x 4 = 12 requests at most
    per operation (was 5 x 2 x 4 = 40); a user's botocore retry config replaces ours."""
    opts = pio.StorageOptions()
    fs, _ = pio.get_fs("s3://bkt/k", opts)
    assert fs.retries == pio.S3FS_TRIES == 1
    assert fs.config_kwargs["retries"] == {"total_max_attempts": pio.BOTO_ATTEMPTS} and pio.BOTO_ATTEMPTS == 3
    assert opts.retry.tries == 4 and pio.BOTO_ATTEMPTS * pio.S3FS_TRIES * opts.retry.tries == 12
    mine = pio.StorageOptions({"s3": {"config_kwargs": {"retries": {"mode": "adaptive"}}, "retries": 2}})
    fs, _ = pio.get_fs("s3://bkt/k", mine)
    assert fs.config_kwargs == {"retries": {"mode": "adaptive"}} and fs.retries == 2
    assert mine.options["s3"]["config_kwargs"] == {"retries": {"mode": "adaptive"}}  # not mutated


def _scheduler(tmp_path, **kw):
    from pipeline.config import JobConfig
    from pipeline.driver import _Scheduler
    from pipeline.protocol import ShardTask
    from pipeline.summary import Progress, Summary

    cfg = JobConfig(inputs=(str(tmp_path / "a.tar"),), output=str(tmp_path / "out"), model="wintok-tiny",
                    progress=False, **kw)
    s = _Scheduler(cfg, pio.Storage(cfg.output), pio.StorageOptions(), {}, [ShardTask(cfg.inputs[0], "a", 1)],
                   Summary())
    s.bars = Progress(1, enabled=False)
    return s


def test_shard_retries_wait_the_one_backoff_then_fail_for_good(tmp_path, monkeypatch):
    """The driver's shard retries use `RetryPolicy.delay` (built from --max-retries /
    --retry-backoff / retry_backoff_max), the same formula as the storage layer."""
    from pipeline.layout import failed_rel
    from pipeline.protocol import Reason, ShardResult

    s = _scheduler(tmp_path, max_retries=2, retry_backoff=3.0, retry_backoff_max=5.0)
    assert s.retry == pio.RetryPolicy(retries=2, backoff=3.0, backoff_max=5.0)
    monkeypatch.setattr("pipeline.driver.time.monotonic", lambda: 1000.0)
    task = s.todo.popleft()
    for attempt in (1, 2):
        random.seed(attempt)
        expected = s.retry.delay(attempt)
        random.seed(attempt)
        s._handle(task, ShardResult.failed("a", Reason.IO, "reset"))
        (when, task), = s.delayed
        s.delayed.clear()
        assert task.attempt == attempt + 1 and when == pytest.approx(1000.0 + expected)
        assert 0.5 * min(3.0 * 2 ** (attempt - 1), 5.0) <= expected < 1.5 * min(3.0 * 2 ** (attempt - 1), 5.0)
    s._handle(task, ShardResult.failed("a", Reason.IO, "reset"))  # attempt 3 = max_retries + 1: recorded
    assert not s.delayed and s.summary.failed == 1 and s.storage.exists(failed_rel("a"))
    s2 = _scheduler(tmp_path, max_retries=2)
    s2._handle(s2.todo.popleft(), ShardResult.failed("a", Reason.NOT_FOUND, "gone"))  # permanent: no backoff
    assert not s2.delayed and s2.summary.failed == 1
