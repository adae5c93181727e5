import os

import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present. Must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU")
    config.addinivalue_line("markers", "last: run after every other test")


def pytest_collection_modifyitems(config, items):
    # tests marked `last` run after all others (GPU code never run on a GPU yet: a hang loses nothing else)
    items.sort(key=lambda item: "last" in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_ops():
    """Runs a test with the plain-PyTorch reference ops (ops backend "torch"), restoring "auto"."""
    from lightx2v_engine import ops
    ops.set_backend("torch")
    yield
    ops.set_backend("auto")
