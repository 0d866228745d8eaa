"""Two ranks of ZeroRedundancyOptimizer (gloo) with adaoptim.torch.AdamW give
torch.optim.AdamW's parameters within the golden tolerance; with AdamW8bit,
the unsharded optimizer's parameters and state bit for bit, and a sharded
optimizer loaded from the consolidated state_dict resumes exactly."""

import json
import os
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "zero.py")


def test_zero_two_ranks_match_torch():
    out = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ranks"] == 2
    assert res["worst_fraction_of_tolerance"] <= 1.0, res
    # State is sharded: each rank holds part, and together all of it (2 buffers per parameter).
    held = res["state_elements_per_rank"]
    assert all(h > 0 for h in held) and sum(held) == 2 * res["params"], res
    assert res["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]


def test_zero_two_ranks_8bit_state_equals_unsharded():
    out = subprocess.run([sys.executable, EXAMPLE, "--bits", "8"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-1000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ranks"] == 2
    assert res["params_equal"] == [True, True], res
    assert res["state_equal"] == [True, True], res
    # ZeroRedundancyOptimizer.load_state_dict writes each saved (bitsandbytes-
    # nested) state dict straight into the local optimizer's state.
    assert res["resumed_equal"] == [True, True], res
    # The two weight matrices (2048 and 4096 elements) have 8-bit state, the
    # four smaller tensors float32, all in bitsandbytes' layout.
    assert res["quantized_tensors"] == 2 and res["state_tensors"] == 6, res
