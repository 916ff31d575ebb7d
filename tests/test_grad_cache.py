"""grad_cache_step: parameter gradients equal one full-batch step (float64, dropout on), AMP, DDP, bad input.

The full-batch step that it must equal: the same encoders over the same inputs with grad, the loss on the
concatenated embeddings, one backward. With dropout, that step draws its masks micro-batch by micro-batch
from the same seed (the masks a full-batch forward would draw differ, and so would any two steps), so the
reference runs the forward in the same micro-batches, with grad, and concatenates.
"""
import pytest
import torch
from torch import nn

import fused_contrastive as fc
from helpers import assert_close

DIM, EMB, N = 6, 5, 10


class Text(nn.Module):
    """A tower taking keyword arguments (as a tokenizer's output): mean of masked token embeddings."""

    def __init__(self, p):
        super().__init__()
        self.tokens = nn.Embedding(20, 8)
        self.out = nn.Sequential(nn.Dropout(p), nn.Linear(8, EMB))

    def forward(self, input_ids, attention_mask, scale=1.0):
        m = attention_mask.unsqueeze(-1).to(self.tokens.weight.dtype)
        return self.out(scale * (self.tokens(input_ids) * m).sum(1) / m.sum(1))


def tower(p):
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, EMB))


def problem(name, p, dtype=torch.float64):
    """(encoders, inputs, loss_fn, extra parameters of the loss) for each supported kind of call."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 2, DIM, generator=gen, dtype=dtype)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 2, 2])
    if name == "supcon":  # one shared encoder over both views; labels captured by the loss
        return (tower(p).to(dtype), [x[:, 0], x[:, 1]],
                lambda a, b: fc.supcon_loss(torch.stack([a, b], 1), labels, temperature=0.2, normalize=True), [])
    if name == "clip":  # two towers, one of them taking a mapping; a learnable logit scale in the loss
        scale = nn.Parameter(torch.tensor(2.0, dtype=dtype))
        ids = torch.randint(0, 20, (N, 4), generator=gen)
        mask = torch.ones(N, 4, dtype=torch.long)
        mask[::3, 2:] = 0
        encoders = [tower(p).to(dtype), Text(p).to(dtype)]
        return (encoders, [x[:, 0], {"input_ids": ids, "attention_mask": mask, "scale": 0.5}],
                lambda img, txt: fc.clip_loss(nn.functional.normalize(img, dim=-1),
                                              nn.functional.normalize(txt, dim=-1), scale.exp()), [scale])
    assert name == "info_nce"
    return (tower(p).to(dtype), x[:, 0], lambda q: fc.info_nce(q[: N // 2], q[N // 2:], temperature=0.3), [])


def full_batch_step(encoders, inputs, loss_fn, micro, whole):
    """The reference: forward with grad (whole batch at once, or in the same micro-batches), loss, backward."""
    towers = inputs if isinstance(inputs, list) else [inputs]
    modules = encoders if isinstance(encoders, list) else [encoders] * len(towers)
    embs = []
    for module, x in zip(modules, towers):
        if isinstance(x, dict):
            size = N if whole else micro
            parts = [{k: (v[i:i + size] if torch.is_tensor(v) else v) for k, v in x.items()} for i in range(0, N, size)]
            embs.append(torch.cat([module(**part) for part in parts]))
        else:
            embs.append(module(x) if whole else torch.cat([module(part) for part in x.split(micro)]))
    loss = loss_fn(*embs)
    loss.backward()
    return loss.detach()


def grads(encoders, extra):
    modules = encoders if isinstance(encoders, list) else [encoders]
    return [p.grad.clone() for m in modules for p in m.parameters()] + [p.grad.clone() for p in extra]


@pytest.mark.parametrize("name", ["supcon", "clip", "info_nce"])
@pytest.mark.parametrize("p,micro", [(0.0, 3), (0.0, 1), (0.3, 3), (0.3, N)])
def test_equals_full_batch_step(name, p, micro):
    encoders, inputs, loss_fn, extra = problem(name, p)
    torch.manual_seed(5)
    ref = full_batch_step(encoders, inputs, loss_fn, micro, whole=p == 0)
    ref_grads, ref_next = grads(encoders, extra), torch.rand(3)
    for param in [q for m in (encoders if isinstance(encoders, list) else [encoders]) for q in m.parameters()] + extra:
        param.grad = None
    torch.manual_seed(5)
    loss = fc.grad_cache_step(encoders, inputs, loss_fn, micro)
    # The random stream continues as after one forward pass (dropout's draws consumed once).
    assert torch.equal(torch.rand(3), ref_next) or p == 0
    assert_close(loss, ref, torch.float64, f"{name} loss")
    for i, (g, r) in enumerate(zip(grads(encoders, extra), ref_grads)):
        assert_close(g, r, torch.float64, f"{name} gradient of parameter {i}")


@pytest.mark.parametrize("name", ["supcon", "clip"])
def test_autocast_bf16(name):
    """Under CPU autocast both passes run in bf16 and give the step the same autocast forward would."""
    encoders, inputs, loss_fn, extra = problem(name, 0.3, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)
        full_batch_step(encoders, inputs, loss_fn, 4, whole=False)
        ref_grads = grads(encoders, extra)
        for param in [q for m in (encoders if isinstance(encoders, list) else [encoders]) for q in m.parameters()]:
            param.grad = None
        for param in extra:
            param.grad = None
        torch.manual_seed(5)
        fc.grad_cache_step(encoders, inputs, loss_fn, 4)
    for i, (g, r) in enumerate(zip(grads(encoders, extra), ref_grads)):
        assert_close(g, r, torch.bfloat16, f"{name} gradient of parameter {i}")


@pytest.mark.parametrize("call,word", [
    (lambda e, x, f: fc.grad_cache_step(e, x, f, 0), "micro_batch_size"),
    (lambda e, x, f: fc.grad_cache_step(e, x, f, 2.0), "micro_batch_size"),
    (lambda e, x, f: fc.grad_cache_step([e, e], x, f, 2), "encoders"),
    (lambda e, x, f: fc.grad_cache_step(e, x[:0], f, 2), "inputs"),
    (lambda e, x, f: fc.grad_cache_step(e, [x, "text"], f, 2), "inputs"),
    (lambda e, x, f: fc.grad_cache_step(e, x, lambda z: z.sum(1), 2), "loss_fn"),
])
def test_bad_input(call, word):
    encoder = tower(0.0)
    with pytest.raises(ValueError, match=word):
        call(encoder, torch.randn(4, DIM), lambda z: z.square().mean())


def check_ddp(rank, world, lo, hi, features, labels, backends):
    """2 ranks, DDP-wrapped encoder, uneven local batches, the loss in gather and ring mode: the DDP-averaged
    gradients equal the single-process full-batch step."""
    import torch.distributed as dist

    from test_distributed import assert_rel

    x = features.reshape(features.shape[0], -1)  # [8, 12]: one input row per sample
    for layout in ("gather", "ring"):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2 * EMB)).double()
        loss_of = lambda z, y, **kw: fc.supcon_loss(z.view(-1, 2, EMB), y, temperature=0.3, normalize=True, **kw)
        loss_of(model(x), labels).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ddp = nn.parallel.DistributedDataParallel(model)
        fc.grad_cache_step(ddp, x[lo:hi], lambda z: loss_of(z, labels[lo:hi], process_group=dist.group.WORLD,
                                                            distributed=layout), 2)
        for i, (param, exp) in enumerate(zip(model.parameters(), expected)):
            assert_rel(param.grad, exp, f"rank {rank} {layout} parameter {i}")


def test_ddp_two_ranks():
    from test_distributed import spawn

    spawn(check_ddp, 2, timeout_s=300)
