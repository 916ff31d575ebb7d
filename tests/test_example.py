"""The examples, short: the digits run follows the same loss curve on every backend and training helps;
every other example runs end to end and reaches its own check."""
import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("sklearn")


def load_example():
    path = os.path.join(ROOT, "examples", "train_supcon_digits.py")
    spec = importlib.util.spec_from_file_location("train_supcon_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_training_same_curve_and_beats_untrained():
    example = load_example()
    runs = {b: example.train(b, epochs=20, log=lambda *_: None) for b in ("reference", "chunked")}
    ref, fused = runs["reference"], runs["chunked"]
    # Each backend's fp32 gradient is ~1e-5 (relative) off the float64 one on these unnormalised embeddings at
    # tau = 0.1 (checked below), and Adam amplifies such differences chaotically from the first steps on: the
    # first epoch's mean loss agrees to fp32 rounding, later ones at the 1e-3 level of run-to-run noise.
    # Exactness itself is tested in float64 elsewhere; here: the same curve, and training works.
    for epoch, (a, b) in enumerate(zip(ref["losses"], fused["losses"])):
        bound = 1e-6 if epoch < 1 else 5e-3
        assert abs(a - b) <= bound * abs(a), (epoch, ref["losses"], fused["losses"])
    assert ref["losses"][-1] < ref["losses"][0]
    assert fused["trained_knn_acc"] > fused["untrained_knn_acc"] + 0.02


def test_digits_first_batch_gradient_as_accurate_as_the_reference():
    """On the example's own first batch, chunked's fp32 gradient is as close to float64 as the dense fp32 one."""
    import torch

    import fused_contrastive as fc
    from helpers import relative_error

    example = load_example()
    torch.manual_seed(0)
    train_set, _ = example.load_digits_split(0)
    encoder, gen = example.Encoder(), torch.Generator().manual_seed(1)
    idx = torch.randperm(len(train_set[1]), generator=gen)[:256]
    x, y = train_set[0][idx], train_set[1][idx]
    with torch.no_grad():
        views = torch.stack([encoder(example.augment(x, gen)), encoder(example.augment(x, gen))], dim=1)

    def grad(backend, dtype):
        f = views.to(dtype).requires_grad_()
        loss = fc.supcon_loss(f, y, temperature=0.1, base_temperature=0.1, backend=backend)
        return torch.autograd.grad(loss, f)[0]

    exact = grad("reference", torch.float64)
    errors = {b: relative_error(grad(b, torch.float32), exact) for b in ("reference", "chunked")}
    assert 0 < errors["chunked"] <= 2 * errors["reference"], errors


SMOKE = {  # example -> (short arguments, check of its result)
    "clip_learnable_scale": (["--steps", "40", "--batch-size", "128"],
                             lambda r: r["losses"][-1] < r["losses"][0] and r["top1_after"] > r["top1_before"] + 0.1),
    "moco_queue": (["--epochs", "2", "--queue", "256"], lambda r: all(math.isfinite(v) for v in r["losses"])),
    "ddp_supcon": (["--steps", "3", "--batch-size", "64"],
                   lambda r: r["max_param_diff"] < 1e-12 and r["ddp_losses"] == pytest.approx(r["single_losses"])),
    "grad_cache_clip": (["--steps", "2", "--batch-size", "512", "--micro-batch", "128"],
                        lambda r: r["exact_rel_diff"] < 1e-12 and r["losses"][1] < r["losses"][0]),
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_example_runs(name):
    """Each README example runs end to end with short settings (the defaults take seconds to a minute)."""
    import importlib
    import sys

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    module = importlib.import_module(name)
    argv, check = SMOKE[name]
    result = module.main(argv)
    assert check(result), result
