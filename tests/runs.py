"""Test helpers: train.py run as a user runs it (a subprocess, torchrun for several processes,
on the CPU) and its outputs read back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR, EMA = 3, 8, 1e-3, 0.995  # LR and EMA: train.py's defaults
QUICK = ["--max-steps", str(STEPS), "--global-batch-size", str(BATCH), "--log-every", "1"]


def run(*args, nproc=1):
    """train.py as a user runs it, on the CPU (the references here are CPU float32 computations;
    on a GPU box the same tests must not pick the GPU and bf16)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share two cores
    return subprocess.run([sys.executable, *launcher, "train.py", "--device", "cpu", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def checked(*args, nproc=1):
    r = run(*args, nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def saved(results, step):
    """The checkpoint of a step as one dict: a file, or a sharded run's folder read whole."""
    path = Path(results) / "latest" / "checkpoints" / f"{step:07d}"
    if path.is_dir():
        dcp_to_torch_save(path, path.with_suffix(".whole"))
        path = path.with_suffix(".whole")
    else:
        path = path.with_suffix(".pt")
    return torch.load(path, weights_only=True)


def records(results):
    return [json.loads(line) for line in (Path(results) / "latest" / "log.jsonl").read_text().splitlines()]


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")
