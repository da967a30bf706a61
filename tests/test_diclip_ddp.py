"""`weakseg train diclip` under torchrun: two CPU ranks (Gloo) train the adapter and head in DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cache = tmp_path / "c.safetensors"
    from weakseg.cli import main

    torch.set_num_threads(1)
    assert main(["cache", "build", "--out", str(cache), "--dataset", "toyworld", "--limit", "3", "--set", "preset=tiny",
                 "--build", "fg_centroids=2", "bg_centroids=2", "--quiet"]) == 0
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "weakseg", "train", "diclip", "--dataset", "toyworld", "--limit", "4", "--cache",
                          str(cache), "--out", str(run), "--set", "preset=tiny", "--train", "iterations=2",
                          "batch_size=1", "log_every=1", "--quiet"], env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout[res.stdout.index("{"):])  # rank 0 alone reports
    assert report["step"] == 2 and res.stdout.count('"step"') == 2  # the report's step + its "last" record
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["step"]) == 2
        assert torch.isfinite(f.get_tensor("head.classifier.weight")).all()
    assert len((run / "log.jsonl").read_text().splitlines()) == 2  # rank 0 writes the log
