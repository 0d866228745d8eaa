"""Writes tests/golden_adafactor/*.json: torch.optim.Adafactor on every
configuration of torch's own test matrix (`optim_db`'s Adafactor entry,
`optim_inputs_func(device="cpu")`), for a vector, a matrix and a 3-d tensor
(the factored path reduces over the last two dimensions, per leading index),
on dense, sparse and wide-scale gradients, in the golden format
(tests/golden/README.md) with one extra key: `shape`, the parameter's shape
(row-major; `n` is its element count).

Run from the repository root: /path/to/venv/bin/python tests/golden_adafactor/generate.py
(needs torch and expecttest; the JSON files are committed, so the tests need
neither). Fixed seeds: reruns write the same files.
"""
import json, math, os, sys

import torch
from torch.testing._internal.common_optimizers import optim_db

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden_wide"))
import generate  # noqa: E402  the gradient styles and f32 lists

OUT = os.path.dirname(os.path.abspath(__file__))
STYLES = ["dense", "sparse", "scales"]
SHAPES = {"vec": [24], "mat": [4, 6], "t3": [2, 3, 4]}


def plain(v):
    if torch.is_tensor(v):
        return float(v)
    if isinstance(v, tuple):
        return [plain(x) for x in v]
    return v


def case(name, options, style, shape, steps=50):
    n = math.prod(shape)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float32))
    p0 = generate.f32list(p.flatten())
    opt = torch.optim.Adafactor([p], **options)
    grads, params = [], []
    for g in generate.grads_for(style, n, steps):
        p.grad = g.reshape(shape).clone()
        opt.step()
        grads.append(generate.f32list(g))
        params.append(generate.f32list(p.detach().flatten()))
    return {"kind": "optimizer", "name": name, "torch_class": "Adafactor", "options": {k: plain(v) for k, v in options.items()},
            "n": n, "shape": shape, "steps": steps, "grad_style": style, "params0": p0, "grads": grads, "params": params}


def main():
    (info,) = [i for i in optim_db if i.optim_cls.__name__ == "Adafactor"]
    count = 0
    for i, inp in enumerate(info.optim_inputs_func(device="cpu")):
        for s, style in enumerate(STYLES):
            for k, (tag, shape) in enumerate(SHAPES.items()):
                torch.manual_seed(20261203 + 100 * i + 10 * s + k)
                name = f"adafactor_{i}_{style}_{tag}"
                c = case(name, dict(inp.kwargs), style, shape)
                c["optim_db_desc"] = inp.desc
                c["torch_version"] = torch.__version__
                with open(os.path.join(OUT, name + ".json"), "w") as f:
                    json.dump(c, f, separators=(",", ":"))
                count += 1
    print(count, "files")


if __name__ == "__main__":
    main()
