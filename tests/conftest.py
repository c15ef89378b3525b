"""Suite-wide test options: tests marked `gpu` skip cleanly where CUDA is not available.

The default run excludes `gpu` (and `slow`) through pyproject's addopts; on a machine with a
GPU run them with `pytest -m gpu` (a later -m replaces the default selection).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device (none is available here)")
    for item in gpu_items:
        item.add_marker(skip)
