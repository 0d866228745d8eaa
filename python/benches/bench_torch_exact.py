#!/usr/bin/env python3
"""What ``torch_exact=True`` costs: adaoptim.torch.AdamW with it and without
it, against torch.optim.AdamW's single-tensor path (``foreach=False``, the
evaluation it reproduces and torch's default for CPU tensors) and its fused
one, on one tensor of each size. Rounds alternate between the
implementations; medians per implementation, as JSON lines (impl, n,
threads, ms_per_step, gparams_per_s), then the ratios.

Run: python3 python/benches/bench_torch_exact.py --threads 2 [--sizes 1048576,67108864] [--rounds 7]
"""

import argparse
import json
import statistics
import time

import torch

import adaoptim.torch as ada

IMPLS = {
    "adaoptim": lambda ps: ada.AdamW(ps, lr=1e-3),
    "adaoptim torch_exact": lambda ps: ada.AdamW(ps, lr=1e-3, torch_exact=True),
    "torch for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1048576,67108864")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ada.set_num_threads(args.threads)
    for n in (int(s) for s in args.sizes.split(",")):
        opts = {}
        for name, make in IMPLS.items():
            p = torch.nn.Parameter(torch.randn(n))
            p.grad = torch.randn(n) * 1e-2
            opts[name] = make([p])
            opts[name].step()  # state created outside the timing
        calls = max(1, int(3e8 // n))
        times = {name: [] for name in IMPLS}
        for _ in range(args.rounds):
            for name, opt in opts.items():
                t = time.perf_counter()
                for _ in range(calls):
                    opt.step()
                times[name].append((time.perf_counter() - t) / calls)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, dt in med.items():
            row = {
                "impl": name,
                "n": n,
                "threads": args.threads,
                "ms_per_step": dt * 1e3,
                "gparams_per_s": n / dt / 1e9,
            }
            print(json.dumps(row))
        base = med["adaoptim torch_exact"]
        for name in IMPLS:
            print(f"n={n}: adaoptim torch_exact is {med[name] / base:.2f}x as fast as {name}")


if __name__ == "__main__":
    main()
