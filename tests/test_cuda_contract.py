"""The CUDA backend above its kernels, on CPU: argument plumbing, the shared autograd.Function, the fused
normalisation, masks, self offsets, extra keys and a learnable temperature, with the extension replaced
by a dense float64 model of what ``csrc/supcon_api.cpp`` promises. The kernels themselves need a GPU
(tests/test_gpu.py runs them against the same oracle); this checks everything that feeds them.
"""
import pytest
import torch

from fused_contrastive import cuda_supcon, reference
from fused_contrastive.losses import supcon_spec
from helpers import assert_close, make_features, make_labels


class DenseExtension:
    """forward -> (lse, pos_sum); backward -> (dQ, dK) for g = coef (e^{l - lse} - a pos_scale), densely."""

    @staticmethod
    def _tile(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset):
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and inv_tau.dtype == torch.float32 and inv_tau.shape == (1,)
        logits = (q.double() @ k.double().T) * inv_tau.double()
        rows, cols = torch.arange(q.shape[0])[:, None], torch.arange(k.shape[0])[None, :]
        valid = torch.ones_like(logits, dtype=torch.bool) if self_offset is None else cols != rows + self_offset
        if mask is not None:
            assert mask.dtype == torch.float32 and anchor_labels is None and key_labels is None
            a = mask.double()[rows % mask.shape[0], cols % mask.shape[1]]
        else:
            assert anchor_labels.dtype == key_labels.dtype == torch.int64
            a = (anchor_labels[:, None] == key_labels[None, :]).double()
        return logits, valid, torch.where(valid, a, 0.0)

    def forward(self, q, k, inv_tau, *, anchor_labels, key_labels, mask, self_offset):
        logits, valid, a = self._tile(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset)
        lse = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), 1)
        return lse.float(), (a * logits).sum(1).float()

    def backward(self, q, k, inv_tau, *, anchor_labels, key_labels, mask, self_offset, lse, coef, pos_scale,
                 need_dq, need_dk):
        assert lse.dtype == coef.dtype == pos_scale.dtype == torch.float32
        logits, valid, a = self._tile(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset)
        lse_safe = torch.where(lse == float("-inf"), 0.0, lse.double())
        g = coef.double()[:, None] * (torch.where(valid, torch.exp(logits - lse_safe[:, None]), 0.0)
                                      - a * pos_scale.double()[:, None])
        dq = (g @ k.double() * inv_tau.double()).to(q.dtype) if need_dq else None
        dk = (g.T @ q.double() * inv_tau.double()).to(k.dtype) if need_dk else None
        return dq, dk


@pytest.fixture
def dense_extension(monkeypatch):
    monkeypatch.setattr(cuda_supcon, "extension", lambda: (DenseExtension(), None))


CASES = {
    "labels_all": dict(kind="random"),
    "labels_one": dict(kind="random", contrast_mode="one"),
    "simclr": dict(kind="none"),
    "mask": dict(kind="mask"),
    "no_positives_excluded": dict(kind="distinct", no_positive="exclude"),
    "normalize_learnable_tau": dict(kind="random", normalize=True, learnable=True, base_temperature=0.07),
    "extra_keys": dict(kind="random", extra=5),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bsz", [1, 3, 70])
def test_cuda_python_side_matches_the_reference(dense_extension, case, bsz):
    opts = dict(CASES[case])
    kind, learnable, extra = opts.pop("kind"), opts.pop("learnable", False), opts.pop("extra", 0)
    labels, mask = make_labels(kind, bsz, seed=bsz)
    features = make_features(bsz, 2, 33, seed=bsz, normalize=not opts.get("normalize", False)).detach()
    extra_keys = torch.randn(extra, 33, dtype=torch.float64) if extra else None
    if extra:
        opts.update(extra_keys=extra_keys, extra_key_labels=torch.arange(extra) % 3)
    results = []
    for dtype, run in ((torch.float64, reference.loss), (torch.float32, cuda_supcon.loss)):
        f = features.to(dtype).requires_grad_()
        tau = torch.tensor(0.3, dtype=dtype, requires_grad=True) if learnable else 0.3
        if extra:
            opts["extra_keys"] = extra_keys.to(dtype)
        spec = supcon_spec(f, labels, mask, temperature=tau, **opts)
        loss = run(spec)
        inputs = (f, tau) if learnable else (f,)
        results.append((loss, *torch.autograd.grad(loss, inputs)))
    for expected, actual, what in zip(results[0], results[1], ("loss", "features grad", "tau grad")):
        assert actual.dtype == torch.float32
        assert_close(actual, expected, torch.float32, f"{case} {what}")
