"""Markers by folder: everything under tests/integration is `integration`, tests/gpu `gpu`."""

import pytest


def pytest_collection_modifyitems(config, items):
    # Fault tests kill parts of the shared service: run them after everything else.
    items.sort(key=lambda item: item.get_closest_marker("faults") is not None)
    for item in items:
        path = str(item.fspath)
        if "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        elif "/tests/gpu/" in path:
            item.add_marker(pytest.mark.gpu)
