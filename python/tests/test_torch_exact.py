"""``torch_exact=True`` gives torch.optim's bits on every step for the seven
classes that take a square root, where torch's square root is MKL's AVX-512 one (the data in
tests/torch_sqrt/ says which); the option's plumbing everywhere."""

import json
import os

import numpy as np
import pytest
import torch

import adaoptim.torch as ada

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def _mkl_avx512_sqrt():
    with open(os.path.join(ROOT, "tests", "torch_sqrt", "torch_sqrt.json")) as f:
        ref = json.load(f)
    x = torch.tensor(np.array(ref["input_bits"], dtype=np.uint32).view(np.float32))
    y = x.sqrt()
    same = y.numpy().view(np.uint32) == np.array(ref["sqrt_bits"], dtype=np.uint32)
    return bool((same | y.isnan().numpy()).all())


exact_here = pytest.mark.skipif(
    not _mkl_avx512_sqrt(), reason="torch's sqrt here is not MKL's AVX-512 one, which torch_exact reproduces"
)

CASES = [
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("Adam", {"lr": 0.003, "maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("AdamW", {}),
    ("AdamW", {"lr": 0.02, "amsgrad": True, "weight_decay": 0.5}),
    ("RMSprop", {}),
    ("RMSprop", {"lr": 0.003, "centered": True, "momentum": 0.9, "weight_decay": 0.01}),
    ("Adagrad", {}),
    ("Adagrad", {"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "maximize": True}),
    ("Adadelta", {"lr": 0.5, "weight_decay": 0.1}),
    ("RAdam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("NAdam", {"lr": 0.01, "momentum_decay": 0.01, "maximize": True}),
]


def _run(make, shapes, steps, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = make(params)
    for t in range(steps):
        for p in params:
            scale = torch.pow(10.0, torch.empty(p.shape).uniform_(-10, 6, generator=g))
            p.grad = torch.randn(p.shape, generator=g) * scale
            if t % 3 == 0:
                p.grad[torch.rand(p.shape, generator=g) < 0.5] = 0.0
        opt.step()
        yield [p.detach().clone() for p in params]


@exact_here
@pytest.mark.parametrize("cls,kw", CASES)
def test_torch_exact_equals_torch_bit_for_bit(cls, kw):
    shapes = [(3,), (17,), (64, 33), (1000,)]
    ours = _run(lambda ps: getattr(ada, cls)(ps, torch_exact=True, **kw), shapes, 25, 1)
    theirs = _run(lambda ps: getattr(torch.optim, cls)(ps, foreach=False, **kw), shapes, 25, 1)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"step {t + 1}, tensor {i}: {(x != y).sum().item()} elements differ"


@exact_here
def test_torch_exact_large_tensor_parallel_path():
    # 2^22 elements: stepped by the crate's parallel driver
    ours = _run(lambda ps: ada.AdamW(ps, torch_exact=True, lr=0.01), [(1 << 22,)], 3, 2)
    theirs = _run(lambda ps: torch.optim.AdamW(ps, foreach=False, lr=0.01), [(1 << 22,)], 3, 2)
    for a, b in zip(ours, theirs):
        assert torch.equal(a[0], b[0])


def test_default_is_not_always_torchs_bits():
    # the default evaluation (one division) parts from torch's last bits
    ours = list(_run(lambda ps: ada.Adam(ps), [(4096,)], 10, 3))
    theirs = list(_run(lambda ps: torch.optim.Adam(ps, foreach=False), [(4096,)], 10, 3))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(ours, theirs))
    assert all(torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-6) for a, b in zip(ours, theirs))


def test_torch_exact_in_param_groups_and_state_dict():
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = ada.Adam([{"params": [p]}, {"params": [q], "torch_exact": False}], torch_exact=True)
    assert [g["torch_exact"] for g in opt.param_groups] == [True, False]
    sd = opt.state_dict()
    assert [g["torch_exact"] for g in sd["param_groups"]] == [True, False]
    # torch's Adam takes the state_dict (it keeps the extra key, ignores it)
    t = torch.optim.Adam([torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))])
    t.param_groups = [{"params": [t.param_groups[0]["params"][0]]}, {"params": [t.param_groups[0]["params"][1]]}]
    t.load_state_dict(sd)
    # without the option no group holds the key: torch's layout exactly
    plain = ada.AdamW([torch.nn.Parameter(torch.ones(2))])
    assert "torch_exact" not in plain.param_groups[0]
    plain.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert "torch_exact" not in plain.param_groups[1]


def test_torch_exact_refused_where_not_offered():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(TypeError, match="torch_exact"):
        ada.SGD([p], lr=0.1, torch_exact=True)
    with pytest.raises(TypeError, match="True or False"):
        ada.Adam([p], torch_exact=1)
    # sparse gradients take torch's sparse Adagrad update, without it
    e = torch.nn.Embedding(10, 4, sparse=True)
    opt = ada.Adagrad(e.parameters(), torch_exact=True)
    e(torch.tensor([1, 2])).sum().backward()
    before = e.weight.detach().clone()
    with pytest.raises(ValueError, match="torch_exact"):
        opt.step()
    assert torch.equal(before, e.weight.detach())
