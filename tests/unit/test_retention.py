"""retention: hard-ceiling deadlines and retry backoff (the purge itself: test_purge.py)."""

from __future__ import annotations

from pipeline.core.config import RetentionConfig
from pipeline.core.records import ObjectClass
from pipeline.retention.purge import deadline_for


def test_deadlines_follow_the_ceilings():
    cfg = RetentionConfig(input_ceiling_h=2, face_data_ceiling_h=1)

    assert deadline_for(ObjectClass.INPUT, 100.0, cfg) == 100.0 + 2 * 3600
    assert deadline_for(ObjectClass.FACE_DATA, 100.0, cfg) == 100.0 + 3600
    assert deadline_for(ObjectClass.OUTPUT, 100.0, cfg) == float("inf")


def test_default_ceilings_keep_the_four_day_promise():
    cfg = RetentionConfig()
    for object_class in ("input", "face_data"):
        assert deadline_for(object_class, 0.0, cfg) <= 96 * 3600
