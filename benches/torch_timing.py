"""Timing shared by the torch comparison scripts."""
import statistics, time


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
