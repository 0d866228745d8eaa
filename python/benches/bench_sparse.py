#!/usr/bin/env python3
"""adaoptim.torch.SparseAdam against torch.optim.SparseAdam on an embedding
table, float32 and bfloat16 tables (state in the table's dtype, as both
create it), in one process, rounds alternated, medians reported as one JSON
line (microseconds per ``step()``, Python overhead and torch's coalescing of
the gradient included), then ratios. The gradient names ``--batch`` random
rows (duplicates included) of a ``--rows`` x ``--dim`` table.

Run: python3 python/benches/bench_sparse.py [--threads 2] [--rows 1048576] [--dim 64] [--batch 8192] [--rounds 7]
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import time_step  # noqa: E402

import adaoptim.torch as ada  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ada.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, a.rows, (1, a.batch), generator=gen)
    vals = torch.randn(a.batch, a.dim, generator=gen) * 0.01

    def make(dtype, cls):
        p = torch.nn.Parameter((torch.randn(a.rows, a.dim, generator=gen) * 0.02).to(dtype))
        p.grad = torch.sparse_coo_tensor(idx, vals.to(dtype), (a.rows, a.dim), check_invariants=True)
        o = cls([p], lr=1e-3)
        o.step()
        return o

    opts = {
        "torch_f32": make(torch.float32, torch.optim.SparseAdam),
        "adaoptim_f32": make(torch.float32, ada.SparseAdam),
        "torch_bf16": make(torch.bfloat16, torch.optim.SparseAdam),
        "adaoptim_bf16": make(torch.bfloat16, ada.SparseAdam),
    }
    times = {k: [] for k in opts}
    for _ in range(a.rounds):
        for k, o in opts.items():
            times[k].append(time_step(o, a.batch * a.dim) * 1e6)
    med = {k: round(statistics.median(v), 1) for k, v in times.items()}
    row = {"rows": a.rows, "dim": a.dim, "batch_rows": a.batch, "threads": a.threads, "us_per_step": med}
    row["adaoptim_vs_torch_f32"] = round(med["torch_f32"] / med["adaoptim_f32"], 2)
    row["adaoptim_vs_torch_bf16"] = round(med["torch_bf16"] / med["adaoptim_bf16"], 2)
    row["adaoptim_bf16_time_vs_f32"] = round(med["adaoptim_bf16"] / med["adaoptim_f32"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
