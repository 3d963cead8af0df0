import os

import pytest
import torch

# Without a CUDA device the Triton kernels run in Triton's CPU interpreter, which is chosen when a kernel is defined
# (at the import of rank1_kernels.triton_*): set it here, before any test module imports them. An explicit
# TRITON_INTERPRET in the environment wins. This queries the machine in the test harness, never at library import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests are marked `gpu` and skipped, visibly, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
