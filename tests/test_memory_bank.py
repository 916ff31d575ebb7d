"""The memory bank (fused_contrastive.memory): FIFO order and wrap-around, labels travelling with their keys,
every loss with a bank against its float64 formula with the bank's rows as extra keys (loss and gradients,
over steps that fill and wrap the bank), no gradient into stored keys, checkpoints, eval mode, errors,
pytorch-metric-learning's CrossBatchMemory parity, and identical banks across 2 gloo ranks."""
import io

import pytest
import torch
import torch.nn.functional as F

import fused_contrastive as fc
import formulas
from helpers import CPU_BACKENDS, assert_close

F64 = torch.float64
BSZ, DIM, SIZE, STEPS = 3, 5, 10, 3  # 6 view rows a step: the bank fills at step 2 and wraps at step 3


def step_inputs(step, bsz=BSZ, dim=DIM, n_views=2):
    gen = torch.Generator().manual_seed(100 + step)
    features = F.normalize(torch.randn(bsz, n_views, dim, dtype=F64, generator=gen), dim=-1).requires_grad_()
    return features, torch.randint(0, 3, (bsz,), generator=gen)


def views(features):
    return features.detach().transpose(0, 1).reshape(-1, features.shape[-1])  # view-major, as the losses stack


# name -> (loss, its kwargs, labelled, formula(features, labels, bank keys, bank labels)); info_nce pairs the views.
CASES = {
    "supcon": (fc.supcon_loss, dict(temperature=0.3), True,
               lambda f, y, e, ey: formulas.supcon_extra_keys(f, y, e, ey, temperature=0.3)),
    "simclr": (fc.supcon_loss, dict(temperature=0.3), False,
               lambda f, y, e, ey: formulas.supcon_extra_keys(f, None, e, torch.full((len(e),), -1), temperature=0.3)),
    "eps_supinfonce": (fc.eps_supinfonce_loss, dict(epsilon=0.2, temperature=0.3), True,
                       lambda f, y, e, ey: formulas.eps_supinfonce(f, y, epsilon=0.2, temperature=0.3, extra_keys=e,
                                                                   extra_key_labels=ey)),
    "dclw": (fc.dcl_loss, dict(temperature=0.3, weighted=True), False,
             lambda f, y, e, ey: formulas.dcl(f, temperature=0.3, weighted=True, extra_keys=e)),
    "debiased": (fc.debiased_contrastive_loss, dict(beta=0.5), False,
                 lambda f, y, e, ey: formulas.debiased(f, beta=0.5, extra_keys=e)),
    "bcl": (fc.bcl_loss, dict(temperature=0.3), True,
            lambda f, y, e, ey: formulas.bcl(f, y, temperature=0.3, extra_keys=e, extra_key_labels=ey)),
    "spread": (fc.spread_loss, dict(), True,
               lambda f, y, e, ey: formulas.spread(f, y, extra_keys=e, extra_key_labels=ey)),
    "symmetric_spread": (fc.SymmetricSpreadLoss(temperature=0.3), dict(), True,
                         lambda f, y, e, ey: formulas.symmetric_spread(f, y, temperature=0.3, extra_keys=e,
                                                                       extra_key_labels=ey)),
    "info_nce": (fc.info_nce, dict(temperature=0.3), False,
                 lambda f, y, e, ey: formulas.info_nce(f[:, 0], f[:, 1], temperature=0.3, queue=e)),
    "moco": (fc.InfoNCELoss(temperature=0.3, in_batch_negatives=False), dict(), False,
             lambda f, y, e, ey: formulas.info_nce(f[:, 0], f[:, 1], temperature=0.3, queue=e,
                                                   in_batch_negatives=False)),
}


def test_fifo_order_wrap_around_and_labels():
    """Rows leave oldest first; the pointer wraps; a batch larger than the bank leaves its last rows;
    every label stays with its key (key value = its label here)."""
    bank = fc.MemoryBank(5, 2, dtype=F64)
    stream = []
    for rows in (3, 1, 4, 7, 2):
        ids = torch.arange(len(stream), len(stream) + rows)
        stream += ids.tolist()
        keys = torch.stack([ids.to(F64), -ids.to(F64)], 1).requires_grad_()
        bank.enqueue(keys, ids * 10)
        expected = torch.tensor(stream[-5:])
        got_keys, got_labels = bank.contents(ordered=True)
        assert torch.equal(got_keys[:, 0], expected.to(F64)) and torch.equal(got_keys[:, 1], -expected.to(F64))
        assert torch.equal(got_labels, expected * 10), (got_labels, expected)
        assert len(bank) == min(5, len(stream)) and int(bank.ptr) == len(stream) % 5 and int(bank.filled) == len(bank)
        assert not bank.keys.requires_grad and bank.keys.grad_fn is None  # a detached copy is stored
    bank.reset()
    assert len(bank) == 0 and bank.contents()[0].shape == (0, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_every_loss_with_a_bank_equals_the_explicit_call(name, backend):
    """Step by step, the loss and its gradients equal the float64 formula with the rows of the previous steps
    as extra keys (an independent FIFO of them), and the bank then holds exactly those rows; stored keys
    get no gradient. The first step (empty bank) is the plain loss."""
    loss, kwargs, labelled, formula = CASES[name]
    memory = fc.MemoryBankLoss(loss, SIZE, DIM, dtype=F64, backend=backend, **kwargs)
    stream_keys, stream_labels = torch.zeros(0, DIM, dtype=F64), torch.zeros(0, dtype=torch.long)
    for step in range(STEPS):
        features, labels = step_inputs(step)
        bank_keys, bank_labels = stream_keys[-SIZE:], stream_labels[-SIZE:]
        expected = formula(features, labels, bank_keys, bank_labels)
        (expected_grad,) = torch.autograd.grad(expected, features)
        if name in ("info_nce", "moco"):
            query, key = features[:, 0], features[:, 1]
            got = memory(query, key)
            new, new_labels = key.detach(), labels
        else:
            got = memory(features, labels) if labelled else memory(features)
            new, new_labels = views(features), labels.repeat(2)
        (grad,) = torch.autograd.grad(got, features)
        assert_close(got, expected, F64, f"{name} step {step} loss")
        assert_close(grad, expected_grad, F64, f"{name} step {step} features grad")
        stream_keys, stream_labels = torch.cat([stream_keys, new]), torch.cat([stream_labels, new_labels])
        keys, stored_labels = memory.bank.contents(ordered=True)
        assert torch.equal(keys, stream_keys[-SIZE:]), f"{name} step {step}: bank rows"
        assert (stored_labels is not None) == labelled
        if labelled:
            assert torch.equal(stored_labels, stream_labels[-SIZE:]), f"{name} step {step}: bank labels"
        assert not memory.bank.keys.requires_grad and memory.bank.keys.grad_fn is None


def test_checkpoint_round_trip_and_eval_mode():
    """state_dict holds keys, labels, pointer, fill level: a restored bank continues exactly; eval() does not
    enqueue."""
    make = lambda: fc.MemoryBankLoss(fc.SupConLoss(temperature=0.3, backend="reference"), SIZE, DIM, dtype=F64)
    memory = make()
    for step in range(2):
        memory(*step_inputs(step))
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer))
    assert sorted(memory.state_dict()) == ["bank.filled", "bank.keys", "bank.labelled", "bank.labels", "bank.ptr"]
    assert len(restored.bank) == SIZE and int(restored.bank.ptr) == 2 and restored.bank._ptr == 2
    for step in range(2, 4):
        assert torch.equal(memory(*step_inputs(step)), restored(*step_inputs(step))), step
        for a, b in zip(memory.bank.contents(ordered=True), restored.bank.contents(ordered=True)):
            assert torch.equal(a, b)
    before = memory.bank.contents(ordered=True)[0].clone()
    memory.eval()
    memory(*step_inputs(9))
    assert torch.equal(memory.bank.contents(ordered=True)[0], before)


@pytest.mark.parametrize("call,word", [
    (lambda: fc.MemoryBankLoss(fc.clip_loss, 4, DIM), "loss: clip_loss is symmetric"),
    (lambda: fc.MemoryBankLoss(fc.info_nce, 4, DIM, symmetric=True), "symmetric"),
    (lambda: fc.MemoryBankLoss(len, 4, DIM), "loss must be"),
    (lambda: fc.MemoryBankLoss(fc.supcon_loss, 0, DIM), "size"),
    (lambda: fc.MemoryBankLoss(fc.supcon_loss, 4, DIM, extra_keys=torch.zeros(1, DIM)), "extra_keys"),
    (lambda: fc.MemoryBankLoss(fc.supcon_loss, 4, DIM)(*step_inputs(0), torch.eye(BSZ)), "mask"),
    (lambda: fc.MemoryBank(4, 2).enqueue(torch.zeros(1, 2), torch.tensor([0.5])), "label_dtype"),
    (lambda: fc.MemoryBank(4, 2, label_dtype=torch.uint8).enqueue(torch.zeros(1, 2), torch.tensor([300])),
     "label_dtype"),
    (lambda: fc.MemoryBank(4, 2).enqueue(torch.zeros(1, 3)), "keys"),
    # the hooks: labelled extra keys need sample labels; extra labels need extra keys
    (lambda: fc.supcon_loss(step_inputs(0)[0], extra_keys=torch.zeros(2, DIM, dtype=F64), extra_key_labels=[0, 1]),
     "extra_key_labels needs labels"),
    (lambda: fc.spread_loss(*step_inputs(0), extra_key_labels=[0]), "extra_key_labels was given without extra_keys"),
    (lambda: fc.bcl_loss(*step_inputs(0), extra_key_labels=[0]), "extra_key_labels was given without extra_keys"),
    (lambda: fc.dcl_loss(step_inputs(0)[0], extra_keys=torch.zeros(2, DIM)), "extra_keys must have the features'"),
])
def test_bad_input(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_labels_at_every_step_or_none():
    memory = fc.MemoryBankLoss(fc.supcon_loss, SIZE, DIM, dtype=F64, backend="reference")
    features, labels = step_inputs(0)
    memory(features, labels)
    with pytest.raises(ValueError, match="labels"):
        memory(features)


def test_pml_cross_batch_memory_parity():
    """pml enqueues first and compares the batch with its whole memory (its own detached copies included):
    the same loss values as a bank of memory_size - batch rows that enqueues after the step."""
    from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss

    bsz, memory_size = 6, 20
    pml = CrossBatchMemory(SupConLoss(temperature=0.2), embedding_size=DIM, memory_size=memory_size)
    ours = fc.MemoryBankLoss(fc.supcon_loss, memory_size - bsz, DIM, dtype=F64, temperature=0.2, normalize=True,
                             no_positive="exclude", backend="chunked")
    for step in range(5):  # fills (20 rows after 4 steps of 6) and wraps around
        gen = torch.Generator().manual_seed(step)
        embeddings = torch.randn(bsz, DIM, dtype=F64, generator=gen)
        labels = torch.randint(0, 4, (bsz,), generator=gen)
        assert_close(ours(embeddings, labels), pml(embeddings, labels), F64, f"step {step}")


def check_ddp(rank, world, lo, hi, features, labels, backends):
    """Every rank's loss equals the single-process loss of the global batch with the same bank, and every
    rank's bank equals the single-process bank (so the ranks' banks are identical)."""
    import torch.distributed as dist

    group = dist.group.WORLD
    for name, loss, kwargs, labelled in [
        ("supcon gather", fc.supcon_loss, dict(temperature=0.3), True),
        ("supcon ring", fc.supcon_loss, dict(temperature=0.3, distributed="ring"), True),
        ("simclr ring", fc.supcon_loss, dict(temperature=0.3, distributed="ring"), False),
        ("dcl", fc.dcl_loss, dict(temperature=0.3), False),
        ("info_nce", fc.info_nce, dict(temperature=0.3), False),
    ]:
        single = fc.MemoryBankLoss(loss, 12, features.shape[-1], dtype=F64, backend="reference", **kwargs)
        distributed = fc.MemoryBankLoss(loss, 12, features.shape[-1], dtype=F64, backend="chunked",
                                        process_group=group, **kwargs)
        for step in range(3):  # 16 view rows a step: wraps from the second step
            f = (features.roll(step, 0) * (1 + step)).requires_grad_()
            args = (lambda t, y: (t[:, 0], t[:, 1])) if name == "info_nce" else (
                (lambda t, y: (t, y)) if labelled else (lambda t, y: (t,)))
            expected = single(*args(f, labels))
            (expected_grad,) = torch.autograd.grad(expected, f)
            local_f = f.detach()[lo:hi].clone().requires_grad_()
            got = distributed(*args(local_f, labels[lo:hi]))
            # Backward after the enqueue: the bank's rows the loss read (ring mode saves them) are unchanged.
            (grad,) = torch.autograd.grad(got, local_f)
            what = f"rank {rank} {name} step {step}"
            assert float((got - expected).abs() / expected.abs()) < 1e-12, f"{what}: {float(got)} != {float(expected)}"
            assert float((grad - world * expected_grad[lo:hi]).norm() / (world * expected_grad).norm()) < 1e-12, what
            for a, b in zip(distributed.bank.contents(ordered=True), single.bank.contents(ordered=True)):
                assert (a is None and b is None) or torch.equal(a, b), f"rank {rank} {name} step {step}: bank"


def test_ddp_banks_stay_identical():
    from test_distributed import spawn

    spawn(check_ddp, 2, timeout_s=120)
