#!/usr/bin/env python3
"""Before/after of adaoptim.torch.AdamW's step in one process: an earlier
build of the package (imported as ``adaoptim_old``), this one, and
torch.optim.AdamW(fused=True), on bench_torch.py's cases, rounds alternated,
medians in microseconds, as JSON lines.

Build the earlier package first, e.g. from a worktree of the old commit:
    git worktree add /tmp/oldwt <commit>
    (cd /tmp/oldwt && pip install --no-deps --target /tmp/old_ada ./python)
    mkdir -p /tmp/old_pkg && cp -r /tmp/old_ada/adaoptim /tmp/old_pkg/adaoptim_old
Run: python3 python/benches/bench_before_after.py --old /tmp/old_pkg [--cases empty194,w64,w256,64M] [--rounds 9]
[--options '{"optim_bits": 8}'] [--dtype bfloat16]
(--options: extra AdamW keyword options for both builds, as JSON; --dtype: of
the parameters and gradients. torch's fused AdamW runs on the same tensors.)
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import case_shapes, time_step  # noqa: E402

import adaoptim.torch as new  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="a folder holding the earlier package as adaoptim_old")
    ap.add_argument("--cases", default="empty194,w64,w256,64M")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--options", default="{}", help="extra AdamW options for both builds, as JSON")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    kw = json.loads(a.options)
    dtype = getattr(torch, a.dtype)
    sys.path.insert(0, a.old)
    import adaoptim_old.torch as old

    torch.set_num_threads(a.threads)
    new.set_num_threads(a.threads)
    old.set_num_threads(a.threads)
    for case in a.cases.split(","):
        ps = [torch.nn.Parameter((torch.randn(*s) * 0.02).to(dtype)) for s in case_shapes(case)]
        for p in ps:
            p.grad = torch.randn_like(p) * 0.01
        n = sum(p.numel() for p in ps)
        opts = {
            "before": old.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw),
            "after": new.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw),
            "torch-fused": torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        }
        for o in opts.values():
            o.step()
            o.step()
        times = {k: [] for k in opts}
        for _ in range(a.rounds):
            for k, o in opts.items():
                times[k].append(time_step(o, n))
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        row = {"case": case, "tensors": len(ps), "params": n, "threads": a.threads, "options": kw, "dtype": a.dtype}
        row.update({f"{k}_us": round(v, 1) for k, v in med.items()})
        row["after_vs_before"] = round(med["before"] / med["after"], 3)
        row["before_vs_torch_fused"] = round(med["torch-fused"] / med["before"], 3)
        row["after_vs_torch_fused"] = round(med["torch-fused"] / med["after"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
