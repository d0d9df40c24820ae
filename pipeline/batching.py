"""The batching queue between ingress and a GPU stage.

Jobs are grouped by a compatible key (kind, style, resolution). A group is released as a
batch when it holds ``max_batch_size`` jobs, or when its oldest job has waited
``max_wait_ms``. Pure and clock-free: the caller passes ``now_s``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipeline.config import StageBatchConfig

T = TypeVar("T")


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    enqueued_s: float


class BatchQueue(Generic[T]):
    """Per-key FIFO queues; ``pop_ready`` returns the batches due now."""

    def __init__(self, cfg: StageBatchConfig) -> None:
        self.cfg = cfg
        self._groups: OrderedDict[Hashable, list[_Waiting[T]]] = OrderedDict()

    def reconfigure(self, cfg: StageBatchConfig) -> None:
        self.cfg = cfg

    def add(self, item: T, key: Hashable, now_s: float) -> None:
        self._groups.setdefault(key, []).append(_Waiting(item, now_s))

    def remove(self, predicate: Callable[[T], bool]) -> int:
        """Drop waiting items for which ``predicate`` is true; returns how many."""
        removed = 0
        for key in list(self._groups):
            kept = [w for w in self._groups[key] if not predicate(w.item)]
            removed += len(self._groups[key]) - len(kept)
            if kept:
                self._groups[key] = kept
            else:
                del self._groups[key]
        return removed

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def pop_ready(self, now_s: float, *, max_batches: int | None = None) -> list[list[T]]:
        """Full batches first, then groups whose oldest job waited max_wait_ms; oldest first."""
        max_wait_s = self.cfg.max_wait_ms / 1000.0
        size = self.cfg.max_batch_size
        limit = max_batches if max_batches is not None else float("inf")
        batches: list[list[T]] = []
        for full_only in (True, False):
            for key, group in sorted(self._groups.items(), key=lambda kv: kv[1][0].enqueued_s):
                while group and len(batches) < limit and (
                    len(group) >= size
                    or (not full_only and now_s - group[0].enqueued_s >= max_wait_s)
                ):
                    batches.append([w.item for w in group[:size]])
                    del group[:size]
                if not group:
                    del self._groups[key]
        return batches
