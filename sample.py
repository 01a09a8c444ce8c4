"""
Sample images from a DiT-MoE checkpoint: PNG grids, FID sample batches and the
routing analysis of the paper (Sec. 3.3, Figs. 5-7).

    python sample.py --ckpt results/latest/ema.pt                 # grid from the built-in digits model
    python sample.py --ckpt dit_moe_s_8E2A.pt --classes 207 360 88 --cfg-scale 4.0
    python sample.py --ckpt dit_moe_xl_8E2A.pt --vae PATH         # rectified flow: Euler, 50 steps
    torchrun --nproc_per_node=8 sample.py --ckpt dit_moe_s_8E2A.pt --num-fid-samples 50000 --cfg-scale 1.5
    python sample.py --ckpt ema.pt --routing-stats                # + routing counts and heatmaps

Image i is drawn with seed `--seed + i`: it depends only on its seed, its class and
the settings, never on the batch size or the number of GPUs. FID batches give
image i the class i % num_classes (exactly uniform when N divides), write chunk
files that an interrupted run skips when restarted with the same command, and end
in `<sample-dir>/<run>.npz` (ADM format, `arr_0` uint8 N x H x W x 3) for evaluate.py.

Tests: python -m pytest -q tests/test_sample.py
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import zipfile
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data import VAE, load_vae
from diffusion import create_objective
from model import CheckpointError, load
from train import setup_distributed  # one launcher for training and sampling

DIT_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's demo classes for ImageNet models


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample grids, FID batches and routing heatmaps from a DiT-MoE checkpoint.")
    p.add_argument("--ckpt", required=True, help="our checkpoint or ema.pt, or an official DiT-MoE .pt file")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="grid classes (columns); default: DiT's 8 demo classes for 1000-class models, else all")
    p.add_argument("--per-class", type=int, default=4, help="grid images per class (rows)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale; default 4.0 for grids (paper demo), 1.5 for FID batches (paper FID)")
    p.add_argument("--legacy-cfg", action="store_true",
                   help="guide only the first 3 channels like DiT and the official code (DiT issue #41)")
    p.add_argument("--sampler", default=None,
                   help="ddpm | ddim for DDPM checkpoints, euler for rectified flow; default ddpm / euler")
    p.add_argument("--num-sampling-steps", type=int, default=None,
                   help="default 250 for DDPM (paper), 50 for rectified flow (official demo)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward pass and process (also the FID chunk size); does not change the images")
    p.add_argument("--vae", default=VAE,
                   help="hub name or local folder of the SD VAE for latent models (paper: ft-ema)")
    p.add_argument("--out", default="sample.png", help="grid PNG; the settings go to the same name with .json")
    p.add_argument("--num-fid-samples", type=int, default=0,
                   help="write an FID batch of this many images instead of a grid (paper: 50000)")
    p.add_argument("--sample-dir", default="samples", help="FID batches: folder of the chunk files and the final .npz")
    p.add_argument("--routing-stats", action="store_true",
                   help="count expert choices per class, patch position and step; save .npz and 3 heatmap PNGs")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# One batch: per-sample noise, guidance, decoding
# ----------------------------------------------------------------------------

def per_sample_randn(seeds):
    """randn(like) for the samplers: row j comes from its own generator seeded seeds[j], so an image
    does not depend on its batch. Drawn on the CPU: the same noise on every device type."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda like: torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like.device, like.dtype)


def guided_model(net, y, cfg_scale, legacy_cfg=False, stats=None):
    """model_fn(x, t) for the samplers: classifier-free guidance (Ho & Salimans 2022) on labels y."""
    null = torch.full_like(y, net.cfg.num_classes)  # the null-class row of the label table

    def model_fn(x, t):
        if stats is not None:
            stats.step += 1  # one model call per sampling step in every sampler we use
        if cfg_scale == 1:  # guidance at scale 1 is the conditional model: skip the null half
            return net(x, t, y)
        out = net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]),
                                   cfg_scale, guided_channels=3 if legacy_cfg else None)
        return out[: len(x)]  # (N, 2C, H, W): guided prediction, conditional variance channels
    return model_fn


@torch.no_grad()
def sample_images(net, obj, args, indices, labels, vae=None, stats=None, progress=False):
    """uint8 images (N, H, W, 3) for global image indices (image i uses seed + i) and class labels."""
    cfg, device = net.cfg, net.pos_embed.device
    randn = per_sample_randn([args.seed + i for i in indices])
    noise = randn(torch.empty(len(indices), cfg.in_channels, cfg.input_size, cfg.input_size, device=device))
    y = torch.tensor(labels, device=device)
    if stats is not None:
        stats.labels, stats.step = y, -1
    model_fn = guided_model(net, y, args.cfg_scale, args.legacy_cfg, stats)
    x = obj.sample(model_fn, noise, sampler=args.sampler, num_steps=args.num_sampling_steps,
                   randn=randn, progress=progress)
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample  # SD: latents were scaled by 0.18215
    if not torch.isfinite(x).all():  # the official repo has NaN reports at XL: never write such images
        raise FloatingPointError(f"non-finite values in the samples of images {indices[0]}..{indices[-1]}; "
                                 "nothing was saved for them")
    if x.shape[1] == 1:  # grayscale digits: three equal channels, the layout evaluate.py reads
        x = x.expand(-1, 3, -1, -1)
    x = (127.5 * x + 128).clamp(0, 255).to(torch.uint8)  # exactly DiT's conversion, so FIDs compare
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (N, H, W, 3), C order as evaluate.py reads


def write_npz(path, arrays, shape):
    """Stream uint8 arrays, concatenated to `shape` (N, H, W, 3), into an uncompressed .npz as arr_0:
    50K images at 256px are 10 GB, which need not fit in memory. Written to a temporary file
    and renamed, so an interrupted write never leaves a truncated file behind."""
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
    with zipfile.ZipFile(path + ".tmp", "w") as zf, zf.open("arr_0.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)  # the .npy format that np.save writes
        rows = 0
        for arr in arrays:
            f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
            rows += len(arr)
    if rows != shape[0]:  # a chunk of the wrong size (edited by hand?): write nothing
        os.remove(path + ".tmp")
        sys.exit(f"error: {path} should hold {shape[0]} images, its chunks hold {rows}")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Routing statistics (paper Sec. 3.3, Figs. 5-7)
# ----------------------------------------------------------------------------

class RoutingStats:
    """Counts of expert choices of every MoE layer by class, patch position and sampling step.

    A forward pre-hook on each MoE layer re-runs its router on the layer's input. The hooks
    exist only with --routing-stats, so plain sampling runs no extra code. Counts are stored
    (L, X, E) with X the class, the position or the step (step 0 = the first, noisiest one).
    A resumed FID batch counts only the chunks sampled in this run.
    """

    def __init__(self, net, num_steps):
        self.layers = [i for i, block in enumerate(net.blocks) if hasattr(block, "moe")]
        cfg, L = net.cfg, len(self.layers)
        self.top_k = cfg.top_k
        zeros = partial(torch.zeros, dtype=torch.long, device=net.pos_embed.device)
        self.counts = {"class": zeros(L, cfg.num_classes, cfg.num_experts),
                       "position": zeros(L, cfg.num_tokens, cfg.num_experts),
                       "step": zeros(L, num_steps, cfg.num_experts)}
        self.labels, self.step = None, -1  # set per batch by sample_images and per call by model_fn
        self.handles = [net.blocks[i].moe.register_forward_pre_hook(partial(self.hook, l))
                        for l, i in enumerate(self.layers)]

    def hook(self, layer, moe, inputs):
        x = inputs[0]  # (N or 2N, T, D): the conditional half first when CFG doubles the batch
        N, T = len(self.labels), x.shape[1]
        # Route the whole batch with the layer's own (inference) rule, keep the conditional
        # images; race marks an unselected candidate pair with expert id E.
        token, expert = moe.route(x)[:2]
        keep = (token < N * T) & (expert < moe.num_experts)
        token, expert = token[keep], expert[keep]
        ones = torch.ones_like(expert)
        self.counts["class"][layer].index_put_((self.labels[token // T], expert), ones, accumulate=True)
        self.counts["position"][layer].index_put_((token % T, expert), ones, accumulate=True)
        self.counts["step"][layer, self.step].index_add_(0, expert, ones)

    def finish(self, prefix, rank, world):
        """Remove the hooks, sum the counts over processes; rank 0 writes <prefix>-routing.npz + 3 PNGs."""
        for handle in self.handles:
            handle.remove()
        if world > 1:
            for c in self.counts.values():
                dist.all_reduce(c)
        if rank != 0:
            return
        counts = {k: v.cpu().numpy() for k, v in self.counts.items()}
        np.savez(prefix + "-routing.npz", layers=np.array(self.layers), top_k=self.top_k,
                 **{f"by_{k}": v for k, v in counts.items()})
        for view, rows in (("class", "classes"), ("position", "patch positions"), ("step", "sampling steps")):
            heatmap(counts[view], self.layers, f"{prefix}-routing-{view}.png",
                    f"Expert share per {view}: rows = {rows} 0-{counts[view].shape[1] - 1}, "
                    f"columns = experts 0-{counts[view].shape[2] - 1}")
        print(f"wrote {prefix}-routing.npz and {prefix}-routing-{{class,position,step}}.png")


def heatmap(counts, layers, path, title):
    """counts (L, X, E) -> one PNG with a panel per layer, side by side. Colour: the share of a
    row's assignments that went to each expert, from white (the figure's minimum) to dark blue
    (its maximum): darker = chosen more often, as in the paper's figures."""
    total = counts.sum(-1, keepdims=True)  # (L, X, 1) assignments per row
    share = counts / np.maximum(total, 1)  # (L, X, E), rows sum to 1
    L, X, E = share.shape
    seen = np.broadcast_to(total > 0, share.shape)  # rows never sampled (e.g. classes) are grey
    vmin, vmax = (share[seen].min(), share[seen].max()) if seen.any() else (0.0, 1.0)
    level = (share - vmin) / max(vmax - vmin, 1e-12)  # stretched to the figure's range, for contrast
    white, blue = np.array([255.0, 255, 255]), np.array([8.0, 48, 107])
    rgb = (white + (blue - white) * level[..., None]).round().astype(np.uint8)  # (L, X, E, 3)
    rgb[~seen] = 200
    cw, ch, gap, top = 12, max(1, 256 // X), 12, 44  # short axes get taller cells, to stay readable
    font = ImageFont.load_default()
    title = f"{title}; white {vmin:.3f}, dark blue {vmax:.3f}, grey: none sampled"
    width = max(gap + L * (E * cw + gap), int(font.getlength(title)) + 2 * gap)
    img = Image.new("RGB", (width, top + X * ch + gap), "white")
    draw = ImageDraw.Draw(img)
    draw.text((gap, 6), title, fill="black", font=font)
    for l in range(L):
        x0 = gap + l * (E * cw + gap)
        img.paste(Image.fromarray(rgb[l]).resize((E * cw, X * ch), Image.NEAREST), (x0, top))
        draw.text((x0, top - 16), f"L{layers[l]}", fill="black", font=font)
    img.save(path)


# ----------------------------------------------------------------------------
# Grids and FID batches
# ----------------------------------------------------------------------------

def write_grid(images, rows, path):
    """(rows * cols, H, W, 3) uint8 -> one PNG, row-major, 2 px white gaps."""
    H = images.shape[1]
    scale = max(1, 64 // H)  # upscale tiny images (8x8 digits) so a viewer shows them at all
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    images = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)
    n, h, w, _ = images.shape
    grid = images.reshape(rows, n // rows, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, -1, 3)
    Image.fromarray(grid).save(path)


def run_grid(net, obj, args, vae, settings, stats):
    """Columns = classes, rows = --per-class images; writes <out>.png and <out>.json."""
    num_classes = net.cfg.num_classes
    classes = args.classes or (DIT_CLASSES if num_classes == 1000 else list(range(num_classes)))
    labels, B = classes * args.per_class, args.batch_size  # row r holds one image of every class
    images = np.concatenate([
        sample_images(net, obj, args, list(range(s, min(s + B, len(labels)))), labels[s: s + B], vae, stats, True)
        for s in range(0, len(labels), B)])
    prefix = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    write_grid(images, args.per_class, prefix + ".png")
    with open(prefix + ".json", "w") as f:
        json.dump(settings | {"classes": classes}, f, indent=2)
    print(f"wrote {prefix}.png and {prefix}.json")
    if stats is not None:
        stats.finish(prefix, rank=0, world=1)


def run_fid(net, obj, args, vae, settings, rank, world, stats):
    """Chunk c holds images c*B .. (c+1)*B - 1; process r samples chunks r, r + world, ... and skips
    those already on disk; rank 0 assembles <prefix>.npz in global image order."""
    num_samples, B, num_classes = args.num_fid_samples, args.batch_size, net.cfg.num_classes
    name = os.path.splitext(os.path.basename(args.ckpt))[0]
    prefix = os.path.join(args.sample_dir, f"{name}-{args.sampler}{args.num_sampling_steps}-cfg{args.cfg_scale}"
                                           f"{'-legacy' if args.legacy_cfg else ''}-seed{args.seed}")
    settings = {k: v for k, v in settings.items() if k not in ("classes", "per_class")}
    if os.path.exists(prefix + ".json"):  # resuming: the chunks on disk must come from these settings
        with open(prefix + ".json") as f:
            if json.load(f) != settings:
                sys.exit(f"error: {prefix} holds samples made with other settings (see {prefix}.json); "
                         "resume with the same command, or use another --sample-dir")
    if world > 1:
        dist.barrier()  # every rank has read the old settings before rank 0 rewrites them
    os.makedirs(prefix, exist_ok=True)
    if rank == 0:
        with open(prefix + ".json", "w") as f:
            json.dump(settings, f, indent=2)
    num_chunks = math.ceil(num_samples / B)
    chunk = lambda c: os.path.join(prefix, f"chunk{c:05d}.npz")
    for c in tqdm(range(rank, num_chunks, world), disable=rank != 0, desc="chunks"):
        if os.path.exists(chunk(c)):
            continue  # written by an interrupted earlier run
        indices = list(range(c * B, min(num_samples, (c + 1) * B)))
        images = sample_images(net, obj, args, indices, [i % num_classes for i in indices], vae, stats)
        write_npz(chunk(c), [images], images.shape)
    if stats is not None:  # its collectives first: rank 0's assembly below may take minutes
        stats.finish(prefix, rank, world)
    if world > 1:
        dist.barrier()
    if rank == 0:
        shape = (num_samples, *np.load(chunk(0))["arr_0"].shape[1:])
        write_npz(prefix + ".npz", (np.load(chunk(c))["arr_0"] for c in range(num_chunks)), shape)
        print(f"wrote {prefix}.npz: {num_samples} images of {shape[1]}x{shape[2]}")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    fid = args.num_fid_samples > 0
    steps_ok = args.num_sampling_steps is None or args.num_sampling_steps > 0
    if min(args.batch_size, args.per_class) < 1 or args.num_fid_samples < 0 or not steps_ok:
        sys.exit("error: --batch-size, --per-class and --num-sampling-steps must be positive, "
                 "--num-fid-samples non-negative")
    rank, world, device = setup_distributed()
    if world > 1 and not fid:
        sys.exit("error: torchrun is for FID batches (--num-fid-samples); sample grids with plain python")
    try:
        net = load(args.ckpt, device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    cfg = net.cfg
    if not fid and any(not 0 <= c < cfg.num_classes for c in args.classes or []):
        sys.exit(f"error: class labels must be in 0..{cfg.num_classes - 1} for this model, got {args.classes}")
    try:
        args.num_sampling_steps = args.num_sampling_steps or create_objective(cfg.objective).default_steps
        obj = create_objective(cfg.objective, args.num_sampling_steps)
    except ValueError as e:
        sys.exit(f"error: {e}")
    args.sampler = args.sampler or obj.samplers[0]
    if args.sampler not in obj.samplers:
        sys.exit(f"error: sampler {args.sampler!r} does not fit this {cfg.objective} checkpoint; "
                 f"valid: {', '.join(obj.samplers)}")
    args.cfg_scale = args.cfg_scale if args.cfg_scale is not None else (1.5 if fid else 4.0)
    if args.routing_stats and not cfg.num_experts:
        sys.exit("error: --routing-stats needs an MoE model; this checkpoint is a dense DiT")
    stats = RoutingStats(net, args.num_sampling_steps) if args.routing_stats else None
    vae = load_vae(args.vae, device) if cfg.latent_space else None  # pixel models skip the VAE

    # Every setting that decides the images goes into a JSON next to them.
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sample_dir", "routing_stats")}
    settings |= {"model": dataclasses.asdict(cfg), "vae": args.vae if vae is not None else None}
    if rank == 0:
        print(f"{args.ckpt}: {cfg.objective}, {args.sampler} {args.num_sampling_steps} steps, "
              f"cfg {args.cfg_scale}, {world} process(es) on {device}")
    try:
        if fid:
            run_fid(net, obj, args, vae, settings, rank, world, stats)
        else:
            run_grid(net, obj, args, vae, settings, stats)
    except FloatingPointError as e:
        sys.exit(f"error: {e}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
