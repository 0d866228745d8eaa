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

from generate import optimizer_case  # the case format and gradient styles of generate.py

OUT = os.path.dirname(os.path.abspath(__file__))

torch.manual_seed(20261201)

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
    case["torch_version"] = torch.__version__
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(case, f, separators=(",", ":"))
    print(name)
