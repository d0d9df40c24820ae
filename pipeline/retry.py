"""Retry timing shared by every caller of a remote service (stores, Redis)."""

from __future__ import annotations

import random


def backoff_s(attempt: int, *, base_s: float = 0.05, cap_s: float = 2.0) -> float:
    """Exponential backoff with full jitter for retry ``attempt`` (0-based)."""
    return random.uniform(0.0, min(cap_s, base_s * (2**attempt)))
