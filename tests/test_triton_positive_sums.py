"""The Triton launchers' O((Na + M) D) positive sums (L_out's sum_j a_ij l_ij and its gradient's positive
part, kept out of the tile loop) against the dense [Na, M] positive matrix, for labels and float masks, self
in range, shifted (ring shards, 'one' mode) or absent."""
import pytest
import torch

pytest.importorskip("triton")

from fused_contrastive.spec import ContrastSpec  # noqa: E402
from fused_contrastive.triton_kernels import supcon  # noqa: E402


def dense_positives(spec):
    rows, cols = torch.arange(spec.num_anchors)[:, None], torch.arange(spec.num_keys)[None, :]
    if spec.mask is None:
        a = (spec.anchor_labels[:, None] == spec.key_labels[None, :]).double()
    else:
        a = spec.mask.double()[rows % spec.mask.shape[0], cols % spec.mask.shape[1]]
    if spec.self_offset is not None:
        a = torch.where(cols == rows + spec.self_offset, 0.0, a)
    return a


@pytest.mark.parametrize("self_offset", [0, 5, -3, 40, None])
@pytest.mark.parametrize("positives", ["labels", "mask"])
def test_positive_sums_match_dense(self_offset, positives):
    gen = torch.Generator().manual_seed(3)
    na, m, dim = 11, 17, 6
    keys = torch.randn(m, dim, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 4, (m,), generator=gen)
    mask = torch.rand(5, 7, generator=gen, dtype=torch.float64) if positives == "mask" else None
    spec = ContrastSpec(anchors=keys[:na], keys=keys, self_offset=self_offset,
                        anchor_labels=None if mask is not None else labels[:na],
                        key_labels=None if mask is not None else labels, num_classes=4, mask=mask, temperature=0.1,
                        base_temperature=None, no_positive="zero", tau_float=0.1)
    a = dense_positives(spec)
    w = torch.randn(na, dim, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(supcon.anchor_positive_sums(spec, keys), a @ keys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(supcon.key_positive_sums(spec, w), a.T @ w, rtol=1e-12, atol=1e-12)
