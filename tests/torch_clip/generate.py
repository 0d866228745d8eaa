"""Writes tests/torch_clip/*.json: torch optimizer trajectories with
torch.nn.utils.clip_grad_norm_ before every step, on one f32 tensor.

Run from the repository root: python3 tests/torch_clip/generate.py
(PyTorch required; the JSON files are committed, so the tests need no torch).
"""
import json

import torch

CASES = [
    ("adam_clip_1.json", "Adam", {}, 1.0, None),
    ("adamw_clip_0.5_scaled.json", "AdamW", {"lr": 1e-2}, 0.5, 1024.0),
    ("sgd_momentum_clip_0.1.json", "SGD", {"lr": 0.05, "momentum": 0.9}, 0.1, None),
    ("rmsprop_clip_large.json", "RMSprop", {}, 1e6, None),  # never clips
]

torch.manual_seed(20261125)
for name, cls, opts, max_norm, loss_scale in CASES:
    n, steps = 97, 12
    p = torch.nn.Parameter(torch.randn(n, dtype=torch.float32))
    p0 = p.detach().clone()
    opt = getattr(torch.optim, cls)([p], **opts)
    grads, params, norms = [], [], []
    for t in range(steps):
        # Gradients large enough that clipping matters in most steps.
        g = (torch.randn(n, dtype=torch.float32) * (3.0 if t % 3 else 0.05)).to(torch.float32)
        if loss_scale is not None:
            g_scaled = g * loss_scale  # what backward would produce under a loss scale
            grads.append(g_scaled.tolist())
            p.grad = g_scaled.clone()
            # GradScaler.unscale_: multiply by the f32 inverse scale.
            p.grad.mul_(torch.tensor(1.0 / loss_scale, dtype=torch.float32))
        else:
            grads.append(g.tolist())
            p.grad = g.clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_([p], max_norm)))
        opt.step()
        params.append(p.detach().tolist())
    json.dump(
        {
            "kind": "clipped_optimizer",
            "torch_version": torch.__version__,
            "torch_class": cls,
            "options": opts,
            "max_norm": max_norm,
            "grad_scale": loss_scale,
            "params0": p0.tolist(),
            "grads": grads,
            "params": params,
            "norms": norms,
        },
        open(f"tests/torch_clip/{name}", "w"),
    )
    print(name, "norms", [round(x, 3) for x in norms[:4]])
