import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
# before triton is first imported (triton.language's own jit helpers, tl.sqrt_rn among them, are built
# for the interpreter or not at import), so import it here, once the variable is set: tests that unset
# the variable later must not be the first to import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from internvl3_engine.dispatch import triton_import_error  # noqa: E402

triton_import_error()


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
