#!/usr/bin/env python3
"""ZeRO with adaoptim: torch.distributed's ZeroRedundancyOptimizer shards
AdamW's state over two ranks (DistributedDataParallel, gloo backend, this
machine), once with adaoptim.torch.AdamW and once with torch.optim.AdamW, from
the same initialization and data, and compares the parameters.

Run:  python3 python/examples/zero.py          (spawns 2 processes itself)
or:   torchrun --nproc-per-node 2 python/examples/zero.py --torchrun
Prints one JSON line: steps, params, worst difference as a fraction of the
golden tolerance (1e-5 |x| + 1e-6), and each rank's share of the state.

With --bits 8 (spawned ranks only) the optimizer is adaoptim.torch.AdamW8bit
(8-bit block-wise state in bitsandbytes' layout; min_8bit_size=1024, so the
weight matrices get 8-bit state and the biases float32), sharded by
ZeroRedundancyOptimizer, against the same optimizer unsharded on every rank:
the parameters must be equal bit for bit, the consolidated state_dict must
equal the unsharded optimizer's, and a fresh sharded optimizer loaded from it
must take the next step as the original does.
"""

import argparse
import copy
import json
import sys

import torch
import torch.distributed as dist
from fsdp import run_two_ranks  # the FSDP2 example beside this one
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import adaoptim.torch as ada

STEPS = 25


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    )


def train(rank, world, optimizer_class):
    """Trains on this rank's data; returns the final parameters and the
    number of state elements this rank holds."""
    torch.set_num_threads(1)
    ada.set_num_threads(1)
    model = DDP(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(16, 32, generator=gen)
        y = x[:, :1].sin()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    held = sum(v.numel() for s in opt.optim.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    # The whole optimizer state, gathered on rank 0 in torch's layout.
    opt.consolidate_state_dict(to=0)
    full = opt.state_dict() if rank == 0 else None
    return [p.detach().clone() for p in model.module.parameters()], held, full


def worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, cls in (("adaoptim", ada.AdamW), ("torch", torch.optim.AdamW)):
        results[name] = train(rank, world, cls)
    held = [None] * world
    dist.all_gather_object(held, results["adaoptim"][1])
    if rank == 0:
        torch.save(
            {
                "params": {k: v[0] for k, v in results.items()},
                "held": held,
                "state_keys": sorted(results["adaoptim"][2]["state"][0].keys()),
            },
            out,
        )
    dist.destroy_process_group()


def _equal(a, b):
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def worker8(rank, world, init_file, out):
    """The --bits 8 run (see the module docs)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ada.set_num_threads(1)
    kw = dict(lr=1e-2, weight_decay=0.01, min_8bit_size=1024)
    runs = {}
    for name in ("zero", "plain"):
        model = DDP(make_model())
        if name == "zero":
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ada.AdamW8bit, **kw)
        else:
            opt = ada.AdamW8bit(model.parameters(), **kw)
        gen = torch.Generator().manual_seed(100 + rank)
        for _ in range(STEPS):
            x = torch.randn(16, 32, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), x[:, :1].sin()).backward()
            opt.step()
        runs[name] = (model, opt)
    (zm, zo), (pm, po) = runs["zero"], runs["plain"]
    same_params = all(torch.equal(a, b) for a, b in zip(zm.parameters(), pm.parameters()))
    zo.consolidate_state_dict(to=0)
    full = [zo.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(full, src=0)
    full = full[0]
    plain_sd = po.state_dict()
    same_state = _equal(full["state"], plain_sd["state"])
    quantized = sum(
        1 for s in full["state"].values() if s["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8
    )
    # A fresh sharded optimizer from the consolidated state, one more step on both.
    model2 = DDP(make_model())
    with torch.no_grad():
        for a, b in zip(model2.parameters(), zm.parameters()):
            a.copy_(b)
    zo2 = ZeroRedundancyOptimizer(model2.parameters(), optimizer_class=ada.AdamW8bit, **kw)
    # A copy: on rank 0 `full` holds zo's own state tensors, which zo's next
    # step updates in place.
    zo2.load_state_dict(copy.deepcopy(full))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(7 + rank))
    for m, o in ((zm, zo), (model2, zo2)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), x[:, :1].sin()).backward()
        o.step()
    resumed = all(torch.equal(a, b) for a, b in zip(zm.parameters(), model2.parameters()))
    flags = [None] * world
    dist.all_gather_object(flags, (same_params, same_state, resumed))
    if rank == 0:
        torch.save({"flags": flags, "quantized": quantized, "tensors": len(full["state"])}, out)
    dist.destroy_process_group()


def compare(saved):
    ours, ref = saved["params"]["adaoptim"], saved["params"]["torch"]
    worst = max((((a - b).abs() / (1e-5 * b.abs() + 1e-6)).max().item() for a, b in zip(ours, ref)))
    return {
        "steps": STEPS,
        "params": sum(p.numel() for p in ref),
        "ranks": len(saved["held"]),
        "worst_fraction_of_tolerance": worst,
        "state_elements_per_rank": saved["held"],
        "state_keys": saved["state_keys"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torchrun", action="store_true", help="started by torchrun (env:// rendezvous)")
    ap.add_argument("--bits", type=int, default=32, choices=[8, 32], help="8: AdamW8bit sharded vs unsharded")
    a = ap.parse_args()
    if a.bits == 8:
        saved = run_two_ranks(worker8)
        names = ("params_equal", "state_equal", "resumed_equal")
        result = {"ranks": len(saved["flags"]), **{n: [f[i] for f in saved["flags"]] for i, n in enumerate(names)}}
        result.update(quantized_tensors=saved["quantized"], state_tensors=saved["tensors"])
        print(json.dumps(result))
        if not all(all(result[n]) for n in names):
            sys.exit("ZeRO with AdamW8bit differs from the unsharded optimizer")
        return
    if a.torchrun:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        res = {name: train(rank, world, cls) for name, cls in (("adaoptim", ada.AdamW), ("torch", torch.optim.AdamW))}
        held = [None] * world
        dist.all_gather_object(held, res["adaoptim"][1])
        if rank == 0:
            saved = {
                "params": {k: v[0] for k, v in res.items()},
                "held": held,
                "state_keys": sorted(res["adaoptim"][2]["state"][0].keys()),
            }
            print(json.dumps(compare(saved)))
        dist.destroy_process_group()
        return
    result = compare(run_two_ranks(worker))
    print(json.dumps(result))
    if result["worst_fraction_of_tolerance"] > 1.0:
        sys.exit("ZeRO with adaoptim left the tolerance")


if __name__ == "__main__":
    main()
