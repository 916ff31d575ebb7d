"""A table of bad inputs over every public loss: each raises a ValueError whose message names the argument.

Each case replaces some arguments of a good call (``GOOD``). test_distributed.py runs the same table with a
process group, the bad call on one rank only: every rank must then raise the same error.
"""
import numpy as np
import pytest
import torch

import fused_contrastive as fc

F = torch.nn.functional.normalize(torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
L = torch.tensor([0, 1, 0, 1])
GOOD = {  # a valid call of every public loss, by keyword
    "supcon_loss": dict(features=F, labels=L),
    "eps_supinfonce_loss": dict(features=F, labels=L),
    "dcl_loss": dict(features=F),
    "info_nce": dict(query=F[:, 0], key=F[:, 1]),
    "clip_loss": dict(image_features=F[:, 0], text_features=F[:, 1], logit_scale=10.0),
    "debiased_contrastive_loss": dict(features=F),
    "bcl_loss": dict(features=F, labels=L),
    "spread_loss": dict(features=F, labels=L),
    "symmetric_spread_loss": dict(features=F, labels=L),
    "unicon_loss": dict(features=F, universum=torch.nn.functional.normalize(torch.randn(8, 8), dim=-1), labels=L),
    "suncet_loss": dict(features=F, labels=L),
}
NAN_F = F.clone().index_fill_(0, torch.tensor([1]), float("nan"))


def _feature_cases(loss):
    """Bad per-sample floating inputs: (id, replaced arguments, word)."""
    if loss in ("info_nce", "clip_loss"):
        a, b = ("query", "key") if loss == "info_nce" else ("image_features", "text_features")
        return [("rank 1", {a: F[:, 0, 0], b: F[:, 1, 0]}, a), ("not a tensor", {a: [[1.0]], b: [[1.0]]}, a),
                ("integers", {a: L[:, None], b: L[:, None]}, a), ("empty", {a: F[:0, 0], b: F[:0, 1]}, a),
                ("meta", {a: F[:, 0].to("meta"), b: F[:, 1].to("meta")}, a),
                ("other shape", {b: F[:3, 1]}, b), ("other dtype", {b: F[:, 1].double()}, b),
                ("non-finite (check on)", {a: NAN_F[:, 0]}, a)]
    return [("rank 1", {"features": F[:, 0, 0]}, "features"), ("not a tensor", {"features": [[1.0, 2.0]]}, "features"),
            ("integers", {"features": torch.ones(4, 2, 8, dtype=torch.long)}, "floating"),
            ("empty", {"features": F[:0]}, "features"), ("zero dim", {"features": F[..., :0]}, "features"),
            ("meta", {"features": F.to("meta")}, "features"),
            ("non-finite (check on)", {"features": NAN_F}, "features")]


def _temperature_cases(loss):
    if loss == "clip_loss":
        return [("scale zero", {"logit_scale": 0.0}, "logit_scale"),
                ("scale inf", {"logit_scale": float("inf")}, "logit_scale"),
                ("scale beyond fp32", {"logit_scale": 1e39}, "logit_scale"),
                ("scale 3 elements", {"logit_scale": torch.ones(3)}, "logit_scale"),
                ("scale string", {"logit_scale": "10"}, "logit_scale"),
                ("scale meta", {"logit_scale": torch.tensor(10.0, device="meta")}, "logit_scale"),
                ("bias 3 elements", {"logit_bias": torch.zeros(3)}, "logit_bias"),
                ("bias string", {"logit_bias": "0"}, "logit_bias")]
    return [(f"temperature {v!r}", {"temperature": v}, "temperature")
            for v in (0.0, -0.1, float("inf"), float("nan"), "0.1", torch.ones(2), 1e-40,
                      torch.tensor(0.1, device="meta"))]


def _label_cases(loss):
    cases = [("label count", {"labels": L[:3]}, "labels"), ("label shape", {"labels": torch.zeros(4, 2)}, "labels"),
             ("string labels", {"labels": ["a", "b", "a", "b"]}, "labels"),
             ("2**64 label", {"labels": [2 ** 64, 0, 1, 0]}, "labels"),
             ("uint64 labels", {"labels": np.array([2 ** 64 - 1, 0, 1, 0], dtype=np.uint64)}, "labels"),
             ("NaN label", {"labels": torch.tensor([0.0, float("nan"), 0.0, 1.0])}, "labels"),
             ("complex labels", {"labels": L.to(torch.complex64)}, "labels"),
             ("meta labels", {"labels": L.to("meta")}, "labels")]
    if loss in ("bcl_loss", "spread_loss", "symmetric_spread_loss", "unicon_loss", "suncet_loss"):
        cases.append(("no labels", {"labels": None}, "labels"))
    return cases


def _reduction_cases():
    return [("reduction", {"reduction": "avg"}, "reduction"), ("weight shape", {"weight": torch.ones(3)}, "weight"),
            ("weight integers", {"weight": torch.ones(4, dtype=torch.long)}, "weight"),
            ("weight list", {"weight": [1.0] * 4}, "weight"), ("weight negative", {"weight": -torch.ones(4)}, "weight"),
            ("weight NaN", {"weight": torch.full((4,), float("nan"))}, "weight"),
            ("weight inf", {"weight": torch.full((4,), float("inf"))}, "weight"),
            ("weight on another device", {"weight": torch.ones(4, device="meta")}, "weight")]


BANK = torch.randn(3, 8)
SPECIFIC = {
    "supcon_loss": [
        ("labels and mask", {"mask": torch.eye(4)}, "labels or mask"),
        ("mask shape", {"labels": None, "mask": torch.eye(3)}, "mask"),
        ("mask negative", {"labels": None, "mask": -torch.eye(4)}, "mask"),
        ("mask nan", {"labels": None, "mask": torch.full((4, 4), float("nan"))}, "mask"),
        ("mask meta", {"labels": None, "mask": torch.eye(4, device="meta")}, "mask"),
        ("base_temperature zero", {"base_temperature": 0.0}, "base_temperature"),
        ("loss scale beyond fp32", {"temperature": 0.1, "base_temperature": 1e-300}, "base_temperature"),
        ("contrast_mode", {"contrast_mode": "both"}, "contrast_mode"),
        ("per-view weight, contrast_mode one", {"contrast_mode": "one", "weight": torch.ones(4, 2)}, "weight"),
        ("no_positive", {"no_positive": "drop"}, "no_positive"),
        ("variant", {"variant": "mid"}, "variant"),
        ("normalize", {"normalize": "yes"}, "normalize"),
        ("distributed", {"distributed": "tree"}, "distributed"),
        ("extra labels alone", {"extra_key_labels": [0]}, "extra_key_labels"),
        ("extra keys D", {"extra_keys": BANK[:, :5], "extra_key_labels": [0, 1, 2]}, "extra_keys"),
        ("extra keys dtype", {"extra_keys": BANK.double(), "extra_key_labels": [0, 1, 2]}, "extra_keys"),
        ("extra keys meta", {"extra_keys": BANK.to("meta"), "extra_key_labels": [0, 1, 2]}, "extra_keys"),
        ("extra labels count", {"extra_keys": BANK, "extra_key_labels": [0, 1]}, "extra_key_labels"),
        ("extra labels NaN", {"extra_keys": BANK, "extra_key_labels": [0.0, float("nan"), 1.0]}, "extra_key_labels"),
        ("extra labels strings", {"extra_keys": BANK, "extra_key_labels": ["a", "b", "c"]}, "extra_key_labels"),
        ("extra keys non-finite (check on)", {"extra_keys": BANK.index_fill(0, torch.tensor([0]), float("inf")),
                                              "extra_key_labels": [0, 1, 2]}, "extra_keys"),
    ],
    "eps_supinfonce_loss": [("epsilon negative", {"epsilon": -1.0}, "epsilon"),
                            ("epsilon beyond fp32", {"epsilon": 1e39}, "epsilon"),
                            ("contrast_mode", {"contrast_mode": "both"}, "contrast_mode")],
    "dcl_loss": [("weighted", {"weighted": "yes"}, "weighted"), ("sigma zero", {"sigma": 0.0}, "sigma"),
                 ("sigma tiny", {"weighted": True, "sigma": 1e-40}, "sigma"),
                 ("three views weighted", {"features": torch.randn(4, 3, 8), "weighted": True}, "features"),
                 ("one sample (local only)", {"features": F[:1]}, "features")],
    "info_nce": [("queue D", {"queue": torch.randn(5, 3)}, "queue"),
                 ("queue dtype", {"queue": torch.randn(5, 8).double()}, "queue"),
                 ("queue meta", {"queue": torch.randn(5, 8, device="meta")}, "queue"),
                 ("queue non-finite (check on)", {"queue": torch.full((5, 8), float("nan"))}, "queue"),
                 ("queue and symmetric", {"queue": torch.randn(5, 8), "symmetric": True}, "symmetric"),
                 ("in_batch_negatives", {"in_batch_negatives": "no"}, "in_batch_negatives")],
    "debiased_contrastive_loss": [("tau_plus one", {"tau_plus": 1.0}, "tau_plus"),
                                  ("beta negative", {"beta": -1.0}, "beta"),
                                  ("beta beyond fp32", {"beta": 1e38, "temperature": 0.1}, "beta"),
                                  ("one view", {"features": torch.randn(4, 1, 8)}, "features")],
    "bcl_loss": [("centers D", {"class_centers": torch.randn(2, 5)}, "class_centers"),
                 ("centers dtype", {"class_centers": torch.randn(2, 8).double()}, "class_centers"),
                 ("centers vector", {"class_centers": torch.randn(8)}, "class_centers"),
                 ("label beyond centers", {"class_centers": torch.randn(1, 8)}, "labels"),
                 ("float labels with centers", {"labels": L.double(), "class_centers": torch.randn(2, 8)}, "labels")],
    "spread_loss": [("one view", {"features": torch.randn(4, 1, 8)}, "features"),
                    ("normalize", {"normalize": "yes"}, "normalize")],
    "symmetric_spread_loss": [("one view", {"features": torch.randn(4, 1, 8)}, "features"),
                              ("bank labels alone", {"extra_key_labels": [0]}, "extra_key_labels")],
    "unicon_loss": [("universum rows", {"universum": torch.randn(4, 8)}, "universum"),
                    ("universum D", {"universum": torch.randn(8, 7)}, "universum"),
                    ("universum dtype", {"universum": torch.randn(8, 8).double()}, "universum"),
                    ("universum meta", {"universum": torch.randn(8, 8, device="meta")}, "universum"),
                    ("universum non-finite (check on)", {"universum": torch.full((8, 8), float("nan"))}, "universum"),
                    ("contrast_mode", {"contrast_mode": "both"}, "contrast_mode")],
    "suncet_loss": [("support without labels", {"support": BANK}, "support_labels"),
                    ("support labels alone", {"support_labels": [0, 1, 2]}, "support_labels"),
                    ("support D", {"support": BANK[:, :5], "support_labels": [0, 1, 2]}, "support"),
                    ("support label count", {"support": BANK, "support_labels": [0, 1]}, "support_labels"),
                    ("support label NaN", {"support": BANK, "support_labels": [0.0, float("nan"), 1.0]},
                     "support_labels"),
                    ("contrast_mode", {"contrast_mode": "both"}, "contrast_mode")],
}


def bad_inputs():
    """(id, loss, replaced arguments, word the message must contain) for every public loss."""
    table = []
    for loss in GOOD:
        cases = _feature_cases(loss) + _temperature_cases(loss) + [("backend", {"backend": "jax"}, "backend")]
        cases += _reduction_cases()
        if "labels" in GOOD[loss]:
            cases += _label_cases(loss)
        table += [(f"{loss}: {name}", loss, bad, word) for name, bad, word in cases + SPECIFIC.get(loss, [])]
    return table


BAD_INPUTS = bad_inputs()


def call_bad(loss, bad, **kw):
    """The good call of ``loss`` with ``bad``'s arguments replaced (the finite check on where a case asks)."""
    return getattr(fc, loss)(**{**GOOD[loss], **bad, **kw})


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_value_error_naming_the_argument(case, monkeypatch):
    name, loss, bad, word = case
    if "(check on)" in name:
        monkeypatch.setenv("FUSED_CONTRASTIVE_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=word):
        call_bad(loss, bad)


@pytest.mark.parametrize("loss", list(GOOD))
def test_good_calls_and_non_finite_input_without_the_check(loss, monkeypatch):
    """The table's base calls are valid; by default NaN features give a NaN loss, as torch's own losses do
    (no host sync to look for them), and FUSED_CONTRASTIVE_CHECK_FINITE=1 turns that into a ValueError."""
    monkeypatch.delenv("FUSED_CONTRASTIVE_CHECK_FINITE", raising=False)
    assert torch.isfinite(call_bad(loss, {}))
    nan = {k: NAN_F[:, 0] if v.dim() == 2 else NAN_F for k, v in GOOD[loss].items() if k in (
        "features", "query", "image_features")}
    assert torch.isnan(call_bad(loss, nan))
    monkeypatch.setenv("FUSED_CONTRASTIVE_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="must be finite"):
        call_bad(loss, nan)


def test_extreme_scalars_next_to_the_refused_ones_are_accepted():
    """The limit is the accumulation dtype's range: what float32 refuses, float64 features accept."""
    assert torch.isfinite(fc.supcon_loss(F, L, temperature=1e-30))
    assert torch.isfinite(fc.supcon_loss(F.double(), L, temperature=1e-40))
    assert torch.isfinite(fc.clip_loss(F[:, 0], F[:, 1], 1e30))
    assert torch.isfinite(fc.clip_loss(F[:, 0].double(), F[:, 1].double(), 1e39))
    assert torch.isfinite(fc.clip_loss(F[:, 0], F[:, 1], 10.0, logit_bias=torch.tensor([-10.0])))
