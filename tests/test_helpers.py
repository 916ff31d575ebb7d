"""The comparison every parity test uses must be able to fail: a vanished, halved or slightly
perturbed gradient is caught at any scale, including the ~1e-4 scale of 16-bit gradients."""
import pytest
import torch

from helpers import TOLERANCES, assert_close


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3])
def test_comparison_catches_wrong_gradients(dtype, scale):
    if dtype == torch.float16 and scale < 6e-5:
        pytest.skip("below fp16's normal range the input itself does not round within the tolerance")
    expected = torch.randn(64, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    assert_close(expected.to(dtype), expected, dtype, "rounded only")  # input rounding alone passes
    tol = TOLERANCES[dtype]
    for wrong, what in ((torch.zeros_like(expected), "zeroed"), (expected / 2, "halved"),
                        (expected * (1 + 3 * tol), "scaled by 1 + 3 tol"),
                        (torch.where(torch.arange(64)[:, None] == 5, -expected, expected), "one row negated")):
        with pytest.raises(AssertionError, match="relative error"):
            assert_close(wrong, expected, dtype, what)


def test_comparison_of_exact_zeros():
    zero = torch.zeros(3, dtype=torch.float64)
    assert_close(zero, zero, torch.float32, "zeros")
    assert_close(torch.tensor([0.0, 1e-12, 0.0]), zero, torch.float32, "rounding residue")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(torch.tensor([0.0, 1e-3, 0.0]), zero, torch.float32, "not zero")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.tensor([float("nan")]), torch.tensor([1.0]), torch.float32, "nan")
