import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests are marked `gpu` and skipped, visibly, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
