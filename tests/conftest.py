import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
# before any Triton kernel module is imported (the ops import theirs lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh seed per test (random inputs differ from test to test), printed on failure to replay it."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section("call", "seed", f"torch.manual_seed({value}) reproduces this test's inputs")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
