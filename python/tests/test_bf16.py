"""bfloat16 parameters and state, and bfloat16/float16 gradients beside
float32 master weights, against real torch: against torch's ``fused=True``
step (which also widens, steps in float32 and rounds back), and for every
element-wise class against torch's float32 step on the widened tensors,
rounded to nearest-even."""

import copy

import pytest
import torch

import adaoptim.torch as ada

RTOL, ATOL = 1e-5, 1e-6  # the golden tolerance (tests/golden/README.md)
# Classes whose float32 step is torch's bit for bit (test_torch.py).
BITWISE = {"SGD", "Adamax", "Rprop", "ASGD"}
ELEMENTWISE = ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Rprop", "ASGD"]
# Two small tensors, one cut into pieces by the Rust driver (> 2^16), one
# stepped by its parallel driver (>= 2^21).
SHAPES = ((5, 7), (13,), (70001,), (1 << 21,))

FUSED_CASES = [
    ("Adam", {"lr": 1e-2}),
    ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 1e-2, "maximize": True, "betas": (0.8, 0.99)}),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "eps": 1e-6}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "dampening": 0.5, "maximize": True}),
    ("SGD", {"lr": 1e-2}),
    ("Adagrad", {"lr": 1e-2}),
    ("Adagrad", {"lr": 1e-2, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1}),
]


def bits(t):
    return t.detach().contiguous().view(torch.int16)


def grads(shapes, gen, dtype):
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


# The classes whose bfloat16 step is torch's fused one bit for bit. Adam's
# and AdamW's float32 arithmetic differs from torch's fused kernel by float32
# ulps (within the golden tolerance), which moves a rare bfloat16 rounding
# by one ulp: measured, 0 to 4 elements of 2.1M after six steps.
FUSED_EXACT = {"SGD", "Adagrad"}


def same_bits(got, want, exact, what, rare=1e-4):
    """`got` has `want`'s bits; where not `exact`, all but a `rare` fraction
    do, and the rest lie within one bfloat16 ulp of a value within the
    golden tolerance of `want` (float32 arithmetic that differs from
    torch's by float32 ulps moves a rare rounding)."""
    differ = bits(got) != bits(want.bfloat16())
    if exact:
        assert not differ.any(), f"{what}: {differ.sum()} of {differ.numel()} differ"
        return
    w, g = want.float(), got.float()
    _, e = torch.frexp(w)
    ulp = torch.ldexp(torch.ones_like(w), e - 8)  # bfloat16 spacing at |w|
    far = (g - w).abs() > RTOL * w.abs() + ATOL + ulp
    assert not far.any(), f"{what}: {g[far][:4].tolist()} for {w[far][:4].tolist()}"
    assert differ.float().mean() <= rare, f"{what}: {differ.sum()} of {differ.numel()} differ"


@pytest.mark.parametrize("name,kwargs", FUSED_CASES, ids=lambda x: str(x))
def test_bf16_is_torch_fused(name, kwargs):
    gen = torch.Generator().manual_seed(1)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in SHAPES]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref = getattr(torch.optim, name)(ref, fused=True, **copy.deepcopy(kwargs))
    o_ours = getattr(ada, name)(ours, **copy.deepcopy(kwargs))
    for step in range(6):
        for a, b, g in zip(ref, ours, grads(SHAPES, gen, torch.bfloat16)):
            a.grad, b.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
        if step == 2:
            # Mid-run, torch's bfloat16 state_dict moves into a new one of ours.
            o_ours = getattr(ada, name)(ours, **copy.deepcopy(kwargs))
            o_ours.load_state_dict(copy.deepcopy(o_ref.state_dict()))
    for i, (a, b) in enumerate(zip(ref, ours)):
        assert b.dtype == torch.bfloat16
        same_bits(b, a, name in FUSED_EXACT, f"{name} {kwargs} tensor {i}")
        for k, v in o_ref.state[a].items():
            w = o_ours.state[b][k]
            if k == "step":
                assert float(v) == float(w)
            else:
                assert w.dtype == torch.bfloat16, f"state {k} is {w.dtype}"
                same_bits(w, v, name in FUSED_EXACT, f"{name} state {k} tensor {i}")
    # And ours loads back into torch.
    o_back = getattr(torch.optim, name)(ref, fused=True, **copy.deepcopy(kwargs))
    o_back.load_state_dict(copy.deepcopy(o_ours.state_dict()))


def widened_reference(name, kwargs, ours, o_ours, gs):
    """torch's float32 step (for-loop) from our current state, every tensor
    widened: the parameters and state it gives."""
    p32 = [torch.nn.Parameter(p.detach().float()) for p in ours]
    ref = getattr(torch.optim, name)(p32, foreach=False, **copy.deepcopy(kwargs))
    # torch's load_state_dict casts floating state to the parameter's dtype.
    ref.load_state_dict(copy.deepcopy(o_ours.state_dict()))
    for p, g in zip(p32, gs):
        p.grad = g.float()
    ref.step()
    return p32, ref


def steps_against_widened(name, kwargs, ours, o_ours, gen, dtype, steps=5):
    """Steps `o_ours` `steps` times on fresh gradients of `dtype` and, from
    the second step on (the first starts from no state, which torch
    creates), yields the step, torch's float32 step from the same state on
    the widened tensors (`widened_reference`), and our parameters and state
    before the step."""
    shapes = [p.shape for p in ours]
    for step in range(steps):
        gs = grads(shapes, gen, dtype)
        if step:
            p32, ref = widened_reference(name, kwargs, ours, o_ours, gs)
        before = [p.detach().clone() for p in ours]
        state_before = [{k: v.clone() for k, v in o_ours.state[p].items()} for p in ours]
        for p, g in zip(ours, gs):
            p.grad = g
        o_ours.step()
        if step:
            yield step, p32, ref, before, state_before


def assert_rounded(got, want32, exact, what):
    """`got` (bfloat16) is `want32` rounded to nearest-even: exactly, or where
    torch's float32 value differs from ours by float32 ulps, one bfloat16
    ulp apart for a rare element."""
    same_bits(got, want32, exact, what, rare=1e-3)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_bf16_every_class_is_the_float32_step_rounded(name):
    kwargs = {"lr": 1e-2} if name != "Adadelta" else {}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    gen = torch.Generator().manual_seed(2)
    shapes = SHAPES[:3]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]
    o_ours = getattr(ada, name)(ours, **kwargs)
    for step, p32, ref, _, _ in steps_against_widened(name, kwargs, ours, o_ours, gen, torch.bfloat16):
        for i, (a, b) in enumerate(zip(p32, ours)):
            assert_rounded(b, a.detach(), name in BITWISE, f"{name} step {step} tensor {i}")
            for k, v in ref.state[a].items():
                w = o_ours.state[b][k]
                if torch.is_tensor(v) and v.shape == a.shape:
                    assert w.dtype == torch.bfloat16
                    assert_rounded(w, v, name in BITWISE, f"{name} state {k} step {step}")


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_float32_state_beside_bf16_params(name):
    """float32 state set by hand beside bfloat16 parameters stays float32
    and exact: torch's float32 step on the widened parameters."""
    kwargs = {"lr": 1e-2, "momentum": 0.9} if name in ("SGD", "RMSprop") else {"lr": 1e-2}
    gen = torch.Generator().manual_seed(3)
    shapes = SHAPES[:3]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]
    o_ours = getattr(ada, name)(ours, **kwargs)
    for p, g in zip(ours, grads(shapes, gen, torch.bfloat16)):
        p.grad = g
    o_ours.step()
    for p in ours:
        for k, v in o_ours.state[p].items():
            if torch.is_tensor(v) and v.shape == p.shape:
                o_ours.state[p][k] = v.float()
    for step in range(4):
        gs = grads(shapes, gen, torch.bfloat16)
        # The reference keeps the float32 state: build it by hand, not
        # through load_state_dict (which would cast it to the parameter's dtype).
        p32 = [torch.nn.Parameter(p.detach().float()) for p in ours]
        ref = getattr(torch.optim, name)(p32, foreach=False, **kwargs)
        prev = []
        for a, b in zip(p32, ours):
            ref.state[a] = {k: v.clone() for k, v in o_ours.state[b].items()}
            prev.append({k: v.clone() for k, v in o_ours.state[b].items()})
        for a, b, g in zip(p32, ours, gs):
            a.grad, b.grad = g.float(), g
        ref.step()
        o_ours.step()
        for i, (a, b) in enumerate(zip(p32, ours)):
            assert_rounded(b, a.detach(), name == "SGD", f"{name} step {step} tensor {i}")
            for k, v in ref.state[a].items():
                w = o_ours.state[b][k]
                if torch.is_tensor(v) and v.shape == a.shape:
                    assert w.dtype == torch.float32
                    # The tolerance is relative to the magnitudes of the terms
                    # summed, not of their sum: a momentum buffer is
                    # momentum * buf + g / avg, and where the two nearly
                    # cancel, a one-ulp difference in torch's square root
                    # (MKL's, not correctly rounded on every CPU: 17% of
                    # roots on its AVX2 path, README "torch_exact") is a large
                    # relative difference of the sum (seen: 4e-5 on one
                    # element of 70001 on an AMD EPYC).
                    scale = v.abs()
                    if k == "momentum_buffer":
                        m = kwargs["momentum"] * prev[i][k]
                        scale = m.abs() + (v - m).abs()
                    bad = (w - v).abs() > ATOL + RTOL * scale
                    assert not bad.any(), f"{name} state {k}: {int(bad.sum())} elements"
                    if name == "SGD":
                        assert torch.equal(w, v)


@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["SGD", "AdamW", "Adamax"])
def test_half_gradients_beside_float32_master_weights(name, gdtype):
    """torch's `grad_dtype` lets a float32 parameter take a bfloat16 or
    float16 gradient (the ZeRO-Offload shape): the step is torch's float32
    step on the widened gradient."""
    kwargs = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    gen = torch.Generator().manual_seed(4)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES[:3]]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    for p in ours:
        p.grad_dtype = gdtype
    o_ref = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    o_ours = getattr(ada, name)(ours, **kwargs)
    for _ in range(5):
        for a, b, g in zip(ref, ours, grads(SHAPES[:3], gen, gdtype)):
            a.grad, b.grad = g.float(), g
        o_ref.step()
        o_ours.step()
    for a, b in zip(ref, ours):
        assert b.dtype == torch.float32 and b.grad.dtype == gdtype
        if name in BITWISE:
            assert torch.equal(a.detach(), b.detach())
        else:
            assert torch.allclose(b.detach(), a.detach(), rtol=RTOL, atol=ATOL)
    # Through the backward pass, as a model produces them.
    lin = torch.nn.Linear(8, 3)
    for p in lin.parameters():
        p.grad_dtype = gdtype
    opt = getattr(ada, name)(lin.parameters(), **kwargs)
    lin(torch.randn(4, 8)).square().sum().backward()
    before = [p.detach().clone() for p in lin.parameters()]
    opt.step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, lin.parameters()))


def test_fused_controls_on_bf16():
    """Loss scale, clipping and the non-finite guard on bfloat16 gradients:
    the float32 run on the widened tensors, rounded (the norm of widened
    bfloat16 values is exact, so the clipping factor is the same)."""
    gen = torch.Generator().manual_seed(5)
    shapes = SHAPES[:3]
    p16 = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]
    o16 = ada.SGD(p16, lr=0.1, momentum=0.9, grad_scale=1024.0, max_grad_norm=1.0)
    for step in range(3):
        gs = [g * 1024 for g in grads(shapes, gen, torch.bfloat16)]
        # torch's float32 reference: unscale, clip_grad_norm_, step.
        p32 = [torch.nn.Parameter(p.detach().float()) for p in p16]
        ref = torch.optim.SGD(p32, lr=0.1, momentum=0.9, foreach=False)
        for a, b in zip(p32, p16):
            if b in o16.state:
                ref.state[a] = {"momentum_buffer": o16.state[b]["momentum_buffer"].float()}
        for a, b, g in zip(p32, p16, gs):
            a.grad, b.grad = g.float() / 1024, g
        torch.nn.utils.clip_grad_norm_(p32, 1.0, foreach=False)
        ref.step()
        o16.step()
        assert not o16.last_step_skipped
        for i, (a, b) in enumerate(zip(p32, p16)):
            assert_rounded(b, a.detach(), False, f"step {step} tensor {i}")
    # A bfloat16 inf gradient skips the whole step, nothing written.
    o16.skip_non_finite = True
    before = [p.detach().clone() for p in p16]
    state = copy.deepcopy(o16.state_dict())
    for p in p16:
        p.grad = torch.zeros_like(p)
    p16[2].grad[7] = float("inf")
    o16.step()
    assert o16.last_step_skipped
    for p, q in zip(p16, before):
        assert torch.equal(bits(p), bits(q))
    for k, v in state["state"].items():
        assert torch.equal(o16.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])


def step_changes_nothing(opt, params, exc):
    """`opt.step()` raises `exc` and leaves every parameter's bits and
    every state value as they were; returns the message."""
    before = [bits(p).clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc) as info:
        opt.step()
    for p, q in zip(params, before):
        assert torch.equal(bits(p), q), "a failed step modified a parameter"
    for k, v in state["state"].items():
        for n, x in v.items():
            assert torch.equal(torch.as_tensor(opt.state_dict()["state"][k][n]), torch.as_tensor(x))
    return str(info.value)


def test_unsupported_dtypes_raise_before_anything_changes():
    a = torch.nn.Parameter(torch.randn(4, 4).bfloat16())
    b = torch.nn.Parameter(torch.randn(5).bfloat16())
    opt = ada.Adam([a, b], lr=0.1)
    a.grad, b.grad = torch.randn(4, 4).bfloat16(), torch.randn(5).bfloat16()
    opt.step()

    def unchanged(exc):
        return step_changes_nothing(opt, (a, b), exc)

    # A float64 gradient.
    b.grad_dtype = None
    b.grad = torch.randn(5, dtype=torch.float64)
    msg = unchanged(TypeError)
    assert "parameter 1" in msg and "float64" in msg
    # A float16 state buffer.
    b.grad = torch.randn(5).bfloat16()
    opt.state[b]["exp_avg_sq"] = opt.state[b]["exp_avg_sq"].half()
    msg = unchanged(TypeError)
    assert "exp_avg_sq" in msg and "float16" in msg
    opt.state[b]["exp_avg_sq"] = opt.state[b]["exp_avg_sq"].bfloat16()
    opt.step()
    # A float16 parameter: the step has no float16 parameter storage.
    c = torch.nn.Parameter(torch.randn(3).half())
    c.grad = torch.randn(3).half()
    opt.add_param_group({"params": [c]})
    msg = unchanged(TypeError)
    assert "param_groups[1]" in msg and "float16" in msg


def test_adjacent_bf16_parameters_and_overlap():
    """Two bfloat16 parameters side by side in one buffer are stepped (the
    overlap check counts two bytes per element); overlapping ones are not."""
    buf = torch.randn(64).bfloat16()
    a, b = torch.nn.Parameter(buf[:32]), torch.nn.Parameter(buf[32:])
    ref = [torch.nn.Parameter(buf[:32].clone()), torch.nn.Parameter(buf[32:].clone())]
    opt, o_ref = ada.SGD([a, b], lr=0.1, momentum=0.9), torch.optim.SGD(ref, lr=0.1, momentum=0.9, fused=True)
    for _ in range(3):
        for p, q in zip((a, b), ref):
            p.grad = torch.randn(32).bfloat16()
            q.grad = p.grad.clone()
        opt.step()
        o_ref.step()
    assert torch.equal(bits(a), bits(ref[0])) and torch.equal(bits(b), bits(ref[1]))
    c, d = torch.nn.Parameter(buf[:33]), torch.nn.Parameter(buf[32:])
    c.grad, d.grad = torch.zeros(33).bfloat16(), torch.zeros(32).bfloat16()
    with pytest.raises(ValueError, match="share memory"):
        ada.SGD([c, d], lr=0.1).step()


# Stochastic rounding of bfloat16 parameters (``bf16_stochastic_round``).
M32, M64 = 0xFFFFFFFF, (1 << 64) - 1


def _splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _fmix32(h):
    import numpy as np

    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(M32)
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(M32)
    return h ^ (h >> np.uint64(16))


def stochastic_reference(x, seed, t):
    """``x`` (float32) rounded to bfloat16 with the stream the Rust core
    documents, written out again here: key = splitmix64(splitmix64(seed) ^ t),
    bits = fmix32(fmix32(i_lo ^ key_lo) ^ i_hi ^ key_hi) >> 16 added below
    the bfloat16's last bit, then truncation."""
    import numpy as np

    key = _splitmix64(_splitmix64(seed) ^ t)
    i = np.arange(x.numel(), dtype=np.uint64)
    lo = (i & np.uint64(M32)) ^ np.uint64(key & M32)
    hi = (i >> np.uint64(32)) ^ np.uint64(key >> 32)
    r = _fmix32(_fmix32(lo) ^ hi) >> np.uint64(16)
    b = x.flatten().view(torch.int32).numpy().astype(np.uint64) & np.uint64(M32)
    out = ((b + r) >> np.uint64(16)).astype(np.uint16).view(np.int16)
    return torch.from_numpy(out.copy()).view(x.shape)


def test_stochastic_rounding_follows_the_documented_stream():
    # SGD at lr 1 on values whose float32 result is exact: p - g with p = 1.5
    # and g a multiple of 2^-15 below one bf16 ulp (2^-7); two tensors, one
    # cut into pieces (> 2^16). The stream's seed: the group's count of
    # stochastic steps in the high 32 bits, the parameter's index in the call
    # in the low; torch keeps no step count for SGD, and the package steps it
    # as step 1 the first time and step 2 after (its momentum buffer exists).
    gen = torch.Generator().manual_seed(3)
    shapes = ((70001,), (13,))
    params = [torch.nn.Parameter(torch.full(s, 1.5, dtype=torch.bfloat16)) for s in shapes]
    opt = ada.SGD(params, lr=1.0, bf16_stochastic_round=True)
    for t in (1, 2, 3):
        want = []
        for p in params:
            k = torch.randint(0, 256, p.shape, generator=gen)
            p.grad = (k.float() * 2.0**-15).bfloat16()
            want.append(p.detach().float() - p.grad.float())
        opt.step()
        for index, (p, w) in enumerate(zip(params, want)):
            expected = stochastic_reference(w, (t - 1) << 32 | index, min(t, 2))
            assert torch.equal(bits(p), expected), f"tensor {index} step {t}"
        assert opt.param_groups[0]["bf16_sr_step"] == t


def test_stochastic_rounding_accumulates_what_round_to_nearest_loses():
    # A quarter of the bfloat16 ulp per step: round to nearest never moves.
    def run(sr, threads):
        ada.set_num_threads(threads)
        try:
            p = torch.nn.Parameter(torch.full((70001,), 1.5, dtype=torch.bfloat16))
            opt = ada.SGD([p], lr=1.0, bf16_stochastic_round=sr)
            for _ in range(100):
                p.grad = torch.full_like(p, 2.0**-9)
                opt.step()
            return p.detach().clone()
        finally:
            ada.set_num_threads(0)

    assert torch.equal(run(False, 2), torch.full((70001,), 1.5, dtype=torch.bfloat16))
    got = run(True, 2)
    assert abs(got.double().mean().item() - (1.5 - 100 / 512)) < 1e-3
    assert torch.equal(bits(got), bits(run(True, 1)))  # any thread count


def test_stochastic_rounding_leaves_float32_parameters_to_nearest():
    p32 = torch.nn.Parameter(torch.linspace(-1, 1, 300))
    q32 = torch.nn.Parameter(p32.detach().clone())
    a = ada.AdamW([p32], lr=1e-2, bf16_stochastic_round=True)
    b = ada.AdamW([q32], lr=1e-2)
    for _ in range(3):
        p32.grad = torch.cos(p32.detach())
        q32.grad = torch.cos(q32.detach())
        a.step()
        b.step()
    assert torch.equal(p32, q32)


def test_stochastic_rounding_resumes_from_a_state_dict():
    def fresh():
        p = torch.nn.Parameter(torch.linspace(-2, 2, 70001).bfloat16())
        return p, ada.AdamW([p], lr=1e-3, bf16_stochastic_round=True)

    def step(p, opt, i):
        p.grad = torch.sin(p.detach().float() * (i + 1)).bfloat16()
        opt.step()

    p, opt = fresh()
    for i in range(6):
        step(p, opt, i)
    q, opt2 = fresh()
    for i in range(3):
        step(q, opt2, i)
    saved, q_saved = copy.deepcopy(opt2.state_dict()), q.detach().clone()
    r, opt3 = fresh()
    with torch.no_grad():
        r.copy_(q_saved)
    opt3.load_state_dict(saved)
    for i in range(3, 6):
        step(r, opt3, i)
    assert torch.equal(bits(r), bits(p))


def sparse_bf16_grad(shape, rows, gen):
    """A bfloat16 row-sparse COO gradient, a duplicated row included (as an
    nn.Embedding(sparse=True) of bfloat16 weights gives)."""
    idx = torch.tensor([rows], dtype=torch.int64)
    vals = torch.randn(len(rows), *shape[1:], generator=gen).bfloat16()
    return torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True)


SPARSE_CASES = [
    ("SparseAdam", {"lr": 0.02}),
    ("SparseAdam", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "maximize": True}),
    ("Adagrad", {"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
]


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name,kwargs", SPARSE_CASES, ids=str)
def test_sparse_bf16_tables_are_the_float32_step_rounded(name, kwargs, state_dtype):
    """bfloat16 embedding tables (state bfloat16 as torch creates it, or
    float32 set by hand): each step is torch's float32 sparse step on the
    widened rows, rounded to nearest-even; rows the gradient does not name
    keep their bits."""
    gen = torch.Generator().manual_seed(17)
    shapes = [(40, 8), (6, 3, 5)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]
    o_ours = getattr(ada, name)(ours, **kwargs)
    names = ["exp_avg", "exp_avg_sq"] if name == "SparseAdam" else ["sum"]
    for step in range(4):
        gs = [sparse_bf16_grad(p.shape, [step % p.shape[0], 1, 1, p.shape[0] - 1], gen) for p in ours]
        if step:  # the first step creates the state, as torch does
            if step == 1 and state_dtype == torch.float32:
                for p in ours:
                    for k in names:
                        o_ours.state[p][k] = o_ours.state[p][k].float()
            p32 = [torch.nn.Parameter(p.detach().float()) for p in ours]
            ref = getattr(torch.optim, name)(p32, **kwargs)
            ref.load_state_dict(copy.deepcopy(o_ours.state_dict()))
            for p, g in zip(p32, gs):
                # torch coalesces the bfloat16 gradient (in bfloat16) before
                # its step; so does ours.
                p.grad = g.coalesce().float()
            ref.step()
        before = [p.detach().clone() for p in ours]
        for p, g in zip(ours, gs):
            p.grad = g
        o_ours.step()
        for i, (p, b) in enumerate(zip(ours, before)):
            moved = torch.zeros(p.shape[0], dtype=torch.bool)
            moved[gs[i].coalesce().indices()[0]] = True
            assert torch.equal(bits(p[~moved]), bits(b[~moved])), f"{name}: a row not named moved"
            assert not torch.equal(bits(p[moved]), bits(b[moved])), f"{name}: the named rows did not move"
        if not step:
            continue
        for i, (a, b) in enumerate(zip(p32, ours)):
            assert b.dtype == torch.bfloat16
            assert_rounded(b, a.detach(), False, f"{name} {kwargs} step {step} tensor {i}")
            for k in names:
                w, v = o_ours.state[b][k], ref.state[a][k]
                assert w.dtype == state_dtype, f"{k} is {w.dtype}"
                if state_dtype == torch.bfloat16:
                    assert_rounded(w, v, False, f"{name} state {k} step {step}")
                else:
                    assert torch.allclose(w, v, rtol=RTOL, atol=ATOL), f"{name} state {k} step {step}"
            assert int(float(o_ours.state[b]["step"])) == step + 1


@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad"])
def test_sparse_unsupported_dtypes_raise_before_anything_changes(name):
    gen = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(torch.randn(10, 4).bfloat16())
    b = torch.nn.Parameter(torch.randn(6, 4))
    opt = getattr(ada, name)([a, b], lr=0.1)
    a.grad, b.grad = sparse_bf16_grad(a.shape, [1, 2], gen), sparse_bf16_grad(b.shape, [0], gen).float()
    opt.step()
    first = "exp_avg" if name == "SparseAdam" else "sum"

    def unchanged(exc):
        return step_changes_nothing(opt, (a, b), exc)

    # A float64 gradient of the second table.
    b.grad_dtype = None
    b.grad = sparse_bf16_grad(b.shape, [3], gen).double()
    msg = unchanged(TypeError)
    assert "parameter 1" in msg and "float64" in msg
    # A float16 state beside the bfloat16 table.
    b.grad = sparse_bf16_grad(b.shape, [3], gen)
    opt.state[a][first] = opt.state[a][first].half()
    msg = unchanged(TypeError)
    assert first in msg and "float16" in msg
    opt.state[a][first] = opt.state[a][first].bfloat16()
    # A float16 table: the sparse steps have no float16 table storage.
    c = torch.nn.Parameter(torch.randn(3, 2).half())
    c.grad = sparse_bf16_grad(c.shape, [2], gen).half()
    opt.add_param_group({"params": [c]})
    msg = unchanged(TypeError)
    assert "param_groups[1]" in msg and "float16" in msg
    c.grad = None
    opt.step()
    assert int(float(opt.state[a]["step"])) == 2 and int(float(opt.state[b]["step"])) == 2


@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad"])
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16], ids=str)
def test_sparse_half_gradients_are_widened_exactly(name, gdtype):
    """A half-precision sparse gradient (coalesced by torch in its dtype)
    steps a table exactly as its values widened to float32 do."""
    gen = torch.Generator().manual_seed(23)
    for table_dtype in (torch.float32, torch.bfloat16):
        a = torch.nn.Parameter(torch.randn(30, 6, generator=gen).to(table_dtype))
        b = torch.nn.Parameter(a.detach().clone())
        a.grad_dtype = None
        b.grad_dtype = None
        oa, ob = getattr(ada, name)([a], lr=0.03), getattr(ada, name)([b], lr=0.03)
        for step in range(3):
            g = sparse_bf16_grad(a.shape, [step, 4, 4, 29], gen).to(gdtype)
            a.grad, b.grad = g, g.coalesce().float()
            oa.step()
            ob.step()
            assert torch.equal(bits(a), bits(b)), f"{name} {gdtype} table {table_dtype} step {step}"
        for k, v in ob.state[b].items():
            assert torch.equal(torch.as_tensor(oa.state[a][k]), torch.as_tensor(v)), k


def assert_rounded_to(got, want32, dtype, what, before):
    """`got` (of `dtype`) is `want32` rounded to nearest-even but for a
    `rare` fraction, which lies within one ulp of `dtype` of a value within
    the golden tolerance of `want32`, relative to the larger of the result
    and the value `before` the step (torch's float32 Adafactor sums its
    norms in float32, ours in float64, so the step's scale differs by
    float32 ulps: an absolute difference of the update's size, large
    against a result that nearly cancels, and a rare moved rounding)."""
    assert got.dtype == dtype, f"{what}: {got.dtype}"
    # float16's finer spacing (2^-11) turns the same float32 differences
    # into more moved roundings than bfloat16's (2^-8): measured 0.24%.
    rare = 1e-3 if dtype == torch.bfloat16 else 1e-2
    differ = got.view(torch.int16) != want32.to(dtype).view(torch.int16)
    w, g = want32.float(), got.float()
    _, e = torch.frexp(w)
    ulp = torch.ldexp(torch.ones_like(w), e - (8 if dtype == torch.bfloat16 else 11)).clamp(min=2.0**-24)
    far = (g - w).abs() > RTOL * torch.maximum(w.abs(), before.float().abs()) + ATOL + ulp
    assert not far.any(), f"{what}: {g[far][:4].tolist()} for {w[far][:4].tolist()}"
    assert differ.float().mean() <= rare, f"{what}: {differ.sum()} of {differ.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adafactor_half_precision_is_the_float32_step_rounded(dtype):
    """bfloat16/float16 parameters: gradients and state in the parameter's
    dtype (as torch creates them); each step is torch's float32 Adafactor on
    the widened parameters, gradients and state, then the parameters and
    the state rounded to the dtype. A matrix past the parallel threshold, a
    vector, a 3-d tensor."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(600, 500), (7,), (2, 3, 5)]
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "d": 1.0}
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    o_ours = ada.Adafactor(ours, **kwargs)
    for step, p32, ref, before, state_before in steps_against_widened("Adafactor", kwargs, ours, o_ours, gen, dtype):
        for i, (a, b) in enumerate(zip(p32, ours)):
            assert_rounded_to(b.detach(), a.detach(), dtype, f"step {step} tensor {i}", before[i])
            for k, v in ref.state[a].items():
                if k != "step":
                    w = o_ours.state[b][k]
                    assert_rounded_to(w, v, dtype, f"step {step} tensor {i} state {k}", state_before[i][k])
    assert all(not torch.equal(p.detach().float(), q) for p, q in zip(ours, p32))


def test_adafactor_stochastic_rounding_follows_the_documented_stream():
    """``bf16_stochastic_round``: each bfloat16 parameter is our float32
    Adafactor step on the widened tensors (that step is checked against
    torch's by the golden tests), rounded with the stream written out in
    ``stochastic_reference``: seed = the group's count of stochastic steps
    in the high 32 bits and the tensor's index among those stepped in the
    call in the low, at the tensor's own step. The state rounds to nearest;
    float16 and float32 parameters beside them are not rounded
    stochastically. A tensor without a gradient shifts the later indices."""
    gen = torch.Generator().manual_seed(8)
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]
    shapes = [(300, 400), (13,), (4,), (5, 6)]
    kwargs = {"lr": 1e-3, "weight_decay": 0.1}
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in zip(shapes, dtypes)]
    opt = ada.Adafactor(ours, bf16_stochastic_round=True, **kwargs)
    moved = 0
    for call in range(4):
        stepped = [i for i in range(len(ours)) if not (call == 1 and i == 0)]
        p32 = [torch.nn.Parameter(p.detach().float()) for p in ours]
        ref = ada.Adafactor(p32, **kwargs)
        ref.load_state_dict(copy.deepcopy(opt.state_dict()))
        for i, p in enumerate(ours):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if i in stepped else None
            p32[i].grad = None if p.grad is None else p.grad.float()
        before = [p.detach().clone() for p in ours]
        ref.step()
        opt.step()
        assert opt.param_groups[0]["bf16_sr_step"] == call + 1
        for index, i in enumerate(stepped):
            want, what = p32[i].detach(), f"call {call} tensor {i}"
            if dtypes[i] == torch.bfloat16:
                t = int(ref.state[p32[i]]["step"])
                expected = stochastic_reference(want, call << 32 | index, t)
                assert torch.equal(bits(ours[i]), expected), what
                moved += int((bits(ours[i]) != bits(want.bfloat16())).sum())
            elif dtypes[i] == torch.float16:
                assert torch.equal(bits(ours[i]), bits(want.half())), what
            else:
                assert torch.equal(ours[i].detach(), want), what
            for k, v in ref.state[p32[i]].items():
                got = opt.state[ours[i]][k]
                assert torch.equal(got, v if k == "step" else v.to(dtypes[i])), f"{what} state {k}"
        assert torch.equal(ours[0].detach(), before[0]) or 0 in stepped
    assert moved > 1000, f"stochastic rounding moved only {moved} roundings"


def test_adafactor_bf16_state_dicts_move_between_torch_and_ours():
    """torch's own bfloat16 Adafactor and ours: a state dict of either loads
    into the other mid-run and both go on stepping, the state bfloat16 in
    both; torch's bfloat16 arithmetic rounds every intermediate, ours the
    result only, so the parameters agree to about a bfloat16 ulp."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(20, 30), (9,)]
    base = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    ref = [torch.nn.Parameter(b.clone()) for b in base]
    ours = [torch.nn.Parameter(b.clone()) for b in base]
    o_ref = torch.optim.Adafactor(ref, lr=0.02)
    o_ours = ada.Adafactor(ours, lr=0.02)
    for step in range(6):
        for a, b, g in zip(ref, ours, grads(shapes, gen, torch.bfloat16)):
            a.grad, b.grad = g.clone(), g.clone()
        if step == 2:
            o_ours.load_state_dict(copy.deepcopy(o_ref.state_dict()))
        if step == 4:
            o_ref.load_state_dict(copy.deepcopy(o_ours.state_dict()))
        o_ref.step()
        o_ours.step()
    for a, b in zip(ref, ours):
        assert b.dtype == torch.bfloat16
        for k, v in o_ours.state[b].items():
            assert v.dtype == (torch.float32 if k == "step" else torch.bfloat16), k
        diff = (a.detach().float() - b.detach().float()).abs()
        assert (diff <= 0.02 * a.detach().float().abs() + 1e-2).all(), diff.max()
    # A float32 gradient of a bfloat16 parameter (torch allows it once
    # `grad_dtype` is cleared): refused, nothing changes.
    ours[0].grad_dtype = None
    ours[0].grad = torch.randn(shapes[0], generator=gen)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(TypeError, match="its gradient has dtype torch.float32"):
        o_ours.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(ours, before))
