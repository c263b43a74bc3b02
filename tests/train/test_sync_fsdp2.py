"""Live sync refuses parameters sharded by FSDP2 (``fully_shard``) on every rank, in one line, before writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

# Two gloo processes on the CPU; each rank shards a tiny model, calls the callback's on_train_begin and reports.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from rlsubnet.errors import RlsubnetError
    from rlsubnet.patch.sync import SparseSyncCallback

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    out = sys.argv[1]
    cb = SparseSyncCallback(os.path.join(out, "sync"), every_steps=1)
    state = TrainerState()
    state.is_world_process_zero = rank == 0
    try:
        cb.on_train_begin(None, state, TrainerControl(), model=model)
        result = {"error": None}
    except RlsubnetError as exc:
        result = {"error": str(exc), "type": type(exc).__name__}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


def test_live_sync_refuses_fsdp2_shards_on_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["type"] == "UsageError", res
        msg = res["error"]
        assert "\n" not in msg and "sharded by FSDP2" in msg and "'0.weight'" in msg
    assert not (tmp_path / "sync").exists()  # nothing written
