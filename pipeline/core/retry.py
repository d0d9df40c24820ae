"""The one retry policy of the project: bounded tries, exponential backoff with full jitter,
and a predicate for what is worth retrying.

Every retry loop goes through ``retry_call`` (or ``retry_call_async``): calls to remote
services (stores, Redis, other pools) and optimistic Redis transactions (WATCH) alike, so
none of them can spin forever and all of them back off the same way (ARCHITECTURE.md,
invariant 12).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

T = TypeVar("T")

MAX_CONFLICT_RETRIES = 50


def backoff_ceiling_s(attempt: int, *, base_s: float = 0.05, cap_s: float = 2.0) -> float:
    """The longest pause before retry ``attempt`` (0-based): ``base_s`` doubled each try,
    never over ``cap_s``. The one doubling formula of the project."""
    return min(cap_s, base_s * (2**attempt))


def backoff_s(attempt: int, *, base_s: float = 0.05, cap_s: float = 2.0) -> float:
    """Exponential backoff with full jitter before retry ``attempt`` (0-based): a uniform
    draw from [0, min(cap_s, base_s * 2**attempt)]."""
    return random.uniform(0.0, backoff_ceiling_s(attempt, base_s=base_s, cap_s=cap_s))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry one kind of call."""

    max_tries: int  # the first call included; at least 1
    base_s: float = 0.05  # the longest first pause
    cap_s: float = 2.0  # no pause is longer

    def __post_init__(self) -> None:
        if self.max_tries < 1 or self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"a retry policy needs max_tries >= 1 and pauses >= 0: {self}")

    def pause_s(self, attempt: int) -> float:
        """The pause after failed try ``attempt`` (0-based)."""
        return backoff_s(attempt, base_s=self.base_s, cap_s=self.cap_s)


def _always(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


Retryable = Callable[[BaseException], bool]
Hint = Callable[[BaseException], float | None]


def _pause(policy: RetryPolicy, attempt: int, exc: BaseException, hint: Hint | None) -> float:
    hinted = hint(exc) if hint is not None else None
    return min(hinted, policy.cap_s) if hinted is not None else policy.pause_s(attempt)


def retry_call(fn: Callable[[], T], *, policy: RetryPolicy, retryable: Retryable = _always,
               sleep: Callable[[float], None] = time.sleep, hint_s: Hint | None = None,
               on_retry: Callable[[int, BaseException], None] | None = None) -> T:
    """Call ``fn`` until it returns, at most ``policy.max_tries`` times.

    An exception for which ``retryable`` is false is raised at once, as is anything that is
    not an ``Exception`` (cancellation, KeyboardInterrupt); after the last try the last
    exception is raised. Between tries it sleeps ``policy.pause_s(attempt)``, or what
    ``hint_s(exc)`` asks (a server's Retry-After), capped at ``policy.cap_s``.
    ``on_retry(attempt, exc)`` is told of each retry (for a log line or a metric).
    """
    for attempt in range(policy.max_tries):
        try:
            return fn()
        except Exception as exc:  # never CancelledError, KeyboardInterrupt, SystemExit
            if not retryable(exc) or attempt == policy.max_tries - 1:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            sleep(_pause(policy, attempt, exc, hint_s))
    raise AssertionError("unreachable")


async def retry_call_async(fn: Callable[[], Awaitable[T]], *, policy: RetryPolicy,
                           retryable: Retryable = _always,
                           sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                           hint_s: Hint | None = None,
                           on_retry: Callable[[int, BaseException], None] | None = None) -> T:
    """``retry_call`` for a coroutine function; pauses without blocking the event loop."""
    for attempt in range(policy.max_tries):
        try:
            return await fn()
        except Exception as exc:  # never CancelledError, KeyboardInterrupt, SystemExit
            if not retryable(exc) or attempt == policy.max_tries - 1:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            await sleep(_pause(policy, attempt, exc, hint_s))
    raise AssertionError("unreachable")


CONFLICT_POLICY = RetryPolicy(max_tries=MAX_CONFLICT_RETRIES, base_s=0.001, cap_s=0.05)


def retry_on_conflict(attempt: Callable[[], T], *, max_tries: int = MAX_CONFLICT_RETRIES) -> T:
    """Run an optimistic Redis transaction until no WATCHed key changed under it.

    Backs off a little between tries (contention means others are writing the same
    keys) and gives up with the last WatchError after ``max_tries``.
    """
    return retry_call(attempt, policy=dataclasses.replace(CONFLICT_POLICY, max_tries=max_tries),
                      retryable=lambda exc: isinstance(exc, redis.WatchError))
