"""Faults and recovery: atomic writes, non-finite numbers never reach a checkpoint or ema.pt,
resume picks the newest finite checkpoint and applies a changed --lr, Ctrl-C, leftover *.tmp
files, a lagging ema.pt, one log record per step, --keep-last, results/latest."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
from runs import QUICK, ROOT, checked, records, run, saved


def finite(sd):
    return all(v.isfinite().all() for v in sd.values() if v.is_floating_point())


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert not (tmp_path / "ckpt.pt.tmp").exists()  # the partial file is removed


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30 sends the output layer to +-1e30 in step 1: step 2's loss overflows
    r = run(*QUICK, "--lr", 1e30, "--ckpt-every", 1, "--results-dir", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss (") and "in steps 2-2; nothing saved" in line, line
    assert line.endswith("checkpoints/0000001.pt")
    assert sorted(p.name for p in (tmp_path / "latest" / "checkpoints").iterdir()) == ["0000001.pt"]
    assert finite(saved(tmp_path, 1)["model"])


def test_non_finite_weights_from_a_finite_loss_are_never_saved(tmp_path):
    # Decoupled weight decay lr * wd = 1e40 flips and overflows every weight in step 1, whose loss,
    # computed before the update, is finite: the old guard (losses only) saved that checkpoint and
    # overwrote ema.pt with it. A first run, then the same failure after a resume.
    checked(*QUICK, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", tmp_path)
    good = torch.load(tmp_path / "latest" / "ema.pt", weights_only=True)
    r = run(*QUICK, "--max-steps", 4, "--ckpt-every", 1, "--lr", 1e30, "--weight-decay", 1e10,
            "--resume", tmp_path / "latest", "--results-dir", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "non-finite weights in steps 3-3; nothing saved; last good checkpoint:" in line, line
    assert line.endswith("checkpoints/0000002.pt")
    assert sorted(p.name for p in (tmp_path / "latest" / "checkpoints").iterdir()) == ["0000002.pt"]
    ema = torch.load(tmp_path / "latest" / "ema.pt", weights_only=True)
    assert ema["step"] == 2 and finite(ema["ema"])
    assert all(torch.equal(ema["ema"][k], v) for k, v in good["ema"].items())
    # a fresh run failing in its first step: no checkpoint, and results/latest stays on the old run
    old_latest = os.readlink(tmp_path / "latest")
    r = run(*QUICK, "--ckpt-every", 1, "--lr", 1e30, "--weight-decay", 1e10, "--results-dir", tmp_path)
    assert r.returncode == 1 and "last good checkpoint: None" in r.stderr
    assert os.readlink(tmp_path / "latest") == old_latest


def test_resume_skips_non_finite_checkpoints_with_a_note(tmp_path, capsys):
    checked(*QUICK, "--max-steps", 4, "--ckpt-every", 2, "--results-dir", tmp_path)
    bad = tmp_path / "latest" / "checkpoints" / "0000004.pt"
    ckpt = torch.load(bad, weights_only=True)  # as the old code could write it
    ckpt["model"]["final_layer.linear.weight"].fill_(float("nan"))
    torch.save(ckpt, bad)
    r = checked(*QUICK, "--max-steps", 5, "--ckpt-every", 5, "--resume", tmp_path / "latest",
                "--results-dir", tmp_path)
    assert f"skipping {bad}: non-finite weights" in r.stdout
    assert "steps 2 -> 5" in r.stdout
    r = run(*QUICK, "--resume", bad, "--results-dir", tmp_path)
    assert r.returncode == 1 and "holds non-finite weights; resume from an earlier checkpoint" in r.stderr
    # python checkpoint.py refuses it too, leaving ema.pt as it was
    before = (tmp_path / "latest" / "ema.pt").read_bytes()
    with pytest.raises(SystemExit):
        checkpoint.export_command([str(bad)])
    assert f"cannot export the EMA of {bad}: {bad} holds non-finite weights" in capsys.readouterr().err
    assert (tmp_path / "latest" / "ema.pt").read_bytes() == before


def test_resume_applies_a_new_learning_rate_and_records_it(tmp_path):
    checked(*QUICK, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", tmp_path)
    r = checked(*QUICK, "--max-steps", 3, "--ckpt-every", 3, "--lr", 5e-4, "--weight-decay", 0.01,
                "--resume", tmp_path / "latest", "--results-dir", tmp_path)
    assert "--lr changed from 0.001 to 0.0005" in r.stdout and "--weight-decay changed from 0.0 to 0.01" in r.stdout
    ckpt = saved(tmp_path, 3)
    assert ckpt["args"]["lr"] == 5e-4 and ckpt["args"]["weight_decay"] == 0.01
    groups = ckpt["opt"]["param_groups"]
    assert all(g["lr"] == 5e-4 and g["weight_decay"] == 0.01 for g in groups)


def test_resume_cleans_up_and_rewrites_a_lagging_ema(tmp_path):
    # After a kill: a partial *.tmp of the next write, log records of steps after the checkpoint,
    # and an ema.pt of an older step (a kill between the two renames). The next start fixes all three.
    checked(*QUICK, "--max-steps", 3, "--ckpt-every", 2, "--results-dir", tmp_path)
    run_dir = (tmp_path / "latest").resolve()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    (run_dir / "checkpoints" / "0000004.pt.tmp").write_bytes(b"PK\x03\x04 partial")
    (run_dir / "ema.pt.tmp").write_bytes(b"partial")
    lagging = torch.load(run_dir / "ema.pt", weights_only=True)
    lagging["step"] = 1
    torch.save(lagging, run_dir / "ema.pt")
    checked(*QUICK, "--max-steps", 4, "--ckpt-every", 4, "--resume", run_dir / "checkpoints" / "0000003.pt",
            "--results-dir", tmp_path)
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]  # one record per step
    assert not list(run_dir.rglob("*.tmp"))
    assert torch.load(run_dir / "ema.pt", weights_only=True)["step"] == 4


def test_keep_last(tmp_path):
    checked(*QUICK, "--max-steps", 4, "--ckpt-every", 1, "--keep-last", 2, "--results-dir", tmp_path)
    names = sorted(p.name for p in (tmp_path / "latest" / "checkpoints").iterdir())
    assert names == ["0000003.pt", "0000004.pt"]


def test_ctrl_c_stops_with_one_line_and_no_partial_file(tmp_path):
    cmd = [sys.executable, "train.py", "--device", "cpu", "--max-steps", "1000", "--global-batch-size", "8",
           "--log-every", "1", "--ckpt-every", "1", "--results-dir", str(tmp_path)]
    # Ctrl-C in a terminal: SIGINT at its default disposition. A shell starts background jobs
    # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: restore it.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until a few steps are done and checkpointed
        if line.startswith("step 3:"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at step "), err
    assert not list(tmp_path.rglob("*.tmp"))
    newest = checkpoint.newest_finite(tmp_path / "latest")
    assert lines[0].endswith(str(newest.resolve())) or lines[0].endswith(str(newest))
