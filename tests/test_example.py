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
    for a, b in zip(ref["losses"], fused["losses"]):
        assert abs(a - b) <= 1e-3 * abs(a), (ref["losses"], fused["losses"])
    assert ref["losses"][-1] < ref["losses"][0]
    assert fused["trained_knn_acc"] > fused["untrained_knn_acc"] + 0.02
