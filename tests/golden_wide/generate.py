"""Writes tests/golden_wide/*.json: more real torch.optim trajectories and
lr_scheduler values, in the format of the shared golden folder (see
tests/golden/README.md), over option combinations that folder does not hold:
`maximize` on every optimizer, AMSGrad with AdamW and with maximize, centered
RMSprop without momentum, SGD without momentum, Adam's decoupled weight decay,
every schedule class with other options (repeated MultiStepLR milestones,
three-phase and linear OneCycleLR, decreasing LinearLR, ConstantLR, nested
SequentialLR), and sparse Adagrad/SparseAdam with every option.

Run from the repository root: python3 tests/golden_wide/generate.py
(PyTorch and numpy required; the JSON files are committed, so the tests need
neither). Cases are drawn from a fixed seed, so reruns write the same cases.
"""
import json, os, random

import numpy as np
import torch

OUT = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(20261125)
torch.manual_seed(20261125)


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


def beta_pair():
    return [rng.choice([0.8, 0.85, 0.9, 0.95]), rng.choice([0.99, 0.995, 0.999, 0.9999])]


OPTIONS = {
    "SGD": lambda: {"lr": rng.choice([0.01, 0.05, 0.1]), "momentum": rng.choice([0.0, 0.5, 0.9]),
                    "dampening": rng.choice([0.0, 0.1]), "weight_decay": rng.choice([0.0, 0.01])},
    "Adagrad": lambda: {"lr": rng.choice([0.01, 0.1]), "lr_decay": rng.choice([0.0, 0.05]),
                        "weight_decay": rng.choice([0.0, 0.01]),
                        "initial_accumulator_value": rng.choice([0.0, 0.5]), "eps": rng.choice([1e-10, 1e-6])},
    "RMSprop": lambda: {"lr": rng.choice([0.001, 0.01]), "alpha": rng.choice([0.9, 0.99]),
                        "eps": rng.choice([1e-8, 1e-5]), "weight_decay": rng.choice([0.0, 0.01]),
                        "momentum": rng.choice([0.0, 0.5]), "centered": rng.choice([False, True])},
    "Adadelta": lambda: {"lr": rng.choice([1.0, 0.3]), "rho": rng.choice([0.9, 0.99]),
                         "eps": rng.choice([1e-6, 1e-4]), "weight_decay": rng.choice([0.0, 0.02])},
    "Adam": lambda: {"lr": rng.choice([0.001, 0.01]), "betas": beta_pair(), "eps": rng.choice([1e-8, 1e-6]),
                     "weight_decay": rng.choice([0.0, 0.01]), "amsgrad": rng.choice([False, True]),
                     "decoupled_weight_decay": rng.choice([False, True])},
    "AdamW": lambda: {"lr": rng.choice([0.001, 0.01]), "betas": beta_pair(), "eps": rng.choice([1e-8, 1e-6]),
                      "weight_decay": rng.choice([0.0, 0.1]), "amsgrad": rng.choice([False, True])},
    "Adamax": lambda: {"lr": rng.choice([0.002, 0.02]), "betas": beta_pair(), "eps": rng.choice([1e-8, 1e-5]),
                       "weight_decay": rng.choice([0.0, 0.01])},
    "NAdam": lambda: {"lr": rng.choice([0.002, 0.01]), "betas": beta_pair(), "eps": rng.choice([1e-8, 1e-6]),
                      "weight_decay": rng.choice([0.0, 0.01]), "momentum_decay": rng.choice([0.004, 0.02]),
                      "decoupled_weight_decay": rng.choice([False, True])},
}

def main():
    files = {}
    for cls, draw in OPTIONS.items():
        for k, style in enumerate(["dense", "sparse", "scales"]):
            opts = draw()
            opts["maximize"] = k == 1  # maximize once per class
            if cls == "SGD" and k == 2:
                opts.update(momentum=0.9, dampening=0.0, nesterov=True)
            files[f"{cls.lower()}_{style}.json"] = optimizer_case(f"{cls} {style}", cls, opts, style)
    # combinations worth naming
    files["adam_amsgrad_maximize.json"] = optimizer_case(
        "Adam amsgrad maximize", "Adam", {"lr": 0.01, "amsgrad": True, "maximize": True}, "scales")
    files["adamw_amsgrad.json"] = optimizer_case("AdamW amsgrad", "AdamW", {"lr": 0.01, "amsgrad": True}, "sparse")
    files["rmsprop_centered_only.json"] = optimizer_case(
        "RMSprop centered", "RMSprop", {"lr": 0.01, "centered": True}, "scales")
    files["sgd_plain_large.json"] = optimizer_case("SGD plain", "SGD", {"lr": 0.1}, "dense", n=257, steps=20)


    def schedule_case(name, cls, options, steps, base_lr=0.1):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=base_lr)

        def build(c, o):
            o = dict(o)
            if c == "SequentialLR":
                kids = [build(k["torch_class"], {a: b for a, b in k.items() if a != "torch_class"})
                        for k in o.pop("schedulers")]
                return torch.optim.lr_scheduler.SequentialLR(opt, kids, **o)
            return getattr(torch.optim.lr_scheduler, c)(opt, **o)

        sched = build(cls, options)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return {"kind": "schedule", "name": name, "torch_class": cls, "base_lr": base_lr, "options": options,
                "steps": steps, "lrs": lrs}


    SCHEDULES = [
        ("schedule_step_gamma.json", "StepLR", {"step_size": 3, "gamma": 0.7}, 30),
        ("schedule_multistep_repeated.json", "MultiStepLR", {"milestones": [4, 4, 9, 20], "gamma": 0.5}, 30),
        ("schedule_exponential_fast.json", "ExponentialLR", {"gamma": 0.8}, 40),
        ("schedule_constant.json", "ConstantLR", {"factor": 0.25, "total_iters": 6}, 15),
        ("schedule_linear_decay.json", "LinearLR", {"start_factor": 1.0, "end_factor": 0.05, "total_iters": 17}, 30),
        ("schedule_polynomial_sqrt.json", "PolynomialLR", {"total_iters": 23, "power": 0.5}, 30),
        ("schedule_cosine_long.json", "CosineAnnealingLR", {"T_max": 7}, 50),
        ("schedule_restarts_tmult3.json", "CosineAnnealingWarmRestarts", {"T_0": 3, "T_mult": 3, "eta_min": 0.001}, 60),
        ("schedule_restarts_t1.json", "CosineAnnealingWarmRestarts", {"T_0": 5}, 30),
        ("schedule_cyclic_down.json", "CyclicLR",
         {"base_lr": 0.01, "max_lr": 0.2, "step_size_up": 3, "step_size_down": 8, "cycle_momentum": False}, 50),
        ("schedule_cyclic_exp_asym.json", "CyclicLR",
         {"base_lr": 0.002, "max_lr": 0.05, "step_size_up": 6, "step_size_down": 2, "mode": "exp_range",
          "gamma": 0.9, "cycle_momentum": False}, 50),
        ("schedule_onecycle_linear.json", "OneCycleLR",
         {"max_lr": 0.3, "total_steps": 40, "pct_start": 0.25, "anneal_strategy": "linear", "cycle_momentum": False}, 40),
        ("schedule_onecycle_three_phase.json", "OneCycleLR",
         {"max_lr": 0.5, "epochs": 4, "steps_per_epoch": 9, "three_phase": True, "div_factor": 10.0,
          "final_div_factor": 100.0, "cycle_momentum": False}, 36),
        ("schedule_sequential_three.json", "SequentialLR",
         {"schedulers": [{"torch_class": "ConstantLR", "factor": 0.5, "total_iters": 3},
                         {"torch_class": "ExponentialLR", "gamma": 0.9},
                         {"torch_class": "StepLR", "step_size": 4, "gamma": 0.5}],
          "milestones": [3, 10]}, 30),
    ]
    for fname, cls, opts, steps in SCHEDULES:
        files[fname] = schedule_case(fname[:-5], cls, opts, steps)


    def sparse_case(name, cls, options, rows=23, dim=5, steps=25):
        table = torch.nn.Parameter(torch.randn(rows, dim, dtype=torch.float32))
        p0 = f32list(table)
        opt = getattr(torch.optim, cls)([table], **options)
        grad_rows, grad_values, params = [], [], []
        for t in range(steps):
            k = rng.randint(1, 6)
            idx = [rng.randrange(rows) for _ in range(k)]
            if t % 4 == 0:
                idx.append(idx[0])  # a repeated row: torch adds its gradients
            vals = torch.randn(len(idx), dim) * (10.0 ** rng.uniform(-3, 2))
            table.grad = torch.sparse_coo_tensor(torch.tensor([idx]), vals, (rows, dim))
            opt.step()
            grad_rows.append(idx)
            grad_values.append(f32list(vals))
            params.append(f32list(table))
        return {"kind": "sparse_optimizer", "name": name, "torch_class": cls, "options": options, "rows": rows,
                "dim": dim, "steps": steps, "params0": p0, "grad_rows": grad_rows, "grad_values": grad_values,
                "params": params}


    files["sparse_adam_options.json"] = sparse_case(
        "SparseAdam options", "SparseAdam", {"lr": 0.05, "betas": [0.8, 0.99], "eps": 1e-6})
    files["sparse_adam_maximize.json"] = sparse_case("SparseAdam maximize", "SparseAdam", {"lr": 0.01, "maximize": True})
    files["sparse_adagrad_options.json"] = sparse_case(
        "sparse Adagrad options", "Adagrad",
        {"lr": 0.2, "lr_decay": 0.02, "initial_accumulator_value": 0.3, "eps": 1e-6})
    files["sparse_adagrad_maximize.json"] = sparse_case("sparse Adagrad maximize", "Adagrad", {"lr": 0.05, "maximize": True})

    for fname, v in files.items():
        v["torch_version"] = torch.__version__
        with open(os.path.join(OUT, fname), "w") as f:
            json.dump(v, f, separators=(",", ":"))
    print(f"wrote {len(files)} files to {OUT}")


if __name__ == "__main__":
    main()
