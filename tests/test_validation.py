"""Every bad input is a ValueError that names the argument and what was expected."""
import pytest
import torch

import fused_contrastive as fc

F = torch.randn(4, 2, 8)
L = torch.tensor([0, 1, 0, 1])

BAD_CALLS = {
    "rank 1": (lambda: fc.supcon_loss(torch.randn(8)), "features"),
    "rank 0": (lambda: fc.supcon_loss(torch.tensor(1.0)), "features"),
    "not a tensor": (lambda: fc.supcon_loss([[1.0, 2.0]]), "features"),
    "integer features": (lambda: fc.supcon_loss(torch.ones(4, 2, 8, dtype=torch.long)), "floating"),
    "empty batch": (lambda: fc.supcon_loss(torch.randn(0, 2, 8)), "at least one"),
    "zero dim": (lambda: fc.supcon_loss(torch.randn(4, 2, 0)), "at least one"),
    "label count": (lambda: fc.supcon_loss(F, torch.tensor([0, 1, 0])), "labels"),
    "label shape": (lambda: fc.supcon_loss(F, torch.zeros(4, 2)), "labels"),
    "labels and mask": (lambda: fc.supcon_loss(F, L, torch.eye(4)), "labels or mask"),
    "mask shape": (lambda: fc.supcon_loss(F, mask=torch.eye(3)), "mask"),
    "mask negative": (lambda: fc.supcon_loss(F, mask=-torch.eye(4)), "mask"),
    "mask nan": (lambda: fc.supcon_loss(F, mask=torch.full((4, 4), float("nan"))), "mask"),
    "temperature zero": (lambda: fc.supcon_loss(F, L, temperature=0.0), "temperature"),
    "temperature negative": (lambda: fc.supcon_loss(F, L, temperature=-0.1), "temperature"),
    "temperature inf": (lambda: fc.supcon_loss(F, L, temperature=float("inf")), "temperature"),
    "temperature string": (lambda: fc.supcon_loss(F, L, temperature="0.1"), "temperature"),
    "temperature vector": (lambda: fc.supcon_loss(F, L, temperature=torch.ones(2)), "temperature"),
    "base temperature": (lambda: fc.supcon_loss(F, L, base_temperature=0), "base_temperature"),
    "contrast mode": (lambda: fc.supcon_loss(F, L, contrast_mode="both"), "contrast_mode"),
    "no_positive": (lambda: fc.supcon_loss(F, L, no_positive="drop"), "no_positive"),
    "backend": (lambda: fc.supcon_loss(F, L, backend="jax"), "backend"),
    "variant": (lambda: fc.supcon_loss(F, L, variant="mid"), "variant"),
    "normalize": (lambda: fc.supcon_loss(F, L, normalize="yes"), "normalize"),
    "mask with process_group": (lambda: fc.supcon_loss(F, mask=torch.eye(4), process_group=object()), "process_group"),
    "module temperature": (lambda: fc.SupConLoss(temperature=0), "temperature"),
    "module mode": (lambda: fc.SupConLoss(contrast_mode="ALL"), "contrast_mode"),
    "module backend": (lambda: fc.SupConLoss(backend="fast"), "backend"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_names_the_argument(case):
    call, word = BAD_CALLS[case]
    with pytest.raises(ValueError, match=word):
        call()


def test_labels_on_another_form_are_accepted():
    """SupContrast accepts [bsz, 1] labels, float labels and lists; so do we."""
    expected = fc.supcon_loss(F, L)
    for labels in (L[:, None], L.float(), L.tolist()):
        torch.testing.assert_close(fc.supcon_loss(F, labels), expected)
    torch.testing.assert_close(fc.supcon_loss(F, mask=(L[:, None] == L[None]).int()), expected)


@pytest.mark.parametrize("labels, extra, unmatched", [
    (L, [0.5, 1.7], [100, 101]),  # cast to int64 they were 0 and 1: positives of classes 0 and 1
    (L.to(torch.int8), [256, 1], [100, 1]),  # cast to int8, 256 wrapped around to 0
])
def test_extra_key_labels_compare_by_value_as_torch_eq(labels, extra, unmatched):
    """Labels and extra_key_labels are compared in their promoted dtype, never cast to the labels' dtype."""
    bank = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    got = fc.supcon_loss(F, labels, extra_keys=bank, extra_key_labels=extra, backend="reference")
    expected = fc.supcon_loss(F, L, extra_keys=bank, extra_key_labels=unmatched, backend="reference")
    torch.testing.assert_close(got, expected)
