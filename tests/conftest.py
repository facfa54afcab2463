import os
import sys

import pytest
import torch

# Kernel parity runs on CPU through Triton's interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU every kernel runs the first config its prune keeps (kernels/common.py): parity does
    # not depend on the config, and autotuning every kernel at every test shape costs minutes of
    # compilation.  test_triton_backend.py::test_autotuned_step_gpu runs with autotuning on.
    os.environ.setdefault("LORA_FAST_AUTOTUNE", "0")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
