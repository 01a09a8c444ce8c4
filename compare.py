"""
Dense vs token choice vs expert choice vs Expert Race at equal active compute, on the digits.

    python compare.py                 # 4 runs of train.py + evaluation (2-core CPU: ~30 minutes)
    python compare.py --steps 100     # a quick look

Every run trains with train.py's demo defaults (batch 128, lr 1e-3, EMA 0.995) for the same
number of steps; only the MLP differs. T/2-4E2A activates K = 2 SwiGLU experts of width 4D plus
the shared expert of width 2D: 30 D^2 multiply-adds per token, which the dense T/2 matches with
a GELU MLP of width 15D (mlp_ratio = 15). Reported per run:
  - the final training loss (mean of the last logged steps),
  - class accuracy: an SVM trained on the real digits labels 500 guided samples (cfg 1.5),
  - FD: the Frechet distance between those samples and the real digits in pixel space (64-d),
  - MaxVio (Race-DiT): max expert load / mean load - 1, averaged over layers (last log record),
  - combination usage (Race-DiT Fig. 13) of the EMA model's routing on noised real digits.
Writes results/compare/summary.json, loss.png (training curves) and samples.png (a row per run).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import load_digits
from diffusion import create_objective
from evaluate import frechet_distance
from checkpoint import load_model
from model import count
from moe import assignment_mask, combination_usage
from sample import sample_images, write_grid

RUNS = {  # name: train.py flags
    "dense": ["--model", "T/2", "--set", "mlp_ratio=15"],
    "token choice": ["--model", "T/2-4E2A", "--set", "router=token"],
    "expert choice": ["--model", "T/2-4E2A", "--set", "router=expert"],
    "expert race": ["--model", "T/2-4E2A", "--set", "router=race", "--set", "layer_reg=0.1"],
}
COLORS = [(80, 80, 80), (31, 119, 180), (44, 160, 44), (214, 39, 40)]


@torch.no_grad()
def routing_usage(net, x0):
    """Mean combination usage over layers of the EMA model routing noised real digits."""
    obj, usages = create_objective(net.cfg.objective), []
    hooks = [b.moe.register_forward_pre_hook(lambda m, inp: usages.append(combination_usage(
        assignment_mask(*m.route(inp[0])[:2], inp[0].shape[0] * inp[0].shape[1], m.num_experts))))
        for b in net.blocks if hasattr(b, "moe")]
    t, x_t, _ = obj.training_inputs(x0)
    net(x_t, t, torch.randint(0, 10, (len(x0),)))
    for h in hooks:
        h.remove()
    return float(np.mean(usages)) if usages else float("nan")


def plot_losses(curves, path, size=(640, 400), pad=50):
    """Training loss against step, one line per run, drawn with PIL (log-scaled loss axis)."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps = [s for c in curves.values() for s, _ in c]
    losses = np.log10([v for c in curves.values() for _, v in c])
    lo, hi, smax = losses.min(), losses.max(), max(steps)
    xy = lambda s, v: (pad + (size[0] - 2 * pad) * s / smax,
                       size[1] - pad - (size[1] - 2 * pad) * (np.log10(v) - lo) / (hi - lo + 1e-9))
    d.rectangle([pad, pad, size[0] - pad, size[1] - pad], outline="black")
    for k, (name, curve) in enumerate(curves.items()):
        d.line([xy(s, v) for s, v in curve], fill=COLORS[k], width=2)
        d.text((size[0] - pad - 120, pad + 8 + 14 * k), name, fill=COLORS[k])
    d.text((pad, size[1] - pad + 8), f"step 0 .. {smax}", fill="black")
    d.text((pad, 10), f"training loss (log scale {10 ** lo:.3f} .. {10 ** hi:.3f})", fill="black")
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps per run (the README's table)")
    p.add_argument("--out", default="results/compare", help="folder for the runs and the summary")
    p.add_argument("--samples", type=int, default=500, help="guided samples per run for accuracy and FD")
    args = p.parse_args()
    out = Path(args.out)
    digits = load_digits().tensors
    real = digits[0].flatten(1).double().numpy()  # (1797, 64) pixels in [-1, 1]
    from sklearn.svm import SVC
    classifier = SVC().fit(real, digits[1].numpy())

    summary, curves, rows = {}, {}, []
    for name, flags in RUNS.items():
        results = out / name.replace(" ", "-")
        cmd = [sys.executable, "train.py", *flags, "--max-steps", str(args.steps), "--log-every", "25",
               "--ckpt-every", str(args.steps), "--results-dir", str(results)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        log = [json.loads(line) for line in (results / "latest" / "log.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["loss"]) for r in log]
        net = load_model(results / "latest" / "ema.pt")
        labels = [i % 10 for i in range(args.samples)]
        images = sample_images(net, create_objective(net.cfg.objective), range(args.samples), labels, seed=0,
                               cfg_scale=1.5, num_steps=250)
        pixels = images[..., 0].reshape(len(images), -1) / 127.5 - 128 / 127.5  # back to [-1, 1]
        stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (pixels, real)]
        summary[name] = dict(
            final_loss=float(np.mean([r["loss"] for r in log[-4:]])),
            class_accuracy=float((classifier.predict(pixels) == np.array(labels)).mean()),
            fd_pixels=frechet_distance(*stats[0], *stats[1]),
            maxvio=log[-1].get("maxvio", 0.0), combination_usage=routing_usage(net, digits[0][:256]),
            gflops_per_image=count(net.cfg)[2], train_seconds=sum(25 / r["steps_per_s"] for r in log))
        rows.append(images[:20])
        print(name, summary[name], flush=True)
    plot_losses(curves, out / "loss.png")
    write_grid(np.concatenate(rows), len(rows), out / "samples.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'run':<14} {'loss':>7} {'accuracy':>9} {'FD':>7} {'MaxVio':>7} {'comb':>6}")
    for name, s in summary.items():
        print(f"{name:<14} {s['final_loss']:>7.4f} {s['class_accuracy']:>9.3f} {s['fd_pixels']:>7.3f} "
              f"{s['maxvio']:>7.3f} {s['combination_usage']:>6.3f}")
    print(f"wrote {out}/summary.json, loss.png, samples.png")


if __name__ == "__main__":
    main()
