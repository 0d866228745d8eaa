#!/usr/bin/env python3
"""Why adaoptim is not bit-identical to torch on the optimizers that take a
square root, and what a bit-exact mode would have to reproduce.

1. torch's float32 ``sqrt`` on the CPU (``torch.sqrt``, ``Tensor.sqrt``,
   ``pow(x, 0.5)``) is not correctly rounded in MKL builds: it goes through
   MKL's vector math (``vsSqrt``), whose result bits depend on the code path
   MKL picks for the machine. The script counts, on 3 * 2^20 values, how
   often torch's result differs from the correctly rounded square root
   (numpy's), once as torch runs here and once with
   ``MKL_ENABLE_INSTRUCTIONS=SSE4_2`` (MKL's older code path).
2. Everything else in torch's single-tensor Adam/AdamW is reproduced: the
   update written out in numpy float32 with torch's order of operations
   (``lerp`` and ``addcmul`` fused as torch's kernels fuse them, Adam's two
   divisions, ``addcdiv`` as ``p + (value * m) / denom``) gives torch's
   parameters bit for bit on every step when it takes its square roots from
   ``torch.sqrt``, and differs on some steps when it takes numpy's correctly
   rounded ones.
3. With ``--probe``, writes the values and torch's square roots to
   ``/tmp/adaoptim_sqrt_{in,torch}.bin`` for
   ``cargo run --release --example sqrt_probe``, which checks candidate
   formulas for MKL's result on AVX-512 (the one that matches:
   ``r = rsqrt14(x); y = x * r; y + (x - y * y) * (r / 2)`` with both
   products fused).

Run: python3 python/benches/torch_sqrt.py [--probe]
"""

import os
import subprocess
import sys

import numpy as np
import torch

F = np.float32


def values():
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    return torch.cat(
        [
            torch.randn(n, generator=g).abs() + 0.1,
            torch.rand(n, generator=g) * 1e-8,
            torch.rand(n, generator=g) * 1e6,
        ]
    ).float()


def sqrt_mismatch():
    a = values()
    t = a.sqrt().numpy()
    return float((t.view(np.uint32) != np.sqrt(a.numpy()).view(np.uint32)).mean())


def fma(a, b, c):
    # float32 fused multiply-add: the product of two float32 is exact in f64
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(F)


def emulate(p, grads, lr, betas, eps, wd, decoupled, sqrt):
    b1, b2 = betas
    p, m, v, out = p.copy(), np.zeros_like(p), np.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        if decoupled:
            p = p * F(1 - lr * wd)
        elif wd:
            g = fma(p, np.full_like(p, F(wd)), g)
        w = F(1 - b1)
        if w < 0.5:
            m = fma(np.full_like(p, w), g - m, m)
        else:
            m = fma(m - g, np.full_like(p, F(1) - w), g)
        v = fma(F(1 - b2) * g, g, v * F(b2))
        step_size = lr / (1 - b1**t)
        bc2_sqrt = (1 - b2**t) ** 0.5
        denom = sqrt(v) / F(bc2_sqrt) + F(eps)
        p = p + (F(-step_size) * m) / denom
        out.append(p.copy())
    return out


def adam_steps():
    rng = np.random.default_rng(0)
    n = 4096
    rows = []
    configs = [
        ("Adam", dict(lr=1e-3, weight_decay=0.0)),
        ("Adam", dict(lr=1e-2, weight_decay=0.1)),
        ("AdamW", dict(lr=1e-3, weight_decay=1e-2)),
    ]
    for cls, kw in configs:
        p0 = rng.standard_normal(n).astype(F)
        grads = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(F) for _ in range(30)]
        param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        opt = getattr(torch.optim, cls)([param], foreach=False, **kw)
        ref = []
        for g in grads:
            param.grad = torch.from_numpy(g.copy())
            opt.step()
            ref.append(param.detach().numpy().copy())
        for name, sqrt in (
            ("torch.sqrt", lambda v: torch.from_numpy(v).sqrt().numpy()),
            ("correctly rounded sqrt", np.sqrt),
        ):
            em = emulate(p0, grads, kw["lr"], (0.9, 0.999), 1e-8, kw["weight_decay"], cls == "AdamW", sqrt)
            same = sum(int(np.array_equal(a.view(np.uint32), b.view(np.uint32))) for a, b in zip(em, ref))
            rows.append(f"{cls} {kw}: torch's op order with {name}: {same}/{len(ref)} steps bit-identical")
    return rows


def main():
    if "--child" in sys.argv:
        print(sqrt_mismatch())
        return
    here = sqrt_mismatch()
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="SSE4_2")
    sse = float(subprocess.check_output([sys.executable, __file__, "--child"], env=env, text=True))
    print(f"torch {torch.__version__}, ATen capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch.sqrt != correctly rounded sqrt: {here:.4%} of values (as torch runs here)")
    print(f"torch.sqrt != correctly rounded sqrt: {sse:.4%} of values (MKL_ENABLE_INSTRUCTIONS=SSE4_2)")
    for row in adam_steps():
        print(row)
    if "--probe" in sys.argv:
        a = values()
        a.numpy().tofile("/tmp/adaoptim_sqrt_in.bin")
        a.sqrt().numpy().tofile("/tmp/adaoptim_sqrt_torch.bin")
        print("wrote /tmp/adaoptim_sqrt_in.bin, /tmp/adaoptim_sqrt_torch.bin")


if __name__ == "__main__":
    main()
