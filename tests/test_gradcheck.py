"""torch.autograd.gradcheck in float64 (features, temperature) through every CPU backend."""
import pytest
import torch

import fused_contrastive as fc

from helpers import CPU_BACKENDS, make_features


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("positives", ["labels", "simclr", "mask"])
def test_gradcheck(backend, mode, positives, small_chunks):
    features = make_features(9, 2, 5, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2, 5]) if positives == "labels" else None
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) if positives == "mask" else None
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def fn(f, t):
        return fc.supcon_loss(f, labels, mask, temperature=t, base_temperature=0.5, contrast_mode=mode, backend=backend)

    assert torch.autograd.gradcheck(fn, (features, tau))
