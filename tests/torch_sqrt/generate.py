#!/usr/bin/env python3
"""Golden data for adaoptim's torch-exact square root: float32 inputs and
the bits of torch's CPU ``sqrt`` of each (MKL's ``vsSqrt``), written to
``torch_sqrt.json`` beside this script.

torch's result bits depend on the code path MKL picks for the machine; the
committed file was made where MKL takes its AVX-512 path (an Intel Xeon
with AVX-512, torch 2.15), which is the path the torch-exact evaluation
reproduces. The script refuses to write a file elsewhere: it checks that
torch's roots are not all correctly rounded (MKL's vector path is active)
and records the torch version and ATen capability in the file.

Run: python3 tests/torch_sqrt/generate.py
"""

import json
import os

import numpy as np
import torch


def inputs():
    g = torch.Generator().manual_seed(15)
    n = 2048

    def bits(lo, hi, k):
        return torch.randint(lo, hi, (k,), generator=g, dtype=torch.int64).tolist()

    special = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xBF800000, 0x00000001, 0x007FFFFF]
    special += [0x3F800000, 0x40000000, 0x40800000, 0x3E800000, 0x7F7FFFFF, 0x00800000, 0x80000001]
    # around 2^-64, where the evaluation starts scaling, and the binades
    # below it where the unscaled residual would lose bits
    around = [0x1F800000 + d for d in range(-8, 9)]
    return (
        special
        + around
        + bits(1, 0x00800000, n)  # subnormals
        + bits(0x00800000, 0x20000000, n)  # small normals, up to 2^-63
        + bits(0x2A000000, 0x32000000, n)  # 1e-13 .. 1e-8, second moments
        + bits(0x32000000, 0x7F800000, n)  # the rest of the positive range
        + bits(0x3F800000, 0x40800000, n)  # [1, 4), every segment
    )


def disagreeing(k):
    """k positive values (normal and subnormal) whose torch root is not the
    correctly rounded one: the values the evaluation must get right."""
    g = torch.Generator().manual_seed(16)
    b = torch.randint(1, 0x7F800000, (1 << 22,), generator=g, dtype=torch.int64)
    x = torch.tensor(b.numpy().astype(np.uint32).view(np.float32))
    off = x.sqrt().numpy().view(np.uint32) != np.sqrt(x.numpy()).view(np.uint32)
    sub = torch.tensor((b.numpy() & 0x007FFFFF).astype(np.uint32).view(np.float32))
    off_sub = sub.sqrt().numpy().view(np.uint32) != np.sqrt(sub.numpy()).view(np.uint32)
    return b.numpy()[off][:k].tolist() + (b.numpy() & 0x007FFFFF)[off_sub][: k // 4].tolist()


def main():
    xs = inputs() + disagreeing(2048)
    x = torch.tensor(np.array(xs, dtype=np.uint32).view(np.float32))
    y = x.sqrt().numpy().view(np.uint32)
    with np.errstate(invalid="ignore"):
        exact = np.sqrt(x.numpy()).view(np.uint32)
    differ = int((y != exact).sum())
    if differ == 0:
        raise SystemExit("torch's sqrt is correctly rounded here: not MKL's vector path; no file written")
    out = {
        "torch": torch.__version__,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "note": "x.sqrt() on float32 CPU tensors; MKL's AVX-512 path",
        "differ_from_correctly_rounded": differ,
        "input_bits": xs,
        "sqrt_bits": [int(b) for b in y],
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_sqrt.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"{len(xs)} values, {differ} differ from the correctly rounded root; wrote {path}")


if __name__ == "__main__":
    main()
