#!/usr/bin/env python3
"""Runs PyTorch/DeepSpeed's CPU optimizers and adaoptim back to back on this
machine and prints the ratios, so every ratio comes from one run.

Needs `python3 -m pip install torch deepspeed ninja` (see the brief) and
`../shared/bench/torch_baseline.py` (or --baseline PATH).

    python3 benches/compare.py --optimizers adam,adagrad --sizes 65536,1048576,67108864 --threads 1,2
"""
import argparse, json, os, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)


def run_json(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=os.path.join(root, "..", "shared", "bench", "torch_baseline.py"))
    ap.add_argument("--optimizers", default="adam,adagrad")
    ap.add_argument("--sizes", default="65536,1048576,67108864")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--impls", default="fused,deepspeed")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate ours/theirs this many times and report medians (bandwidth drifts between runs)")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "throughput"], check=True, cwd=root)
    ours_bin = os.path.join(root, "target", "release", "examples", "throughput")
    rows = []
    import statistics

    def median_rows(runs, key):
        groups = {}
        for run in runs:
            for r in run:
                groups.setdefault(key(r), []).append(r)
        out = []
        for rows_ in groups.values():
            r = dict(rows_[0])
            for f in ("gparams_per_s", "roofline_gparams_per_s"):
                if f in r:
                    r[f] = statistics.median(x[f] for x in rows_)
            out.append(r)
        return out

    for t in a.threads.split(","):
        theirs_runs, ours_runs = [], []
        for _ in range(a.rounds):
            ours_runs.append(run_json([ours_bin, "--optimizers", a.optimizers, "--sizes", a.sizes, "--threads", t, "--json"]))
            theirs_runs.append(run_json([sys.executable, a.baseline, "--sizes", a.sizes, "--threads", t,
                                         "--optimizers", a.optimizers, "--impls", a.impls]))
        ours = median_rows(ours_runs, lambda r: (r["optimizer"], r["n"]))
        theirs = median_rows(theirs_runs, lambda r: (r["impl"], r["optimizer"], r["n"]))
        for o in ours:
            for b in theirs:
                if b["optimizer"] == o["optimizer"] and b["n"] == o["n"]:
                    rows.append((o["optimizer"], o["n"], int(t), b["impl"], o["gparams_per_s"],
                                 b["gparams_per_s"], o["roofline_gparams_per_s"]))
    print(f"{'optimizer':<9} {'n':>9} {'thr':>3} {'vs':<12} {'ours':>7} {'theirs':>7} {'ratio':>6} {'roofline':>8} {'ours/roof':>9}")
    for opt, n, t, impl, ours, theirs, roof in rows:
        print(f"{opt:<9} {n:>9} {t:>3} {impl:<12} {ours:>7.3f} {theirs:>7.3f} {ours / theirs:>6.2f} {roof:>8.3f} {ours / roof:>9.3f}")


if __name__ == "__main__":
    main()
