#!/usr/bin/env python3
"""Mixed-precision Adam steps, torch against adaoptim, back to back.

torch: fused Adam driven by `torch.amp.GradScaler("cpu")` (`scaler.step(opt)`
then `scaler.update()`), which is how a torch recipe skips steps whose
gradients hold an inf or NaN: a check pass over the gradients
(`_amp_foreach_non_finite_check_and_unscale_`), then the fused step with
`grad_scale` and `found_inf`. adaoptim: `NonFinitePolicy::SkipStep` with
`grad_scale = 65536`, timed by the throughput example's `--guards` mode
(variant `skip-step+grad-scale-65536`). The plain steps of both are printed
beside, with each one's cost over its own plain step. Gparam/s, medians of
`--rounds` alternated rounds.

    python3 benches/compare_amp.py --sizes 1048576,67108864 --threads 2 --rounds 3
"""
import argparse, json, os, statistics

import torch

from torch_timing import adam_guard_variant, build_throughput, gparams_per_s

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
SCALE = 65536.0


def torch_gps(n, amp):
    p = torch.nn.Parameter(torch.full((n,), 0.5))
    p.grad = (torch.randn(n) * 0.01 * (SCALE if amp else 1.0))
    opt = torch.optim.Adam([p], lr=1e-3, fused=True)
    # No growth during the run: the scale stays 65536, as ours does.
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10**9)
    scaler.scale(torch.tensor(1.0))  # creates the scale tensor

    def amp_step():
        scaler.step(opt)
        scaler.update()

    gps = gparams_per_s(n, amp_step if amp else opt.step)
    assert scaler.get_scale() == SCALE, "a step was skipped: the gradients must be finite"
    return gps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1048576,67108864")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    exe = build_throughput(root)
    for n in [int(s) for s in a.sizes.split(",")]:
        got = {k: [] for k in ("ours_plain", "ours_amp", "torch_plain", "torch_amp")}
        for _ in range(a.rounds):
            amp = adam_guard_variant(exe, n, a.threads, "skip-step+grad-scale-65536")
            got["ours_plain"].append(amp["plain_gparams_per_s"])
            got["ours_amp"].append(amp["gparams_per_s"])
            got["torch_plain"].append(torch_gps(n, False))
            got["torch_amp"].append(torch_gps(n, True))
        m = {k: statistics.median(v) for k, v in got.items()}
        print(json.dumps({"n": n, "threads": a.threads, "rounds": a.rounds,
                          **{k: round(v, 3) for k, v in m.items()},
                          "ours_amp_cost": round(m["ours_plain"] / m["ours_amp"] - 1, 3),
                          "torch_amp_cost": round(m["torch_plain"] / m["torch_amp"] - 1, 3),
                          "amp_ratio_ours_vs_torch": round(m["ours_amp"] / m["torch_amp"], 2)}))


if __name__ == "__main__":
    main()
