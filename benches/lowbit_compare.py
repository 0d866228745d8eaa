#!/usr/bin/env python3
"""adaoptim's mixed-precision AdamW steps against the reduced-precision pipelines users run today, in
alternated rounds of one run (medians reported), as JSON lines and a table.

Ours: `examples/throughput --precision ...` (release build). Peers: `../shared/bench/lowbit_baseline.py`
(or the path in --baseline), which needs torch, deepspeed and ninja (DS_ACCELERATOR=cpu).

Run: python3 benches/lowbit_compare.py --sizes 1048576,67108864 --threads 2 --rounds 3
(with bitsandbytes and torchao installed too for the 8-bit rows). Ends with a table of each precision
against the peer the mixed-precision issue names and its target ratio.
"""

import argparse, json, os, statistics, subprocess, sys

OURS = "f32,bf16-grads,bf16-f32states,bf16,q8,bf16-q8"
PEERS = "torch-fused-f32,torch-fused-bf16grads,deepspeed-bf16grads,deepspeed-bf16-fp32st,deepspeed-bf16-bf16st,bnb-8bit,torchao-8bit"

# (ours, the peers it is measured against (the faster one counts), the mixed-precision issue's target)
TARGETS = [
    ("bf16-grads", ["torch-fused-bf16grads", "deepspeed-bf16grads"], 1.8),
    ("bf16-f32states", ["deepspeed-bf16-fp32st"], 1.5),
    ("bf16", ["deepspeed-bf16-bf16st"], 1.5),
    ("q8", ["bnb-8bit", "torchao-8bit"], 30.0),
    ("q8", ["adaoptim-f32"], 1.5),
    ("bf16-q8", ["adaoptim-f32"], 2.2),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1048576,67108864")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", default=PEERS)
    ap.add_argument(
        "--baseline",
        default=os.path.join(
            os.path.dirname(__file__),
            "..",
            "..",
            "shared",
            "bench",
            "lowbit_baseline.py",
        ),
    )
    ap.add_argument("--binary", default="target/release/examples/throughput")
    a = ap.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    rows = {}
    for r in range(a.rounds):
        out = subprocess.run(
            [
                a.binary,
                "--optimizers",
                "adamw",
                "--precision",
                OURS,
                "--sizes",
                a.sizes,
                "--threads",
                a.threads,
                "--rounds",
                "3",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for d in map(json.loads, out.splitlines()):
            rows.setdefault(("adaoptim-" + d["precision"], d["n"]), []).append(d)
        out = subprocess.run(
            [
                sys.executable,
                a.baseline,
                "--sizes",
                a.sizes,
                "--threads",
                a.threads,
                "--impls",
                a.peers,
                "--reps",
                "3",
            ],
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        for d in map(json.loads, out.splitlines()):
            if "error" in d:
                print(json.dumps(d), file=sys.stderr)
                continue
            rows.setdefault((d["impl"], d["n"]), []).append(d)
    for (impl, n), ds in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        g = statistics.median(d["gparams_per_s"] for d in ds)
        roof = [
            d["roofline_gparams_per_s"] for d in ds if "roofline_gparams_per_s" in d
        ]
        row = {
            "impl": impl,
            "n": n,
            "threads": int(a.threads),
            "bytes_per_param": ds[0]["bytes_per_param"],
            "gparams_per_s": round(g, 4),
            "rounds": len(ds),
        }
        if roof:
            row["roofline_gparams_per_s"] = round(statistics.median(roof), 4)
        print(json.dumps(row), flush=True)
    med = {
        k: statistics.median(d["gparams_per_s"] for d in ds) for k, ds in rows.items()
    }
    print(
        f"{'ours':16}{'n':>10}{'Gparam/s':>10}  {'against':44}{'ratio':>7}{'target':>8}"
    )
    for n in sorted({n for _, n in rows}):
        for ours, peers, target in TARGETS:
            mine = med.get(("adaoptim-" + ours, n))
            theirs = [(med[(p, n)], p) for p in peers if (p, n) in med]
            if mine is None or not theirs:
                continue
            best, name = max(theirs)
            print(
                f"{ours:16}{n:>10}{mine:10.3f}  {name + f' ({best:.3f})':44}{mine / best:7.2f}{target:8.1f}"
            )


if __name__ == "__main__":
    main()
