#!/usr/bin/env python3
"""DeepSpeed's engine with adaoptim: ``deepspeed.initialize`` with
``adaoptim.torch.AdamW`` as the client optimizer (``"zero_force_ds_cpu_optimizer":
false``, ``"zero_allow_untested_optimizer": true``), ZeRO stage 1 or 2 with
bf16 training, two ranks on this machine (DeepSpeed's CPU accelerator,
gloo), once with adaoptim and once with ``torch.optim.AdamW`` from the same
initialization and data; compares each rank's fp32 master partition (what
the optimizer steps) after the first and the last step, and the model.

With bf16 training, one bf16 ulp of the model copy that rounds the other way
(our float32 AdamW and torch's differ by float32 ulps, within the golden
tolerance) changes the next forward pass, so the two runs drift apart after
the first step as two torch runs with different summation orders would;
with ``--dtype float32`` they stay within the tolerance.

Run:  DS_ACCELERATOR=cpu python3 python/examples/deepspeed_engine.py [--stage 2] [--dtype float32]
(needs ``pip install deepspeed ninja``; DeepSpeed compiles a small CPU op on
first use). Prints one JSON line: stage, steps, params, each rank's master
partition size, the worst master difference as a fraction of the golden
tolerance (1e-5 |x| + 1e-6), the largest bf16 model difference, and the
class DeepSpeed wrapped.
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STEPS = 10
RTOL, ATOL = 1e-5, 1e-6


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )


def run(rank, world, stage, bf16, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import deepspeed

    import adaoptim.torch as ada

    torch.set_num_threads(1)
    ada.set_num_threads(1)
    result = {}
    for name in ("adaoptim", "torch"):
        model = make_model()
        params = list(model.parameters())
        kw = {"lr": 1e-2, "weight_decay": 0.01}
        opt = ada.AdamW(params, **kw) if name == "adaoptim" else torch.optim.AdamW(params, **kw)
        config = {
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_force_ds_cpu_optimizer": False,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bf16},
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        gen = torch.Generator().manual_seed(100 + rank)
        dtype = torch.bfloat16 if bf16 else torch.float32
        zero = engine.optimizer
        for step in range(STEPS):
            x = torch.randn(8, 24, generator=gen).to(dtype)
            y = torch.randn(8, 1, generator=gen).to(dtype)
            loss = (engine(x) - y).float().square().mean()
            engine.backward(loss)
            engine.step()
            if step == 0:
                first = [t.detach().clone() for t in zero.single_partition_of_fp32_groups]
        result[name] = {
            "first": first,
            "master": [t.detach().clone() for t in zero.single_partition_of_fp32_groups],
            "model": [p.detach().float().clone() for p in engine.module.parameters()],
            "wrapped": type(zero.optimizer).__module__ + "." + type(zero.optimizer).__name__,
            "state_keys": sorted({k for st in zero.optimizer.state.values() for k in st}),
        }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--port", type=int, default=29533)
    a = ap.parse_args()
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(world, a.stage, a.dtype == "bfloat16", a.port, d), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    worst, first, model_diff, sizes = 0.0, 0.0, 0.0, []

    def fraction(xs, ys):
        return max(((x - y).abs() / (RTOL * y.abs() + ATOL)).max().item() for x, y in zip(xs, ys))

    for r in ranks:
        ours, ref = r["adaoptim"], r["torch"]
        sizes.append(sum(t.numel() for t in ours["master"]))
        worst = max(worst, fraction(ours["master"], ref["master"]))
        first = max(first, fraction(ours["first"], ref["first"]))
        for a_, b_ in zip(ours["model"], ref["model"]):
            model_diff = max(model_diff, (a_ - b_).abs().max().item())
    params = sum(p.numel() for p in make_model().parameters())
    print(
        json.dumps(
            {
                "stage": a.stage,
                "dtype": a.dtype,
                "ranks": world,
                "steps": STEPS,
                "params": params,
                "master_elements_per_rank": sizes,
                "first_step_fraction_of_tolerance": first,
                "worst_fraction_of_tolerance": worst,
                "max_model_difference": model_diff,
                "wrapped": ranks[0]["adaoptim"]["wrapped"],
                "state_keys": ranks[0]["adaoptim"]["state_keys"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
