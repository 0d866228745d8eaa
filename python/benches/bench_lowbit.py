#!/usr/bin/env python3
"""adaoptim.torch's reduced-precision AdamW steps against the pipelines
users run today, in one process, rounds alternated, medians reported as
JSON lines (impl, case, params, threads, ms_per_step, gparams_per_s,
bytes_per_param), then ratios. Each step is one ``step()`` as its users run
it, Python overhead included.

  adaoptim-q8              float32 params and gradients, 8-bit block-wise states (optim_bits=8)
  bnb-8bit                 bitsandbytes.optim.AdamW8bit on CPU (the same scheme)
  torchao-8bit             torchao.optim.AdamW8bit on CPU (where torchao is installed)
  adaoptim-master          bfloat16 params and gradients, float32 master weights and states
                           (master_weights=True): one pass writes the master and the bf16 copy
  torch-fused-bf16grads    the same with torch: bf16 gradients upcast into the float32 master's
                           gradient, fused AdamW, then the bf16 copy written
  deepspeed-bf16grads      the same pipeline with DeepSpeedCPUAdam (where deepspeed is installed)
  adaoptim-master-q8       bfloat16 params and gradients, float32 master, 8-bit states
  torch-fused-f32          float32 everything: the baseline

Run: python3 python/benches/bench_lowbit.py --threads 2 [--sizes 1048576,67108864] [--rounds 5] [--impls ...]
[--models empty194,w64]

--models: also adaoptim's AdamW plain, with optim_bits=8 and with master_weights=True (bf16)
on bench_torch.py's 194-tensor model (w64) and on 194 empty tensors (the Python-side cost of a
step() call), rounds alternated.
"""

import argparse
import json
import os
import statistics
from types import SimpleNamespace

import bench_torch
import torch

import adaoptim.torch as ada

# DRAM bytes moved per parameter (reads + writes).
BYTES = {
    "adaoptim-q8": 4 + 4 + 2 + 4 + 2,
    "bnb-8bit": 4 + 4 + 2 + 4 + 2,
    "torchao-8bit": 4 + 4 + 2 + 4 + 2,
    "adaoptim-master": 2 + 8 + 16 + 2,
    "torch-fused-bf16grads": 2 + 4 + 4 + 28 + 4 + 2,
    "deepspeed-bf16grads": 2 + 4 + 4 + 28 + 4 + 2,
    "adaoptim-master-q8": 2 + 8 + 4 + 2,
    "torch-fused-f32": 28,
}


def make(impl, n):
    """A zero-argument function running one step of `impl` on `n` parameters."""
    gen = torch.Generator().manual_seed(0)
    if impl in ("adaoptim-master", "adaoptim-master-q8"):
        p = torch.nn.Parameter(torch.full((n,), 0.5, dtype=torch.bfloat16))
        p.grad = (torch.randn(n, generator=gen) * 0.01).to(torch.bfloat16)
        bits = 8 if impl.endswith("q8") else 32
        return ada.AdamW([p], lr=1e-3, weight_decay=0.01, master_weights=True, optim_bits=bits).step
    if impl in ("torch-fused-bf16grads", "deepspeed-bf16grads"):
        p = torch.nn.Parameter(torch.full((n,), 0.5))
        p.grad = torch.empty(n)
        if impl.startswith("deepspeed"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.01, adamw_mode=True)
        else:
            opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=True)
        g16 = (torch.randn(n, generator=gen) * 0.01).to(torch.bfloat16)
        p16 = torch.empty(n, dtype=torch.bfloat16)

        def step():
            p.grad.copy_(g16)
            opt.step()
            p16.copy_(p.detach())

        return step
    p = torch.nn.Parameter(torch.full((n,), 0.5))
    p.grad = torch.randn(n, generator=gen) * 0.01
    if impl == "adaoptim-q8":
        return ada.AdamW([p], lr=1e-3, weight_decay=0.01, optim_bits=8).step
    if impl == "bnb-8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit([p], lr=1e-3, weight_decay=0.01).step
    if impl == "torchao-8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit([p], lr=1e-3, weight_decay=0.01).step
    if impl == "torch-fused-f32":
        return torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=True).step
    raise SystemExit(f"unknown impl {impl}")


def time_step(step, n):
    """Seconds per call of `step`, timed as bench_torch.py times a step."""
    return bench_torch.time_step(SimpleNamespace(step=step), n)


def models(case, rounds):
    """adaoptim's AdamW plain, 8-bit and with master weights on a many-tensor model."""
    steps = {}
    for impl, kw, dtype in (
        ("adaoptim", {}, torch.float32),
        ("adaoptim-q8", {"optim_bits": 8}, torch.float32),
        ("adaoptim-master", {"master_weights": True}, torch.bfloat16),
    ):
        ps = [torch.nn.Parameter((torch.randn(*s) * 0.02).to(dtype)) for s in bench_torch.case_shapes(case)]
        for p in ps:
            p.grad = torch.randn_like(p) * 0.01
        steps[impl] = ada.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw).step
        steps[impl]()
    n = sum(p.numel() for p in ps)
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            times[k].append(time_step(step, max(n, 1 << 20)))
    for k, v in times.items():
        print(
            json.dumps(
                {"impl": k, "case": case, "tensors": len(ps), "params": n, "us_per_step": statistics.median(v) * 1e6}
            )
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1048576,67108864")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impls", default=",".join(BYTES))
    ap.add_argument("--models", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ada.set_num_threads(a.threads)
    for case in filter(None, a.models.split(",")):
        models(case, a.rounds)
    for n in map(int, a.sizes.split(",")):
        steps = {}
        for impl in a.impls.split(","):
            try:
                steps[impl] = make(impl, n)
                for _ in range(2):
                    steps[impl]()
            except ImportError as e:
                print(json.dumps({"impl": impl, "n": n, "skipped": str(e)}), flush=True)
                steps.pop(impl, None)
        times = {k: [] for k in steps}
        for _ in range(a.rounds):
            for k, step in steps.items():
                times[k].append(time_step(step, n))
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, dt in med.items():
            row = {"impl": k, "n": n, "threads": a.threads, "ms_per_step": dt * 1e3, "gparams_per_s": n / dt / 1e9}
            print(json.dumps({**row, "bytes_per_param": BYTES[k]}), flush=True)
        ratios = {}
        for ours, peers in (
            ("adaoptim-q8", ("bnb-8bit", "torchao-8bit", "torch-fused-f32")),
            ("adaoptim-master", ("torch-fused-bf16grads", "deepspeed-bf16grads")),
            ("adaoptim-master-q8", ("torch-fused-bf16grads", "deepspeed-bf16grads", "bnb-8bit")),
        ):
            for peer in peers:
                if ours in med and peer in med:
                    ratios[f"{ours}_vs_{peer}"] = round(med[peer] / med[ours], 3)
        print(json.dumps({"n": n, "speedup": ratios}), flush=True)
        del steps


if __name__ == "__main__":
    main()
