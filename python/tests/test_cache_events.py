"""The cached step under random changes between steps.

From the second step on, ``step`` is served from a cache of checked
parameters (``_core.step_cached``), and anything that changed since goes
back through the full checks. These runs throw random changes at it between
steps, the ones a training loop or a framework makes, applied alike to
adaoptim's AdamW and torch's: gradients set to None, new memory behind a
parameter (``p.data = ...``), a parameter's state deleted, replaced or one
state tensor swapped, a new learning rate, a state_dict round trip, and bad
gradients (non-contiguous, of the wrong size) that adaoptim refuses with
nothing changed (torch's step is then skipped too). After every step the
parameters and state agree with torch's within the golden tolerance.
"""

import copy

import pytest
import torch

import adaoptim.torch as ada

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(7,), (3, 5), (0,), (300,), (2, 2, 2)]


def close(got, want, what):
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), (
        f"{what}: worst {((got - want).abs() / (RTOL * want.abs() + ATOL)).max().item():.3f} x tolerance"
    )


@pytest.mark.parametrize("seed", range(6))
def test_random_changes_between_steps(seed):
    gen = torch.Generator().manual_seed(seed)

    def randint(n):
        return int(torch.randint(n, (1,), generator=gen))

    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    o_ref = torch.optim.AdamW(groups(ref), lr=0.01, weight_decay=0.1, foreach=False)
    o_ours = ada.AdamW(groups(ours), lr=0.01, weight_decay=0.1)
    refused = 0
    for k in range(60):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for a, b, g in zip(ref, ours, grads):
            a.grad, b.grad = g.clone(), g.clone()
        event, i = randint(10), randint(len(SHAPES))
        if k == 30:
            event, i = 7, 1  # at least one refused step in every run
        a, b = ref[i], ours[i]
        bad = False
        if event == 0:
            a.grad = b.grad = None
        elif event == 1:
            x = a.detach().clone() * 1.5
            a.data, b.data = x.clone(), x.clone()
        elif event == 2:
            o_ref.state.pop(a, None)
            o_ours.state.pop(b, None)
        elif event == 3 and a in o_ref.state:
            o_ref.state[a] = {kk: v.clone() for kk, v in o_ref.state[a].items()}
            o_ours.state[b] = {kk: v.clone() for kk, v in o_ours.state[b].items()}
        elif event == 4 and a in o_ref.state:
            o_ref.state[a]["exp_avg"] = o_ref.state[a]["exp_avg"] * 0.5
            o_ours.state[b]["exp_avg"] = o_ours.state[b]["exp_avg"] * 0.5
        elif event == 5:
            lr = 0.001 * (1 + randint(20))
            o_ref.param_groups[i >= 2]["lr"] = lr
            o_ours.param_groups[i >= 2]["lr"] = lr
        elif event == 6:
            o_ref.load_state_dict(copy.deepcopy(o_ref.state_dict()))
            o_ours.load_state_dict(copy.deepcopy(o_ours.state_dict()))
        elif event == 7 and b.dim() == 2 and b.shape[0] != b.shape[1]:
            b.grad = torch.randn(b.shape[1], b.shape[0], generator=gen).t()  # non-contiguous
            bad = True
        elif event == 8 and b.numel() > 0:
            b.grad.data = torch.randn(b.numel() + 1, generator=gen)  # wrong size behind torch's back
            bad = True
        if bad:
            before = [p.detach().clone() for p in ours]
            state = copy.deepcopy(o_ours.state_dict())
            with pytest.raises((ValueError, TypeError), match=f"parameter {i if i < 2 else i - 2} of param_groups"):
                o_ours.step()
            assert all(torch.equal(p.detach(), q) for p, q in zip(ours, before)), f"step {k}: a refused step wrote"
            after = o_ours.state_dict()
            assert after["state"].keys() == state["state"].keys()
            for key, st in state["state"].items():
                for n, v in st.items():
                    assert torch.equal(torch.as_tensor(after["state"][key][n]), torch.as_tensor(v))
            refused += 1
            continue
        o_ref.step()
        o_ours.step()
        for j, (x, y) in enumerate(zip(ref, ours)):
            close(y.detach(), x.detach(), f"seed {seed} step {k} event {event} parameter {j}")
            assert (x in o_ref.state) == (y in o_ours.state)
            if x in o_ref.state:
                for n in ("exp_avg", "exp_avg_sq"):
                    close(o_ours.state[y][n], o_ref.state[x][n], f"seed {seed} step {k} {n} {j}")
                assert float(o_ours.state[y]["step"]) == float(o_ref.state[x]["step"])
    assert refused >= 1


def _same_state(sa, sb, what):
    assert sa.keys() == sb.keys(), what
    for n, v in sa.items():
        w = sb[n]
        if torch.is_tensor(v):
            assert v.dtype == w.dtype and torch.equal(v, w), f"{what}: {n}"
        else:
            assert v == w, f"{what}: {n}"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "kw,dtype",
    [
        (dict(optim_bits=8, min_8bit_size=256), torch.float32),
        (dict(master_weights=True), torch.bfloat16),
        (dict(optim_bits=8, min_8bit_size=256, master_weights=True), torch.float16),
    ],
    ids=["8bit", "master-bf16", "8bit-master-f16"],
)
def test_lowbit_cached_step_equals_the_python_loop(kw, dtype, seed, monkeypatch):
    """With 8-bit state or master weights, the step served from the cache
    (``_core.step_cached`` with the integer step and master bookkeeping in
    Rust) gives the bits of the Python loop (the same optimizer with its
    cache cleared before every step), under random changes between steps:
    gradients set to None, a parameter written in place (which reseeds its
    master), new memory behind a parameter, a state's step count set by
    hand, a new lr, a state_dict round trip."""
    gen = torch.Generator().manual_seed(seed)

    def randint(n):
        return int(torch.randint(n, (1,), generator=gen))

    shapes = [(600,), (20, 30), (5,), (0,)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    fast = [torch.nn.Parameter(x.clone()) for x in init]
    slow = [torch.nn.Parameter(x.clone()) for x in init]
    o_fast = ada.AdamW(fast, lr=0.01, weight_decay=0.1, **kw)
    o_slow = ada.AdamW(slow, lr=0.01, weight_decay=0.1, **kw)
    calls, real, counting = [], ada._core.step, [False]

    def counted(*args, **kwargs):
        if counting[0]:
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ada._core, "step", counted)
    misses = 1  # the first step
    for k in range(40):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        for a, b, g in zip(fast, slow, grads):
            a.grad, b.grad = g.clone(), g.clone()
        event, i = randint(7), randint(len(shapes))
        a, b = fast[i], slow[i]
        if event == 0:
            a.grad = b.grad = None
        elif event == 1:
            with torch.no_grad():
                a.mul_(0.5)
                b.mul_(0.5)
            # A parameter with a master, written in place: the loop reseeds it.
            misses += kw.get("master_weights", False) and k > 0
        elif event == 2:
            x = a.detach().clone() * 1.5
            a.data, b.data = x.clone(), x.clone()
            misses += k > 0 and a.numel() > 0  # (an empty tensor's pointer may not move)
        elif event == 3 and a in o_fast.state and "step" in o_fast.state[a]:
            o_fast.state[a]["step"] = o_slow.state[b]["step"] = 100
        elif event == 4:
            o_fast.param_groups[0]["lr"] = o_slow.param_groups[0]["lr"] = 0.001 * (1 + randint(20))
        elif event == 5:
            o_fast.load_state_dict(copy.deepcopy(o_fast.state_dict()))
            o_slow.load_state_dict(copy.deepcopy(o_slow.state_dict()))
            misses += k > 0
        o_slow.__dict__.pop("_adaoptim_lowcache", None)  # the Python loop, every step
        counting[0] = True
        o_fast.step()
        counting[0] = False
        o_slow.step()
        for j, (x, y) in enumerate(zip(fast, slow)):
            assert torch.equal(x.detach(), y.detach()), f"step {k} event {event} parameter {j}"
            assert (x in o_fast.state) == (y in o_slow.state)
            if x in o_fast.state:
                _same_state(o_fast.state[x], o_slow.state[y], f"step {k} event {event} parameter {j}")
    # The fast optimizer took the Python loop only on its first step and
    # after the changes that must send it there.
    assert len(calls) == misses
