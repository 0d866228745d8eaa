#!/usr/bin/env python3
"""Per class, the golden steps (the three folders under tests/) on which
adaoptim.torch gives torch's exact bits, not just values within the tolerance.

Run: python3 python/benches/bit_identical.py
"""

import collections
import glob
import json
import os

import torch

import adaoptim.torch as ada

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main():
    res = collections.defaultdict(lambda: [0, 0])
    for d in ("golden", "golden_wide", "golden_optimdb"):
        for f in sorted(glob.glob(os.path.join(ROOT, "tests", d, "*.json"))):
            with open(f) as fh:
                c = json.load(fh)
            if c["kind"] != "optimizer":
                continue
            p = torch.nn.Parameter(torch.tensor(c["params0"], dtype=torch.float32))
            o = getattr(ada, c["torch_class"])([p], **c["options"])
            for g, w in zip(c["grads"], c["params"]):
                p.grad = torch.tensor(g, dtype=torch.float32)
                o.step()
                res[c["torch_class"]][0] += int(torch.equal(p.detach(), torch.tensor(w, dtype=torch.float32)))
                res[c["torch_class"]][1] += 1
    for k, (same, total) in sorted(res.items()):
        print(f"{k}: {same}/{total} steps bit-identical ({same / total:.1%})")


if __name__ == "__main__":
    main()
