"""Timing shared by the torch comparison scripts."""
import json, os, statistics, subprocess, time


def gparams_per_s(n, step, after_round=None, reps=7):
    """Median Gparam/s of `step()` on `n` parameters: `reps` timed rounds of
    about 1.5e8 parameter updates each, after one untimed warm-up round;
    `after_round()` runs untimed after every round."""
    steps = max(1, int(1.5e8 / n))
    times = []
    for r in range(reps + 1):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if r:
            times.append((time.perf_counter() - t) / steps)
        if after_round:
            after_round()
    return n / statistics.median(times) / 1e9


def build_throughput(root):
    """Builds the throughput example (release) and returns its path."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "throughput"], check=True, cwd=root)
    return os.path.join(root, "target", "release", "examples", "throughput")


def adam_guard_variant(exe, n, threads, variant):
    """One `--guards` row of the throughput report for Adam: the variant's and
    the plain step's Gparam/s, alternated in one run."""
    out = subprocess.run([exe, "--optimizers", "adam", "--sizes", str(n), "--threads", str(threads),
                          "--json", "--guards"], check=True, capture_output=True, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return next(r for r in rows if r.get("variant") == variant)
