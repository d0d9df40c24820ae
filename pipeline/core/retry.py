"""The one retry policy of the project: exponential backoff with full jitter, bounded.

Every retry loop goes through here: calls to remote services (stores, Redis) and
optimistic Redis transactions (WATCH) alike, so none of them can spin forever.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import redis

T = TypeVar("T")

MAX_CONFLICT_RETRIES = 50


def backoff_s(attempt: int, *, base_s: float = 0.05, cap_s: float = 2.0) -> float:
    """Exponential backoff with full jitter for retry ``attempt`` (0-based)."""
    return random.uniform(0.0, min(cap_s, base_s * (2**attempt)))


def retry_on_conflict(attempt: Callable[[], T], *, max_tries: int = MAX_CONFLICT_RETRIES) -> T:
    """Run an optimistic Redis transaction until no WATCHed key changed under it.

    Backs off a little between tries (contention means others are writing the same
    keys) and gives up with the last WatchError after ``max_tries``.
    """
    for n in range(max_tries):
        try:
            return attempt()
        except redis.WatchError:
            if n == max_tries - 1:
                raise
            time.sleep(backoff_s(n, base_s=0.001, cap_s=0.05))
    raise AssertionError("unreachable")
