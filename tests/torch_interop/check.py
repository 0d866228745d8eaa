"""Checkpoints across PyTorch and adaoptim, both ways, for every optimizer.

For each case: torch runs all STEPS steps straight (the reference). Then
  rust->torch: adaoptim runs the first K steps and saves a checkpoint
    (`examples/interop.rs save`); torch reads it with `safetensors`, builds
    the optimizer from the metadata's `param_groups`, loads the tensors into
    `state_dict()["state"][0]` and runs the remaining steps;
  torch->rust: torch runs the first K steps and writes its `state_dict` as a
    safetensors file in adaoptim's format (tensors under torch's names, the
    metadata below); adaoptim loads it (`examples/interop.rs resume`) and runs
    the remaining steps.
Both must end within the golden tolerance (1e-5 |x| + 1e-6) of the reference.
The torch-written checkpoints, their remaining gradients and the reference
end points are also written to tests/torch_interop/fixtures/ for
tests/checkpoint.rs (`torch_written_checkpoints_resume`), which needs no torch.

Run from the repository root (torch, numpy and safetensors required):
    python3 tests/torch_interop/check.py
"""
import json, os, subprocess, sys, tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(HERE, "fixtures")
N, STEPS, K = 37, 16, 7
CASES = [
    ("sgd_momentum", "SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd_plain", "SGD", {"lr": 0.1}),
    ("adagrad", "Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.2}),
    ("rmsprop_centered_momentum", "RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
    ("adadelta", "Adadelta", {"lr": 0.5, "weight_decay": 0.01}),
    ("adam_amsgrad", "Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    ("adamw", "AdamW", {"lr": 0.01, "betas": [0.85, 0.99]}),
    ("adamax", "Adamax", {"lr": 0.02}),
    ("nadam_decoupled", "NAdam", {"lr": 0.01, "weight_decay": 0.01, "decoupled_weight_decay": True}),
]


def f32list(t):
    return [float(str(x)) for x in t.detach().to(torch.float32).numpy().ravel()]


def worst(got, want):
    return max(abs(g - w) / (1e-5 * abs(w) + 1e-6) for g, w in zip(got, want))


def run_rust(mode, run, ckpt):
    with tempfile.TemporaryDirectory() as d:
        rp, op = os.path.join(d, "run.json"), os.path.join(d, "out.json")
        with open(rp, "w") as f:
            json.dump(run, f)
        exe = os.path.join(ROOT, "target", "release", "examples", "interop")
        subprocess.run([exe, mode, rp, ckpt, op], check=True)
        with open(op) as f:
            return json.load(f)


def torch_steps(opt, p, grads):
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()


def main():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "interop"], check=True, cwd=ROOT)
    os.makedirs(FIXTURES, exist_ok=True)
    torch.manual_seed(20261125)
    failed = False
    for name, cls, opts in CASES:
        p0 = f32list(torch.randn(N))
        grads = [f32list(torch.randn(N) * (0.1 if t % 2 else 2.0)) for t in range(STEPS)]
        # the reference: torch straight through
        p = torch.nn.Parameter(torch.tensor(p0))
        opt = getattr(torch.optim, cls)([p], **opts)
        torch_steps(opt, p, grads)
        ref = f32list(p)

        with tempfile.TemporaryDirectory() as d:
            # rust -> torch
            ck = os.path.join(d, "ours.safetensors")
            mid = run_rust("save", {"torch_class": cls, "options": opts, "params0": p0, "grads": grads[:K]}, ck)
            meta = safe_open(ck, "pt").metadata()
            group = json.loads(meta["param_groups"])[0]
            assert meta["torch_class"] == cls and int(meta["step"]) == K
            p = torch.nn.Parameter(torch.tensor(mid))
            opt = getattr(torch.optim, cls)([p], **{k: v for k, v in group.items() if k != "params"})
            sd = opt.state_dict()
            sd["state"] = {0: load_file(ck)}
            opt.load_state_dict(sd)
            torch_steps(opt, p, grads[K:])
            w_rt = worst(f32list(p), ref)

        # torch -> rust
        p = torch.nn.Parameter(torch.tensor(p0))
        opt = getattr(torch.optim, cls)([p], **opts)
        torch_steps(opt, p, grads[:K])
        sd = opt.state_dict()
        tensors = {k: v.reshape(-1) if v.dim() else v for k, v in sd["state"].get(0, {}).items() if v is not None}
        tensors.setdefault("step", torch.tensor(float(K)))  # torch's SGD keeps no step count
        meta = {"format": "adaoptim-optimizer", "format_version": "1", "torch_class": cls, "layout": "dense",
                "n": str(N), "step": str(K), "param_groups": json.dumps(sd["param_groups"])}
        ck = os.path.join(FIXTURES, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, ck, metadata=meta)
        run = {"params0": f32list(p), "grads": grads[K:]}
        got = run_rust("resume", run, ck)
        w_tr = worst(got, ref)
        with open(os.path.join(FIXTURES, f"{name}.json"), "w") as f:
            json.dump({**run, "expected": ref, "torch_version": torch.__version__}, f, separators=(",", ":"))

        ok = w_rt <= 1 and w_tr <= 1
        failed |= not ok
        print(json.dumps({"case": name, "rust_to_torch_worst": round(w_rt, 4), "torch_to_rust_worst": round(w_tr, 4),
                          "ok": ok}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
