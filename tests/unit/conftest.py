"""Unit-test fixtures. Kept tiny: builders live in factories.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run models on one intra-op thread, as the actors do (models.yaml torch_num_threads).

    Also keeps the tiny-model tests steady on a busy host.
    """
    import torch  # only the model tests pay for this import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
