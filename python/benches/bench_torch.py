#!/usr/bin/env python3
"""adaoptim.torch.AdamW against torch.optim.AdamW(fused=True) (and
DeepSpeedCPUAdam when deepspeed is installed) in one process: the 194-tensor
model mix of ../shared/bench/torch_mix.py (width 64: 0.73M params; width 256:
11.5M) and one 64M tensor. Rounds alternate between the implementations and
the median per implementation is reported, as JSON lines (impl, case,
tensors, params, threads, ms_per_step, gparams_per_s), then the ratios and
the Python-side overhead per step() call (the same call with empty tensors:
what a step costs beyond the arithmetic).

Run: python3 python/benches/bench_torch.py --threads 2 [--cases w64,w256,64M] [--rounds 7] [--clip 1.0]
[--dtype bfloat16]
(--clip: every implementation clips by that global norm; ours inside the step
with ``max_grad_norm``, beside ours and torch's fused AdamW after
``clip_grad_norm_``. --dtype bfloat16: parameters and gradients in bfloat16,
state as each implementation creates it: bfloat16 for ours and torch's).
"""

import argparse
import json
import statistics
import time

import torch

import adaoptim.torch as ada


def model_shapes(w):
    shapes = []
    for _ in range(12):
        shapes += [(w, w)] * 4 + [(4 * w, w), (w, 4 * w)] + [(w,)] * 6 + [(4 * w,)] * 2 + [(w,)] * 2
    shapes += [(8000 * w // 256, w), (w,)]
    return shapes


def case_shapes(case):
    if case == "w64":
        return model_shapes(64)
    if case == "w256":
        return model_shapes(256)
    if case == "64M":
        return [(1 << 26,)]
    if case == "empty194":
        return [(0,)] * 194
    raise SystemExit(f"unknown case {case}")


class ClipThenStep:
    """torch's clipping as a training loop writes it: clip_grad_norm_ then step."""

    def __init__(self, params, opt, max_norm):
        self.params, self.opt, self.max_norm = params, opt, max_norm

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()


def make_opts(params, threads, clip=None):
    if clip is not None:
        # Clipping by the global norm: ours fused into the step, against
        # clip_grad_norm_ + step (ours and torch's).
        return {
            "adaoptim": ada.AdamW(params, lr=1e-3, weight_decay=0.01, max_grad_norm=clip),
            "adaoptim+clip_grad_norm_": ClipThenStep(params, ada.AdamW(params, lr=1e-3, weight_decay=0.01), clip),
            "torch-fused": ClipThenStep(
                params, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True), clip
            ),
        }
    opts = {
        "adaoptim": ada.AdamW(params, lr=1e-3, weight_decay=0.01),
        "torch-fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True),
    }
    try:
        import os

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opts["deepspeed"] = DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=0.01, adamw_mode=True)
    except Exception:
        pass
    return opts


def time_step(opt, n_params, min_time=0.25):
    reps = max(3, min(200, int(2e7 / max(n_params, 1))))
    t = time.perf_counter()
    k = 0
    while True:
        for _ in range(reps):
            opt.step()
        k += reps
        dt = time.perf_counter() - t
        if dt > min_time:
            return dt / k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="w64,w256,64M")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--clip", type=float, default=None, help="clip by this global norm (ours fused, vs clip_grad_norm_)"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ada.set_num_threads(a.threads)
    summary = {}
    for case in a.cases.split(",") + ["empty194"]:
        shapes = case_shapes(case)
        dtype = getattr(torch, a.dtype)
        ps = [torch.nn.Parameter((torch.randn(*s) * 0.02).to(dtype)) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p) * 0.01
        n = sum(p.numel() for p in ps)
        opts = make_opts(ps, a.threads, None if case == "empty194" else a.clip)
        if case == "empty194":
            opts = {"adaoptim": opts["adaoptim"], "torch-fused": opts["torch-fused"]}
        for o in opts.values():
            for _ in range(2):
                o.step()
        times = {k: [] for k in opts}
        for _ in range(a.rounds):
            for k, o in opts.items():
                times[k].append(time_step(o, n))
        for k, ts in times.items():
            dt = statistics.median(ts)
            summary[(case, k)] = dt
            print(
                json.dumps(
                    {
                        "impl": k,
                        "case": case,
                        "tensors": len(ps),
                        "params": n,
                        "threads": a.threads,
                        "dtype": a.dtype,
                        "ms_per_step": dt * 1e3,
                        "gparams_per_s": n / dt / 1e9 if n else 0.0,
                    }
                ),
                flush=True,
            )
    for case in a.cases.split(","):
        ours = summary[(case, "adaoptim")]
        peers = {k: v for (c, k), v in summary.items() if c == case and k != "adaoptim"}
        print(json.dumps({"case": case, **{f"speedup_vs_{k}": v / ours for k, v in peers.items()}}))
    print(
        json.dumps(
            {
                "case": "python_overhead_194_tensors_us",
                "adaoptim": summary[("empty194", "adaoptim")] * 1e6,
                "torch-fused": summary[("empty194", "torch-fused")] * 1e6,
            }
        )
    )


if __name__ == "__main__":
    main()
