#!/usr/bin/env python3
"""Throughput of PyTorch's CPU optimizers, to compare against in the same run.

(A copy of ../shared/bench/torch_baseline.py extended to the optimizers added
since: SGD (defaults, as the throughput example), RAdam, Rprop, ASGD and Adafactor (on a square-ish
matrix of n elements, its factored path) from torch.optim, and Lion from
lion-pytorch, which has only a for-loop path: its rows are `torch-forloop`.)

Install once (about 3 GB, a minute or two):  python3 -m pip install torch
For DeepSpeed's AVX-512 CPU Adam / Adagrad as well:  python3 -m pip install deepspeed ninja
(its C++ op is compiled on first use, about 40 s, with -march=native; ninja must be on PATH).
Run:  python3 torch_baseline.py --sizes 4096,65536,1048576,67108864 --threads 2 --impls fused,foreach,deepspeed
Prints one JSON object a line:
  {"impl": "torch-fused", "optimizer": "adam", "n": 1048576, "threads": 2,
   "gparams_per_s": 4.9, "ns_per_step": ...}
`gparams_per_s` is parameters updated per second / 1e9 for one step over one
flat float32 tensor of n elements, median of several timed repetitions after a
warm-up, with the step's own Python overhead included (that is what a user of
torch pays).
"""
import argparse, json, statistics, time

import torch

OPTS = {
    "adagrad": lambda ps, impl: torch.optim.Adagrad(ps, lr=0.01, **impl),
    "rmsprop": lambda ps, impl: torch.optim.RMSprop(ps, lr=0.01, **impl),
    "adadelta": lambda ps, impl: torch.optim.Adadelta(ps, **impl),
    "adam": lambda ps, impl: torch.optim.Adam(ps, lr=1e-3, **impl),
    "adamw": lambda ps, impl: torch.optim.AdamW(ps, lr=1e-3, **impl),
    "adamax": lambda ps, impl: torch.optim.Adamax(ps, **impl),
    "nadam": lambda ps, impl: torch.optim.NAdam(ps, **impl),
    "sgd": lambda ps, impl: torch.optim.SGD(ps, lr=1e-3, **impl),
    "radam": lambda ps, impl: torch.optim.RAdam(ps, **impl),
    "rprop": lambda ps, impl: torch.optim.Rprop(ps, **impl),
    "asgd": lambda ps, impl: torch.optim.ASGD(ps, **impl),
    "lion": lambda ps, impl: _lion(ps, impl),
    "adafactor": lambda ps, impl: torch.optim.Adafactor(ps, weight_decay=0.01, **impl),
}


def _lion(ps, impl):
    if impl.get("foreach") or impl.get("fused"):
        raise NotImplementedError("lion-pytorch has a for-loop path only")
    from lion_pytorch import Lion

    return Lion(ps, lr=1e-4)
# torch has a fused CPU kernel only for these
FUSED = {"adagrad", "adam", "adamw"}
# DeepSpeed's CPU ops (compiled C++ with AVX-512/AVX2 and OpenMP)
DEEPSPEED = {"adagrad", "adam", "adamw"}


def deepspeed_optimizer(opt_name, ps):
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
    if opt_name == "adagrad":
        return DeepSpeedCPUAdagrad(ps, lr=0.01)
    return DeepSpeedCPUAdam(ps, lr=1e-3, adamw_mode=(opt_name == "adamw"),
                            weight_decay=0.01 if opt_name == "adamw" else 0.0)


def shape_of(opt_name, n):
    """A flat tensor, except Adafactor: a square-ish matrix (its factored path)."""
    if opt_name != "adafactor":
        return (n,)
    rows = 1 << (n.bit_length() - 1) // 2
    return (rows, n // rows)


def measure(opt_name, impl_name, n, reps):
    shape = shape_of(opt_name, n)
    p = torch.nn.Parameter(torch.full(shape, 0.5))
    p.grad = torch.randn(shape) * 0.01
    if impl_name == "deepspeed":
        opt = deepspeed_optimizer(opt_name, [p])
    else:
        impl = {"fused": dict(fused=True), "foreach": dict(foreach=True), "forloop": dict(foreach=False)}[impl_name]
        opt = OPTS[opt_name]([p], impl)
    for _ in range(3):
        opt.step()
    # enough steps per repetition for ~0.05 s of work at 3 Gparam/s
    steps = max(1, int(1.5e8 / n))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        times.append((time.perf_counter() - t) / steps)
    dt = statistics.median(times)
    return {"impl": impl_name if impl_name == "deepspeed" else "torch-" + impl_name, "optimizer": opt_name, "n": n,
            "threads": torch.get_num_threads(), "gparams_per_s": n / dt / 1e9,
            "ns_per_step": dt * 1e9, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,65536,1048576,67108864")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optimizers", default=",".join(OPTS))
    ap.add_argument("--impls", default="fused,foreach", help="fused,foreach,forloop,deepspeed")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import os
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    for n in [int(s) for s in a.sizes.split(",")]:
        for o in a.optimizers.split(","):
            for impl in a.impls.split(","):
                if (impl == "fused" and o not in FUSED) or (impl == "deepspeed" and o not in DEEPSPEED):
                    continue
                if o == "lion" and impl != "forloop":
                    continue
                print(json.dumps(measure(o, impl, n, a.reps)), flush=True)


if __name__ == "__main__":
    main()
