"""Writes tests/golden_optimdb/*.json: torch's own optimizer test matrix in
the golden format (tests/golden/README.md). For every class adaoptim
implements, every configuration of
`torch.testing._internal.common_optimizers.optim_db` (each entry's
`optim_inputs_func(device="cpu")` kwargs) is run by real torch.optim on
dense, sparse and wide-scale gradients. A tensor-valued option (`lr` as a
0-d tensor) is written as the float it holds.

Run from the repository root: /path/to/venv/bin/python tests/golden_optimdb/generate.py
(needs torch and expecttest; the JSON files are committed, so the tests need
neither). Fixed seeds: reruns write the same files.
"""
import json, os, sys

import torch
from torch.testing._internal.common_optimizers import optim_db

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden_wide"))
import generate  # noqa: E402  the case format and gradient styles

OUT = os.path.dirname(os.path.abspath(__file__))
CLASSES = ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Rprop", "ASGD"]
STYLES = ["dense", "sparse", "scales"]


def plain(v):
    if torch.is_tensor(v):
        return float(v)
    if isinstance(v, tuple):
        return [plain(x) for x in v]
    return v


def main():
    count = 0
    for info in optim_db:
        cls = info.optim_cls.__name__
        if cls not in CLASSES:
            continue
        for i, inp in enumerate(info.optim_inputs_func(device="cpu")):
            kwargs = {k: plain(v) for k, v in inp.kwargs.items()}
            for style in STYLES:
                torch.manual_seed(20261202 + 1000 * CLASSES.index(cls) + 10 * i + STYLES.index(style))
                name = f"{cls.lower()}_{i}_{style}"
                # The original kwargs (a tensor lr stays a tensor) drive torch.
                case = generate.optimizer_case(name, cls, dict(inp.kwargs), style, n=24, steps=50)
                case["options"] = kwargs
                case["optim_db_desc"] = inp.desc
                case["torch_version"] = torch.__version__
                with open(os.path.join(OUT, name + ".json"), "w") as f:
                    json.dump(case, f, separators=(",", ":"))
                count += 1
    print(count, "files")


if __name__ == "__main__":
    main()
