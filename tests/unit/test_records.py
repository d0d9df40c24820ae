"""records: the work item carries the device key but never shows it; batch keys group jobs."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.factories import make_item

KEY = bytes(range(32))


def test_work_item_repr_hides_the_device_key():
    item = make_item(device_key=KEY)

    text = repr(item) + str(item)

    assert "device_key" not in text
    assert repr(KEY) not in text and KEY.hex() not in text


def test_batch_key_groups_by_kind_style_and_resolution():
    assert make_item("a").batch_key == make_item("b", attempts=2).batch_key
    assert make_item(kind="art_style").batch_key != make_item(kind="ai_photo").batch_key
    assert make_item(style="comic").batch_key != make_item(style="portrait").batch_key
    assert make_item(resolution_px=128).batch_key != make_item(resolution_px=64).batch_key


def test_work_item_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_item().face_uri = "file:///x"  # type: ignore[misc]
