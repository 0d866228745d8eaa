"""adaoptim.torch against real torch.optim: golden trajectories, torch's own
test matrix (optim_db), state_dict interchange both ways, schedulers,
GradScaler, clipping, skipped parameters and every bad input."""

import copy
import glob
import json
import os

import pytest
import torch

import adaoptim.torch as ada

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
RTOL, ATOL = 1e-5, 1e-6  # the golden tolerance (tests/golden/README.md)

BITWISE = {"SGD", "Adamax", "Rprop", "ASGD", "Lion"}
CLASSES = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Rprop",
    "ASGD",
    "Adafactor",
]


def golden_files():
    dirs = [os.path.join(ROOT, "tests", d) for d in ("golden", "golden_wide", "golden_optimdb", "golden_adafactor")]
    if os.environ.get("ADAOPTIM_GOLDEN_DIR"):
        dirs.append(os.environ["ADAOPTIM_GOLDEN_DIR"])
    files = []
    for d in dirs:
        files += sorted(glob.glob(os.path.join(d, "*.json")))
    assert files, "no golden files found"
    return files


def close(got, want, what):
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True), (
        f"{what}: worst {((got - want).abs() / (RTOL * want.abs() + ATOL)).max().item():.3f} x tolerance"
    )


@pytest.mark.parametrize("path", golden_files(), ids=os.path.basename)
def test_golden(path):
    with open(path) as f:
        case = json.load(f)
    if case["kind"] == "sparse_optimizer":
        return check_sparse_golden(case, os.path.basename(path))
    if case["kind"] != "optimizer":
        pytest.skip(f"{case['kind']} files are checked by the Rust tests (schedules)")
    cls = getattr(ada, case["torch_class"])
    shape = case.get("shape", [case["n"]])  # Adafactor's files give the shape
    p = torch.nn.Parameter(torch.tensor(case["params0"], dtype=torch.float32).reshape(shape))
    options = dict(case["options"])
    if "eps" in options and isinstance(options["eps"], list):
        options["eps"] = tuple(options["eps"])
    opt = cls([p], **options)
    # These evaluate torch's operations in torch's order, fused where torch
    # fuses: on the repository's own golden files they are torch's bits.
    bitwise = case["torch_class"] in BITWISE and os.path.dirname(os.path.abspath(path)).startswith(
        os.path.abspath(ROOT)
    )
    for t, (g, want) in enumerate(zip(case["grads"], case["params"])):
        p.grad = torch.tensor(g, dtype=torch.float32).reshape(shape)
        opt.step()
        want = torch.tensor(want, dtype=torch.float32).reshape(shape)
        close(p.detach(), want, f"{os.path.basename(path)} step {t + 1}")
        if bitwise:
            assert torch.equal(p.detach(), want), f"{os.path.basename(path)} step {t + 1}: not torch's bits"


def check_sparse_golden(case, name):
    """A row-sparse golden file: SparseAdam or Adagrad fed the file's sparse
    COO gradients (duplicate rows as written; torch coalesces them)."""
    rows, dim = case["rows"], case["dim"]
    p = torch.nn.Parameter(torch.tensor(case["params0"], dtype=torch.float32).reshape(rows, dim))
    opt = getattr(ada, case["torch_class"])([p], **case["options"])
    for t, (r, v, want) in enumerate(zip(case["grad_rows"], case["grad_values"], case["params"])):
        idx = torch.tensor([r], dtype=torch.int64)
        vals = torch.tensor(v, dtype=torch.float32).reshape(len(r), dim)
        p.grad = torch.sparse_coo_tensor(idx, vals, (rows, dim), check_invariants=True)
        opt.step()
        want = torch.tensor(want, dtype=torch.float32).reshape(rows, dim)
        close(p.detach(), want, f"{name} step {t + 1}")


def optim_db_cases():
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # expecttest missing
        pytest.skip(f"optim_db not importable: {e}", allow_module_level=False)
    cases = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in CLASSES:
            continue
        for i, inp in enumerate(info.optim_inputs_func(device="cpu")):
            cases.append(pytest.param(name, inp.kwargs, id=f"{name}-{i}-{inp.desc}"))
    return cases


def run_pair(name, kwargs, steps=12, shapes=((5, 7), (13,), (2, 3, 4)), scales=False, seed=0):
    """The same gradients through torch.optim.<name> and adaoptim.torch.<name>."""
    gen = torch.Generator().manual_seed(seed)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref = getattr(torch.optim, name)(ref, **copy.deepcopy(kwargs))
    o_ours = getattr(ada, name)(ours, **copy.deepcopy(kwargs))
    for _ in range(steps):
        for a, b in zip(ref, ours):
            g = torch.randn(a.shape, generator=gen)
            if scales:
                g = g * torch.pow(10.0, torch.empty(a.shape).uniform_(-8, 6, generator=gen))
            a.grad, b.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
    return ref, ours, o_ref, o_ours


@pytest.mark.parametrize("name,kwargs", optim_db_cases())
@pytest.mark.parametrize("scales", [False, True], ids=["dense", "scales"])
def test_optim_db(name, kwargs, scales):
    ref, ours, _, _ = run_pair(name, kwargs, scales=scales)
    for i, (a, b) in enumerate(zip(ref, ours)):
        close(b.detach(), a.detach(), f"{name} {kwargs} tensor {i}")


INTERCHANGE = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adadelta": {"lr": 0.5, "weight_decay": 0.01},
    "Adam": {"lr": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
    "Adamax": {"lr": 0.01},
    "NAdam": {"lr": 0.01, "momentum_decay": 0.006},
    "RAdam": {"lr": 0.01},
    "Rprop": {"lr": 0.01},
    "ASGD": {"lr": 0.01, "t0": 3},
    "Adafactor": {"lr": 0.02, "weight_decay": 0.01},
}


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_interchange(name, direction):
    kwargs = INTERCHANGE[name]
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (6,)]
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    first, second = (torch.optim, ada) if direction == "torch_to_ours" else (ada, torch.optim)
    o1 = getattr(first, name)(a, **kwargs)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]
    for gs in grads[:4]:
        for p, g in zip(a, gs):
            p.grad = g.clone()
        o1.step()
    sd = o1.state_dict()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    o2 = getattr(second, name)(b, **kwargs)
    o2.load_state_dict(copy.deepcopy(sd))
    # Both continue: the one that saved, and the other class that loaded.
    for gs in grads[4:]:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for i, (p, q) in enumerate(zip(a, b)):
        close(q.detach(), p.detach(), f"{name} {direction} tensor {i}")
    # The saved layout is torch's: same keys per parameter.
    torch_sd = o1.state_dict() if first is torch.optim else o2.state_dict()
    ours_sd = o2.state_dict() if first is torch.optim else o1.state_dict()
    for k in torch_sd["state"]:
        assert set(ours_sd["state"][k]) == set(torch_sd["state"][k]), (name, k)


def test_lion_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    gen = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(50, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    o1 = lion_pytorch.Lion([a], lr=3e-3, weight_decay=0.1)
    o2 = ada.Lion([b], lr=3e-3, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(50, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(a, b)
    assert torch.equal(o1.state[a]["exp_avg"], o2.state[b]["exp_avg"])


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "NAdam"])
def test_one_cycle_with_momentum_cycling(name):
    kwargs = {"SGD": {"lr": 0.1, "momentum": 0.9}, "RMSprop": {"lr": 0.01, "momentum": 0.9}}.get(name, {"lr": 0.01})
    gen = torch.Generator().manual_seed(7)
    a = torch.nn.Parameter(torch.randn(20, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    o1, o2 = getattr(torch.optim, name)([a], **kwargs), getattr(ada, name)([b], **kwargs)
    s1 = torch.optim.lr_scheduler.OneCycleLR(o1, max_lr=0.05, total_steps=30)
    s2 = torch.optim.lr_scheduler.OneCycleLR(o2, max_lr=0.05, total_steps=30)
    for _ in range(30):
        g = torch.randn(20, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        s1.step()
        s2.step()
    close(b.detach(), a.detach(), name)


def test_cosine_and_step_schedulers():
    gen = torch.Generator().manual_seed(8)
    a = torch.nn.Parameter(torch.randn(20, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    o1, o2 = torch.optim.Adam([a], lr=0.01), ada.Adam([b], lr=0.01)
    sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10) for o in (o1, o2)]
    for _ in range(25):
        g = torch.randn(20, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        for s in sched:
            s.step()
    close(b.detach(), a.detach(), "cosine")


def test_grad_scaler_and_clipping():
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model_b = copy.deepcopy(model_a)
    o1 = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    o2 = ada.AdamW(model_b.parameters(), lr=1e-2)
    sc1, sc2 = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _step in range(10):
        for model, opt, sc in ((model_a, o1, sc1), (model_b, o2, sc2)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            sc.scale(loss).backward()
            sc.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            sc.step(opt)
            sc.update()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        close(q.detach(), p.detach(), "GradScaler + clip_grad_norm_")


def test_parameters_without_grad_are_skipped():
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = ada.Adam([a, b], lr=0.1)
    a.grad = torch.ones(4)
    opt.step()
    assert torch.equal(b, torch.ones(4)) and b not in opt.state
    assert opt.state[a]["step"].item() == 1.0
    b.grad = torch.ones(4)
    opt.step()
    assert opt.state[a]["step"].item() == 2.0 and opt.state[b]["step"].item() == 1.0
    # torch's own optimizer agrees on every value.
    c, d = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    ref = torch.optim.Adam([c, d], lr=0.1)
    c.grad = torch.ones(4)
    ref.step()
    d.grad = torch.ones(4)
    ref.step()
    close(a.detach(), c.detach(), "skipped-then-stepped a")
    close(b.detach(), d.detach(), "skipped-then-stepped b")


def test_groups_and_add_param_group():
    gen = torch.Generator().manual_seed(9)
    a1, a2 = torch.nn.Parameter(torch.randn(6, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))
    b1, b2 = torch.nn.Parameter(a1.detach().clone()), torch.nn.Parameter(a2.detach().clone())
    o1 = torch.optim.AdamW([{"params": [a1], "weight_decay": 0.0}], lr=0.01)
    o2 = ada.AdamW([{"params": [b1], "weight_decay": 0.0}], lr=0.01)
    o1.add_param_group({"params": [a2], "lr": 0.1, "betas": (0.8, 0.99)})
    o2.add_param_group({"params": [b2], "lr": 0.1, "betas": (0.8, 0.99)})
    for _ in range(6):
        for p, q in ((a1, b1), (a2, b2)):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    close(b1.detach(), a1.detach(), "group 0")
    close(b2.detach(), a2.detach(), "group 1")


def unchanged_after(opt, params, fn, exc):
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc) as info:
        fn()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q), "a failed step modified a parameter"
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for k in state["state"]:
        for n, v in state["state"][k].items():
            assert torch.equal(torch.as_tensor(after["state"][k][n]), torch.as_tensor(v)), (
                "a failed step modified state"
            )
    return str(info.value)


def test_bad_inputs_raise_before_anything_changes():
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(5))
    opt = ada.Adam([a, b], lr=0.1)
    a.grad, b.grad = torch.randn(4, 4), torch.randn(5)
    opt.step()  # state exists for both
    # A gradient of the wrong shape on the second parameter (torch refuses the
    # assignment; `.data` swaps it behind torch's back): the first is untouched too.
    a.grad, b.grad = torch.randn(4, 4), torch.randn(5)
    b.grad.data = torch.randn(6)
    msg = unchanged_after(opt, [a, b], opt.step, ValueError)
    assert "parameter 1" in msg and "shape" in msg
    # A float64 gradient (torch refuses it unless grad_dtype is cleared).
    b.grad_dtype = None
    b.grad = torch.randn(5, dtype=torch.float64)
    assert "float32" in unchanged_after(opt, [a, b], opt.step, TypeError)
    # Non-contiguous gradient.
    b.grad = torch.randn(10)[::2]
    assert "contiguous" in unchanged_after(opt, [a, b], opt.step, ValueError)
    # Sparse gradient.
    b.grad = torch.randn(5).to_sparse()
    assert "sparse" in unchanged_after(opt, [a, b], opt.step, TypeError)
    # A hyperparameter made invalid after construction (torch checks only in __init__).
    b.grad = torch.randn(5)
    opt.param_groups[0]["lr"] = -1.0
    assert "lr" in unchanged_after(opt, [a, b], opt.step, ValueError)
    opt.param_groups[0]["lr"] = 0.1
    opt.param_groups[0]["betas"] = (1.5, 0.999)
    assert "betas" in unchanged_after(opt, [a, b], opt.step, ValueError)
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.step()


def test_bad_parameters():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = ada.SGD([p], lr=0.1)
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        opt.step()
    base = torch.randn(4, 4)
    p = torch.nn.Parameter(base.t())  # a non-contiguous parameter
    opt = ada.SGD([p], lr=0.1)
    p.grad = torch.randn(4, 4).t()
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    # torch's own ValueError messages for bad constructor arguments.
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ada.Adam([torch.nn.Parameter(torch.ones(1))], lr=-1)
    with pytest.raises(ValueError, match="Invalid beta parameter"):
        ada.AdamW([torch.nn.Parameter(torch.ones(1))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="differentiable"):
        ada.Adam([torch.nn.Parameter(torch.ones(1))], differentiable=True)


def test_is_a_torch_optimizer_and_threads():
    p = torch.nn.Parameter(torch.ones(10))
    opt = ada.AdamW([p])
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, torch.optim.AdamW)
    # Small tensors (whole pieces), a mid-sized one (cut into pieces) and one
    # past 2^21 elements (the crate's parallel driver): the same bits for any
    # thread count, and torch's values.
    gen = torch.Generator().manual_seed(11)
    shapes = [(7,), (300_001,), (2_100_003,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for n in (1, 2, 3):
        ada.set_num_threads(n)
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        o = ada.AdamW(ps, lr=1e-2, weight_decay=0.1)
        for gs in grads:
            for q, g in zip(ps, gs):
                q.grad = g.clone()
            o.step()
        results.append(ps)
    ada.set_num_threads(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), "thread count changed the bits"
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    ro = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for gs in grads:
        for q, g in zip(ref, gs):
            q.grad = g.clone()
        ro.step()
    for a, b in zip(results[0], ref):
        close(a.detach(), b.detach(), "threads")


def test_moved_parameter_memory_and_empty_state():
    # `p.data = ...` moves a parameter's memory: the next step uses the new memory.
    a = torch.nn.Parameter(torch.ones(6))
    opt = ada.SGD([a], lr=0.5)
    a.grad = torch.ones(6)
    opt.step()
    a.data = torch.full((6,), 10.0)
    opt.step()
    assert torch.equal(a.detach(), torch.full((6,), 9.5))
    # A parameter resized behind the optimizer's back is checked again, not overrun.
    b = torch.nn.Parameter(torch.ones(6))
    ob = ada.Adam([b], lr=0.1)
    b.grad = torch.ones(6)
    ob.step()
    b.data = torch.ones(3)
    b.grad = torch.ones(3)
    with pytest.raises(ValueError, match="state 'exp_avg' has shape"):
        ob.step()
    # SGD without momentum keeps no state, as torch's.
    assert len(opt.state) == 0 and len(torch.optim.SGD([a], lr=0.5).state) == 0


def test_adafactor_checks_large_tensors_and_schedules():
    # Past the parallel threshold (262144 elements), a 3-d and a vector
    # parameter, a scheduler writing lr, a parameter without gradient.
    gen = torch.Generator().manual_seed(5)
    shapes = [(600, 500), (3, 20, 30), (700,), (4, 4)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref = torch.optim.Adafactor(ref, lr=0.05, weight_decay=0.1, d=1.5)
    o_ours = ada.Adafactor(ours, lr=0.05, weight_decay=0.1, d=1.5)
    s_ref = torch.optim.lr_scheduler.CosineAnnealingLR(o_ref, T_max=5)
    s_ours = torch.optim.lr_scheduler.CosineAnnealingLR(o_ours, T_max=5)
    for _ in range(6):
        for a, b in zip(ref[:3], ours[:3]):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
        s_ref.step()
        s_ours.step()
    for i, (a, b) in enumerate(zip(ref, ours)):
        close(b.detach(), a.detach(), f"Adafactor tensor {i}")
    assert ours[3] not in o_ours.state and torch.equal(ours[3], ref[3])


def test_adafactor_fused_controls():
    """max_grad_norm clips by torch's clip_grad_norm_ factor over every
    gradient, grad_scale divides a loss scale out (a power of two: the bits
    of the unscaled step), skip_non_finite skips a step with a NaN or
    infinite gradient anywhere and changes nothing."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(30, 40), (7,), (2, 3, 5)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref = torch.optim.Adafactor(ref, lr=0.05, d=1.0)
    o_ours = ada.Adafactor(ours, lr=0.05, d=1.0, max_grad_norm=0.5, grad_scale=1024.0, skip_non_finite=True)
    o_plain = ada.Adafactor(plain, lr=0.05, d=1.0)
    for _ in range(8):
        for a, b, c in zip(ref, ours, plain):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad, c.grad = g.clone(), g * 1024.0, g.clone()
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        torch.nn.utils.clip_grad_norm_(plain, 0.5)
        o_ref.step()
        o_ours.step()
        o_plain.step()
        assert not o_ours.last_step_skipped
    for i, (a, b, c) in enumerate(zip(ref, ours, plain)):
        close(b.detach(), a.detach(), f"clipped Adafactor tensor {i}")
        close(b.detach(), c.detach(), f"fused vs clip_grad_norm_ tensor {i}")
    # Without clipping, a power-of-two scale gives the unscaled step's bits.
    o_scaled = ada.Adafactor(ours, lr=0.05, grad_scale=64.0)
    o_plain = ada.Adafactor(plain, lr=0.05)
    for p, q in zip(ours, plain):
        q.data.copy_(p.data)
    for _ in range(3):
        for b, c in zip(ours, plain):
            g = torch.randn(b.shape, generator=gen)
            b.grad, c.grad = g * 64.0, g.clone()
        o_scaled.step()
        o_plain.step()
    for b, c in zip(ours, plain):
        assert torch.equal(b.detach(), c.detach())
    for bad in (float("inf"), float("nan")):
        g = torch.randn(7, generator=gen)
        g[3] = bad
        ours[1].grad = g
        before = [p.detach().clone() for p in ours]
        state = copy.deepcopy(o_ours.state_dict())
        o_ours.step()
        assert o_ours.last_step_skipped
        assert all(torch.equal(p.detach(), q) for p, q in zip(ours, before))
        for k, st in state["state"].items():
            for n, v in st.items():
                assert torch.equal(o_ours.state_dict()["state"][k][n], v), f"{bad}: state {k} {n}"
    # A skipped first step leaves no state behind.
    fresh = ada.Adafactor([ours[0]], skip_non_finite=True)
    ours[0].grad = torch.full(shapes[0], float("nan"))
    fresh.step()
    assert fresh.last_step_skipped and len(fresh.state) == 0
    with pytest.raises(ValueError, match="grad_scale"):
        ada.Adafactor(ours, grad_scale=0.0)
    o_ours.max_grad_norm = -1.0
    ours[1].grad = torch.ones(7)
    assert "max_grad_norm" in unchanged_after(o_ours, ours, o_ours.step, ValueError)


def test_adafactor_bad_inputs_raise_before_anything_changes():
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(5))
    opt = ada.Adafactor([a, b])
    a.grad, b.grad = torch.randn(4, 4), torch.randn(5)
    b.grad.data = torch.randn(6)
    # Nothing is created on a failed first step, not even the first tensor's state.
    assert "shape" in unchanged_after(opt, [a, b], opt.step, ValueError)
    assert len(opt.state) == 0
    b.grad = torch.randn(5)
    opt.step()
    b.grad = torch.randn(10)[::2]
    assert "contiguous" in unchanged_after(opt, [a, b], opt.step, ValueError)
    b.grad = torch.randn(5)
    opt.param_groups[0]["d"] = 0.5
    assert "d" in unchanged_after(opt, [a, b], opt.step, ValueError)
    opt.param_groups[0]["d"] = 1.0
    opt.state[a]["row_var"] = torch.zeros(4, 2)
    assert "row_var" in unchanged_after(opt, [a, b], opt.step, ValueError)
    with pytest.raises(ValueError, match="Clipping threshold d should be >= 1"):
        ada.Adafactor([torch.nn.Parameter(torch.ones(2))], d=0.5)


def sparse_grad(shape, rows, gen):
    """A row-sparse COO gradient (sparse_dim 1, duplicates included) for a 2-d parameter."""
    idx = torch.tensor([rows], dtype=torch.int64)
    vals = torch.randn(len(rows), *shape[1:], generator=gen)
    return torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True)


def optim_db_sparse_adam():
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # expecttest missing
        pytest.skip(f"optim_db not importable: {e}", allow_module_level=False)
    return [
        pytest.param(inp.kwargs, id=f"optim_db-{i}-{inp.desc}")
        for info in optim_db
        if info.optim_cls is torch.optim.SparseAdam
        for i, inp in enumerate(info.optim_inputs_func(device="cpu"))
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 0.01, "betas": (0.8, 0.99)}, {"lr": 0.05, "eps": 1e-6, "maximize": True}] + optim_db_sparse_adam(),
    ids=str,
)
def test_sparse_adam_matches_torch(kwargs):
    kwargs = copy.deepcopy(kwargs)
    gen = torch.Generator().manual_seed(9)
    shapes = [(50, 8), (20, 3)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref, o_ours = torch.optim.SparseAdam(ref, **kwargs), ada.SparseAdam(ours, **kwargs)
    for t in range(15):
        for a, b in zip(ref, ours):
            rows = torch.randint(0, a.shape[0], (6,), generator=gen).tolist() + [t % a.shape[0]] * 2
            g = sparse_grad(a.shape, rows, gen)
            a.grad, b.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
    for i, (a, b) in enumerate(zip(ref, ours)):
        close(b.detach(), a.detach(), f"SparseAdam {kwargs} tensor {i}")
        sa, sb = o_ref.state[a], o_ours.state[b]
        assert sa["step"] == sb["step"] == 15
        close(sb["exp_avg"], sa["exp_avg"], "exp_avg")
        close(sb["exp_avg_sq"], sa["exp_avg_sq"], "exp_avg_sq")


def sparse_embedding_both_ways(name, seed, **kwargs):
    """An nn.Embedding(sparse=True) trained 4 steps by one library's `name`,
    its state_dict loaded into the other's, 4 more steps on both: the same
    weights either way round."""
    torch.manual_seed(seed)
    for first, second in [(torch.optim, ada), (ada, torch.optim)]:
        emb = torch.nn.Embedding(40, 6, sparse=True)
        emb2 = torch.nn.Embedding(40, 6, sparse=True)
        o1 = getattr(first, name)(emb.parameters(), **kwargs)
        batches = [torch.randint(0, 40, (12,)) for _ in range(8)]
        for x in batches[:4]:
            o1.zero_grad()
            emb(x).pow(2).sum().backward()
            o1.step()
        emb2.load_state_dict(emb.state_dict())
        o2 = getattr(second, name)(emb2.parameters(), **kwargs)
        o2.load_state_dict(copy.deepcopy(o1.state_dict()))
        for x in batches[4:]:
            for e, o in ((emb, o1), (emb2, o2)):
                o.zero_grad()
                e(x).pow(2).sum().backward()
                o.step()
        close(emb2.weight.detach(), emb.weight.detach(), f"{name}: {first.__name__} -> {second.__name__}")
        assert float(o2.state[emb2.weight]["step"]) == 8


def test_sparse_adam_embedding_and_state_dict_both_ways():
    sparse_embedding_both_ways("SparseAdam", 0, lr=0.02)


def test_sparse_adam_bad_inputs_change_nothing():
    gen = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(10, 4))
    b = torch.nn.Parameter(torch.randn(6, 4))
    opt = ada.SparseAdam([a, b])
    a.grad = sparse_grad(a.shape, [1, 2], gen)
    b.grad = torch.sparse_coo_tensor(torch.tensor([[7]]), torch.randn(1, 4), (6, 4), check_invariants=False)
    assert "outside" in unchanged_after(opt, [a, b], opt.step, ValueError)
    assert len(opt.state) == 0
    b.grad = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="dense gradients"):
        opt.step()
    b.grad = sparse_grad(b.shape, [0, 5], gen)
    opt.step()
    opt.param_groups[0]["lr"] = -1.0
    assert "lr" in unchanged_after(opt, [a, b], opt.step, ValueError)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ada.SparseAdam([torch.nn.Parameter(torch.ones(2, 2))], lr=-1)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 0.05, "lr_decay": 0.01}, {"lr": 0.02, "initial_accumulator_value": 0.1, "eps": 1e-6, "maximize": True}],
    ids=str,
)
def test_adagrad_sparse_gradients_match_torch(kwargs):
    """Sparse gradients take torch's sparse Adagrad update; a dense-gradient
    parameter in the same optimizer takes the dense one, in the same step."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(50, 8), (20, 3), (7,)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref, o_ours = torch.optim.Adagrad(ref, **kwargs), ada.Adagrad(ours, **kwargs)
    for t in range(15):
        for a, b in zip(ref, ours):
            if a.dim() == 2:
                rows = torch.randint(0, a.shape[0], (6,), generator=gen).tolist() + [t % a.shape[0]] * 2
                g = sparse_grad(a.shape, rows, gen)
            else:
                g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
    for i, (a, b) in enumerate(zip(ref, ours)):
        close(b.detach(), a.detach(), f"Adagrad {kwargs} tensor {i}")
        sa, sb = o_ref.state[a], o_ours.state[b]
        assert float(sa["step"]) == float(sb["step"]) == 15
        close(sb["sum"], sa["sum"], "sum")


def test_adagrad_sparse_embedding_state_dict_both_ways():
    sparse_embedding_both_ways("Adagrad", 1, lr=0.05, lr_decay=0.001)


def test_adagrad_sparse_bad_inputs_change_nothing():
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(10, 4))
    b = torch.nn.Parameter(torch.randn(6, 4))
    c = torch.nn.Parameter(torch.randn(5))
    opt = ada.Adagrad([a, b, c])
    a.grad = sparse_grad(a.shape, [1, 2], gen)
    c.grad = torch.randn(5)
    b.grad = torch.sparse_coo_tensor(torch.tensor([[7]]), torch.randn(1, 4), (6, 4), check_invariants=False)
    # nothing changes, the dense parameter included
    assert "outside" in unchanged_after(opt, [a, b, c], opt.step, ValueError)
    assert all(float(opt.state[p]["step"]) == 0 for p in (a, b, c))
    b.grad = sparse_grad(b.shape, [0, 5], gen)
    opt.param_groups[0]["lr"] = -1.0
    assert "lr" in unchanged_after(opt, [a, b, c], opt.step, ValueError)
    opt.param_groups[0]["lr"] = 0.01
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in (a, b, c))
    opt.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in (a, b, c))


def test_fused_clipping_is_torch_clip_grad_norm():
    """max_grad_norm clips inside the step by torch's factor over all
    parameters' gradients: the same trajectory as clip_grad_norm_ + step."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(30, 4), (9,), (5000,)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref = torch.optim.AdamW(ref, lr=0.01)
    o_ours = ada.AdamW(ours, lr=0.01, max_grad_norm=0.5)
    for _ in range(10):
        for a, b in zip(ref, ours):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        o_ref.step()
        o_ours.step()
        assert not o_ours.last_step_skipped
    for a, b in zip(ref, ours):
        close(b.detach(), a.detach(), "clipped AdamW")
        close(o_ours.state[b]["exp_avg_sq"], o_ref.state[a]["exp_avg_sq"], "exp_avg_sq")


def test_fused_grad_scale_and_skip_non_finite():
    """grad_scale divides the loss scale out inside the step (a power of two:
    exactly torch's unscaled step); skip_non_finite skips a step with a NaN or
    infinite gradient anywhere and changes nothing."""
    gen = torch.Generator().manual_seed(6)
    a = torch.nn.Parameter(torch.randn(40, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    o_ref = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    o_ours = ada.SGD([b], lr=0.1, momentum=0.9, grad_scale=1024.0, skip_non_finite=True)
    for t in range(6):
        g = torch.randn(40, generator=gen)
        a.grad = g.clone()
        b.grad = g * 1024.0
        o_ref.step()
        o_ours.step()
        assert torch.equal(b.detach(), a.detach()), f"step {t}"
    for bad in (float("inf"), float("nan")):
        g = torch.randn(40, generator=gen)
        g[7] = bad
        b.grad = g
        unchanged_after_skip = b.detach().clone()
        state = copy.deepcopy(o_ours.state_dict())
        o_ours.step()
        assert o_ours.last_step_skipped
        assert torch.equal(b.detach(), unchanged_after_skip)
        assert torch.equal(o_ours.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])
    b.grad = torch.ones(40)
    o_ours.step()
    assert not o_ours.last_step_skipped


def test_fused_controls_bad_values():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="grad_scale"):
        ada.Adam([p], grad_scale=0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        ada.Adam([p], max_grad_norm=-1.0)
    opt = ada.Adam([p], max_grad_norm=1.0)
    p.grad = torch.ones(3)
    opt.max_grad_norm = float("nan")
    assert "max_grad_norm" in unchanged_after(opt, [p], opt.step, ValueError)
    e = torch.nn.Parameter(torch.randn(6, 2))
    opt = ada.Adagrad([e], max_grad_norm=1.0)
    e.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (6, 2), check_invariants=True)
    assert "dense gradients" in unchanged_after(opt, [e], opt.step, ValueError)
    # Lion takes them too
    opt = ada.Lion([p], lr=0.01, grad_scale=2.0)
    p.grad = torch.full((3,), 2.0)
    opt.step()


def test_later_steps_are_served_by_the_cache(monkeypatch):
    """After the first step, a step whose parameters are all unchanged goes
    through ``_core.step_cached`` (the per-parameter checks in Rust) without
    the Python loop; a changed parameter falls back to the loop, which checks
    and names it."""
    gen = torch.Generator().manual_seed(5)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6,), (3, 4), (0,))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.1, foreach=False)
    o_ours = ada.AdamW(ours, lr=0.1, weight_decay=0.1)
    calls = []
    real_step = ada._core.step
    monkeypatch.setattr(ada._core, "step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    for k in range(4):
        for i, (a, b) in enumerate(zip(ref, ours)):
            g = torch.randn(a.shape, generator=gen)
            # The last parameter has no gradient on step 2: skipped from the cache too.
            a.grad, b.grad = (None, None) if (k == 2 and i == 1) else (g.clone(), g.clone())
        o_ref.step()
        o_ours.step()
        for a, b in zip(ref, ours):
            close(b.detach(), a.detach(), f"step {k}")
    assert len(calls) == 1, "only the first step should have taken the Python loop"
    # A non-contiguous gradient after caching: the loop runs and refuses it.
    ours[1].grad = torch.randn(4, 3).t()
    before = [p.detach().clone() for p in ours]
    with pytest.raises(ValueError, match="parameter 1 .*contiguous"):
        o_ours.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(ours, before))
    assert len(calls) == 1


def test_state_changed_by_hand_is_what_the_next_step_uses():
    """A training loop that deletes a parameter's state (to restart its
    moments), replaces its state dict, or swaps one state tensor gets what
    torch gives: the cached step sees each change."""
    gen = torch.Generator().manual_seed(9)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6,), (3, 4))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref, o_ours = torch.optim.SGD(ref, lr=0.1, momentum=0.9), ada.SGD(ours, lr=0.1, momentum=0.9)

    def step():
        for a, b in zip(ref, ours):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
        for a, b in zip(ref, ours):
            assert torch.equal(a.detach(), b.detach())
            assert torch.equal(o_ref.state[a]["momentum_buffer"], o_ours.state[b]["momentum_buffer"])

    step()
    step()
    del o_ref.state[ref[0]], o_ours.state[ours[0]]  # restart one parameter's momentum
    step()
    o_ref.state[ref[1]] = {"momentum_buffer": torch.ones(3, 4)}
    o_ours.state[ours[1]] = {"momentum_buffer": torch.ones(3, 4)}
    step()
    # Adam: a second state buffer swapped by hand.
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    b.data.copy_(a.data)
    oa, ob = torch.optim.Adam([a], lr=0.1, foreach=False), ada.Adam([b], lr=0.1)
    for k in range(3):
        g = torch.randn(5, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        if k == 0:
            oa.state[a]["exp_avg_sq"] = torch.full((5,), 4.0)
            ob.state[b]["exp_avg_sq"] = torch.full((5,), 4.0)
    close(b.detach(), a.detach(), "Adam after exp_avg_sq swapped")
    close(ob.state[b]["exp_avg_sq"], oa.state[a]["exp_avg_sq"], "exp_avg_sq")
