"""What every actor does once at start: pin torch threads, open Redis and the store."""

from __future__ import annotations

import redis

from pipeline.config import Settings
from pipeline.storage import StoreSet, open_stores


def open_backends(settings: Settings) -> tuple[redis.Redis, StoreSet]:
    if settings.service.redis_url is None:
        raise ValueError("redis_url must be resolved before actors start (see serve.launcher)")
    return redis.Redis.from_url(settings.service.redis_url), open_stores(settings.storage)


def pin_torch_threads(settings: Settings) -> None:
    import torch

    torch.set_num_threads(settings.models.torch_num_threads)
