"""The digits training example, short: backends follow the same loss curve and training helps."""
import importlib.util
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
    # From the same weights the two backends agree to fp32 rounding (the first epochs); Adam then amplifies
    # those 1e-8 differences about tenfold per epoch until they settle at the 1e-3 level of run-to-run noise.
    # Exactness itself is tested in float64 elsewhere; here: the same curve, and training works.
    for epoch, (a, b) in enumerate(zip(ref["losses"], fused["losses"])):
        bound = 1e-6 if epoch < 2 else 5e-3
        assert abs(a - b) <= bound * abs(a), (epoch, ref["losses"], fused["losses"])
    assert ref["losses"][-1] < ref["losses"][0]
    assert fused["trained_knn_acc"] > fused["untrained_knn_acc"] + 0.02
