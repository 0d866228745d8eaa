#!/usr/bin/env python3
"""Golden trajectories for the torch-exact evaluation: real torch.optim.Adam,
AdamW, RMSprop, Adagrad, Adadelta, RAdam and NAdam (the single-tensor CPU
path, torch's default there) on this
machine, in the golden format (tests/golden/README.md), which the crate with
``torch_exact`` must reproduce bit for bit (``tests/torch_exact.rs``).

torch's bits depend on the square root MKL computes, which depends on the
code path MKL picks for the CPU: the script writes files only where torch's
``sqrt`` reproduces ``tests/torch_sqrt/torch_sqrt.json`` (MKL's AVX-512 path,
the one the evaluation reproduces), and records the torch version.

Run from the repository root: python3 tests/torch_exact/generate.py
"""

import json
import os

import numpy as np
import torch

OUT = os.path.dirname(os.path.abspath(__file__))
N, STEPS = 131, 30  # 8 vectors of 16 and a tail of 3

CASES = [
    ("adam_default", "Adam", {}, "dense"),
    ("adam_wd", "Adam", {"lr": 0.01, "weight_decay": 0.1}, "scales"),
    ("adam_amsgrad_maximize", "Adam", {"lr": 0.003, "amsgrad": True, "maximize": True}, "sparse"),
    ("adam_betas_eps", "Adam", {"lr": 0.02, "betas": [0.8, 0.99], "eps": 1e-6}, "scales"),
    ("adam_decoupled", "Adam", {"weight_decay": 0.05, "decoupled_weight_decay": True}, "dense"),
    ("adamw_default", "AdamW", {}, "scales"),
    ("adamw_amsgrad", "AdamW", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}, "dense"),
    ("adamw_sparse", "AdamW", {"lr": 0.001, "betas": [0.95, 0.9999]}, "sparse"),
    ("adamw_tiny", "AdamW", {"lr": 0.1, "eps": 1e-12}, "tiny"),
    ("rmsprop_default", "RMSprop", {}, "dense"),
    ("rmsprop_centered_momentum", "RMSprop", {"lr": 0.003, "centered": True, "momentum": 0.9}, "scales"),
    ("rmsprop_wd_maximize", "RMSprop", {"alpha": 0.9, "weight_decay": 0.1, "maximize": True}, "sparse"),
    ("rmsprop_tiny", "RMSprop", {"eps": 1e-12, "momentum": 0.5}, "tiny"),
    ("adagrad_default", "Adagrad", {}, "dense"),
    ("adagrad_decay_wd", "Adagrad", {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.1}, "scales"),
    ("adagrad_init_maximize", "Adagrad", {"initial_accumulator_value": 0.1, "maximize": True}, "sparse"),
    ("adagrad_tiny", "Adagrad", {"eps": 1e-14}, "tiny"),
    ("adadelta_default", "Adadelta", {}, "dense"),
    ("adadelta_wd_maximize", "Adadelta", {"lr": 0.5, "rho": 0.95, "weight_decay": 0.1, "maximize": True}, "scales"),
    ("adadelta_tiny", "Adadelta", {"eps": 1e-12}, "tiny"),
    ("radam_default", "RAdam", {}, "dense"),
    ("radam_wd", "RAdam", {"lr": 0.01, "weight_decay": 0.1, "betas": [0.8, 0.99]}, "scales"),
    ("radam_decoupled_maximize", "RAdam", {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True}, "sparse"),
    ("radam_tiny", "RAdam", {"eps": 1e-12}, "tiny"),
    ("nadam_default", "NAdam", {}, "dense"),
    ("nadam_wd_momentum_decay", "NAdam", {"lr": 0.01, "weight_decay": 0.1, "momentum_decay": 0.01}, "scales"),
    ("nadam_decoupled_maximize", "NAdam", {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True}, "sparse"),
    ("nadam_tiny", "NAdam", {"eps": 1e-12}, "tiny"),
]


def grads(style, gen):
    out = []
    for t in range(STEPS):
        g = torch.randn(N, generator=gen)
        if style == "sparse":
            g = g * (torch.rand(N, generator=gen) < (0.9 if t % 7 == 0 else 0.05))
        elif style == "scales":
            g = g * torch.pow(10.0, torch.empty(N).uniform_(-12, 8, generator=gen))
            g[torch.rand(N, generator=gen) < 0.1] = 0.0
        elif style == "tiny":
            # second moments in the subnormal range, where the root is scaled
            g = g * torch.pow(10.0, torch.empty(N).uniform_(-30, -18, generator=gen))
        out.append(g.float())
    return out


def f32list(t):
    return [float(str(x)) for x in t.detach().float().numpy().ravel()]


def sqrt_is_mkl_avx512():
    with open(os.path.join(OUT, "..", "torch_sqrt", "torch_sqrt.json")) as f:
        ref = json.load(f)
    x = torch.tensor(np.array(ref["input_bits"], dtype=np.uint32).view(np.float32))
    y = x.sqrt().numpy().view(np.uint32)
    want = np.array(ref["sqrt_bits"], dtype=np.uint32)
    nan = np.isnan(x.sqrt().numpy())
    return bool(((y == want) | nan).all())


def main():
    if not sqrt_is_mkl_avx512():
        raise SystemExit("torch's sqrt here is not the one of tests/torch_sqrt (MKL's AVX-512 path); no file written")
    gen = torch.Generator().manual_seed(20261204)
    for name, cls, options, style in CASES:
        p = torch.nn.Parameter(torch.randn(N, generator=gen))
        p0 = f32list(p)
        opt = getattr(torch.optim, cls)([p], foreach=False, **options)
        gs, ps = [], []
        for g in grads(style, gen):
            p.grad = g.clone()
            opt.step()
            gs.append(f32list(g))
            ps.append(f32list(p))
        case = {
            "kind": "optimizer",
            "name": name,
            "torch_class": cls,
            "options": options,
            "n": N,
            "steps": STEPS,
            "grad_style": style,
            "torch": torch.__version__,
            "params0": p0,
            "grads": gs,
            "params": ps,
        }
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(case, f)
    print(f"wrote {len(CASES)} files to {OUT}")


if __name__ == "__main__":
    main()
