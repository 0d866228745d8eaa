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

The same is done for grouped optimizers (several tensors in two parameter
groups with different options; layout `grouped`: `params.{i}`,
`state.{i}.{name}`, one `step`, NAdam's `mu_product` per group in
`param_groups`); their fixtures are the `grouped_*` files.

And for the row-sparse layout (`SparseAdam`, `Adagrad` with sparse
gradients; an embedding table of ROWS x DIM, state tensors of that shape,
repeated rows in a gradient added up); their fixtures are `sparse_*`.

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

SIZES = [11, 5, 23]  # tensors 0, 1 in group 0; tensor 2 in group 1
# (groups may keep different state buffers, as torch allows: AMSGrad, centered
# and momentum differ across groups in three of these)
GROUPED = [
    ("grouped_adam", "Adam", {"lr": 0.01}, {"lr": 0.003, "weight_decay": 0.1, "amsgrad": True, "betas": [0.8, 0.99]}),
    ("grouped_nadam", "NAdam", {"lr": 0.01}, {"lr": 0.002, "momentum_decay": 0.01}),
    ("grouped_sgd", "SGD", {"lr": 0.05, "momentum": 0.9}, {"lr": 0.01}),
    ("grouped_rmsprop", "RMSprop", {"lr": 0.01, "centered": True}, {"lr": 0.001, "momentum": 0.3}),
]
AUX = {"NAdam": "mu_product"}
ROWS, DIM = 29, 6
SPARSE = [
    ("sparse_adam", "SparseAdam", {"lr": 0.02, "betas": [0.85, 0.995]}),
    ("sparse_adagrad", "Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
]  # scalar state kept per group in the grouped layout


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


def finish(name, run, ref, w_rt, w_tr):
    """Writes the fixture for tests/checkpoint.rs and prints the case's line."""
    with open(os.path.join(FIXTURES, f"{name}.json"), "w") as f:
        json.dump({**run, "expected": ref, "torch_version": torch.__version__}, f, separators=(",", ":"))
    ok = w_rt <= 1 and w_tr <= 1
    print(json.dumps({"case": name, "rust_to_torch_worst": round(w_rt, 4), "torch_to_rust_worst": round(w_tr, 4),
                      "ok": ok}))
    return ok


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
        failed |= not finish(name, run, ref, w_rt, w_tr)
    for name, cls, opts0, opts1 in GROUPED:
        p0 = [f32list(torch.randn(n)) for n in SIZES]
        grads = [[f32list(torch.randn(n) * (0.1 if t % 2 else 2.0)) for n in SIZES] for t in range(STEPS)]

        def torch_opt(params):
            return getattr(torch.optim, cls)([{"params": params[:2], **opts0}, {"params": params[2:], **opts1}])

        def steps(opt, params, gs):
            for step in gs:
                for p, g in zip(params, step):
                    p.grad = torch.tensor(g, dtype=torch.float32)
                opt.step()

        params = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
        opt = torch_opt(params)
        steps(opt, params, grads)
        ref = [f32list(p) for p in params]

        with tempfile.TemporaryDirectory() as d:
            # rust -> torch
            ck = os.path.join(d, "ours.safetensors")
            run = {"torch_class": cls, "groups": [{"options": opts0, "sizes": SIZES[:2]},
                                                   {"options": opts1, "sizes": SIZES[2:]}],
                   "params0": p0, "grads": grads[:K]}
            run_rust("grouped-save", run, ck)
            meta = safe_open(ck, "pt").metadata()
            t = load_file(ck)
            groups = json.loads(meta["param_groups"])
            params = [torch.nn.Parameter(t[f"params.{i}"].clone()) for i in range(len(SIZES))]
            skip = {"params", AUX.get(cls)}
            opt = getattr(torch.optim, cls)([{"params": [params[i] for i in g["params"]],
                                              **{k: v for k, v in g.items() if k not in skip}} for g in groups])
            sd = opt.state_dict()
            state = {}
            for g in groups:
                for i in g["params"]:
                    st = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"state.{i}.")}
                    st["step"] = t["step"].clone()
                    if cls in AUX:
                        st[AUX[cls]] = torch.tensor(g[AUX[cls]], dtype=torch.float32)
                    state[i] = st
            sd["state"] = state
            opt.load_state_dict(sd)
            steps(opt, params, grads[K:])
            w_rt = max(worst(f32list(p), r) for p, r in zip(params, ref))

        # torch -> rust
        params = [torch.nn.Parameter(torch.tensor(x)) for x in p0]
        opt = torch_opt(params)
        steps(opt, params, grads[:K])
        sd = opt.state_dict()
        tensors = {"step": torch.tensor(float(K))}
        groups = []
        for g in sd["param_groups"]:
            g = dict(g)
            if cls in AUX:
                g[AUX[cls]] = float(sd["state"][g["params"][0]][AUX[cls]])
            groups.append(g)
        for i, p in enumerate(params):
            tensors[f"params.{i}"] = p.detach().clone()
            for k, v in sd["state"].get(i, {}).items():
                if v is not None and k not in ("step", AUX.get(cls)):
                    tensors[f"state.{i}.{k}"] = v.contiguous()
        meta = {"format": "adaoptim-optimizer", "format_version": "1", "torch_class": cls, "layout": "grouped",
                "step": str(K), "param_groups": json.dumps(groups)}
        ck = os.path.join(FIXTURES, f"{name}.safetensors")
        save_file(tensors, ck, metadata=meta)
        run = {"torch_class": cls, "grads": grads[K:]}
        got = run_rust("grouped-resume", run, ck)
        w_tr = max(worst(g, r) for g, r in zip(got, ref))
        failed |= not finish(name, run, ref, w_rt, w_tr)
    for name, cls, opts in SPARSE:
        p0 = f32list(torch.randn(ROWS, DIM))
        grad_rows = [[int(r) for r in torch.randint(0, ROWS, (5,))] for _ in range(STEPS)]
        grad_values = [f32list(torch.randn(5, DIM)) for _ in range(STEPS)]

        def steps(opt, table, first, last):
            for r, v in zip(grad_rows[first:last], grad_values[first:last]):
                table.grad = torch.sparse_coo_tensor(torch.tensor([r]), torch.tensor(v).reshape(5, DIM), (ROWS, DIM))
                opt.step()

        table = torch.nn.Parameter(torch.tensor(p0).reshape(ROWS, DIM))
        opt = getattr(torch.optim, cls)([table], **opts)
        steps(opt, table, 0, STEPS)
        ref = f32list(table)

        with tempfile.TemporaryDirectory() as d:
            # rust -> torch
            ck = os.path.join(d, "ours.safetensors")
            run = {"torch_class": cls, "options": opts, "rows": ROWS, "dim": DIM, "params0": p0,
                   "grad_rows": grad_rows[:K], "grad_values": grad_values[:K]}
            mid = run_rust("sparse-save", run, ck)
            meta = safe_open(ck, "pt").metadata()
            group = json.loads(meta["param_groups"])[0]
            table = torch.nn.Parameter(torch.tensor(mid).reshape(ROWS, DIM))
            opt = getattr(torch.optim, cls)([table], **{k: v for k, v in group.items() if k != "params"})
            sd = opt.state_dict()
            sd["state"] = {0: load_file(ck)}
            opt.load_state_dict(sd)
            steps(opt, table, K, STEPS)
            w_rt = worst(f32list(table), ref)

        # torch -> rust
        table = torch.nn.Parameter(torch.tensor(p0).reshape(ROWS, DIM))
        opt = getattr(torch.optim, cls)([table], **opts)
        steps(opt, table, 0, K)
        sd = opt.state_dict()
        meta = {"format": "adaoptim-optimizer", "format_version": "1", "torch_class": cls, "layout": "sparse",
                "rows": str(ROWS), "dim": str(DIM), "step": str(K), "param_groups": json.dumps(sd["param_groups"])}
        ck = os.path.join(FIXTURES, f"{name}.safetensors")
        # SparseAdam keeps its step as a Python int
        state = {k: v.contiguous() if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in sd["state"][0].items()}
        save_file(state, ck, metadata=meta)
        run = {"torch_class": cls, "rows": ROWS, "dim": DIM, "params0": f32list(table),
               "grad_rows": grad_rows[K:], "grad_values": grad_values[K:]}
        got = run_rust("sparse-resume", run, ck)
        failed |= not finish(name, run, ref, w_rt, worst(got, ref))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
