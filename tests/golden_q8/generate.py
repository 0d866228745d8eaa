#!/usr/bin/env python3
"""Writes bitsandbytes.json: bitsandbytes' 8-bit block-wise scheme as its CPU backend computes it, for
tests/q8.rs to check adaoptim against.

- the signed and unsigned dynamic code maps (`create_dynamic_map`);
- `quantize_blockwise` (block 256) of assorted inputs: codes and absmax per block;
- a 20-step AdamW8bit trajectory (bitsandbytes.optim.AdamW8bit, min_8bit_size=0) on fixed gradients:
  the gradients, and after every step the params, state1/state2 codes and absmax1/absmax2.

Run with the bitsandbytes the tests were made with (0.50.2, torch 2.15 CPU):
  python3 tests/golden_q8/generate.py
"""
import json, os

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F

torch.manual_seed(0)
out = {"bitsandbytes": bnb.__version__, "torch": torch.__version__}
signed = F.create_dynamic_map(signed=True)
unsigned = F.create_dynamic_map(signed=False)
out["signed_map"] = signed.tolist()
out["unsigned_map"] = unsigned.tolist()


def q(x, code):
    codes, state = F.quantize_blockwise(x, code=code.clone(), blocksize=256)
    return {"input": x.tolist(), "codes": codes.tolist(), "absmax": state.absmax.tolist()}


cases = []
for name, x, code in [
    ("normal", torch.randn(1000), signed),
    ("tiny", torch.randn(700) * 1e-6, signed),
    ("one-outlier", torch.cat([torch.randn(255) * 1e-3, torch.tensor([5.0]), torch.randn(300)]), signed),
    ("negative-max", torch.cat([torch.rand(255), torch.tensor([-2.0])]), signed),
    # each code's value, and the midpoints between neighbours, as a block's values (absmax 1)
    ("codes", signed.clone(), signed),
    ("midpoints", torch.cat([(signed[:-1] + signed[1:]) / 2, torch.tensor([1.0])]), signed),
    ("squares", torch.randn(1000) ** 2 * 1e-4, unsigned),
    ("squares-with-zeros", torch.cat([torch.zeros(10), torch.rand(500) * 1e-3]), unsigned),
    ("unsigned-midpoints", torch.cat([(unsigned[:-1] + unsigned[1:]) / 2, torch.tensor([1.0])]), unsigned),
]:
    c = q(x.float(), code)
    c["name"] = name
    c["map"] = "signed" if code is signed else "unsigned"
    cases.append(c)
out["quantize"] = cases

n, steps = 2048, 20
p = torch.nn.Parameter(torch.randn(n) * 0.5)
opt = bnb.optim.AdamW8bit([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, min_8bit_size=0)
traj = {"n": n, "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "params0": p.detach().tolist(), "steps": []}
for t in range(steps):
    g = torch.randn(n) * 0.1
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    traj["steps"].append({
        "grad": g.tolist(), "params": p.detach().tolist(),
        "state1": st["state1"].tolist(), "state2": st["state2"].tolist(),
        "absmax1": st["absmax1"].tolist(), "absmax2": st["absmax2"].tolist(),
    })
out["adamw8bit"] = traj

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bitsandbytes.json"), "w") as f:
    json.dump(out, f)
print("wrote", len(cases), "quantize cases and", steps, "AdamW8bit steps")
