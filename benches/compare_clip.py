#!/usr/bin/env python3
"""Adam with gradient clipping, torch against adaoptim, back to back.

torch: `clip_grad_norm_([p], 1.0)` then fused Adam's `step()` (three passes
over the gradients: norm, multiply, step). adaoptim: `set_max_grad_norm(1.0)`
(norm pass, then the factor multiplied inside the step), timed by the
throughput example's `--guards` mode. Gparam/s, medians; the plain steps of
both are printed beside for reference.

    python3 benches/compare_clip.py --sizes 1048576,67108864 --threads 2
"""
import argparse, json, os

import torch

from torch_timing import adam_guard_variant, build_throughput, gparams_per_s

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)


def torch_gps(n, clip):
    p = torch.nn.Parameter(torch.full((n,), 0.5))
    g = torch.randn(n) * 0.01
    p.grad = g.clone()
    opt = torch.optim.Adam([p], lr=1e-3, fused=True)

    def step():
        if clip:
            torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()

    # clipping shrinks the gradient in place; restore it after each round
    return gparams_per_s(n, step, after_round=lambda: p.grad.copy_(g))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1048576,67108864")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    exe = build_throughput(root)
    for n in [int(s) for s in a.sizes.split(",")]:
        clip = adam_guard_variant(exe, n, a.threads, "clip-norm-1")
        t_plain, t_clip = torch_gps(n, False), torch_gps(n, True)
        print(json.dumps({"n": n, "threads": a.threads,
                          "adaoptim_plain": round(clip["plain_gparams_per_s"], 3),
                          "adaoptim_clip": round(clip["gparams_per_s"], 3),
                          "torch_fused_plain": round(t_plain, 3), "torch_fused_clip": round(t_clip, 3),
                          "clip_ratio_ours_vs_torch": round(clip["gparams_per_s"] / t_clip, 2)}))


if __name__ == "__main__":
    main()
