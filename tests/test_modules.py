"""The loss modules: explicit constructors (the functions' defaults, except the documented differences, and
their ValueErrors at construction), tensor settings registered, forward = the function, extra_repr, and the
docstring examples run."""
import doctest
import inspect

import pytest
import torch

import fused_contrastive as fc
from fused_contrastive import family
from helpers import assert_close, make_features

F64 = torch.float64
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0])
NO_DEFAULT = inspect.Parameter.empty

# (module, argument) -> (module default, function default): the differences family's docstring lists.
DIFFERENCES = {("SupConLoss", "base_temperature"): (0.07, None), ("ClipLoss", "logit_scale"): (None, NO_DEFAULT)}


def _inputs():
    f = make_features(7, 2, 5, seed=3)
    return f, f[:, 0].detach().clone().requires_grad_(), f[:, 1].detach().clone().requires_grad_()


# name -> (function, non-default settings, forward's (args, kwargs) from (features, query, key),
#          a bad setting, the tensor setting to register (name, value))
CASES = {
    "SupConLoss": (fc.supcon_loss, dict(temperature=0.2, contrast_mode="one"), lambda f, q, k: ((f, LABELS), {}),
                   ("contrast_mode", "ALL"), ("temperature", 0.3)),
    "EpsSupInfoNCELoss": (fc.eps_supinfonce_loss, dict(epsilon=0.3, base_temperature=0.2),
                          lambda f, q, k: ((f, LABELS), {}), ("epsilon", -1.0), ("temperature", 0.3)),
    "DCLLoss": (fc.dcl_loss, dict(weighted=True, sigma=0.7), lambda f, q, k: ((f,), {}), ("sigma", 0.0),
                ("temperature", 0.3)),
    "InfoNCELoss": (fc.info_nce, dict(in_batch_negatives=False), lambda f, q, k: ((q, k), dict(queue=f[:3, 0].detach())),
                    ("symmetric", "yes"), ("temperature", 0.3)),
    "ClipLoss": (fc.clip_loss, dict(logit_bias=0.5), lambda f, q, k: ((q, k, 4.0), {}), ("logit_bias", "a"),
                 ("logit_scale", 5.0)),
    "DebiasedContrastiveLoss": (fc.debiased_contrastive_loss, dict(tau_plus=0.2, beta=0.5),
                                lambda f, q, k: ((f,), {}), ("tau_plus", 1.0), ("temperature", 0.3)),
    "BCLLoss": (fc.bcl_loss, dict(temperature=0.2), lambda f, q, k: ((f, LABELS), {}), ("temperature", -1.0),
                ("class_centers", [[0.6, 0.8, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0, 0.8, 0.6]])),
    "SpreadLoss": (fc.spread_loss, dict(temperature=0.3), lambda f, q, k: ((f, LABELS), {}), ("temperature", 0.0),
                   ("temperature", 0.3)),
    "SymmetricSpreadLoss": (fc.symmetric_spread_loss, dict(normalize=True), lambda f, q, k: ((f, LABELS), {}),
                            ("normalize", 1.5), ("temperature", 0.3)),
    "UniConLoss": (fc.unicon_loss, dict(base_temperature=0.2, contrast_mode="one"),
                   lambda f, q, k: ((f, torch.cat([q, k]), LABELS), {}), ("contrast_mode", "both"),
                   ("temperature", 0.3)),
    "SuNCEtLoss": (fc.suncet_loss, dict(normalize=True), lambda f, q, k: ((f, LABELS), dict(support=q[:3],
                                                                                          support_labels=LABELS[:3])),
                   ("contrast_mode", "none"), ("temperature", 0.3)),
}
NAMES = list(CASES)


def _call(module, name):
    inputs = _inputs()
    args, kwargs = CASES[name][2](*inputs)
    if name == "ClipLoss" and module.logit_scale is not None:
        args = args[:2]
    return module(*args, **kwargs), inputs


@pytest.mark.parametrize("name", NAMES)
def test_signature_has_the_functions_arguments_and_defaults(name):
    cls, fn = getattr(fc, name), CASES[name][0]
    init = dict(list(inspect.signature(cls.__init__).parameters.items())[1:])
    forward = dict(list(inspect.signature(cls.forward).parameters.items())[1:])
    for both in set(init) & set(forward):  # given at construction or per call: the same default
        assert init[both].default == forward[both].default, both
    module = {k: p.default for k, p in {**forward, **init}.items()}
    function = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    assert sorted(module) == sorted(function)
    for arg, default in function.items():
        expected = DIFFERENCES.get((name, arg), (default, default))
        assert (module[arg], default) == expected, arg
    defaults = cls()  # construction with defaults
    assert defaults.kwargs == {k: v for k, v in module.items() if k in init}


def test_differences_are_listed_in_one_table():
    for cls_name, arg in DIFFERENCES:
        assert f"{cls_name} {arg}" in family.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_typo_and_bad_value_at_construction(name):
    cls, (fn, _, inputs, (arg, value), _) = getattr(fc, name), CASES[name]
    with pytest.raises(TypeError):
        cls(temprature=0.1)
    with pytest.raises(ValueError, match=arg) as at_construction:
        cls(**{arg: value})
    args, kwargs = inputs(*_inputs())
    with pytest.raises(ValueError) as in_function:
        fn(*args, **kwargs, **{arg: value})
    assert str(at_construction.value) == str(in_function.value)


@pytest.mark.parametrize("name", NAMES)
def test_module_equals_function(name):
    cls, (fn, settings, inputs, _, _) = getattr(fc, name), CASES[name]
    module = cls(**settings, backend="reference")
    got, (f, q, k) = _call(module, name)
    args, kwargs = inputs(f, q, k)
    defaults = {arg: d[0] for (c, arg), d in DIFFERENCES.items() if c == name and d[0] is not None}
    expected = fn(*args, **kwargs, **{**defaults, **settings}, backend="chunked")
    leaves = (f, q, k)
    grads = torch.autograd.grad(got, leaves, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    assert_close(got, expected, F64, f"{name} loss")
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if g is not None:
            assert_close(g, e, F64, f"{name} gradient")
    text = repr(module)
    for arg, value in {**settings, "backend": "reference"}.items():
        assert f"{arg}={value!r}" in text, text


@pytest.mark.parametrize("name", NAMES)
def test_tensor_settings_are_registered(name):
    cls, arg, value = getattr(fc, name), *CASES[name][4]
    learned = torch.nn.Parameter(torch.tensor(value, dtype=F64))
    module = cls(**{arg: learned}, backend="chunked")
    assert [p for p in module.parameters()] == [learned] and f"{arg}=Parameter(" in repr(module)
    loss, _ = _call(module, name)
    (grad,) = torch.autograd.grad(loss, learned)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    buffer = cls(**{arg: torch.tensor(value, dtype=torch.float32)})
    assert list(buffer.parameters()) == [] and list(buffer.state_dict()) == [arg]
    assert buffer.to(F64).state_dict()[arg].dtype == F64 and getattr(buffer, arg).dtype == F64


@pytest.mark.parametrize("name,arg,value", [("ClipLoss", "logit_scale", 4.0), ("ClipLoss", "logit_bias", 0.5),
                                            ("BCLLoss", "class_centers", None)])
def test_given_at_construction_and_per_call_is_refused(name, arg, value):
    f, q, k = _inputs()
    if name == "ClipLoss":
        module = fc.ClipLoss(**{arg: torch.tensor(value)})
        call = lambda: module(q, k, 4.0, **({"logit_bias": 0.5} if arg == "logit_bias" else {}))  # noqa: E731
    else:
        module = fc.BCLLoss(class_centers=f[:3, 0].detach())
        call = lambda: module(f, LABELS, class_centers=f[:3, 0].detach())  # noqa: E731
    with pytest.raises(ValueError, match=f"{arg} was given both"):
        call()
    with pytest.raises(ValueError, match="logit_scale must be given"):
        fc.ClipLoss()(q, k)


@pytest.mark.parametrize("obj", [getattr(fc, n) for n in NAMES] + [
    fc.supcon_loss, fc.eps_supinfonce_loss, fc.dcl_loss, fc.info_nce, fc.clip_loss, fc.debiased_contrastive_loss,
    fc.bcl_loss, fc.spread_loss], ids=lambda o: o.__name__)
def test_docstring_example_runs(obj):
    examples = doctest.DocTestFinder(recurse=False).find(obj, obj.__name__, globs={})
    assert examples and examples[0].examples, f"{obj.__name__} has no example"
    runner = doctest.DocTestRunner()
    for test in examples:
        runner.run(test)
    assert runner.failures == 0


@pytest.mark.parametrize("name", ["DCLLoss", "ClipLoss", "BCLLoss"])
def test_registered_parameter_under_compile(name):
    """A registered Parameter setting is read inside the compiled graph: the eager loss and its gradient."""
    arg, value = CASES[name][4]
    learned = torch.nn.Parameter(torch.tensor(value, dtype=F64))
    module = getattr(fc, name)(**{arg: learned}, backend="chunked")
    args, kwargs = CASES[name][2](*_inputs())
    args = args[:2] if name == "ClipLoss" else args
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: module(*a, **kwargs), fullgraph=True, backend="aot_eager")
    eager, got = module(*args, **kwargs), compiled(*args)
    assert_close(got, eager, F64, f"{name} compiled loss")
    assert_close(torch.autograd.grad(got, learned)[0], torch.autograd.grad(eager, learned)[0], F64, f"{name} grad")


def test_memory_bank_with_a_module_owning_its_temperature():
    """The module's Parameter is the bank loss's parameter and is learned through it; keyword arguments given
    to MemoryBankLoss override the module's settings."""
    learned = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))
    memory = fc.MemoryBankLoss(fc.DCLLoss(temperature=learned, weighted=True), 10, 5, dtype=F64, backend="reference")
    assert list(memory.parameters()) == [learned]
    for step in range(2):
        features = make_features(3, 2, 5, seed=10 + step)
        expected = fc.dcl_loss(features, temperature=learned, weighted=True, backend="chunked",
                               extra_keys=memory.bank.contents()[0] if len(memory.bank) else None)
        got = memory(features)
        assert_close(got, expected, F64, f"step {step}")
        assert_close(torch.autograd.grad(got, learned)[0], torch.autograd.grad(expected, learned)[0], F64, "tau grad")
