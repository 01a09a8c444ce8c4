"""train.py: steps against a hand-written loop, DDP and FSDP2 against one process, resume, the
digits demo learning, latent shards, the race router on two processes, --set, bad input.
(Faults and recovery: tests/test_reliability.py.)

Everything runs train.py as a user would (a subprocess, torchrun for 2 processes on CPU/gloo)
with the tiny T/2-4E2A on the built-in digits."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import train
from diffusion import create_objective
from model import create_model
from runs import BATCH, EMA, LR, QUICK, STEPS, assert_close, checked, records, run, saved


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 2 micro-batches of 4 per step, STEPS steps: the run the others must equal."""
    results = tmp_path_factory.mktemp("single")
    checked(*QUICK, "--grad-accum", 2, "--results-dir", results)
    return results


def test_steps_equal_a_hand_written_loop(single):
    # The same steps written out: init from the global seed, epoch-0 permutation of the digits,
    # micro-batch m = samples m, m + 2, ... of the batch with its draws seeded by (seed, step, m),
    # loss + balance averaged over the 2 micro-batches, one AdamW step, EMA.
    digits = load_digits()
    x_all = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1
    y_all = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = create_model("T/2-4E2A", input_size=8, in_channels=1, num_classes=10, latent_space=False)
    init, ema = copy.deepcopy(net.state_dict()), copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0)
    obj = create_objective("ddpm")
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    for step in range(STEPS):
        batch = perm[step * BATCH:(step + 1) * BATCH]
        for m in range(2):
            torch.manual_seed(int(np.random.SeedSequence([0, step, m]).generate_state(1, np.uint64)[0]))
            idx = batch[m::2]
            t, x_t, noise = obj.training_inputs(x_all[idx])
            out, aux = net(x_t, t, y_all[idx], return_aux=True)
            loss = obj.training_losses(out, x_all[idx], x_t, t, noise)["loss"].mean() + aux["router_loss"]
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.mul_(EMA).add_(p, alpha=1 - EMA)
    ckpt = saved(single, STEPS)
    assert_close(ckpt["model"], net.state_dict(), atol=1e-6)
    assert_close(ckpt["ema"], ema.state_dict(), atol=1e-6)
    # three steps are enough for the adaLN-Zero gates to open and the experts to get gradients
    assert not torch.equal(ckpt["model"]["blocks.1.moe.w_gate_up"], init["blocks.1.moe.w_gate_up"])
    assert ckpt["step"] == STEPS and ckpt["config"]["in_channels"] == 1
    # ema.pt: the EMA alone, for sample.py and model.load
    export = torch.load(single / "latest" / "ema.pt", weights_only=True)
    assert export.keys() == {"config", "ema", "step", "args"}
    assert_close(export["ema"], ckpt["ema"], atol=0)


@pytest.mark.parametrize("mode", ["ddp", "sharded"])
def test_two_processes_equal_one(single, tmp_path, mode):
    # 2 processes x 1 micro-batch of 4 == 1 process x 2 micro-batches of 4: the same micro-batches,
    # the gradients averaged by all-reduce (DDP) or reduce-scatter (FSDP2) instead of accumulated.
    checked(*QUICK, "--results-dir", tmp_path, *(["--sharded"] if mode == "sharded" else []), nproc=2)
    ours, ref = saved(tmp_path, STEPS), saved(single, STEPS)
    assert_close(ours["model"], ref["model"], atol=1e-6)
    assert_close(ours["ema"], ref["ema"], atol=1e-6)
    for k, state in ref["opt"]["state"].items():  # AdamW state keyed by name: loads in either mode
        assert_close(ours["opt"]["state"][k], state, atol=1e-6)
    # metrics are all-reduced before rank 0 logs them
    for a, b in zip(records(tmp_path), records(single)):
        for k in ("loss", "mse", "vb", "router_loss", "load_min", "load_max"):
            assert np.allclose(a[k], b[k], atol=1e-5), (k, a[k], b[k])


def test_resume_continues_exactly(single, tmp_path):
    checked(*QUICK, "--grad-accum", 2, "--results-dir", tmp_path, "--max-steps", 1)
    r = checked(*QUICK, "--grad-accum", 2, "--results-dir", tmp_path, "--resume", tmp_path / "latest")
    assert "steps 1 -> 3" in r.stdout
    ours, ref = saved(tmp_path, STEPS), saved(single, STEPS)
    for part in ("model", "ema"):
        assert_close(ours[part], ref[part], atol=0)
    for k, state in ref["opt"]["state"].items():
        assert_close(ours["opt"]["state"][k], state, atol=0)
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]  # one log, one run folder
    assert [r["loss"] for r in records(tmp_path)] == [r["loss"] for r in records(single)]


def test_demo_data_loss_goes_down(tmp_path):
    checked("--max-steps", 60, "--global-batch-size", 32, "--log-every", 10, "--results-dir", tmp_path)
    log = records(tmp_path)
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    assert log[-1]["mse"] < 0.5 * log[0]["mse"], [r["mse"] for r in log]
    for r in log:  # expert shares of 4 experts: each a fraction, the smallest below 1/4, the largest above
        assert len(r["load_min"]) == 4 and all(0 <= lo <= 0.25 <= hi <= 1 for lo, hi in zip(r["load_min"], r["load_max"]))


def test_set_overrides_reach_the_config_and_the_objective(tmp_path):
    # --set objective=rf must train rectified flow (its loss term "rf"), not just label the checkpoint
    checked(*QUICK, "--set", "objective=rf", "--set", "shared_hidden=none", "--set", "top_k=1",
            "--results-dir", tmp_path)
    cfg = saved(tmp_path, STEPS)["config"]
    assert (cfg["objective"], cfg["shared_hidden"], cfg["top_k"]) == ("rf", None, 1)
    assert "rf" in records(tmp_path)[-1] and "vb" not in records(tmp_path)[-1]


def tiny_vae(path):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # requirements-vae.txt
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(path)
    return vae.eval()


def test_latent_shards_encode_then_train(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(3):  # 16 wide, 24 high: the crop keeps rows 4..19
            Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    vae = tiny_vae(tmp_path / "vae")
    common = ["--data-path", tmp_path / "images", "--vae", tmp_path / "vae", "--image-size", 16, "--num-workers", 0]
    checked("--extract-latents", *common, "--latents-path", tmp_path / "latents", "--global-batch-size", 4)
    meta = json.loads((tmp_path / "latents" / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["latent_size"] == 16 and meta["channels"] == 4
    shard = torch.load(next((tmp_path / "latents").glob("shard-*.pt")), weights_only=True)
    assert shard["label"].tolist() == [0, 0, 0, 1, 1, 1]
    # image dog/2 and its mirror image through the VAE by hand
    img = np.asarray(Image.open(tmp_path / "images" / "dog" / "2.png"))[4:20]
    x = torch.tensor(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    s = vae.config.scaling_factor
    torch.testing.assert_close(shard["mean"][5].float(), post.mean * s, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(shard["std"][5].float(), post.std * s, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(shard["mean"][5, 0], shard["mean"][5, 1])  # the flip is really there
    # train on the shards (no VAE), then straight from the folder through the VAE
    for source in (["--latents-path", tmp_path / "latents"], common):
        results = tmp_path / f"run{len(source)}"
        checked(*source, "--max-steps", 2, "--global-batch-size", 4, "--results-dir", results)
        cfg = torch.load(results / "latest" / "ema.pt", weights_only=True)["config"]
        assert (cfg["latent_space"], cfg["in_channels"], cfg["input_size"], cfg["num_classes"]) == (True, 4, 16, 2)


def test_race_router_trains_with_layer_reg_on_two_processes(tmp_path):
    # Race-DiT: per-layer regularisation is logged, the inference thresholds are averaged over
    # ranks, reach the EMA (buffers are copied, not averaged) and are finite; race's training
    # routing does not use them, so the weights still equal one process with 2 micro-batches.
    race = ["--set", "router=race", "--set", "layer_reg=0.1"]
    checked(*QUICK, *race, "--results-dir", tmp_path / "two", nproc=2)
    checked(*QUICK, *race, "--grad-accum", 2, "--results-dir", tmp_path / "one")
    two, one = saved(tmp_path / "two", STEPS), saved(tmp_path / "one", STEPS)
    assert two["config"]["router"] == "race" and two["config"]["layer_reg"] == 0.1
    thresholds = {k: v for k, v in two["model"].items() if k.endswith("threshold")}
    assert len(thresholds) == 4 and all(torch.isfinite(v) for v in thresholds.values())
    assert all(torch.equal(two["ema"][k], v) for k, v in thresholds.items())
    weights = lambda sd: {k: v for k, v in sd.items() if not k.endswith("threshold")}
    assert_close(weights(two["model"]), weights(one["model"]), atol=1e-6)
    rec = records(tmp_path / "two")[-1]
    assert rec["layer_reg"] > 0 and rec["maxvio"] >= 0


@pytest.mark.parametrize("args, message", [  # the in-process checks: tests/test_bad_input.py
    (["--global-batch-size", 10, "--grad-accum", 4], "error: --global-batch-size 10 does not split"),
    (["--model", "S/2-8E2A", "--resume", "SINGLE"], "is a T/2-4E2A checkpoint that does not fit this run "
                                                    "(checkpoint vs this run: depth 4 vs 12, hidden_size 128 vs 384"),
])
def test_bad_input_is_one_line(single, tmp_path, args, message):
    args = [single / "latest" if a == "SINGLE" else a for a in args]
    r = run(*args, "--results-dir", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_upcycled_run_starts_at_the_source_models_loss(tmp_path, capsys):
    # A 1-expert model trained briefly, then new runs from its weights (train.py --init-from):
    # itself (1E1A: the source's own loss on the first batch), upcycled to 4E2A (4 copies of its
    # expert, a fresh N(0, 0.02) router), and a 4E2A from scratch. In-process: four short runs.
    def first_loss(*flags):
        train.main(train.parse_args(["--device", "cpu", "--global-batch-size", "32", "--log-every", "1",
                                     *map(str, flags)]))
        return records(flags[flags.index("--results-dir") + 1])[0]["loss"]

    one = ["--set", "num_experts=1", "--set", "top_k=1"]
    train.main(train.parse_args(["--device", "cpu", *one, "--max-steps", "60", "--global-batch-size", "32",
                                 "--ema-decay", "0.5", "--results-dir", str(tmp_path / "src")]))
    source = tmp_path / "src" / "latest" / "ema.pt"
    itself = first_loss(*one, "--init-from", source, "--max-steps", 1, "--results-dir", tmp_path / "same")
    upcycled = first_loss("--init-from", source, "--max-steps", 1, "--results-dir", tmp_path / "up")
    scratch = first_loss("--max-steps", 1, "--results-dir", tmp_path / "scratch")
    out = capsys.readouterr().out
    assert "44 tensors copied, 8 upcycled into 4 experts, 4 fresh (moe.router.weight x4)" in out
    assert scratch - itself > 0.3  # the source has learned something
    assert abs(upcycled - itself) < 0.1 * (scratch - itself), (itself, upcycled, scratch)


def test_digits_are_scikit_learns_and_the_held_out_split_is_every_fifth():
    import data
    ref = load_digits()  # through scikit-learn itself
    x, y = data.load_digits().tensors
    assert torch.equal(x, torch.tensor(ref.images, dtype=torch.float32)[:, None] / 8 - 1)
    assert torch.equal(y, torch.tensor(ref.target))
    (xt, yt), (xh, yh) = data.load_digits("train").tensors, data.load_digits("held-out").tensors
    assert len(yt) == 1438 and len(yh) == 359
    assert torch.equal(xh, x[4::5]) and torch.equal(yh, y[4::5])
    keep = torch.arange(len(y)) % 5 != 4
    assert torch.equal(xt, x[keep]) and torch.equal(yt, y[keep])
