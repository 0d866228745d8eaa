"""Two ranks of FSDP1 (``FullyShardedDataParallel`` on the CPU, gloo) with
adaoptim.torch.AdamW give torch.optim.AdamW's parameters within the golden
tolerance, for flat and original-parameter sharding, and switch to and from
torch.optim.AdamW through FSDP's optimizer checkpointing as torch's own
optimizer does."""

import json
import os
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "fsdp1.py")


def test_fsdp1_two_ranks_match_torch():
    out = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-1000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["use_orig_params"] for r in rows] == [False, True]
    for r in rows:
        assert r["worst_fraction_of_tolerance"] <= 1.0, r
        assert r["resumed_from_torch_worst_fraction"] <= 1.0, r
        assert r["torch_resumed_from_ours_worst_fraction"] <= 1.0, r
        # Each rank holds two state buffers of its shard, not of the model.
        held = r["state_elements_per_rank"]
        assert len(held) == 2 and all(0 < h < 2 * r["params"] for h in held), r
    # With flat parameters, torch's own round trip is exact, so the
    # switched runs are compared with the uninterrupted run itself.
    assert rows[0]["control_torch_round_trip_vs_uninterrupted"] == 0.0, rows[0]
