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


# `make test-quick` runs `-m "not slow"`: besides the cases marked slow in their own files, the patterns
# below (fnmatch on the test id) are marked slow here, in one place. Measured with a CPU-time plugin on the
# 2-core machine, they were most of the suite's time: the Triton kernels under the interpreter beyond a
# few rows (every backend and loss still runs at 1-3 rows there, and at every size on the PyTorch
# backends), ptxas over every shipped Triton config, the CPU emulation of the CUDA kernels beyond its
# smallest cases, torch.compile, multi-process runs and the example trainings. CI (`make test`) runs all.
QUICK_EXCLUDED = (  # "[[]" is a literal "[" in fnmatch
    "*triton-64]", "*triton-127]", "*triton-129]", "*triton-1000]",
    "tests/test_gradcheck.py::*triton]",
    "tests/test_supcon_parity.py::test_low_precision[[]0.07-*-triton]",
    "tests/test_supcon_parity.py::test_low_precision[[]1.0-*-triton]",
    "tests/test_supcon_parity.py::test_temperatures_and_no_positive[[]*-0.05-triton]",
    "tests/test_supcon_parity.py::test_temperatures_and_no_positive[[]*-0.2-triton]",
    "tests/test_supcon_parity.py::test_temperatures_and_no_positive[[]*-1.0-triton]",
    "tests/test_family.py::test_eps_supinfonce_temperature_epsilon_views[[]3-*-triton]",
    "tests/test_triton_numerics.py::test_fp16_gradients_at_realistic_n*",
    "tests/test_triton_numerics.py::test_fp16_dq_dk_at_1024_anchors[[]in]",
    "tests/test_compile.py::test_inductor_*",
    "tests/test_fuzz.py::*",
    "tests/test_aot_compile.py::*",
    "tests/test_gpu_suite.py::*",
    "tests/test_cuda_contract.py::test_register_tile_and_wmma_kernels_agree[[]*-255-*]",
    "tests/test_cuda_contract.py::test_cuda_backend_across_tiles_dtypes_and_widths[[]*-255]",
    "tests/test_distributed.py::*[[]3]",
    "tests/test_renyicl_cacr.py::test_gather_and_ring_modes_are_exact[[]3]",
    "tests/test_renyicl_cacr.py::test_aot_compile_without_spills*",
    "tests/test_distributed.py::test_ranks_agree_or_fail_together",
    "tests/test_example.py::test_digits_training_same_curve_and_beats_untrained",
    "tests/test_example.py::test_example_runs[[]ddp_supcon]",
    # Under 3 minutes: the CUDA emulation (its build alone takes ~50 s; the dense model of the same contract
    # stays), the 127/129-row cases of the family and reduction tables (1, 2, 3 rows stay), the 2-rank
    # library comparison.
    "tests/test_cuda_contract.py::*emulated*",
    "tests/test_cuda_contract.py::test_register_tile_and_wmma_kernels_agree*",
    "tests/test_cuda_contract.py::test_fp16_gradient_does_not_vanish*",
    "tests/test_family.py::*-127]", "tests/test_family.py::*-129]",
    "tests/test_reductions.py::*-129]",
    "tests/test_compat.py::*n129*", "tests/test_compat.py::test_distributed_modes_on_two_ranks",
    # and the Triton interpreter's compile and low-precision sweeps (their chunked/reference cases stay).
    "tests/test_supcon_parity.py::test_low_precision[[]*-triton]",
    "tests/test_supcon_parity.py::test_extreme_logits[[]*-triton]",
    "tests/test_supcon_parity.py::test_temperatures_and_no_positive[[]*-0.01-triton]",
    "tests/test_reductions.py::test_compiled_fullgraph[[]triton-*]",
    "tests/test_compile.py::test_every_loss_compiles_whole[[]*-triton]",
)


def pytest_collection_modifyitems(config, items):
    import fnmatch

    for item in items:
        if any(fnmatch.fnmatchcase(item.nodeid, pattern) for pattern in QUICK_EXCLUDED):
            item.add_marker(pytest.mark.slow)
