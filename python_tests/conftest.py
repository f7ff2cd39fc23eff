from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Decided at collection time, not import time: nothing touches torch.cuda on import.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test (from its name), so failures reproduce but inputs vary by test."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
