"""Shared by python_tests/ and benchmarks/: tests marked `cuda` are skipped without a usable GPU."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    # Decided at collection time, not import time: nothing touches torch.cuda on import.
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
