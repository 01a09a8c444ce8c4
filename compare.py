"""
The papers' claims at toy scale, with error bars: an ablation suite on the built-in digits.

    python compare.py                      # 11 configurations x 3 seeds, 800 steps (2-core CPU: ~75 min)
    python compare.py --quick              # dense and race, 1 seed, 4 steps, 20 samples: under a minute
    python compare.py --only token race --seeds 1   # a subset (writes to --out, not to docs/)

Each configuration is trained by train.py at seeds 0 .. SEEDS-1 (--global-seed) for --steps
steps of 64 images with EMA decay 0.99: the demo's 128 images and 0.995 learn less for the same
compute this early, and their EMA lags a run this short (token choice, seed 0: class accuracy of
the raw weights 16% after 400 steps of 128, 84% after 800 of 64; of the EMA weights after 800
steps, 37% at decay 0.995, 66% at 0.99). sample.py then draws --samples guided samples from the
EMA weights (cfg 1.5; DDPM respaced to 25 steps, which scored as 50 did: accuracy 68% vs 66%,
FD 2.52 vs 2.57), image i of class i % 10 from noise seed SEED * SAMPLES + i. Per run:
  - final loss: the diffusion loss (mse + vb; router losses and layer_reg excluded, so every
    configuration is scored alike) averaged over the last 20% of the training steps,
  - class accuracy: an SVM fit on the 359 held-out digits (every 5th, which the diffusion
    models never see: train.py --digits train) labels the samples; its accuracy on the 1,438
    training digits is the ceiling,
  - FD: the Frechet distance between the samples and the 1,438 training digits in pixel space (64-d);
    the FD of as many real digits drawn at random shows the floor at this sample size,
  - MaxVio (Race-DiT Table 2): max expert load / mean load - 1, mean over layers, over the
    training batches of the last 20% of steps,
  - combination usage (Race-DiT Fig. 7 and 13) and experts per token of the EMA model's
    inference routing on noised real digits.
Mean +- std over seeds, std the sample standard deviation (n - 1). A claim "A beats B" holds on
a metric when the means differ in its direction by more than twice the standard error of the
difference, sqrt(sA^2 / nA + sB^2 / nB); in the other direction by as much it does not hold;
otherwise it is within noise. Race-DiT Fig. 6 (experts per token against the sampling step)
comes from sample.py --routing-stats on the seed-0 race model.

A finished run is reused when its settings and the source files it runs are unchanged, so an
interrupted suite continues where it stopped. Writes (to --docs, default docs/ for the full
suite, else --out): ablation.json (every seed's numbers, means, stds, verdicts, timing),
ablation.md (the tables), ablation-loss.png, ablation-samples.png and
ablation-race-experts-per-token.png.

Tests: python -m pytest -q tests/test_compare.py
"""
import launch  # noqa: I001  first import: the OpenMP wait policy must be set before torch loads

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import load_model
from data import load_digits
from diffusion import create_objective
from evaluate import frechet_distance
from launch import fail, nonnegative_float, positive_int
from model import count
from moe import assignment_mask, combination_usage

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------
# The configurations, the groups they are compared in, the claims
# ----------------------------------------------------------------------------

# T/2-4E2A activates K = 2 SwiGLU experts of width 4D plus the shared expert of width 2D:
# 2 * 12 D^2 + 6 D^2 = 30 D^2 multiply-adds per token; the dense T/2 with a GELU MLP of width
# 15D has 2 * 15 D^2, the same. 8 and 16 experts keep K = 2 experts of width 4D: the same
# active compute, 2x and 4x the routed parameters. Without the shared expert: 24 D^2.
MOE = ["--model", "T/2-4E2A"]
TOKEN = MOE + ["--set", "router=token"]  # DiT-MoE: 4 experts, a shared expert, alpha 0.05
RACE = MOE + ["--set", "router=race"]  # identity gating, learned threshold, similarity 0.01, no PLR
CONFIGS = {  # name: train.py flags; each trained once per seed, whatever groups it is in
    "dense": ["--model", "T/2", "--set", "mlp_ratio=15"],
    "token": TOKEN,
    "expert": MOE + ["--set", "router=expert"],
    "race": RACE,
    "token-no-shared": TOKEN + ["--set", "shared_hidden=0"],
    "token-alpha0": TOKEN + ["--set", "balance_alpha=0"],
    "token-alpha0.01": TOKEN + ["--set", "balance_alpha=0.01"],
    "token-8E": TOKEN + ["--set", "num_experts=8"],
    "token-16E": TOKEN + ["--set", "num_experts=16"],
    "race-PLR": RACE + ["--set", "layer_reg=0.1"],
    "race-no-similarity": RACE + ["--set", "similarity_beta=0"],
}
QUICK_CONFIGS = ["dense", "race"]

GROUPS = {  # name: (what it reproduces, configurations)
    "dense vs MoE": ("DiT-MoE headline, Race-DiT Fig. 8: equal active compute", ["dense", "token", "race"]),
    "routers": ("Race-DiT Table 1: token vs expert choice vs Expert Race", ["token", "expert", "race"]),
    "shared expert": ("DiT-MoE Fig. 3a; without it 24 D^2 active per token, not 30",
                      ["token", "token-no-shared"]),
    "balance loss": ("DiT-MoE Eq. 5: alpha 0, 0.01 (official code), 0.05 (paper)",
                     ["token-alpha0", "token-alpha0.01", "token"]),
    "experts": ("DiT-MoE Fig. 3b, Race-DiT Table 5: 4, 8, 16 experts of width 4D, K = 2",
                ["token", "token-8E", "token-16E"]),
    "per-layer regularisation": ("Race-DiT Table 3: layer_reg 0 vs 0.1", ["race", "race-PLR"]),
    "router similarity": ("Race-DiT Table 2, Fig. 7: similarity_beta 0 vs 0.01",
                          ["race-no-similarity", "race"]),
}

METRICS = {  # name: (column title, True when higher is better; None: neither)
    "final_loss": ("loss", False),
    "class_accuracy": ("accuracy", True),
    "fd_pixels": ("FD", False),
    "maxvio": ("MaxVio", False),
    "combination_usage": ("comb. usage", True),
    "experts_per_token": ("experts/token", None),
}
QUALITY = ["final_loss", "class_accuracy", "fd_pixels"]

CLAIMS = [  # (claim, source, better, worse, metrics)
    ("MoE beats dense at equal active compute", "DiT-MoE", "token", "dense", QUALITY),
    ("Expert Race MoE beats dense at equal active compute", "Race-DiT Fig. 8", "race", "dense", QUALITY),
    ("Expert Race beats token choice", "Race-DiT Table 1", "race", "token", QUALITY),
    ("Expert Race beats expert choice", "Race-DiT Table 1", "race", "expert", QUALITY),
    ("a shared expert helps", "DiT-MoE Fig. 3a", "token", "token-no-shared", QUALITY),
    ("the balance loss (alpha 0.05) helps and balances", "DiT-MoE Sec. 3.1", "token", "token-alpha0",
     QUALITY + ["maxvio"]),
    ("8 experts beat 4 at equal active compute", "DiT-MoE Fig. 3b", "token-8E", "token", QUALITY),
    ("16 experts beat 8 at equal active compute", "DiT-MoE Fig. 3b", "token-16E", "token-8E", QUALITY),
    ("per-layer regularisation helps", "Race-DiT Table 3", "race-PLR", "race", QUALITY),
    ("the router similarity loss helps, balances and diversifies", "Race-DiT Table 2, Fig. 7", "race",
     "race-no-similarity", QUALITY + ["maxvio", "combination_usage"]),
]

# the full suite and --quick; Fig. 6 samples a grid of every class, fig6_per_class rows
FULL = dict(steps=800, samples=500, sampling_steps=25, seeds=3, fig6_steps=250, fig6_per_class=5)
QUICK = dict(steps=4, samples=20, sampling_steps=5, seeds=1, fig6_steps=5, fig6_per_class=1)
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (80, 80, 80)]


def parse_args(argv=None):
    p = launch.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--steps", type=positive_int, help=f"optimizer steps per run (default {FULL['steps']})")
    add("--seeds", type=positive_int, help=f"seeds per configuration, 0 .. SEEDS-1 (default {FULL['seeds']})")
    add("--samples", type=positive_int, help=f"guided samples per run (default {FULL['samples']})")
    add("--sampling-steps", type=positive_int,
        help=f"DDPM steps of those samples, respaced (default {FULL['sampling_steps']})")
    add("--cfg-scale", type=nonnegative_float, default=1.5, help="guidance scale (paper FID setting: 1.5)")
    add("--batch-size", type=positive_int, default=64, help="images per step (train.py's demo: 128)")
    add("--ema-decay", type=launch.ranged(float, 0, 1, high_open=True), default=0.99,
        help="EMA decay per step (train.py's demo: 0.995, ~200 steps; 0.99 averages ~100)")
    add("--only", nargs="+", metavar="CONFIG", help=f"these configurations only: {', '.join(CONFIGS)}")
    add("--jobs", type=positive_int, default=2,
        help="runs at once, each on one thread (default 2: on a 2-core CPU two 1-thread runs do "
             "1.7x the work of one 2-thread run of these tiny models); 1: one run, all threads")
    add("--quick", action="store_true",
        help=f"{' and '.join(QUICK_CONFIGS)}, 1 seed, {QUICK['steps']} steps, {QUICK['samples']} samples")
    add("--out", default="results/ablation", help="folder of the runs (reused when unchanged)")
    add("--docs", help="folder of the results (default: docs/ for the full suite, else --out)")
    add("--upcycle", action="store_true",
        help="instead of the suite: a 1-expert model trained --steps, upcycled into T/2-4E2A and "
             "trained --steps more (train.py --init-from), against T/2-4E2A from scratch; "
             "upcycle.png and upcycle.json")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # what the flags leave unset
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    unknown = [c for c in args.only or [] if c not in CONFIGS]
    if unknown:
        fail(f"--only: unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    args.configs = args.only or (QUICK_CONFIGS if args.quick else list(CONFIGS))
    # a part of the suite never overwrites the committed results
    args.docs = Path(args.docs or (args.out if args.quick or args.only else ROOT / "docs"))
    if args.upcycle:
        args.out = str(Path(args.out) / "upcycle")
    args.threads = 1 if args.jobs > 1 else None
    launch.writable_dir(args.out)
    launch.writable_dir(args.docs)
    return args


# ----------------------------------------------------------------------------
# Runs: train.py, then sample.py, as subprocesses; reused when nothing changed
# ----------------------------------------------------------------------------

RUN_SOURCES = ["train.py", "sample.py", "model.py", "moe.py", "diffusion.py", "data.py", "checkpoint.py",
               "launch.py"]  # what a run executes (the metrics are recomputed every time)


def source_hash():
    """A digest of the code a run executes: a run made by other code is redone, not reused."""
    digest = hashlib.sha256()
    for name in RUN_SOURCES:
        digest.update(name.encode() + (ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def call(script, flags, log_path, threads=None):
    """python script flags, its output in log_path; a failure ends the suite with one line.
    threads: OpenMP threads of the process (None: the machine's)."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    with open(log_path, "w") as f:
        rc = subprocess.run([sys.executable, str(ROOT / script), *flags], stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=env).returncode
    if rc:
        tail = " | ".join(line.strip()[-200:] for line in log_path.read_text().splitlines()[-3:])
        fail(f"{script} exited with {rc} (log {log_path}): {tail}")


def log_every(steps):
    return max(1, steps // 40)  # ~40 points per loss curve


def run_folder(out, name, seed):
    return Path(out) / name / f"seed{seed}"


def run(name, seed, args, code):
    """Train configuration `name` at `seed` and sample from its EMA weights, or reuse such a run.
    Returns its folder: train/latest/{ema.pt, log.jsonl}, samples/*.npz, run.json."""
    folder = run_folder(args.out, name, seed)
    key = dict(flags=CONFIGS[name], seed=seed, steps=args.steps, batch_size=args.batch_size,
               ema_decay=args.ema_decay, samples=args.samples, sampling_steps=args.sampling_steps,
               cfg_scale=args.cfg_scale, code=code)
    done = folder / "run.json"
    if done.exists() and json.loads(done.read_text())["key"] == key:
        print(f"{name}, seed {seed}: reusing {folder}", flush=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a run of other settings or code, or unfinished
    folder.mkdir(parents=True)
    t0 = time.time()
    call("train.py", [*CONFIGS[name], "--device", "cpu", "--digits", "train", "--global-seed", str(seed),
                      "--max-steps", str(args.steps), "--global-batch-size", str(args.batch_size),
                      "--ema-decay", str(args.ema_decay),
                      "--log-every", str(log_every(args.steps)), "--ckpt-every", str(args.steps),
                      "--results-dir", str(folder / "train")], folder / "train.log", args.threads)
    t1 = time.time()
    # One chunk of every sample; image i has class i % 10 and the noise of seed (seed * samples + i).
    call("sample.py", ["--ckpt", str(folder / "train" / "latest" / "ema.pt"), "--device", "cpu",
                       "--num-fid-samples", str(args.samples), "--batch-size", str(args.samples),
                       "--cfg-scale", str(args.cfg_scale), "--num-sampling-steps", str(args.sampling_steps),
                       "--seed", str(seed * args.samples), "--sample-dir", str(folder / "samples")],
         folder / "sample.log", args.threads)
    t2 = time.time()
    done.write_text(json.dumps(dict(key=key, train_seconds=t1 - t0, sample_seconds=t2 - t1), indent=1))
    print(f"{name}, seed {seed}: trained in {t1 - t0:.0f} s, sampled in {t2 - t1:.0f} s", flush=True)
    return folder


# ----------------------------------------------------------------------------
# Metrics of one run
# ----------------------------------------------------------------------------

def to_pixels(images):
    """uint8 (N, H, W, 3) of sample.py -> (N, H*W) in [-1, 1]: sample.py's conversion inverted."""
    return (images[..., 0].reshape(len(images), -1).astype(np.float64) - 128) / 127.5


def quantize(x):
    """Real digits through sample.py's uint8 conversion, so both sides of FD are rounded alike."""
    u8 = np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)  # truncates, as .to(torch.uint8) does
    return (u8.astype(np.float64) - 128) / 127.5


def gaussian(x):
    """Mean and covariance of the rows of x: the statistics of a Frechet distance."""
    return x.mean(0), np.cov(x, rowvar=False)


class Judge:
    """The real digits and what scores samples against them: an SVM and their pixel statistics."""

    def __init__(self, num_samples):
        from sklearn.svm import SVC
        x0, labels = load_digits("train").tensors
        self.x0 = x0  # (1438, 1, 8, 8) in [-1, 1], the diffusion models' training data
        self.labels = labels
        self.real = quantize(x0.flatten(1).double().numpy())  # (1438, 64)
        held_out, held_y = load_digits("held-out").tensors  # every 5th digit, never trained on
        fit_x = quantize(held_out.flatten(1).double().numpy())
        fit_y = held_y.numpy()
        self.classifier = SVC().fit(fit_x, fit_y)
        held_x = self.real  # the classifier's own held-out set: the digits it was not fit on
        held_y = labels.numpy()
        self.stats = gaussian(self.real)
        # References: the classifier on the real digits it did not see; the FD of as many real
        # digits as there are samples (5 draws without replacement) to all of them.
        rng = np.random.default_rng(0)
        n = min(num_samples, len(self.real))
        floor = [frechet_distance(*gaussian(self.real[rng.choice(len(self.real), n, replace=False)]),
                                  *self.stats) for _ in range(5)]
        self.reference = dict(
            classifier_fit_digits=len(fit_y), classifier_heldout_digits=len(held_y),
            classifier_heldout_accuracy=float((self.classifier.predict(held_x) == held_y).mean()),
            fd_real_digits=mean_std(floor), fd_real_digits_n=n)

    def score(self, images):
        """(class accuracy, FD) of uint8 samples (N, H, W, 3) whose image i has class i % 10."""
        pixels = to_pixels(images)
        accuracy = float((self.classifier.predict(pixels) == np.arange(len(images)) % 10).mean())
        return accuracy, frechet_distance(*gaussian(pixels), *self.stats)


@torch.no_grad()
def inference_routing(net, x0, labels):
    """(combination usage, experts per token) of the MoE layers' inference routing on noised
    real digits, one seeded t per image, each averaged over layers."""
    torch.manual_seed(0)
    t, x_t, _ = create_objective(net.cfg.objective).training_inputs(x0)
    usage = []
    per_token = []

    def hook(moe, inputs):  # re-run the layer's router on its input
        x = inputs[0]  # (N, T, D)
        token, expert = moe.route(x)[:2]
        mask = assignment_mask(token, expert, x.shape[0] * x.shape[1], moe.num_experts)  # (NT, E)
        usage.append(combination_usage(mask).item())
        per_token.append(mask.sum(1).float().mean().item())
    handles = [b.moe.register_forward_pre_hook(hook) for b in net.blocks if hasattr(b, "moe")]
    net(x_t, t, labels)
    for h in handles:
        h.remove()
    return float(np.mean(usage)), float(np.mean(per_token))


def run_metrics(folder, steps, judge):
    """(metrics, loss curve [(step, loss)], samples) of one run folder."""
    train = folder / "train" / "latest"
    log = [json.loads(line) for line in (train / "log.jsonl").read_text().splitlines()]
    final = [r for r in log if r["step"] > 0.8 * steps]  # the last 20% of the steps
    images = np.load(next((folder / "samples").glob("*.npz")))["arr_0"]  # (N, H, W, 3) uint8
    accuracy, fd = judge.score(images)
    net = load_model(train / "ema.pt")
    moe = net.cfg.num_experts > 0
    usage, per_token = inference_routing(net, judge.x0, judge.labels) if moe else (None, None)
    times = json.loads((folder / "run.json").read_text())
    metrics = dict(final_loss=float(np.mean([r["loss"] for r in final])), class_accuracy=accuracy,
                   fd_pixels=fd, maxvio=float(np.mean([r["maxvio"] for r in final])) if moe else None,
                   combination_usage=usage, experts_per_token=per_token,
                   train_seconds=times["train_seconds"], sample_seconds=times["sample_seconds"])
    return metrics, [(r["step"], r["loss"]) for r in log], images


# ----------------------------------------------------------------------------
# Statistics over seeds, verdicts
# ----------------------------------------------------------------------------

def mean_std(values):
    """{mean, std} of per-seed values; std is the sample standard deviation (n - 1), None for one
    seed; both None where the metric does not apply (a dense model's MaxVio)."""
    if not values or values[0] is None:
        return dict(mean=None, std=None)
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    return dict(mean=float(values.mean()), std=std)


def verdict(better, worse, higher_is_better):
    """Does the configuration claimed better beat the other on a metric? better, worse: their
    per-seed values. The difference of means against twice its standard error."""
    a = mean_std(better)
    b = mean_std(worse)
    diff = a["mean"] - b["mean"]
    out = dict(better_mean=a["mean"], worse_mean=b["mean"], difference=diff)
    if a["std"] is None or b["std"] is None:
        return out | dict(standard_error=None, verdict="one seed: no error bar")
    se = math.sqrt(a["std"] ** 2 / len(better) + b["std"] ** 2 / len(worse))
    gain = diff if higher_is_better else -diff
    if abs(diff) <= 2 * se:
        word = "within noise"
    else:
        word = "holds" if gain > 0 else "does not hold"
    return out | dict(standard_error=se, verdict=word)


def overall(words):
    """A claim's verdict from its metrics' verdicts: holds (some hold, none contradict), does not
    hold (the reverse), mixed (both), else what they all say (within noise)."""
    holds = "holds" in words
    fails = "does not hold" in words
    if holds and fails:
        return "mixed"
    if holds or fails:
        return "holds" if holds else "does not hold"
    return words[0]


def judge_claims(configs):
    """Every claim whose two configurations ran, each of its metrics with a verdict."""
    out = []
    for text, source, better, worse, metrics in CLAIMS:
        if better not in configs or worse not in configs:
            continue
        per_metric = {}
        for m in metrics:
            values = [[s[m] for s in configs[c]["seeds"].values()] for c in (better, worse)]
            per_metric[m] = verdict(*values, METRICS[m][1])
        out.append(dict(claim=text, source=source, better=better, worse=worse, metrics=per_metric,
                        overall=overall([v["verdict"] for v in per_metric.values()])))
    return out


# ----------------------------------------------------------------------------
# Race-DiT Fig. 6: experts per token against the sampling step
# ----------------------------------------------------------------------------

def race_fig6(args, code):
    """sample.py --routing-stats on the seed-0 race model (fig6_per_class images of every class);
    returns the numbers for the JSON and the path of its experts-per-token plot."""
    model = run_folder(args.out, "race", 0)
    folder = Path(args.out) / "fig6"
    prefix = folder / "race"
    key = dict(model=json.loads((model / "run.json").read_text())["key"], steps=args.fig6_steps,
               per_class=args.fig6_per_class, cfg_scale=args.cfg_scale, code=code)
    done = folder / "run.json"
    if not (done.exists() and json.loads(done.read_text()) == key):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        call("sample.py", ["--ckpt", str(model / "train" / "latest" / "ema.pt"), "--device", "cpu",
                           "--routing-stats", "--num-sampling-steps", str(args.fig6_steps),
                           "--per-class", str(args.fig6_per_class), "--cfg-scale", str(args.cfg_scale),
                           "--out", f"{prefix}.png"], folder / "sample.log")
        done.write_text(json.dumps(key))
    stats = np.load(f"{prefix}-routing.npz")
    per_token = stats["experts_per_token"]  # (L, S), step 0 the noisiest
    mean = per_token.mean(0)  # (S,)
    half = len(mean) // 2
    numbers = dict(
        model="race, seed 0", sampling_steps=args.fig6_steps, images=10 * args.fig6_per_class,
        cfg_scale=args.cfg_scale, layers=stats["layers"].tolist(), top_k=int(stats["top_k"]),
        experts_per_token=np.round(per_token, 4).tolist(), mean_over_layers=np.round(mean, 4).tolist(),
        noisy_half_mean=float(mean[:half].mean()) if half else None,
        clean_half_mean=float(mean[half:].mean()))
    return numbers, Path(f"{prefix}-routing-experts-per-token.png")


# ----------------------------------------------------------------------------
# Figures and tables
# ----------------------------------------------------------------------------

def shown_groups(ran):
    """(group, source, its configurations that ran) of every group where two or more ran."""
    out = [(g, source, [c for c in names if c in ran]) for g, (source, names) in GROUPS.items()]
    return [(g, source, names) for g, source, names in out if len(names) > 1]


def plot_losses(curves, path, cols=2, size=(420, 260), pad=40):
    """A panel per group: each configuration's training loss against step, the mean over seeds
    as a line and their range as a band, log-scaled; the first 10% of steps are left out (the
    initial loss would flatten the rest). curves: {config: [[(step, loss)] of each seed]}."""
    groups = shown_groups(curves)
    img = Image.new("RGB", (cols * size[0], max(1, math.ceil(len(groups) / cols)) * size[1]), "white")
    for k, (group, _, names) in enumerate(groups):
        corner = ((k % cols) * size[0] + pad, (k // cols) * size[1] + pad)
        draw_panel(img, corner, (size[0] - 2 * pad, size[1] - 2 * pad), {c: curves[c] for c in names},
                   group)
    img.save(path)


def draw_panel(img, corner, box, curves, title):
    """One panel of plot_losses at corner (left, top), box (width, height)."""
    d = ImageDraw.Draw(img)
    left, top = corner
    w, h = box
    smax = max(s for seeds in curves.values() for s, _ in seeds[0])
    lines = {}
    for c, seeds in curves.items():
        steps = [s for s, _ in seeds[0] if s >= 0.1 * smax]
        logs = np.log10([[v for s, v in seed if s >= 0.1 * smax] for seed in seeds])  # (seeds, P)
        lines[c] = (steps, logs)
    lo = min(v.min() for _, v in lines.values())
    hi = max(v.max() for _, v in lines.values())
    xy = lambda s, v: (left + w * s / smax, top + h * (hi - v) / (hi - lo + 1e-9))
    d.rectangle([left, top, left + w, top + h], outline="black")
    for j, (steps, logs) in enumerate(lines.values()):  # the bands first, lines go over all of them
        if len(logs) > 1 and len(steps) > 1:
            edge = [xy(s, v) for s, v in zip(steps, logs.max(0))]
            edge += [xy(s, v) for s, v in zip(steps[::-1], logs.min(0)[::-1])]
            d.polygon(edge, fill=tuple(int(255 - 0.25 * (255 - ch)) for ch in COLORS[j]))
    for j, (c, (steps, logs)) in enumerate(lines.items()):
        if len(steps) > 1:
            d.line([xy(s, v) for s, v in zip(steps, logs.mean(0))], fill=COLORS[j], width=2)
        d.text((left + w - 130, top + 6 + 12 * j), c, fill=COLORS[j])
    d.text((left, top - 32), f"{title}: loss {10 ** lo:.3f} .. {10 ** hi:.3f} (log)", fill="black")
    d.text((left, top + h + 6), f"step {0.1 * smax:.0f} .. {smax}", fill="black")


def samples_grid(rows, path, scale=6, label=140, top=16):
    """A row per configuration: its seed-0 samples of classes 0..9 (the column headings),
    upscaled, named on the left. rows: {config: uint8 (10, H, W, 3)}."""
    cell = rows[next(iter(rows))].shape[1] * scale + 2
    img = Image.new("RGB", (label + 10 * cell, top + len(rows) * cell), "white")
    d = ImageDraw.Draw(img)
    for c in range(10):
        d.text((label + c * cell + cell // 2 - 3, 2), str(c), fill="black")
    for r, (name, images) in enumerate(rows.items()):
        y = top + r * cell
        d.text((4, y + cell // 2 - 6), name, fill="black")
        for c, im in enumerate(images[:10]):
            tile = Image.fromarray(im).resize((cell - 2, cell - 2), Image.NEAREST)
            img.paste(tile, (label + c * cell + 1, y + 1))
    img.save(path)


def cell(stat, digits=4):
    """mean ± std, or the mean alone for one seed, or - where the metric does not apply."""
    if stat["mean"] is None:
        return "-"
    std = "" if stat["std"] is None else f" ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{std}"


def tables(summary):
    """Markdown: a table per group (mean ± std over seeds), then every claim's verdicts."""
    lines = []
    titles = [title for title, _ in METRICS.values()]
    for group, source, names in shown_groups(summary["configs"]):
        lines += [f"### {group} ({source})", "",
                  "| configuration | params (active) | " + " | ".join(titles) + " |",
                  "|---" * (len(titles) + 2) + "|"]
        for c in names:
            config = summary["configs"][c]
            row = [c, f"{config['params'] / 1e6:.2f}M ({config['active_params'] / 1e6:.2f}M)"]
            row += [cell(config["stats"][m], 4 if m == "final_loss" else 3) for m in METRICS]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if summary["claims"]:
        lines += ["### claims (A: claimed better, B: the other)", "",
                  "| claim | source | metric | A | B | A - B | 2 SE | verdict | claim overall |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for claim in summary["claims"]:
            name = f"{claim['claim']} ({claim['better']} vs {claim['worse']})"
            for k, (m, v) in enumerate(claim["metrics"].items()):
                first = k == 0  # the claim's name and overall verdict go on its first row
                se = "-" if v["standard_error"] is None else f"{2 * v['standard_error']:.4f}"
                row = [name if first else "", claim["source"] if first else "", METRICS[m][0],
                       f"{v['better_mean']:.4f}", f"{v['worse_mean']:.4f}", f"{v['difference']:+.4f}", se,
                       v["verdict"], claim["overall"] if first else ""]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    ref = summary["reference"]
    lines.append(f"Reference: the classifier labels {ref['classifier_heldout_accuracy']:.1%} of the "
                 f"{ref['classifier_heldout_digits']} real digits it was not fit on; "
                 f"{ref['fd_real_digits_n']} real digits drawn at random have FD "
                 f"{cell(ref['fd_real_digits'], 3)} to all of them.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def upcycle(args):
    """Start from a trained model: the loss of T/2-4E2A upcycled from a 1-expert model (its expert
    copied into the 4, train.py --init-from) against T/2-4E2A from scratch, the same steps."""
    out = Path(args.out)
    common = ["--device", "cpu", "--digits", "train", "--max-steps", str(args.steps),
              "--global-batch-size", str(args.batch_size), "--ema-decay", str(args.ema_decay),
              "--log-every", str(log_every(args.steps)), "--ckpt-every", str(args.steps)]
    source = out / "one-expert"
    call("train.py", [*common, "--set", "num_experts=1", "--set", "top_k=1", "--results-dir", str(source)],
         out / "one-expert.log")
    runs = {"from scratch": [], "upcycled": ["--init-from", str(source / "latest" / "ema.pt")]}
    curves = {}
    for name, flags in runs.items():
        folder = out / name.replace(" ", "-")
        call("train.py", [*common, *flags, "--results-dir", str(folder)], out / f"{folder.name}.log")
        log = [json.loads(line) for line in (folder / "latest" / "log.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["loss"]) for r in log]
    img = Image.new("RGB", (420, 260), "white")
    draw_panel(img, (40, 40), (340, 180), {k: [v] for k, v in curves.items()}, "T/2-4E2A")
    img.save(args.docs / "upcycle.png")
    source_log = [json.loads(line) for line in (source / "latest" / "log.jsonl").read_text().splitlines()]
    summary = dict(steps=args.steps, batch_size=args.batch_size, curves=curves,
                   source_final_loss=float(np.mean([r["loss"] for r in source_log[-max(1, len(source_log) // 5):]])),
                   first_loss={k: v[0][1] for k, v in curves.items()},
                   final_loss={k: float(np.mean([loss for _, loss in v[-max(1, len(v) // 5):]]))
                               for k, v in curves.items()})
    (args.docs / "upcycle.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("source_final_loss", "first_loss", "final_loss")}))


def main(argv=None):
    args = parse_args(argv)
    if args.upcycle:
        return upcycle(args)
    t_start = time.time()
    code = source_hash()
    judge = Judge(args.samples)
    seeds = list(range(args.seeds))
    print(f"{len(args.configs)} configurations x {len(seeds)} seeds, {args.steps} steps each, in {args.out}",
          flush=True)

    # Train and sample every run, --jobs at once; then score them.
    pairs = [(name, seed) for name in args.configs for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda pair: run(*pair, args, code), pairs))
    configs = {}
    curves = {}
    grid_rows = {}
    for name in args.configs:
        per_seed = {}
        curves[name] = []
        for seed in seeds:
            folder = run(name, seed, args, code)
            metrics, curve, images = run_metrics(folder, args.steps, judge)
            per_seed[str(seed)] = metrics
            curves[name].append(curve)
            if seed == 0:
                grid_rows[name] = images[:10]  # classes 0..9
        cfg = load_model(run_folder(args.out, name, 0) / "train" / "latest" / "ema.pt").cfg
        total, active, gflops = count(cfg)
        stats = {m: mean_std([s[m] for s in per_seed.values()]) for m in METRICS}
        configs[name] = dict(flags=CONFIGS[name], params=total, active_params=active, gflops_per_image=gflops,
                             seeds=per_seed, stats=stats)
        print(f"{name}: " + ", ".join(f"{title} {cell(stats[m])}" for m, (title, _) in METRICS.items()),
              flush=True)

    # Race-DiT Fig. 6 from the seed-0 race model.
    fig6 = None
    if "race" in configs:
        fig6, plot = race_fig6(args, code)
        shutil.copyfile(plot, args.docs / "ablation-race-experts-per-token.png")

    # The summary: JSON, tables, figures.
    runs = [s for c in configs.values() for s in c["seeds"].values()]
    summary = dict(
        settings=dict(steps=args.steps, batch_size=args.batch_size, ema_decay=args.ema_decay, seeds=seeds,
                      samples=args.samples, sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale,
                      log_every=log_every(args.steps), code=code,
                      recipe="train.py's defaults otherwise: AdamW lr 1e-3 constant, no weight decay, DDPM "
                             "(mse + vb, learned sigma), fp32, --device cpu",
                      data="the diffusion models train on the 1438 scikit-learn digits of train.py "
                           "--digits train; the classifier is an SVM fit on the other 359 (every 5th), "
                           "its ceiling measured on the 1438"),
        rule="std: sample standard deviation over seeds (n - 1). A claim holds on a metric when the "
             "difference of means is in its direction and larger than 2 standard errors, "
             "sqrt(sA^2/nA + sB^2/nB); it does not hold when as large the other way; else within noise.",
        reference=judge.reference,
        groups={g: dict(source=source, configs=names) for g, source, names in shown_groups(configs)},
        configs=configs, claims=judge_claims(configs), race_fig6=fig6,
        timing=dict(this_invocation_seconds=time.time() - t_start,
                    train_and_sample_seconds=sum(r["train_seconds"] + r["sample_seconds"] for r in runs)))
    (args.docs / "ablation.json").write_text(json.dumps(summary, indent=1))
    text = tables(summary)
    (args.docs / "ablation.md").write_text(text)
    plot_losses(curves, args.docs / "ablation-loss.png")
    samples_grid(grid_rows, args.docs / "ablation-samples.png")
    print("\n" + text)
    timing = summary["timing"]
    print(f"took {timing['this_invocation_seconds']:.0f} s (its runs, trained and sampled anew: "
          f"{timing['train_and_sample_seconds']:.0f} s); wrote ablation.json, ablation.md, "
          f"ablation-loss.png, ablation-samples.png"
          f"{', ablation-race-experts-per-token.png' if fig6 else ''} to {args.docs}")


if __name__ == "__main__":
    main()
