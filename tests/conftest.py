"""Test configuration: markers, seeding, and the Triton interpreter on machines without CUDA.

On a machine without a CUDA device, ``TRITON_INTERPRET=1`` is set here, before any test
module imports triton, so the ``interpreter`` tests run every Triton kernel on the CPU in
the same pytest process. With a GPU the same tests run the compiled kernels on CUDA
tensors. CUDA is never initialised at import time (``torch.cuda.is_available`` only asks
the driver for a device count).
"""
from __future__ import annotations

import os
import sys

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") is None:  # pragma: no cover
    raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each, or they fight over the cores.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # A fixed seed per test (derived from its name): fresh random inputs, reproducible failures.
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def device():
    """Where kernels run: CUDA when present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


# LLM2VEC_FAST_FAILURES=path (benchmarks/gpu_check.sh sets it): each failing test's report is
# appended there as soon as it fails, so a run cut by its time limit still says why a test
# failed (pytest prints failures only at the end). Under xdist the controller writes them (the
# hook runs in the workers too: each failure would be written twice).
_FAILURES = os.environ.get("LLM2VEC_FAST_FAILURES")


def pytest_runtest_logreport(report):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if _FAILURES and report.failed:
        with open(_FAILURES, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
