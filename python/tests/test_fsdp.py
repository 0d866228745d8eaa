"""Two ranks of FSDP2 (``fully_shard``, gloo) with adaoptim.torch.AdamW give
torch.optim.AdamW's parameters within the golden tolerance, with DTensor
state sharded over the ranks, resume from torch's DTensor state_dict, and
are served from the cache after the first step."""

import json
import os
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "fsdp.py")


def test_fsdp2_two_ranks_match_torch():
    out = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-1000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ranks"] == 2
    assert res["worst_fraction_of_tolerance"] <= 1.0, res
    assert res["resumed_worst_fraction_of_tolerance"] <= 1.0, res
    # Each rank holds its shard of the two state buffers, together all of them.
    held = res["state_elements_per_rank"]
    assert all(h > 0 for h in held) and sum(held) == 2 * res["params"], res
    assert res["state_type"] == "DTensor"
    assert res["python_loop_steps"] == 1, res
    assert res["optim_bits_8_and_adafactor_refused"] is True, res
