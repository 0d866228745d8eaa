"""8-bit block-wise states (``optim_bits=8``, bitsandbytes' layout) and
float32 master weights for half-precision parameters (``master_weights``).

Against real bitsandbytes where it is installed (CI installs it and sets
ADAOPTIM_REQUIRE_BITSANDBYTES=1, so there those tests cannot skip), and
against the bitsandbytes trajectory in tests/golden_q8/bitsandbytes.json
(written by bitsandbytes 0.50.2) everywhere."""

import copy
import json
import os
import pathlib

import pytest
import torch

import adaoptim.torch as ada
from adaoptim import _core

GOLDEN_Q8 = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden_q8" / "bitsandbytes.json"

try:
    import bitsandbytes as bnb
except ImportError:
    if os.environ.get("ADAOPTIM_REQUIRE_BITSANDBYTES"):
        raise
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

N = 5000  # 8-bit (>= min_8bit_size 4096), its last block partial (5000 = 19 * 256 + 136)
SMALL = 100  # float32 state under bitsandbytes' min_8bit_size rule


def dequantized(st, i):
    """State buffer `i` (1-based) of a parameter's state as float32."""
    codes = st[f"state{i}"]
    if codes.dtype != torch.uint8:
        return codes.float()
    out = torch.empty(codes.shape, dtype=torch.float32)
    unsigned = torch.equal(st[f"qmap{i}"], torch.tensor(_core.q8_map(False)))
    _core.q8_dequantize(codes.data_ptr(), st[f"absmax{i}"].data_ptr(), codes.numel(), out.data_ptr(), unsigned)
    return out


# --- against the golden bitsandbytes trajectory (no bitsandbytes needed) ---


def test_maps_are_bitsandbytes_dynamic_maps():
    g = json.loads(GOLDEN_Q8.read_text())
    assert torch.equal(torch.tensor(_core.q8_map(True)), torch.tensor(g["signed_map"], dtype=torch.float32))
    assert torch.equal(torch.tensor(_core.q8_map(False)), torch.tensor(g["unsigned_map"], dtype=torch.float32))


def test_golden_adamw8bit_trajectory_step_by_step():
    """From each of bitsandbytes' recorded states (codes, absmax, params),
    one step of ours with the recorded gradient gives bitsandbytes' next
    params within 1e-6, absmax within 1e-5 relative and all but under 1% of
    its codes, over the 20 steps (float32 arithmetic in another order, and
    bitsandbytes' approximate code search, move a value near a code
    boundary to another code; see tests/q8.rs)."""
    tr = json.loads(GOLDEN_Q8.read_text())["adamw8bit"]
    n = tr["n"]
    p = torch.nn.Parameter(torch.tensor(tr["params0"], dtype=torch.float32))
    opt = ada.AdamW(
        [p],
        lr=tr["lr"],
        betas=tuple(tr["betas"]),
        eps=tr["eps"],
        weight_decay=tr["weight_decay"],
        optim_bits=8,
        min_8bit_size=0,
    )
    differ = total = 0
    prev = None
    for t, s in enumerate(tr["steps"]):
        if prev is not None:
            st = opt.state[p]
            st["state1"] = torch.tensor(prev["state1"], dtype=torch.uint8)
            st["state2"] = torch.tensor(prev["state2"], dtype=torch.uint8)
            st["absmax1"] = torch.tensor(prev["absmax1"], dtype=torch.float32)
            st["absmax2"] = torch.tensor(prev["absmax2"], dtype=torch.float32)
            assert st["step"] == t
            with torch.no_grad():
                p.copy_(torch.tensor(prev["params"]))
        p.grad = torch.tensor(s["grad"], dtype=torch.float32)
        opt.step()
        want = torch.tensor(s["params"], dtype=torch.float32)
        assert (p.detach() - want).abs().max() <= 1e-6, t
        st = opt.state[p]
        for k in ("state1", "state2"):
            differ += int((st[k] != torch.tensor(s[k], dtype=torch.uint8)).sum())
            total += n
        for k in ("absmax1", "absmax2"):
            torch.testing.assert_close(st[k], torch.tensor(s[k], dtype=torch.float32), rtol=1e-5, atol=0)
        prev = s
    # Measured: 177 of 81920 (0.22%).
    assert differ < 0.01 * total, f"{differ} of {total} codes differ"


# --- against bitsandbytes itself ---

BNB_CASES = [
    ("AdamW", "AdamW8bit", {"lr": 1e-2, "weight_decay": 0.01}),
    ("Adam", "Adam8bit", {"lr": 1e-2}),
    ("Lion", "Lion8bit", {"lr": 1e-3, "weight_decay": 0.01}),
    ("SGD", "SGD8bit", {"lr": 1e-2, "momentum": 0.9}),
    ("RMSprop", "RMSprop8bit", {"lr": 1e-3}),
    ("Adagrad", "Adagrad8bit", {"lr": 1e-2}),
]


@needs_bnb
@pytest.mark.parametrize("ours,theirs,kw", BNB_CASES, ids=[c[1] for c in BNB_CASES])
@pytest.mark.parametrize("direction", ["bnb-to-ours", "ours-to-bnb"])
def test_bitsandbytes_state_continues_step_by_step(ours, theirs, kw, direction):
    """Each step, one optimizer loads the other's state_dict (and params)
    and both take the same step: params within 1e-6 (measured: 1.2e-7 at
    most), under 1% of codes differing from the second step on (the first
    step's states are each one's own: adaoptim gives the never-negative
    one-state buffers, RMSprop's and Adagrad's, the unsigned map, twice the
    resolution of bitsandbytes' signed one)."""
    gen = torch.Generator().manual_seed(1)
    p0 = [torch.randn(N, generator=gen) * 0.5, torch.randn(SMALL, generator=gen)]
    a = [torch.nn.Parameter(x.clone()) for x in p0]
    b = [torch.nn.Parameter(x.clone()) for x in p0]
    ob = getattr(bnb.optim, theirs)(a, **kw)
    oo = getattr(ada, ours)(b, optim_bits=8, **kw)
    src, dst, ps, pd = (ob, oo, a, b) if direction == "bnb-to-ours" else (oo, ob, b, a)
    for t in range(6):
        g = [torch.randn(x.shape, generator=gen) * 0.1 for x in p0]
        if t:
            dst.load_state_dict(src.state_dict())
            with torch.no_grad():
                for x, y in zip(pd, ps):
                    x.copy_(y)
        for x, y, gg in zip(a, b, g):
            x.grad, y.grad = gg.clone(), gg.clone()
        ob.step()
        oo.step()
        for x, y in zip(a, b):
            assert (x.detach() - y.detach()).abs().max() <= 1e-6, t
            sa, so = ob.state[x], oo.state[y]
            assert sa["step"] == so["step"] == t + 1
            assert sorted(k for k in sa if k != "unorm_vec") == sorted(so), t
            for k in [k for k in so if k.startswith("state")]:
                assert sa[k].dtype == so[k].dtype == (torch.uint8 if x.numel() == N else torch.float32)
                if so[k].dtype == torch.uint8:
                    frac = (sa[k] != so[k]).float().mean()
                    # Measured: 0.06-0.64% from the second step on; on the
                    # first, 3.3% of Adam's state2 (squared gradients span
                    # many decades in a block, where the dynamic map is dense
                    # and bitsandbytes' search approximate).
                    if t:
                        assert frac < 0.01, (t, k, frac)
                    elif ours not in ("RMSprop", "Adagrad"):
                        assert frac < 0.05, (t, k, frac)
                else:
                    torch.testing.assert_close(sa[k], so[k], rtol=1e-5, atol=1e-7)


@needs_bnb
def test_state_dict_layout_is_bitsandbytes():
    """Keys, nesting, dtypes and shapes of the state_dict equal bitsandbytes'
    own, and each loads the other's without error, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    p0 = [torch.randn(64, 80, generator=gen), torch.randn(SMALL, generator=gen)]
    a = [torch.nn.Parameter(x.clone()) for x in p0]
    b = [torch.nn.Parameter(x.clone()) for x in p0]
    ob = bnb.optim.AdamW8bit(a, lr=1e-3)
    oo = ada.AdamW(b, lr=1e-3, optim_bits=8)
    for x, y in zip(a, b):
        g = torch.randn(x.shape, generator=gen)
        x.grad, y.grad = g.clone(), g.clone()
    ob.step()
    oo.step()
    sb, so = ob.state_dict(), oo.state_dict()

    def layout(sd):
        out = {}
        for k, v in sd["state"].items():
            out[k] = {kk: (vv.dtype, tuple(vv.shape)) if torch.is_tensor(vv) else type(vv) for kk, vv in v.items()}
            inner = v.get("__bnb_optimizer_quant_state__")
            if inner is not None:
                out[k]["__bnb_optimizer_quant_state__"] = {kk: (vv.dtype, tuple(vv.shape)) for kk, vv in inner.items()}
        return out

    assert layout(sb) == layout(so)
    # Ours loads bitsandbytes' and gives it back unchanged, bit for bit.
    oo.load_state_dict(sb)
    back = oo.state_dict()
    for k, v in sb["state"].items():
        inner = v["__bnb_optimizer_quant_state__"]
        for kk, vv in inner.items():
            assert torch.equal(vv, back["state"][k]["__bnb_optimizer_quant_state__"][kk]), kk
    # bitsandbytes loads ours, bit for bit.
    ob.load_state_dict(so)
    for i, x in enumerate(a):
        inner = so["state"][i]["__bnb_optimizer_quant_state__"]
        for kk, vv in inner.items():
            assert torch.equal(ob.state[x][kk], vv), kk


# --- our own properties ---


def run(opt_factory, p0, steps=4, seed=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in p0]
    opt = opt_factory(ps)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
        opt.step()
    return ps, opt


def test_small_tensors_are_the_float32_step_bit_for_bit():
    p0 = [torch.randn(SMALL), torch.randn(7, 9)]
    a, oa = run(lambda ps: ada.AdamW(ps, lr=1e-2, optim_bits=8), p0)
    b, ob = run(lambda ps: ada.AdamW(ps, lr=1e-2), p0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert torch.equal(oa.state[x]["state1"], ob.state[y]["exp_avg"])
        assert torch.equal(oa.state[x]["state2"], ob.state[y]["exp_avg_sq"])
        assert oa.state[x]["step"] == 4 and "absmax1" not in oa.state[x]


@pytest.mark.parametrize("n", [N, 70001, (1 << 21) + 300])
def test_thread_count_changes_no_bit(n):
    """Pieces (> 2^16) and the parallel driver (>= 2^21) cut at block
    boundaries: the same bits with 1 and 2 threads."""
    p0 = [torch.randn(n)]
    out = []
    for threads in (1, 2):
        ada.set_num_threads(threads)
        try:
            ps, opt = run(lambda ps: ada.AdamW(ps, lr=1e-2, optim_bits=8), p0, steps=3)
        finally:
            ada.set_num_threads(0)
        st = opt.state[ps[0]]
        out.append((ps[0].detach().clone(), st["state1"].clone(), st["absmax1"].clone(), st["state2"].clone()))
    for x, y in zip(*out):
        assert torch.equal(x, y)


def test_initial_accumulator_is_quantized():
    """A nonzero initial state value (Adagrad's initial_accumulator_value)
    is quantized into the 8-bit state: it dequantizes to that value."""
    p = torch.nn.Parameter(torch.randn(N))
    opt = ada.Adagrad([p], lr=1e-2, initial_accumulator_value=0.25, optim_bits=8)
    p.grad = torch.zeros(N)
    opt.step()
    st = opt.state[p]
    assert st["state1"].dtype == torch.uint8
    assert torch.equal(dequantized(st, 1), torch.full((N,), 0.25))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [32, 8])
def test_master_weights(dtype, bits):
    """Half-precision parameters with float32 master weights: the master
    follows the float32 run on the same (widened) gradients bit for bit, and
    the parameter is the master rounded to nearest-even, each step."""
    gen = torch.Generator().manual_seed(4)
    p0 = [torch.randn(N, generator=gen).to(dtype), torch.randn(SMALL, generator=gen).to(dtype)]
    half = [torch.nn.Parameter(x.clone()) for x in p0]
    full = [torch.nn.Parameter(x.float()) for x in p0]
    oh = ada.AdamW(half, lr=1e-2, master_weights=True, optim_bits=bits)
    of = ada.AdamW(full, lr=1e-2, optim_bits=bits)
    for _ in range(4):
        for h, f in zip(half, full):
            g = torch.randn(h.shape, generator=gen).to(dtype)
            h.grad, f.grad = g, g.float()
        oh.step()
        of.step()
        for h, f in zip(half, full):
            m = oh.state[h]["master_param"]
            assert m.dtype == torch.float32
            assert torch.equal(m, f.detach())
            assert torch.equal(h.detach(), f.detach().to(dtype))
    # The master survives a state_dict round trip in float32 (torch would cast it).
    again = [torch.nn.Parameter(h.detach().clone()) for h in half]
    o2 = ada.AdamW(again, lr=1e-2, master_weights=True, optim_bits=bits)
    o2.load_state_dict(copy.deepcopy(oh.state_dict()))
    for h, h2 in zip(half, again):
        assert o2.state[h2]["master_param"].dtype == torch.float32
        assert torch.equal(o2.state[h2]["master_param"], oh.state[h]["master_param"])


def test_torch_state_dict_converts_both_ways():
    """torch's AdamW state loads into an 8-bit optimizer (quantized; it
    dequantizes within the map's resolution) and an 8-bit state into a
    32-bit one (dequantized into torch's names)."""
    p0 = [torch.randn(N), torch.randn(SMALL)]
    a, ta = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2), p0)
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    o8 = ada.AdamW(b, lr=1e-2, optim_bits=8)
    o8.load_state_dict(ta.state_dict())
    for x, y in zip(a, b):
        st, ts = o8.state[y], ta.state[x]
        assert st["step"] == 4 and isinstance(st["step"], int)
        for i, name in ((1, "exp_avg"), (2, "exp_avg_sq")):
            want = ts[name]
            if y.numel() == N:
                assert st[f"state{i}"].dtype == torch.uint8
                absmax = want.abs().reshape(-1)
                blocks = torch.nn.functional.pad(absmax, (0, -absmax.numel() % 256)).reshape(-1, 256).amax(1)
                assert torch.equal(st[f"absmax{i}"], blocks)
                scale = blocks.repeat_interleave(256)[: want.numel()]
                # The dynamic maps' widest gap is under 0.06 of absmax.
                assert ((dequantized(st, i) - want).abs() <= 0.03 * scale + 1e-12).all()
            else:
                assert torch.equal(st[f"state{i}"], want)
    # And back into a 32-bit optimizer: torch's names, the dequantized values.
    c = [torch.nn.Parameter(x.detach().clone()) for x in a]
    o32 = ada.AdamW(c, lr=1e-2)
    o32.load_state_dict(o8.state_dict())
    for y, z in zip(b, c):
        assert sorted(o32.state[z]) == ["exp_avg", "exp_avg_sq", "step"]
        assert torch.equal(o32.state[z]["exp_avg"], dequantized(o8.state[y], 1))
        assert float(o32.state[z]["step"]) == 4.0
    for z in c:
        z.grad = torch.ones(z.shape)
    o32.step()


@pytest.mark.parametrize("bits", [8, 32])
def test_nested_state_written_into_state_is_unnested(bits):
    """A saved 8-bit state dict assigned straight into ``state`` (as
    ZeroRedundancyOptimizer.load_state_dict assigns it, bypassing ours) steps
    as the same state loaded by load_state_dict: unnested, and dequantized
    for a 32-bit optimizer."""
    p0 = [torch.randn(N), torch.randn(SMALL)]
    a, o8 = run(lambda ps: ada.AdamW(ps, lr=1e-2, optim_bits=8), p0)
    saved = o8.state_dict()
    outs = []
    for how in ("load_state_dict", "assigned"):
        ps = [torch.nn.Parameter(x.detach().clone()) for x in a]
        o = ada.AdamW(ps, lr=1e-2, optim_bits=bits)
        if how == "load_state_dict":
            o.load_state_dict(copy.deepcopy(saved))
        else:
            for i, q in enumerate(ps):
                o.state[q] = copy.deepcopy(saved["state"][i])
        for q in ps:
            q.grad = torch.full(q.shape, 0.5)
        o.step()
        outs.append((ps, o))
    (pa, oa), (pb, ob) = outs
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        assert oa.state[x].keys() == ob.state[y].keys()
        for k, v in oa.state[x].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob.state[y][k])), k


def test_skipped_step_counts_nothing():
    p0 = [torch.randn(N)]
    ps, opt = run(lambda ps: ada.AdamW(ps, lr=1e-2, optim_bits=8, skip_non_finite=True), p0, steps=2)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[ps[0]].items()}
    p_before = ps[0].detach().clone()
    ps[0].grad = torch.full((N,), float("nan"))
    opt.step()
    assert opt.last_step_skipped
    assert torch.equal(ps[0], p_before)
    for k, v in opt.state[ps[0]].items():
        assert torch.equal(v, before[k]) if torch.is_tensor(v) else v == before[k]


def snapshot(opt, ps):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def unchanged(opt, ps, snap):
    params, sd = snap
    for p, q in zip(ps, params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, v in sd["state"].items():
        for kk, vv in v.items():
            if isinstance(vv, dict):
                for name, t in vv.items():
                    assert torch.equal(now["state"][k][kk][name], t)
            elif torch.is_tensor(vv):
                assert torch.equal(now["state"][k][kk], vv)
            else:
                assert now["state"][k][kk] == vv


def stepped(n=N, steps=1):
    ps, opt = run(lambda ps: ada.AdamW(ps, lr=1e-2, optim_bits=8), [torch.randn(n), torch.randn(SMALL)], steps=steps)
    for p in ps:
        p.grad = torch.randn(p.shape)
    return ps, opt


@pytest.mark.parametrize(
    "spoil,err,match",
    [
        (lambda st: st["qmap1"].__setitem__(3, 0.5), ValueError, "dynamic map"),
        (lambda st: st.__setitem__("absmax2", torch.zeros(3)), ValueError, "absmax2"),
        (lambda st: st.__setitem__("state1", torch.zeros(N - 1, dtype=torch.uint8)), ValueError, "codes"),
        (lambda st: st.pop("qmap2"), ValueError, "qmap2"),
        (lambda st: st.__setitem__("step", -1), ValueError, "step"),
        (lambda st: st.__setitem__("state2", torch.zeros(N, dtype=torch.float64)), TypeError, "float64"),
    ],
)
def test_bad_state_changes_nothing(spoil, err, match):
    ps, opt = stepped()
    spoil(opt.state[ps[0]])
    snap = snapshot(opt, ps[1:])
    with pytest.raises(err, match=match):
        opt.step()
    unchanged(opt, ps[1:], snap)


def test_bad_inputs():
    p = torch.nn.Parameter(torch.randn(N))
    with pytest.raises(ValueError, match="optim_bits"):
        ada.AdamW([p], optim_bits=4)
    with pytest.raises(ValueError, match="min_8bit_size"):
        ada.AdamW([p], optim_bits=8, min_8bit_size=-1)
    with pytest.raises(ValueError, match="exclude"):
        ada.AdamW([p], master_weights=True, bf16_stochastic_round=True)
    # A float16 parameter needs master weights.
    h = torch.nn.Parameter(torch.randn(N).half())
    h.grad = torch.randn(N).half()
    opt = ada.AdamW([h], optim_bits=8)
    before = h.detach().clone()
    with pytest.raises(TypeError, match="float16"):
        opt.step()
    assert torch.equal(h, before) and len(opt.state) == 0
    # Sparse gradients take the plain step.
    e = torch.nn.Parameter(torch.randn(10, 4))
    e.grad = torch.sparse_coo_tensor([[1, 3]], torch.ones(2, 4), (10, 4))
    opt = ada.Adagrad([e], optim_bits=8)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert e not in opt.state


def test_bad_load_changes_nothing():
    ps, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["__bnb_optimizer_quant_state__"]["qmap1"][0] = 7.0
    snap = snapshot(opt, ps)
    with pytest.raises(ValueError, match="dynamic map"):
        ada.AdamW(ps, lr=1e-2).load_state_dict(sd)
    other = ada.AdamW(ps, lr=1e-2)
    ok = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="dynamic map"):
        other.load_state_dict(sd)
    assert other.state_dict() == ok
    unchanged(opt, ps, snap)


def test_bitsandbytes_group_without_momentum_keeps_ours():
    """A group saved by bitsandbytes' SGD8bit has no `momentum` (it keeps
    `betas`): loading it keeps this optimizer's momentum, not torch's
    default of 0."""
    ps, opt = run(lambda ps: ada.SGD(ps, lr=1e-2, momentum=0.9, optim_bits=8), [torch.randn(N)])
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["momentum"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["momentum"] == 0.9


def test_master_reseeded_when_the_parameter_is_written():
    """A bfloat16 parameter written in place between steps (as
    ``model.load_state_dict`` writes it) reseeds its master from the new
    value: the same bits as a float32 run whose parameter was set to the
    widened new value at that point. Without a write the master is kept."""
    gen = torch.Generator().manual_seed(5)
    h = torch.nn.Parameter(torch.randn(N, generator=gen).bfloat16())
    f = torch.nn.Parameter(h.detach().float())
    oh = ada.AdamW([h], lr=1e-2, master_weights=True)
    of = ada.AdamW([f], lr=1e-2)
    new = torch.randn(N, generator=gen).bfloat16()
    for t in range(5):
        if t == 3:
            with torch.no_grad():
                h.copy_(new)
                f.copy_(new.float())
        g = torch.randn(N, generator=gen).bfloat16()
        h.grad, f.grad = g, g.float()
        oh.step()
        of.step()
        assert torch.equal(oh.state[h]["master_param"], f.detach()), t


def test_stochastic_rounding_over_8bit_state():
    """bfloat16 parameters with 8-bit state round stochastically with the
    documented stream (written out again in test_bf16.py): SGD with
    momentum at lr 1, first step (the update is the gradient itself, exact
    in float32), one tensor with 8-bit state cut into pieces and one with
    float32 state; seeds as in test_bf16 (the group's count in the high 32
    bits, the parameter's index in the low), the step count 1."""
    from test_bf16 import stochastic_reference

    gen = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.full(s, 1.5, dtype=torch.bfloat16)) for s in ((70001,), (13,))]
    opt = ada.SGD(params, lr=1.0, momentum=0.9, optim_bits=8, bf16_stochastic_round=True)
    want = []
    for p in params:
        k = torch.randint(0, 256, p.shape, generator=gen)
        p.grad = (k.float() * 2.0**-15).bfloat16()
        want.append(p.detach().float() - p.grad.float())
    opt.step()
    assert opt.state[params[0]]["state1"].dtype == torch.uint8
    assert opt.state[params[1]]["state1"].dtype == torch.float32
    for index, (p, w) in enumerate(zip(params, want)):
        expected = stochastic_reference(w, index, 1)
        assert torch.equal(p.detach().view(torch.int16), expected), index
        # Not all rounded to nearest: the stream rounded some up.
        assert not torch.equal(p.detach(), w.bfloat16()) or p.numel() < 100


@pytest.mark.parametrize("ours,theirs,kw", BNB_CASES, ids=[c[1] for c in BNB_CASES])
def test_bitsandbytes_class_names(ours, theirs, kw):
    """``adaoptim.torch.AdamW8bit`` (and the other five) is ``AdamW`` with
    ``optim_bits=8``, bit for bit; bitsandbytes' own options are taken
    where they mean what adaoptim does and refused otherwise."""
    p0 = [torch.randn(N), torch.randn(SMALL)]
    a, oa = run(lambda ps: getattr(ada, theirs)(ps, block_wise=True, percentile_clipping=100, **kw), p0)
    b, ob = run(lambda ps: getattr(ada, ours)(ps, optim_bits=8, **kw), p0)
    assert isinstance(oa, getattr(ada, ours)) and type(oa).__name__ == theirs
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert torch.equal(oa.state[x]["state1"], ob.state[y]["state1"])
    p = [torch.nn.Parameter(torch.randn(N))]
    for bad in ({"percentile_clipping": 5}, {"block_wise": False}, {"is_paged": True}, {"optim_bits": 32}):
        with pytest.raises(ValueError):
            getattr(ada, theirs)(p, **kw, **bad)
    small = getattr(ada, theirs)(p, min_8bit_size=N + 1, **kw)
    p[0].grad = torch.randn(N)
    small.step()
    assert small.state[p[0]]["state1"].dtype == torch.float32
