import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the chunked backend into many row blocks with a ragged last one."""
    from fused_contrastive import chunked

    monkeypatch.setattr(chunked, "block_rows", lambda num_keys: 7)
