"""Every bad input is one line `error: ...` naming the bad value or file and a non-zero exit,
before any work starts where possible: train.py's flags and --set, paths, data, checkpoints,
devices, a full disk, and torchrun (printed once). Table-driven, in-process: seconds."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import launch
import sample
import train
from model import DiT, DiTConfig
from official_layout import official_state_dict

ROOT = Path(__file__).resolve().parents[1]
DIGITS = dict(input_size=8, in_channels=1, num_classes=10, latent_space=False)  # what setup_data reports


def one_line_error(call, capsys):
    """The stderr of a call that must stop with SystemExit(1): exactly one line, `error: ...`."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 1, (e.value.code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------
# train.py: flags and --set, checked before anything is built
# ----------------------------------------------------------------------------

FLAGS = [  # argv -> fragment of the message
    (["--global-batch-size", "0"], "--global-batch-size: 0 is not in [1, inf]"),
    (["--global-batch-size", "-8"], "--global-batch-size: -8 is not in [1, inf]"),
    (["--grad-accum", "0"], "--grad-accum: 0 is not in [1, inf]"),
    (["--grad-accum", "-2"], "--grad-accum: -2 is not in"),
    (["--max-steps", "-5"], "--max-steps: -5 is not in"),
    (["--epochs", "0"], "--epochs: 0 is not in"),
    (["--ckpt-every", "0"], "--ckpt-every: 0 is not in"),
    (["--log-every", "0"], "--log-every: 0 is not in"),
    (["--lr", "nan"], "--lr: nan is not in (0, inf]"),
    (["--lr", "-1"], "--lr: -1 is not in (0, inf]"),
    (["--lr", "inf"], "--lr: inf is not in"),
    (["--weight-decay", "-1"], "--weight-decay: -1 is not in [0, inf]"),
    (["--clip-grad", "-1"], "--clip-grad: -1 is not in (0, inf]"),
    (["--ema-decay", "2"], "--ema-decay: 2 is not in [0, 1)"),
    (["--ema-decay", "-0.5"], "--ema-decay: -0.5 is not in [0, 1)"),
    (["--ema-decay", "1"], "--ema-decay: 1 is not in [0, 1)"),
    (["--num-workers", "-1"], "--num-workers: -1 is not in [0, inf]"),
    (["--lr", "fast"], "--lr: 'fast' is not a number"),
    (["--model", "Q/2-8E2A"], "unknown model 'Q/2-8E2A'"),  # worked before: still one line
    (["--set", "colour=red"], "--set colour=red: unknown config field 'colour'"),
    (["--set", "depth=x"], "--set depth=x: 'x' is not an int"),
    (["--set", "shared_hidden=abc"], "'abc' is not an int or none"),
    (["--set", "qk_norm=maybe"], "'maybe' is not true or false"),
    (["--data-path", "/no/such/folder"], "data path /no/such/folder is not a folder"),
    (["--resume", "x", "--init-from", "y"], "pass one of them"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
]


@pytest.mark.parametrize("argv, message", FLAGS)
def test_train_flags(tmp_path, capsys, argv, message):
    err = one_line_error(lambda: train.parse_args(argv + ["--results-dir", str(tmp_path)]), capsys)
    assert message in err, err


CONFIGS = [  # --set on the digits -> fragment; the config's own rules, then the config against the data
    ("depth=0", "depth must be >= 1"),
    ("depth=-1", "depth must be >= 1"),
    ("num_heads=0", "hidden_size must split into num_heads heads"),
    ("num_heads=3", "hidden_size must split into num_heads heads"),
    ("hidden_size=100", "hidden_size of an MoE must be a multiple of 8"),
    ("hidden_size=6,num_heads=1,num_experts=0", "hidden_size must be a multiple of 4"),
    ("top_k=9", "top_k must be between 1 and num_experts"),
    ("num_experts=-2", "num_experts must be >= 0"),
    ("router=banana", "router must be one of token, expert, race"),
    ("objective=banana", "objective must be one of ddpm, rf"),
    ("patch_size=3", "input_size must be a positive multiple of patch_size"),
    ("input_size=16", "--set input_size=16 does not fit the data: its input_size is 8"),
    ("num_classes=5", "--set num_classes=5 is fewer than the 10 classes in the data"),
    ("in_channels=3", "--set in_channels=3 does not fit the data: its in_channels is 1"),
    ("shared_hidden=-8", "shared_hidden must be >= 0"),
    ("capacity_factor=0", "capacity_factor must be > 0"),
    ("balance_alpha=-0.1", "must be >= 0"),
    ("class_dropout_prob=1", "class_dropout_prob must be in [0, 1)"),
    ("latent_space=true", "--set latent_space=True does not fit the data"),
]


@pytest.mark.parametrize("override, message", CONFIGS)
def test_train_config_against_itself_and_the_data(tmp_path, capsys, override, message):
    sets = [arg for field in override.split(",") for arg in ("--set", field)]
    args = train.parse_args(sets + ["--results-dir", str(tmp_path)])
    err = one_line_error(lambda: train.build_config(args, dict(DIGITS)), capsys)
    assert message in err, err


def test_good_configs_pass(tmp_path):
    for override in ("num_classes=12", "shared_hidden=none", "shared_hidden=0", "router=race", "top_k=4"):
        args = train.parse_args(["--set", override, "--results-dir", str(tmp_path)])
        assert train.build_config(args, dict(DIGITS)).check() is None


# ----------------------------------------------------------------------------
# Paths that cannot be written, devices
# ----------------------------------------------------------------------------

def test_unwritable_output_paths(tmp_path, capsys):
    # (root ignores file permissions, so a chmod-ed folder is no test here: a path under a regular
    # file and one in /proc cannot be created by anyone)
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file" / "results", Path("/proc/dit-moe-results")):
        err = one_line_error(lambda: train.parse_args(["--results-dir", str(bad)]), capsys)
        assert f"cannot write to {bad}" in err
    ckpt = str(tiny_ema(tmp_path))
    err = one_line_error(lambda: sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "file" / "g.png")]), capsys)
    assert f"cannot write to {tmp_path / 'file'}" in err
    err = one_line_error(lambda: sample.main(["--ckpt", ckpt, "--num-fid-samples", "4",
                                              "--sample-dir", "/proc/dit-moe-samples"]), capsys)
    assert "cannot write to /proc/dit-moe-samples" in err


@pytest.mark.parametrize("device, message", [
    ("banana", "unknown device 'banana'; choose auto, cuda or cpu"),
    ("cuda", "--device cuda, but this torch sees no CUDA GPU"),
])
def test_devices(capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = one_line_error(lambda: launch.setup(device), capsys)
    assert message in err


# ----------------------------------------------------------------------------
# Corrupt or partial data
# ----------------------------------------------------------------------------

def latent_folder(root, meta=None, shards=None):
    root.mkdir()
    if meta is not None:
        (root / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    for name, content in (shards or {}).items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            torch.save(content, root / name)
    return root


META = dict(image_size=16, latent_size=2, channels=4, classes=["a", "b"], count=2)
GOOD = {"mean": torch.zeros(2, 2, 4, 2, 2), "std": torch.ones(2, 2, 4, 2, 2), "label": torch.tensor([0, 1])}


class NotATensor:  # a pickled object: weights_only loading refuses it
    pass


@pytest.mark.parametrize("meta, shards, message", [
    (META, {}, "0 of the 0 latent shards listed in meta.json are not here"),
    (META | {"shards": {"shard-000-00000.pt": 2, "shard-001-00000.pt": 2}}, {"shard-000-00000.pt": GOOD},
     "1 of the 2 latent shards listed in meta.json are not here (e.g. shard-001-00000.pt)"),
    ("{not json", {}, "meta.json is not the metadata --extract-latents writes (no valid JSON"),
    ({"classes": ["a"]}, {}, "(no latent_size, channels)"),
    (META, {"shard-000-00000.pt": b"hello"}, "shard-000-00000.pt is not a latent shard of --extract-latents"),
    (META, {"shard-000-00000.pt": {"x": NotATensor()}}, "shard-000-00000.pt is not a latent shard"),
    (META, {"shard-000-00000.pt": {"mean": torch.zeros(1)}}, "is not a latent shard of --extract-latents (keys"),
    (META | {"shards": {"shard-000-00000.pt": 3}}, {"shard-000-00000.pt": GOOD}, "2 images where meta.json lists 3"),
])
def test_bad_latent_folders(tmp_path, meta, shards, message):
    root = latent_folder(tmp_path / "latents", meta, shards)
    with pytest.raises(data.DataError) as e:
        data.LatentShards(root)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert data.LatentShards(latent_folder(tmp_path / "ok", META | {"shards": {"s.pt": 2}}, {"s.pt": GOOD}))[1][1] == 1


def test_truncated_image_names_the_file(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "b.png").write_bytes((tmp_path / "cat" / "a.png").read_bytes()[:40])  # cut short
    folder = data.ImageFolder(tmp_path, 8)
    assert folder[0][0].shape == (3, 8, 8)
    with pytest.raises(data.DataError, match=r"cannot read image .*b\.png .*replace or delete it, then --resume"):
        folder[1]
    with pytest.raises(data.DataError, match="holds no images in class sub-folders"):
        data.ImageFolder(tmp_path / "cat", 8)


# ----------------------------------------------------------------------------
# Checkpoints, a full disk
# ----------------------------------------------------------------------------

SMALL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_experts=4, top_k=2, input_size=8,
             in_channels=4, num_classes=10)


def tiny_ema(tmp_path):
    cfg = DiTConfig(**SMALL | dict(in_channels=1, latent_space=False))
    checkpoint.save_ema(tmp_path / "ema.pt", DiT(cfg).state_dict(), {"config": vars(cfg), "step": 0, "args": {}})
    return tmp_path / "ema.pt"


@pytest.mark.parametrize("cut, message", [
    ("pos_embed", "not a DiT / DiT-MoE checkpoint (missing pos_embed)"),
    ("y_embedder.embedding_table.weight", "missing y_embedder.embedding_table.weight"),
    ("blocks.1.moe.experts.3.up_proj.weight", "official checkpoint lacks blocks.1.moe.experts.3.up_proj.weight"),
    ("blocks.0.moe.shared_experts.down_proj.weight", "missing: blocks.0.moe.shared.down.weight"),
])
def test_official_file_missing_a_key_is_one_line(tmp_path, capsys, cut, message):
    sd = official_state_dict(DiTConfig(**SMALL))
    del sd[cut]
    torch.save({"ema": sd}, tmp_path / "official.pt")
    err = one_line_error(lambda: sample.main(["--ckpt", str(tmp_path / "official.pt"), "--device", "cpu"]), capsys)
    assert message in err, err


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    cfg = DiTConfig(**SMALL)
    net = DiT(cfg)
    opt = torch.optim.AdamW(net.parameters())
    (tmp_path / "checkpoints").mkdir()
    args = train.parse_args(["--results-dir", str(tmp_path)])
    run = train.Run(net, net, net, DiT(cfg), opt, sharded=False, folder=tmp_path, step=1, last_good=None)
    train.save(run, cfg, args, epoch=0)
    good = run.last_good
    run.step = 2

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 part of a zip")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    err = one_line_error(lambda: train.save(run, cfg, args, epoch=0), capsys)
    assert f"disk full writing the checkpoint of step 2 in {tmp_path}; last good checkpoint: {good}" in err
    monkeypatch.undo()
    assert torch.load(good, weights_only=True)["step"] == 1
    assert not list(tmp_path.rglob("*.tmp"))  # the partial file is gone


# ----------------------------------------------------------------------------
# torchrun: one line, printed once, every process stops
# ----------------------------------------------------------------------------

def test_a_user_error_under_torchrun_is_printed_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--device", "cpu", "--set", "depth=0", "--results-dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and errors == ["error: model config: depth must be >= 1 (got depth=0, hidden_size=128, "
                                            "num_heads=4, num_experts=4, input_size=8, in_channels=1, "
                                            "num_classes=10, latent_space=False)"], r.stderr
    assert "[rank" not in r.stderr  # no process printed a Python traceback
    assert r.stderr.count("exitcode  : 1") == 1  # torchrun's own report names one failed process


# ----------------------------------------------------------------------------
# The other commands: evaluate.py, bench.py, compare.py (their own test files hold more)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["a.npz", "b.npz", "--device", "banana"], "--device banana"),
    (["a.npz", "b.npz", "--batch-size", "0"], "--batch-size: 0 is not in [1, inf]"),
    (["a.npz", "b.npz", "--out", "/proc/m.json"], "cannot write --out /proc/m.json"),
])
def test_evaluate_arguments(monkeypatch, capsys, argv, message):
    import evaluate
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
    assert message in one_line_error(evaluate.main, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda:99"], "--device cuda:99: not available on this machine"),
    (["--rounds", "0"], "--rounds: 0 is not in [1, inf]"),
])
def test_bench_arguments(capsys, argv, message):
    import bench
    assert message in one_line_error(lambda: bench.main(["--quick", *argv]), capsys)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: 0 is not in [1, inf]"),
    (["--samples", "0"], "--samples: 0 is not in [1, inf]"),
    (["--seeds", "-1"], "--seeds: -1 is not in [1, inf]"),
    (["--only", "banana"], "unknown configuration 'banana'"),
])
def test_compare_arguments(tmp_path, capsys, argv, message):
    import compare
    call = lambda: compare.parse_args([*argv, "--out", str(tmp_path), "--docs", str(tmp_path)])
    assert message in one_line_error(call, capsys)
