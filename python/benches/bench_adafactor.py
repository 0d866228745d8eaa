#!/usr/bin/env python3
"""adaoptim.torch.Adafactor against torch.optim.Adafactor (its default
for-loop implementation and foreach=True) in one process: a 1M-element
matrix (1024 x 1024), the 194-tensor model mix of bench_torch.py at width 256
(11.5M params: matrices and vectors), a 64M matrix (8192 x 8192) and, with
--cases conv, a 256x256x3x3 conv weight (65536 3x3 matrices). Rounds
alternate between the implementations; the median per implementation is
reported as JSON lines (impl, case, params, threads, ms_per_step,
gparams_per_s), then the ratios to torch's fastest.

Run: python3 python/benches/bench_adafactor.py --threads 2 [--cases 1M,w256,64M] [--rounds 5]
"""

import argparse
import json
import statistics
import time

import torch
from bench_torch import model_shapes

import adaoptim.torch as ada

CASES = {
    "1M": lambda: [(1024, 1024)],
    "w256": lambda: model_shapes(256),
    "64M": lambda: [(8192, 8192)],
    # A conv weight: 65536 3x3 matrices, factored per kernel.
    "conv": lambda: [(256, 256, 3, 3)],
    # One long row: 1M columns, factored (row_var [1, 1], col_var [1, 1M]).
    "row": lambda: [(1, 1048576)],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="1M,w256,64M")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ada.set_num_threads(args.threads)
    for case in args.cases.split(","):
        shapes = CASES[case]()
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=gen) for s in shapes]
        grads = [torch.randn(s, generator=gen) for s in shapes]
        n = sum(p.numel() for p in base)
        impls = {
            "adaoptim": lambda ps: ada.Adafactor(ps, weight_decay=0.01),
            "torch-forloop": lambda ps: torch.optim.Adafactor(ps, weight_decay=0.01),
            "torch-foreach": lambda ps: torch.optim.Adafactor(ps, weight_decay=0.01, foreach=True),
        }
        runs = {}
        for name, make in impls.items():
            ps = [torch.nn.Parameter(b.clone()) for b in base]
            for p, g in zip(ps, grads):
                p.grad = g
            runs[name] = make(ps)
            runs[name].step()  # state created
        steps = 3 if n > (1 << 24) else 20
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, opt in runs.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    opt.step()
                times[name].append((time.perf_counter() - t0) / steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, s in med.items():
            print(
                json.dumps(
                    {
                        "impl": name,
                        "case": case,
                        "params": n,
                        "threads": args.threads,
                        "ms_per_step": round(s * 1e3, 3),
                        "gparams_per_s": round(n / s / 1e9, 4),
                    }
                )
            )
        best = min(med["torch-forloop"], med["torch-foreach"])
        print(
            json.dumps(
                {
                    "case": case,
                    "adaoptim_vs_torch_fastest": round(best / med["adaoptim"], 2),
                    "vs_forloop": round(med["torch-forloop"] / med["adaoptim"], 2),
                    "vs_foreach": round(med["torch-foreach"] / med["adaoptim"], 2),
                }
            )
        )


if __name__ == "__main__":
    main()
