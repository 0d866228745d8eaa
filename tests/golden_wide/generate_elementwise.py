"""Writes tests/golden_wide/{rprop,asgd,lion}_*.json: trajectories of the
element-wise optimizers added after round 1, in the golden format
(tests/golden/README.md), on dense, sparse and wide-scale gradients:
torch.optim.Rprop and torch.optim.ASGD from torch itself, and Lion from the
`lion-pytorch` package (lucidrains, the implementation the Lion paper's
authors point PyTorch users to; `pip install lion-pytorch`), whose class is
written as `torch_class: "Lion"`.

Run from the repository root: /path/to/venv/bin/python tests/golden_wide/generate_elementwise.py
[CLASS...] (PyTorch required, and lion-pytorch for the Lion files; the JSON
files are committed, so the tests need neither). Fixed seeds: reruns write
the same files.
"""
import json, os, sys

import torch

import generate  # the case format and gradient styles of generate.py

OUT = os.path.dirname(os.path.abspath(__file__))

CASES = {
    "Rprop": [
        ("rprop_default", {}, "dense"),
        ("rprop_scales", {}, "scales"),
        ("rprop_etas_sparse", {"lr": 0.05, "etas": [0.3, 1.5], "step_sizes": [1e-4, 0.2]}, "sparse"),
        ("rprop_maximize_scales", {"maximize": True, "step_sizes": [1e-8, 1.0]}, "scales"),
    ],
    "ASGD": [
        ("asgd_default", {}, "dense"),
        ("asgd_wd_scales", {"weight_decay": 0.01}, "scales"),
        ("asgd_t0_dense", {"lr": 0.05, "lambd": 0.001, "alpha": 0.5, "t0": 10.0}, "dense"),
        ("asgd_maximize_sparse", {"maximize": True, "lr": 0.03, "t0": 3.0, "weight_decay": 0.1}, "sparse"),
    ],
    "Lion": [
        ("lion_default", {}, "dense"),
        ("lion_wd_scales", {"lr": 3e-4, "weight_decay": 0.1}, "scales"),
        ("lion_betas_sparse", {"lr": 1e-3, "betas": [0.95, 0.98]}, "sparse"),
    ],
}


def main(classes):
    for cls in classes:
        torch.manual_seed(20261202)
        if cls == "Lion":
            from lion_pytorch import Lion

            torch.optim.Lion = Lion  # generate.optimizer_case looks the class up in torch.optim
        for name, options, style in CASES[cls]:
            case = generate.optimizer_case(name, cls, options, style)
            case["torch_version"] = torch.__version__
            if cls == "Lion":
                import lion_pytorch

                case["reference"] = "lion-pytorch " + getattr(lion_pytorch, "__version__", "0.2.5")
            with open(os.path.join(OUT, name + ".json"), "w") as f:
                json.dump(case, f, separators=(",", ":"))
            print(name)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
