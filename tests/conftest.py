"""Markers by folder: everything under tests/integration is `integration`, tests/gpu `gpu`."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        elif "/tests/gpu/" in path:
            item.add_marker(pytest.mark.gpu)
