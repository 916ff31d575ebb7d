import os
import sys

import importlib.util

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter. The variable
# must be set before triton.jit decorates them, i.e. before the kernels' module is imported.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import fused_contrastive.triton_kernels.supcon  # noqa: F401  (decorated now, under the interpreter)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the chunked backend into many row blocks with a ragged last one."""
    from fused_contrastive import chunked

    monkeypatch.setattr(chunked, "block_rows", lambda num_keys: 7)
