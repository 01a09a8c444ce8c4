"""sample.py: guidance, per-sample seeds, FID batches (also under torchrun), official
checkpoints, routing statistics and bad input, all on the tiny model in seconds."""
import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import sample
from diffusion import create_objective
from model import create_model
from official_layout import to_official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(seed=0, **overrides):
    """The tiny MoE at the digits' size (8x8, 1 channel, 10 classes), every weight random:
    the zero-initialised output layers would make many checks trivially true. The class table
    is scaled up so that the class visibly changes the image, as in a trained model."""
    net = create_model("T/2-4E2A", **(dict(input_size=8, in_channels=1, num_classes=10, latent_space=False) | overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        net.y_embedder.embedding_table.weight.mul_(20)
    return net.eval()


def save_ours(net, path):
    """An ema.pt as train.py writes it."""
    checkpoint.save_ema(path, net.state_dict(), {"config": dataclasses.asdict(net.cfg), "step": 0, "args": {}})
    return str(path)


def same_images(a, b):
    """Equal up to float rounding: matmuls batched differently may move a rare pixel across a
    grey-level boundary, never further (a half-level offset would change about half of them)."""
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() <= 0.02


def draw(net, obj, indices, labels, **kw):
    """sample_images with the test's defaults: seed 0, guidance 4, DDPM 4 steps."""
    return sample.sample_images(net, obj, indices, labels, **(dict(sampler="ddpm", num_steps=4) | kw))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's matmuls are too small to split: on a busy 2-core machine a second
    # thread only waits for a core (measured: 8 ms per forward with one thread, 800 ms with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A randomly initialised one-level AutoencoderKL in the diffusers folder format (no download)."""
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # requirements-vae.txt
    path = str(tmp_path_factory.mktemp("vae"))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------

def test_cfg_scale_one_equals_conditional_model():
    net, g = tiny(), torch.Generator().manual_seed(1)
    z, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([999, 500, 20, 0]), torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        cond = net(z, t, y)
        out = net.forward_with_cfg(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.0)
        torch.testing.assert_close(out[:4], cond, atol=1e-5, rtol=1e-5)  # all 2C channels
        torch.testing.assert_close(sample.guided_model(net, y, 1.0)(z, t), cond)


def test_guidance_on_all_channels_and_legacy_three():
    net, g = tiny(in_channels=4), torch.Generator().manual_seed(2)
    z, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([900, 400, 10]), torch.tensor([1, 5, 7])
    with torch.no_grad():
        cond, uncond = net(z, t, y), net(z, t, torch.full_like(y, 10))  # two separate passes
        full = sample.guided_model(net, y, 3.0)(z, t)
        legacy = sample.guided_model(net, y, 3.0, guided_channels=3)(z, t)
    guided = uncond + 3.0 * (cond - uncond)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full[:, :4], guided[:, :4], **tol)    # every latent channel guided
    torch.testing.assert_close(full[:, 4:], cond[:, 4:], **tol)      # variance channels: conditional
    torch.testing.assert_close(legacy[:, :3], guided[:, :3], **tol)  # DiT: only channels 0-2 ...
    torch.testing.assert_close(legacy[:, 3:], cond[:, 3:], **tol)    # ... channel 3 stays conditional
    assert (full[:, 3] - legacy[:, 3]).abs().max() > 1e-2            # and the two modes do differ


# ----------------------------------------------------------------------------
# Per-sample seeds
# ----------------------------------------------------------------------------

def test_noise_of_each_image_comes_from_its_own_seed():
    randn = sample.per_sample_randn([10, 11, 12])
    like = torch.empty(3, 2, 4, 4)
    first, second = randn(like), randn(like)
    for j in range(3):
        g = torch.Generator().manual_seed(10 + j)
        assert torch.equal(first[j], torch.randn(2, 4, 4, generator=g))
        assert torch.equal(second[j], torch.randn(2, 4, 4, generator=g))  # the same stream goes on


def test_images_are_deterministic_and_independent_of_the_batch():
    net, obj = tiny(), create_objective("ddpm")
    labels = [0, 1, 2, 3, 4, 5]
    whole = draw(net, obj, list(range(6)), labels, seed=3)
    assert whole.shape == (6, 8, 8, 3) and whole.dtype == np.uint8
    assert np.array_equal(whole, draw(net, obj, list(range(6)), labels, seed=3))
    parts = np.concatenate([draw(net, obj, [0, 1], labels[:2], seed=3),
                            draw(net, obj, [2, 3, 4, 5], labels[2:], seed=3)])
    alone = draw(net, obj, [4], [4], seed=3)
    assert same_images(parts, whole) and same_images(alone[0], whole[4])
    other = draw(net, obj, list(range(6)), labels, seed=4)
    assert np.abs(other.astype(int) - whole).mean() > 10  # a different seed is a different image
    relabelled = draw(net, obj, [4], [7], seed=3)
    assert np.abs(relabelled[0].astype(int) - whole[4]).mean() > 10  # and so is a different class


def test_latents_are_decoded_by_the_vae_with_sd_scaling(vae_dir):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # requirements-vae.txt
    net, vae, obj = tiny(in_channels=4, latent_space=True), AutoencoderKL.from_pretrained(vae_dir), create_objective("ddpm")
    got = draw(net, obj, [0], [2], cfg_scale=1.0, num_steps=3, vae=vae)
    # By hand: the latent of seed 0, class 2, decoded from latents / 0.18215 (SD's scale factor).
    g = torch.Generator().manual_seed(0)
    randn = lambda like: torch.randn(like.shape, generator=g)
    with torch.no_grad():
        z = obj.sample(lambda x, t: net(x, t, torch.tensor([2])), randn(torch.empty(1, 4, 8, 8)), num_steps=3,
                       randn=randn)
        want = vae.decode(z / 0.18215).sample[0].permute(1, 2, 0).numpy()
    assert same_images(got[0], np.clip(127.5 * want + 128, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------
# FID batches
# ----------------------------------------------------------------------------

def fid_argv(ckpt, folder, *extra):
    return ["--ckpt", ckpt, "--num-fid-samples", "5", "--batch-size", "2", "--num-sampling-steps", "4",
            "--seed", "7", "--sample-dir", str(folder), "--device", "cpu", *extra]


def test_fid_batch_equals_independent_sampling_resumes_and_reads_in_evaluate(tmp_path, capsys):
    net = tiny()
    argv = fid_argv(save_ours(net, tmp_path / "ema.pt"), tmp_path / "s")
    sample.main(argv)
    [npz] = glob.glob(str(tmp_path / "s" / "*.npz"))
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8

    # Image 3 by hand: seed 7 + 3, class 3 % 10, DDPM 4 steps, guidance 1.5 (the FID default) on all channels.
    g = torch.Generator().manual_seed(10)
    randn = lambda like: torch.randn(like.shape, generator=g)
    y, null = torch.tensor([3]), torch.tensor([10])

    def model_fn(x, t):
        cond, uncond = net(x, t, y), net(x, t, null)
        return torch.cat([uncond[:, :1] + 1.5 * (cond[:, :1] - uncond[:, :1]), cond[:, 1:]], dim=1)
    x = create_objective("ddpm").sample(model_fn, randn(torch.empty(1, 1, 8, 8)), sampler="ddpm", num_steps=4,
                                       randn=randn)
    want = np.clip(127.5 * x[0, 0].numpy() + 128, 0, 255).astype(np.uint8)
    for c in range(3):  # grey images are written as three equal channels
        assert same_images(arr[3, :, :, c], want)

    # Resume: a chunk on disk is kept as it is, a missing one is sampled again.
    folder = npz[:-4]
    np.savez(os.path.join(folder, "chunk00000.npz"), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    os.remove(os.path.join(folder, "chunk00001.npz"))
    sample.main(argv)
    again = np.load(npz)["arr_0"]
    assert (again[:2] == 0).all() and np.array_equal(again[2:], arr[2:])
    with pytest.raises(SystemExit):
        sample.main(argv + ["--batch-size", "3"])  # other chunking, same folder: refused
    assert "other settings" in capsys.readouterr().err

    import evaluate  # the batch reads back as evaluate.py reads sample batches
    images = evaluate.load_npz(npz)
    assert tuple(images.shape) == (5, 8, 8, 3)  # its own uint8 (N, H, W, 3) check passed
    assert np.array_equal(np.concatenate(list(images.batches(2))), again)


def test_torchrun_two_processes_write_the_same_batch(tmp_path):
    ckpt = save_ours(tiny(), tmp_path / "ema.pt")
    sample.main(fid_argv(ckpt, tmp_path / "one", "--routing-stats"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py",
           *fid_argv(ckpt, tmp_path / "two", "--routing-stats")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [one], [two] = (glob.glob(str(tmp_path / d / "*-seed7.npz")) for d in ("one", "two"))
    assert same_images(np.load(one)["arr_0"], np.load(two)["arr_0"])
    # Routing counts are summed over both processes: 5 images x 16 tokens x k = 2 per layer and step.
    a, b = np.load(one.replace(".npz", "-routing.npz")), np.load(two.replace(".npz", "-routing.npz"))
    assert (b["by_step"].sum(-1) == 5 * 16 * 2).all()
    assert np.abs(a["by_step"] - b["by_step"]).sum() <= 0.01 * a["by_step"].sum()  # rare near-ties may flip


# ----------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_official_checkpoint_samples_like_ours(tmp_path, vae_dir, qk_norm):
    # The released files: S/B without QK-norm (DDPM), XL/G with it (rectified flow). The official
    # loader reads heads off the file: D / 64 = 2 without QK-norm, D / head width = 4 with it.
    net = tiny(in_channels=4, latent_space=True, qk_norm=qk_norm, num_heads=4 if qk_norm else 2,
               objective="rf" if qk_norm else "ddpm")
    official = to_official(net.state_dict(), qk_norm)
    attn = "blocks.3.attn.Wqkv.weight" if qk_norm else "blocks.3.attn.qkv.weight"
    for key in ("blocks.0.moe.gate.weight", "blocks.0.moe.experts.3.down_proj.weight", attn,
                "blocks.0.moe.shared_experts.up_proj.weight", "y_embedder.embedding_table.weight"):
        assert key in official
    assert not any("w_gate_up" in k or "router" in k for k in official)
    torch.save({"ema": official}, tmp_path / "official.pt")
    save_ours(net, tmp_path / "ours.pt")
    grids = {}
    for name in ("official", "ours"):
        sample.main(["--ckpt", str(tmp_path / f"{name}.pt"), "--vae", vae_dir, "--device", "cpu", "--classes", "1", "7",
                     "--per-class", "1", "--num-sampling-steps", "3", "--out", str(tmp_path / f"{name}.png")])
        grids[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert grids["official"].shape == (66, 132, 3)  # 8x8 images shown 8x larger, 1 px frame, 1 x 2
    assert np.array_equal(grids["official"], grids["ours"])
    assert grids["ours"].std() > 1  # not a blank grid
    with open(tmp_path / "official.json") as f:
        saved = json.load(f)
    assert saved["sampler"] == ("euler" if qk_norm else "ddpm") and saved["vae"] == vae_dir
    assert saved["num_sampling_steps"] == 3 and saved["classes"] == [1, 7] and saved["cfg_scale"] == 4.0


# ----------------------------------------------------------------------------
# Routing statistics
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_routing_counts_match_routing_by_hand(cfg_scale):
    net, S, L, N, T, E, K = tiny(), 3, 4, 4, 16, 4, 2
    labels = [0, 0, 3, 9]
    stats = sample.RoutingStats(net, S)
    inputs = []  # every MoE call's input, in call order: step-major, then layer
    hooks = [b.moe.register_forward_pre_hook(lambda m, inp: inputs.append((m, inp[0]))) for b in net.blocks]
    draw(net, create_objective("ddpm"), list(range(N)), labels, cfg_scale=cfg_scale, num_steps=S, stats=stats)
    for h in hooks:
        h.remove()
    stats.finish("unused", rank=1, world=1)  # rank != 0 writes nothing
    assert not net.blocks[0].moe._forward_pre_hooks  # the hooks are gone after sampling
    want = {"step": torch.zeros(L, S, E, dtype=torch.long), "class": torch.zeros(L, 10, E, dtype=torch.long),
            "position": torch.zeros(L, T, E, dtype=torch.long)}
    assert len(inputs) == S * L
    for call, (moe, x) in enumerate(inputs):
        s, l = divmod(call, L)
        x = x[:N].reshape(N * T, -1)  # conditional images only: the null half comes second
        top = torch.softmax(x @ moe.router.weight.T, dim=-1).topk(K, dim=-1).indices  # paper: top-k of softmax
        hits = F.one_hot(top, E).sum(1).reshape(N, T, E)
        want["step"][l, s] += hits.sum((0, 1))
        want["position"][l] += hits.sum(0)
        want["class"][l].index_add_(0, torch.tensor(labels), hits.sum(1))
    for view in want:
        assert torch.equal(stats.counts[view], want[view]), view
    assert (stats.counts["step"].sum(-1) == N * T * K).all()  # tokens x k per layer and step


def test_routing_stats_cli_writes_counts_and_heatmaps(tmp_path):
    ckpt = save_ours(tiny(), tmp_path / "ema.pt")
    sample.main(["--ckpt", ckpt, "--routing-stats", "--device", "cpu", "--classes", "2", "5", "--per-class", "1",
                 "--num-sampling-steps", "3", "--out", str(tmp_path / "g.png")])
    r = np.load(tmp_path / "g-routing.npz")
    assert r["by_class"].shape == (4, 10, 4) and r["by_position"].shape == (4, 16, 4) and r["by_step"].shape == (4, 3, 4)
    assert list(r["layers"]) == [0, 1, 2, 3] and r["top_k"] == 2
    assert (r["by_step"].sum(-1) == 2 * 16 * 2).all() and (r["by_position"].sum(-1) == 2 * 3 * 2).all()
    per_class = r["by_class"].sum(-1)  # only classes 2 and 5 were sampled
    assert (per_class[:, [2, 5]] == 16 * 3 * 2).all() and per_class.sum() == 4 * 2 * 16 * 3 * 2
    for view in ("class", "position", "step"):
        img = Image.open(tmp_path / f"g-routing-{view}.png")
        assert img.width >= 4 * 4 * 12 and img.height > 200  # four layer panels of 4 experts, readable rows


def test_heatmap_colours_are_one_fixed_scale_of_the_share(tmp_path):
    # An expert's share of a row times E: 0 red, 1 (even use) white, >= 2 dark blue, linear in
    # between; the same scale in every figure, so a near-uniform heatmap looks near-white.
    counts = np.zeros((2, 3, 4))
    counts[0, 0, 1] = 5                 # all of a row on one expert: 4x the even share, clipped to blue
    counts[0, 1] = 7                    # spread evenly: white
    counts[1, 0] = [1, 1, 3, 3]         # shares x E: 0.5, 0.5, 1.5, 1.5
    counts[1, 1] = [2, 2, 2, 0]         # 4/3 each, and one expert never chosen: red
    rgb = sample.share_colours(counts).astype(float)
    red, white, blue, grey = sample.RED, sample.WHITE, sample.BLUE, sample.GREY
    assert (rgb[0, 0, 1] == blue).all() and (rgb[0, 0, 0] == red).all()
    assert (rgb[0, 1] == white).all() and (rgb[0, 2] == grey).all() and (rgb[1, 2] == grey).all()
    np.testing.assert_array_equal(rgb[1, 0, 0], np.round(red + (white - red) * 0.5))
    np.testing.assert_array_equal(rgb[1, 0, 2], np.round(white + (blue - white) * 0.5))
    np.testing.assert_array_equal(rgb[1, 1, 0], np.round(white + (blue - white) / 3))
    assert (rgb[1, 1, 3] == red).all()
    sample.heatmap(counts, [0, 5], str(tmp_path / "h.png"), "class")
    px = np.asarray(Image.open(tmp_path / "h.png").convert("RGB")).reshape(-1, 3)
    assert (px == blue).all(1).any() and (px == red).all(1).any()  # the cells reach the figure


def test_experts_per_token_plot_of_race_varies_with_the_step(tmp_path):
    # Race-DiT Fig. 6: with the race router at inference the number of experts per token is not
    # fixed; the npz holds it per layer and step (counts / routed tokens), the PNG plots it.
    net = tiny(router="race")
    for block in net.blocks:
        block.moe.threshold.fill_(0.05)
    stats = sample.RoutingStats(net, 3)
    draw(net, create_objective("ddpm"), [0, 1], [3, 4], num_steps=3, stats=stats)
    stats.finish(str(tmp_path / "r"), rank=0, world=1)
    r = np.load(tmp_path / "r-routing.npz")
    assert (r["tokens"] == 2 * 16).all()
    np.testing.assert_allclose(r["experts_per_token"], r["by_step"].sum(-1) / 32)
    assert r["experts_per_token"].std() > 0 and (r["experts_per_token"] <= 4).all()
    assert Image.open(tmp_path / "r-routing-experts-per-token.png").size == (420, 260)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def test_non_finite_samples_are_refused_and_nothing_is_saved(tmp_path, capsys):
    net = tiny()
    with torch.no_grad():
        net.final_layer.linear.bias[0] = float("nan")
    ckpt = save_ours(net, tmp_path / "nan.pt")
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--device", "cpu", "--classes", "0", "--per-class", "1", "--num-sampling-steps", "2",
                     "--out", str(tmp_path / "g.png")])
    assert "non-finite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(fid_argv(ckpt, tmp_path / "s"))
    assert "non-finite" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "g.*")) and not glob.glob(str(tmp_path / "s" / "*" / "chunk*"))


@pytest.mark.parametrize("argv,message", [
    (["--ckpt", "{tmp}/missing.pt"], "checkpoint not found"),
    (["--ckpt", "{pixel}", "--classes", "3", "10"], "class labels must be in 0..9"),
    (["--ckpt", "{pixel}", "--sampler", "euler"], "valid: ddpm, ddim"),
    (["--ckpt", "{rf}", "--sampler", "ddim"], "valid: euler"),
    (["--ckpt", "{dense}", "--routing-stats"], "needs an MoE model"),
    (["--ckpt", "{latent}", "--vae", "{tmp}/no-vae"], "cannot load the VAE"),
    (["--ckpt", "{pixel}", "--batch-size", "0"], "argument --batch-size: 0 is not in [1, inf]"),
])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nets = {"pixel": {}, "rf": dict(objective="rf"), "dense": dict(num_experts=0, top_k=0),
            "latent": dict(in_channels=4, latent_space=True)}
    paths = {"tmp": tmp_path} | {k: save_ours(tiny(**kw), tmp_path / f"{k}.pt") for k, kw in nets.items()
                                 if "{" + k + "}" in argv[1]}
    with pytest.raises(SystemExit) as e:
        sample.main([a.format(**paths) for a in argv] + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_exits_nonzero_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "missing.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: checkpoint not found")


# ----------------------------------------------------------------------------
# --legacy-cfg per objective, DiT's released checkpoints
# ----------------------------------------------------------------------------

def test_legacy_cfg_is_the_official_rule_of_each_objective(tmp_path, vae_dir):
    # The official DDPM sampler guides channels 0-2 of 4, its rectified-flow sampler all four:
    # --legacy-cfg changes DDPM samples and leaves rectified-flow samples as they are.
    grids = {}
    for objective in ("ddpm", "rf"):
        net = tiny(in_channels=4, latent_space=True, objective=objective)
        ckpt = save_ours(net, tmp_path / f"{objective}.pt")
        for legacy in ([], ["--legacy-cfg"]):
            out = tmp_path / f"{objective}{len(legacy)}.png"
            sample.main(["--ckpt", ckpt, "--vae", vae_dir, "--device", "cpu", "--classes", "1", "2",
                         "--per-class", "1", "--num-sampling-steps", "4", "--out", str(out), *legacy])
            grids[objective, bool(legacy)] = np.asarray(Image.open(out))
    assert np.array_equal(grids["rf", True], grids["rf", False])
    assert not np.array_equal(grids["ddpm", True], grids["ddpm", False])


def test_dit_released_checkpoint_samples_through_sample_py(tmp_path, vae_dir):
    # A raw state_dict in facebookresearch/DiT's layout (dense, GELU MLPs, learned sigma): DDPM,
    # the learned-sigma split, and with --legacy-cfg exactly DiT's guidance (channels 0-2).
    from test_checkpoint import dit_state_dict
    torch.save(dit_state_dict(), tmp_path / "DiT-tiny.pt")
    sample.main(["--ckpt", str(tmp_path / "DiT-tiny.pt"), "--vae", vae_dir, "--device", "cpu", "--classes", "3",
                 "--per-class", "1", "--num-sampling-steps", "3", "--legacy-cfg", "--out", str(tmp_path / "d.png")])
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["sampler"] == "ddpm" and saved["model"]["num_experts"] == 0 and saved["model"]["learn_sigma"]
    assert np.asarray(Image.open(tmp_path / "d.png")).std() > 0
