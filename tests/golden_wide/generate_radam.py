"""Writes tests/golden_wide/radam_*.json: real torch.optim.RAdam trajectories
in the golden format (tests/golden/README.md), for the options torch's
RAdam takes: coupled and decoupled weight decay, maximize, other betas and
eps, on dense, sparse and wide-scale gradients. 30 steps cover both of
RAdam's branches (rho_t <= 5 on the first steps, the rectified step after).

Run from the repository root: /path/to/venv/bin/python tests/golden_wide/generate_radam.py
(PyTorch required; the JSON files are committed, so the tests need neither).
Fixed seeds: reruns write the same files.
"""
import json, os

import torch

# The case format and gradient styles of generate.py (which writes its own
# files when imported, so its helpers are repeated here).

OUT = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(20261201)


def f32list(t):
    # shortest decimal that parses back to the same f32
    return [float(str(x)) for x in t.detach().to(torch.float32).numpy().ravel()]


def grads_for(style, n, steps):
    out = []
    for t in range(steps):
        g = torch.randn(n)
        if style == "sparse":
            # most coordinates zero on most steps; a few active ones
            mask = torch.rand(n) < (0.9 if t % 7 == 0 else 0.05)
            g = g * mask
        elif style == "scales":
            g = g * torch.pow(10.0, torch.empty(n).uniform_(-12, 8))
            g[torch.rand(n) < 0.1] = 0.0
        out.append(g.to(torch.float32))
    return out


def optimizer_case(name, cls, options, style, n=41, steps=30):
    p = torch.nn.Parameter(torch.randn(n, dtype=torch.float32))
    p0 = f32list(p)
    opt = getattr(torch.optim, cls)([p], **options)
    grads, params = [], []
    for g in grads_for(style, n, steps):
        p.grad = g.clone()
        opt.step()
        grads.append(f32list(g))
        params.append(f32list(p))
    return {"kind": "optimizer", "name": name, "torch_class": cls, "options": options, "n": n,
            "steps": steps, "grad_style": style, "params0": p0, "grads": grads, "params": params}



CASES = [
    ("radam_default", {}, "dense"),
    ("radam_wd_scales", {"weight_decay": 0.01}, "scales"),
    ("radam_decoupled", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}, "dense"),
    ("radam_maximize_sparse", {"maximize": True, "betas": [0.8, 0.99]}, "sparse"),
    ("radam_eps_scales", {"lr": 0.003, "eps": 1e-6, "betas": [0.95, 0.9999]}, "scales"),
    ("radam_decoupled_scales", {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True}, "scales"),
]

for name, options, style in CASES:
    case = optimizer_case(name, "RAdam", options, style)
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(case, f)
    print(name)
