"""The one retry policy (pipeline/core/retry.py), tested once for every caller: bounded
tries, full-jitter exponential backoff, a predicate for what is retryable, Retry-After
hints, and the same behaviour sync and async. No test sleeps: pauses are recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis

from pipeline.core.retry import (
    RetryPolicy,
    backoff_ceiling_s,
    retry_call,
    retry_call_async,
    retry_on_conflict,
)


class Flaky:
    """Fails with ``errors`` in turn (one per call), then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def _sync(fn: Callable[[], Any], sleep: Callable[[float], None], **kw: Any) -> Any:
    return retry_call(fn, sleep=sleep, **kw)


def _async(fn: Callable[[], Any], sleep: Callable[[float], None], **kw: Any) -> Any:
    async def call() -> Any:
        return fn()

    async def pause(seconds: float) -> None:
        sleep(seconds)

    return asyncio.run(retry_call_async(call, sleep=pause, **kw))


@pytest.fixture(params=[_sync, _async], ids=["sync", "async"])
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """retry_call or retry_call_async (run to completion): every policy test runs on both."""
    return request.param


POLICY = RetryPolicy(max_tries=4, base_s=0.05, cap_s=2.0)


def test_returns_the_first_success(run):
    pauses: list[float] = []
    first = Flaky()
    assert run(first, pauses.append, policy=POLICY) == "done"
    assert first.calls == 1 and pauses == []

    later = Flaky(OSError("a"), OSError("b"))
    assert run(later, pauses.append, policy=POLICY) == "done"
    assert later.calls == 3 and len(pauses) == 2


def test_only_what_retryable_accepts_is_retried(run):
    pauses: list[float] = []
    only_os = {"retryable": lambda exc: isinstance(exc, OSError)}

    assert run(Flaky(OSError("x")), pauses.append, policy=POLICY, **only_os) == "done"
    refused = Flaky(ValueError("bad input"), OSError("never reached"))
    with pytest.raises(ValueError, match="bad input"):
        run(refused, pauses.append, policy=POLICY, **only_os)
    assert refused.calls == 1 and len(pauses) == 1  # raised at once, no pause for it


def test_gives_up_after_max_tries_with_the_last_error(run):
    pauses: list[float] = []
    down = Flaky(*(OSError(f"try {n}") for n in range(10)))
    with pytest.raises(OSError, match="try 3"):
        run(down, pauses.append, policy=POLICY)
    assert down.calls == POLICY.max_tries and len(pauses) == POLICY.max_tries - 1

    once = Flaky(OSError("only"))
    with pytest.raises(OSError, match="only"):
        run(once, pauses.append, policy=RetryPolicy(max_tries=1))
    assert once.calls == 1


def test_pauses_are_full_jitter_under_a_doubling_capped_ceiling(run):
    policy = RetryPolicy(max_tries=9, base_s=0.05, cap_s=2.0)
    ceilings = [backoff_ceiling_s(n, base_s=0.05, cap_s=2.0) for n in range(8)]
    assert ceilings == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    by_attempt: list[list[float]] = [[] for _ in ceilings]
    for _ in range(300 if run is _sync else 100):
        pauses: list[float] = []
        with pytest.raises(OSError):
            run(Flaky(*[OSError()] * 9), pauses.append, policy=policy)
        for attempt, pause in enumerate(pauses):
            by_attempt[attempt].append(pause)

    for attempt, draws in enumerate(by_attempt):
        assert all(0.0 <= p <= ceilings[attempt] for p in draws), attempt
    for attempt in range(1, 7):  # the ceiling grows: later pauses exceed earlier ceilings
        assert max(by_attempt[attempt]) > ceilings[attempt - 1], attempt
    assert min(by_attempt[6]) < 0.5  # full jitter: short pauses stay possible at the cap


def test_a_hint_overrides_the_pause_but_is_capped(run):
    hints = iter([0.7, 60.0, None])
    pauses: list[float] = []
    policy = RetryPolicy(max_tries=4, base_s=0.05, cap_s=2.0)
    assert run(Flaky(OSError(), OSError(), OSError()), pauses.append, policy=policy,
               hint_s=lambda exc: next(hints)) == "done"
    assert pauses[:2] == [0.7, 2.0]  # Retry-After as asked, then capped at cap_s
    assert 0.0 <= pauses[2] <= 0.2  # no hint: the backoff of attempt 2


def test_on_retry_hears_each_retry_once(run):
    first, second = OSError("1"), OSError("2")
    heard: list[tuple[int, BaseException]] = []
    assert run(Flaky(first, second), lambda s: None, policy=POLICY,
               on_retry=lambda attempt, exc: heard.append((attempt, exc))) == "done"
    assert heard == [(0, first), (1, second)]

    heard.clear()
    with pytest.raises(OSError):
        run(Flaky(*[OSError()] * 4), lambda s: None, policy=POLICY,
            on_retry=lambda attempt, exc: heard.append((attempt, exc)))
    assert [a for a, _ in heard] == [0, 1, 2]  # the last failure is raised, not retried


@pytest.mark.parametrize("stop", [KeyboardInterrupt, asyncio.CancelledError, SystemExit])
def test_cancellation_and_interrupts_are_never_retried(run, stop):
    pauses: list[float] = []
    interrupted = Flaky(stop(), OSError())
    with pytest.raises(stop):
        run(interrupted, pauses.append, policy=POLICY, retryable=lambda exc: True)
    assert interrupted.calls == 1 and pauses == []


def test_async_pauses_do_not_block_the_event_loop():
    ticks: list[int] = []

    async def ticker() -> None:
        for n in range(3):
            ticks.append(n)
            await asyncio.sleep(0)

    async def main() -> str:
        flaky = Flaky(OSError(), OSError())

        async def call() -> str:
            return flaky()

        task = asyncio.create_task(ticker())
        result = await retry_call_async(call, policy=RetryPolicy(max_tries=3, base_s=0.0))
        await task
        return result

    assert asyncio.run(main()) == "done" and ticks == [0, 1, 2]


@pytest.mark.parametrize("bad", [{"max_tries": 0}, {"max_tries": -1},
                                 {"max_tries": 3, "base_s": -0.1},
                                 {"max_tries": 3, "cap_s": -1.0}])
def test_a_policy_refuses_no_tries_and_negative_pauses(bad):
    with pytest.raises(ValueError, match="max_tries >= 1"):
        RetryPolicy(**bad)


def test_retry_on_conflict_retries_watch_errors_only():
    raced = Flaky(redis.WatchError(), redis.WatchError())
    assert retry_on_conflict(raced) == "done" and raced.calls == 3

    broken = Flaky(redis.ConnectionError("down"), redis.WatchError())
    with pytest.raises(redis.ConnectionError):
        retry_on_conflict(broken)
    assert broken.calls == 1

    contended = Flaky(*[redis.WatchError(str(n)) for n in range(10)])
    with pytest.raises(redis.WatchError, match="3"):
        retry_on_conflict(contended, max_tries=4)
    assert contended.calls == 4
