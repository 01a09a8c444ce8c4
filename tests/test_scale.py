"""The XL and G recipes at scale, proven on CPU processes: the memory plan (activations traced on
fake tensors, checked against PyTorch's own memory tracker), the sharded step as the DDP recipe,
sharded checkpoints (torch.distributed.checkpoint) saved on 2 processes and resumed on 1 and 2,
a killed save, HSDP on a simulated 2-node world, and a node whose disk lacks latent shards."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

import checkpoint
import train
from model import DiT, DiTBlock, DiTConfig, config_from_name
from runs import QUICK, ROOT, assert_close, checked, saved

SMALL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_experts=4, top_k=2, input_size=8,
             in_channels=4, num_classes=10)


# ----------------------------------------------------------------------------
# Memory: the activation trace against PyTorch's tracker, and the plan
# ----------------------------------------------------------------------------

def memtracker_activations(cfg, images, bf16):
    """Bytes PyTorch's MemTracker files as activations after one block's forward (fake tensors)."""
    with FakeTensorMode():
        block = DiTBlock(cfg)
        x = torch.randn(images, cfg.num_tokens, cfg.hidden_size, requires_grad=True)
        c = torch.randn(images, cfg.hidden_size)
        tracker = MemTracker()
        tracker.track_external(block)
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = block(x, c)  # held: the graph, and what it saved, live as long as the output
            snapshot = tracker.get_tracker_snapshot("current")
        del out
    return snapshot[torch.device("cpu")][_MemRefType.ACT]


@pytest.mark.parametrize("name", ["S/2-8E2A", "XL/2-8E2A"])
@pytest.mark.parametrize("bf16", [True, False])
def test_activation_trace_agrees_with_pytorchs_memory_tracker(name, bf16):
    # Two independent accounts of what one block keeps for backward: train.saved_bytes (tensors
    # autograd saves) and MemTracker (every allocation live after the forward, as activations).
    cfg = config_from_name(name)
    per_image = train.saved_bytes(cfg, 2, bf16) - train.saved_bytes(cfg, 1, bf16)
    tracked = memtracker_activations(cfg, 2, bf16) - memtracker_activations(cfg, 1, bf16)
    assert abs(per_image / tracked - 1) < 0.1, (per_image, tracked)
    # per token and block ~130 B x D in bf16 for these routers and widths (XL/2: ~38 MiB an image)
    assert 100 < per_image / (cfg.num_tokens * cfg.hidden_size) < 200 if bf16 else 400


def test_plan_picks_ddp_for_s2_and_sharding_with_checkpointing_for_xl_and_g():
    # The paper's batch 1024 on 8 GPUs of 80 GB (128 images each), bf16.
    plan = lambda name, gb, accum=1: train.plan(config_from_name(name), 128, accum, 8, 8, gb, True, False, False)
    sharded, checkpointing, est = plan("S/2-8E2A", 80)
    assert (sharded, checkpointing) == (False, False) and est["activations"] > 10  # ~0.15 GB an image
    sharded, checkpointing, est = plan("XL/2-8E2A", 80)
    assert (sharded, checkpointing) == (True, True) and sum(est.values()) < 72
    full = train.memory_estimate(config_from_name("XL/2-8E2A"), 128, 8, 8, True, sharded=False, checkpointing=False)
    assert full["weights"] + full["grads"] + full["AdamW"] + full["EMA"] == pytest.approx(20 * 4.1679e9 / 1e9, rel=1e-3)
    assert full["activations"] > 100  # what the old rule (20 B a parameter) left out
    assert plan("G/2-16E2A", 80)[:2] == (True, True)
    with pytest.raises(SystemExit):
        plan("G/2-16E2A", 48)  # 41 GB of sharded states alone: refused with the --grad-accum that fits
    with pytest.raises(SystemExit):
        plan("G/2-16E2A", 24)


def test_plan_refusal_names_the_flags_that_fit(capsys):
    with pytest.raises(SystemExit):
        train.plan(config_from_name("G/2-16E2A"), 256, 1, 8, 8, 80, True, False, False)
    err = capsys.readouterr().err
    assert "add --grad-accum" in err, err
    accum = int(err.split("--grad-accum ")[1].split()[0])
    est = train.memory_estimate(config_from_name("G/2-16E2A"), 256 // accum, 8, 8, True, True, True)
    assert sum(est.values()) <= 0.9 * 80  # the suggestion itself fits


# ----------------------------------------------------------------------------
# Sharded training is DDP's recipe
# ----------------------------------------------------------------------------

def torchrun(script, *args, nproc=2):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("objective", ["rf", "ddpm"])
def test_one_sharded_step_equals_one_ddp_step_in_bf16(objective):
    r = torchrun("tests/fsdp_vs_ddp.py", objective)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # train.shard: the residual stream and t stay fp32 and the matmul weights are rounded to bf16
    # as DDP's autocast rounds them (routers, embedders and final layer fp32): the same numbers.
    t = "float32" if objective == "rf" else "int64"  # rectified flow's t is a float in [0, 1]
    assert out["sharded"]["dtypes"] == out["ddp"]["dtypes"] == {"block input": "float32", "t": t}
    assert out["sharded"]["loss"] < 1e-6 and out["sharded"]["grads"] < 1e-5, out
    # the old recipe (FSDP casting the inputs, no autocast) ran the residual stream and RF's t in bf16
    assert out["old"]["dtypes"] == {"block input": "bfloat16", "t": "bfloat16" if objective == "rf" else t}
    assert out["old"]["loss"] > 1e-4 and out["old"]["grads"] > 1e-3, out


# ----------------------------------------------------------------------------
# Sharded checkpoints
# ----------------------------------------------------------------------------

def test_sharded_checkpoints_resume_on_one_and_on_two_processes(tmp_path):
    # 2 processes, sharded, write torch.distributed.checkpoint folders at steps 2 and 3; copies of
    # the run resumed from step 2 on 1 process (unsharded, 2 micro-batches) and on 2 processes
    # (sharded) reach the same step 3.
    a = tmp_path / "a"
    checked(*QUICK, "--sharded", "--ckpt-every", 2, "--results-dir", a, nproc=2)
    folder = a / "latest" / "checkpoints" / "0000002"
    assert folder.is_dir() and (folder / ".metadata").is_file() and (folder / "train_state.json").is_file()
    reference = saved(a, 3)
    for name, flags, nproc in (("one", ["--grad-accum", 2], 1), ("two", ["--sharded"], 2)):
        shutil.copytree(a, tmp_path / name, symlinks=True)
        shutil.rmtree(tmp_path / name / "latest" / "checkpoints" / "0000003")
        checked(*QUICK, *flags, "--resume", tmp_path / name / "latest" / "checkpoints" / "0000002",
                "--results-dir", tmp_path / name, nproc=nproc)
        resumed = saved(tmp_path / name, 3)
        assert_close(resumed["model"], reference["model"], atol=1e-6)
        assert_close(resumed["ema"], reference["ema"], atol=1e-6)
    # ema.pt of the sharded run: gathered, the EMA of the newest checkpoint; the offline command
    # writes the same from the shards alone
    ema = torch.load(a / "latest" / "ema.pt", weights_only=True)
    assert ema["step"] == 3
    assert_close(ema["ema"], reference["ema"], atol=0)
    os.remove(a / "latest" / "ema.pt")
    done = subprocess.run([sys.executable, "checkpoint.py", str(a / "latest")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_close(torch.load(a / "latest" / "ema.pt", weights_only=True)["ema"], reference["ema"], atol=0)


def test_a_killed_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    # In one process, torch.distributed.checkpoint writes the same folder format. The second save
    # dies after writing its shards, before the metadata: the first stays the newest and loads.
    cfg = DiTConfig(**SMALL)
    torch.manual_seed(0)
    net, ema = DiT(cfg), DiT(cfg)
    opt = torch.optim.AdamW(net.parameters())
    (tmp_path / "checkpoints").mkdir()
    info = lambda step: {"step": step, "epoch": 0, "config": vars(cfg), "args": {"model": "small"}}
    first = checkpoint.save(tmp_path, net, ema, opt, info(1), sharded=True)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    writer = checkpoint.dcp.FileSystemWriter

    def dies(self, metadata, results):  # as a kill would stop it: shards written, no metadata
        raise RuntimeError("killed")
    monkeypatch.setattr(writer, "finish", dies)
    with pytest.raises(BaseException):  # (torch.distributed.checkpoint wraps it in its own exception)
        checkpoint.save(tmp_path, net, ema, opt, info(2), sharded=True)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "0000002.tmp").is_dir()
    assert checkpoint.newest_finite(tmp_path) == first
    fresh = DiT(cfg)
    checkpoint.resume(first, fresh, DiT(cfg), torch.optim.AdamW(fresh.parameters()))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
    checkpoint.remove_partial(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------
# Several nodes, simulated on this machine
# ----------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args, cwds, nproc=2):
    """train.py on 2 simulated nodes of nproc processes each, node n started in cwds[n] (its own
    disk for relative paths)."""
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}",
                               f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(ROOT / "train.py"), "--device", "cpu", *map(str, args)],
                              cwd=cwds[n], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    return [p.communicate(timeout=300) + (p.returncode,) for p in procs]


def test_hsdp_on_two_nodes_equals_one_process(tmp_path):
    # 2 nodes x 2 processes: a (2, 2) mesh, replicated across nodes, sharded within; each process
    # one micro-batch: the same step as 1 process with 4 micro-batches.
    (out0, err0, rc0), (_, err1, rc1) = two_nodes([*QUICK, "--sharded", "--results-dir", tmp_path / "hsdp"],
                                                  [tmp_path, tmp_path])
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    assert "HSDP across nodes" in out0
    checked(*QUICK, "--grad-accum", 4, "--results-dir", tmp_path / "one")
    ours, ref = saved(tmp_path / "hsdp", 3), saved(tmp_path / "one", 3)
    assert_close(ours["model"], ref["model"], atol=1e-6)
    assert_close(ours["ema"], ref["ema"], atol=1e-6)


def test_a_node_without_the_shards_stops_every_rank_with_one_line(tmp_path):
    # Node-local disks: node 0 has the latent shards, node 1 a copy without one of them. Every
    # rank stops at start (no rank waits in a collective), the message printed once, by rank 0.
    for node, shards in ((0, [0, 1]), (1, [0])):
        latents = tmp_path / f"node{node}" / "latents"
        latents.mkdir(parents=True)
        names = {f"shard-00{k}-00000.pt": 4 for k in (0, 1)}
        meta = dict(image_size=16, latent_size=4, channels=4, classes=["a", "b"], count=8, shards=names)
        (latents / "meta.json").write_text(json.dumps(meta))
        for k in shards:
            torch.save({"mean": torch.zeros(4, 2, 4, 4, 4), "std": torch.ones(4, 2, 4, 4, 4),
                        "label": torch.tensor([0, 1, 0, 1])}, latents / f"shard-00{k}-00000.pt")
    (_, err0, rc0), (_, err1, _) = two_nodes(["--latents-path", "latents", "--max-steps", 1,
                                              "--global-batch-size", 4, "--results-dir", tmp_path / "r"],
                                             [tmp_path / "node0", tmp_path / "node1"], nproc=1)
    errors = [line for line in (err0 + err1).splitlines() if line.startswith("error: ")]
    assert rc0 == 1, err0[-2000:] + err1[-2000:]  # (node 1's rank leaves quietly: rank 0 reports)
    assert errors == ["error: rank 1: latents: 1 of the 2 latent shards listed in meta.json are not here "
                      "(e.g. shard-001-00000.pt); every node needs every shard"], err0 + err1
