r"""
Sample images from a DiT-MoE checkpoint: PNG grids, FID sample batches and the
routing analysis of the paper (Sec. 3.3, Figs. 5-7; Race-DiT Fig. 6).

    python sample.py --ckpt results/latest/ema.pt          # grid from the built-in digits model
    python sample.py --ckpt dit_moe_s_8E2A.pt --classes 207 360 88 --cfg-scale 4.0
    python sample.py --ckpt dit_moe_xl_8E2A.pt --vae PATH  # rectified flow: Euler, 50 steps
    python sample.py --ckpt DiT-XL-2-256x256.pt            # DiT's released dense model
    torchrun --nproc_per_node=8 sample.py --ckpt dit_moe_s_8E2A.pt --num-fid-samples 50000 \
        --cfg-scale 1.5
    python sample.py --ckpt ema.pt --routing-stats         # + routing counts and heatmaps

Image i is drawn with seed `--seed + i`: it depends only on its seed, its class and
the settings, never on the batch size or the number of GPUs. FID batches give
image i the class i % num_classes (exactly uniform when N divides), write chunk
files that an interrupted run skips when restarted with the same command, and end
in `<sample-dir>/<run>.npz` (ADM format, `arr_0` uint8 N x H x W x 3) for evaluate.py.
On a GPU the network runs in bf16 (weights stored bf16: G/2-16E2A takes 33 GB) under
autocast, the sampler's arithmetic and the VAE in fp32; on a CPU everything is fp32.

Tests: python -m pytest -q tests/test_sample.py
"""
import launch  # noqa: I001  first import: the OpenMP wait policy must be set before torch loads

import dataclasses
import json
import math
import os
import zipfile
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from checkpoint import CheckpointError, load_model
from data import VAE, DataError, load_vae
from diffusion import create_objective
from launch import fail, nonnegative_int, positive_int

DIT_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's demo classes for ImageNet models
# images per VAE decode: the decoder's fp32 activations at 256 px are ~0.2 GB an image
VAE_CHUNK = 8


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = launch.Parser(
        description="Sample grids, FID batches and routing heatmaps from a DiT-MoE checkpoint.")
    add = p.add_argument
    add("--ckpt", required=True,
        help="our checkpoint or ema.pt, an official DiT-MoE or a DiT .pt file")
    add("--classes", type=nonnegative_int, nargs="+", default=None,
        help="grid classes (columns); default: DiT's 8 demo classes for 1000-class models, "
             "else all")
    add("--per-class", type=positive_int, default=4, help="grid images per class (rows)")
    add("--cfg-scale", type=launch.nonnegative_float, default=None,
        help="guidance scale; default 4.0 for grids (paper demo), 1.5 for FID batches (paper FID)")
    add("--legacy-cfg", action="store_true",
        help="exactly as the official code for the checkpoint's objective: DDPM guides only "
             "the first 3 latent channels, as DiT (DiT issue #41); the official rectified-flow "
             "sampler guides all, so for rf checkpoints this changes nothing")
    add("--sampler", default=None,
        help="ddpm | ddim for DDPM checkpoints, euler for rectified flow; default ddpm / euler")
    add("--num-sampling-steps", type=positive_int, default=None,
        help="default 250 for DDPM (paper), 50 for rectified flow (official demo)")
    add("--seed", type=nonnegative_int, default=0, help="image i is drawn with seed + i")
    add("--batch-size", type=positive_int, default=32,
        help="images per forward pass and process (also the FID chunk size); "
             "does not change the images")
    add("--vae", default=VAE,
        help="hub name or local folder of the SD VAE for latent models (paper: ft-ema)")
    add("--out", default="results/sample.png",
        help="grid PNG; the settings go to the same name with .json, routing figures to "
             "<name>-routing-*")
    add("--num-fid-samples", type=nonnegative_int, default=0,
        help="write an FID batch of this many images instead of a grid (paper: 50000)")
    add("--sample-dir", default="samples",
        help="FID batches: folder of the chunk files and the final .npz")
    add("--routing-stats", action="store_true",
        help="count expert choices per class, patch position and step; save .npz and the "
             "heatmap PNGs")
    launch.add_device_flags(p, "the network's weights and matmuls: default bf16 on GPU "
                               "(the fast grouped GEMM), fp32 on CPU")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# One batch: per-sample noise, guidance, decoding
# ----------------------------------------------------------------------------

def per_sample_randn(seeds):
    """randn(like) for the samplers: row j comes from its own generator seeded seeds[j], so an image
    does not depend on its batch. Drawn on the CPU: the same noise on every device type; copied
    from pinned memory without blocking, so a GPU never waits for the host."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def randn(like):
        # (N, C, H, W): row j from generator j
        noise = torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens])
        if like.device.type == "cuda":
            noise = noise.pin_memory()
        return noise.to(like.device, like.dtype, non_blocking=True)
    return randn


def guided_model(net, y, cfg_scale, guided_channels=None, bf16=False):
    """model_fn(x, t) for the samplers: classifier-free guidance (Ho & Salimans 2022) on labels y,
    the network under bf16 autocast or not, its output in float32 for the sampler's arithmetic."""
    null = torch.full_like(y, net.cfg.num_classes)  # the null-class row of the label table
    both = torch.cat([y, null])

    def model_fn(x, t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if cfg_scale == 1:  # guidance at scale 1 is the conditional model: skip the null half
                return net(x, t, y).float()
            out = net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), both, cfg_scale,
                                       guided_channels)
        # (N, 2C, H, W): guided prediction, conditional variance channels
        return out[: len(x)].float()
    return model_fn


@torch.no_grad()
def sample_images(net, obj, indices, labels, seed=0, cfg_scale=4.0, guided_channels=None,
                  sampler=None, num_steps=None, bf16=False, vae=None, stats=None, progress=False):
    """uint8 images (N, H, W, 3) for global image indices (image i uses seed + i) and class labels.
    stats: a RoutingStats that watches the model calls."""
    cfg = net.cfg
    device = net.pos_embed.device
    randn = per_sample_randn([seed + i for i in indices])
    noise = randn(torch.empty(len(indices), cfg.in_channels, cfg.input_size, cfg.input_size,
                              device=device))
    y = torch.tensor(labels, device=device)
    model_fn = guided_model(net, y, cfg_scale, guided_channels, bf16)
    if stats is not None:
        model_fn = stats.watch(model_fn, y)
    x = obj.sample(model_fn, noise, sampler=sampler, num_steps=num_steps, randn=randn,
                   progress=progress)
    if vae is not None:  # SD: latents were scaled by 0.18215; decoded a few images at a time
        x = torch.cat([vae.decode(z / vae.config.scaling_factor).sample
                       for z in x.split(VAE_CHUNK)])
    # the official repo has NaN reports at XL: never write such images
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite values in the samples of images "
                                 f"{indices[0]}..{indices[-1]}; nothing was saved for them")
    if x.shape[1] == 1:  # grayscale digits: three equal channels, the layout evaluate.py reads
        x = x.expand(-1, 3, -1, -1)
    x = (127.5 * x + 128).clamp(0, 255).to(torch.uint8)  # exactly DiT's conversion, so FIDs compare
    # (N, H, W, 3), C order as evaluate.py reads
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def write_npz(path, arrays, shape):
    """Stream uint8 arrays, concatenated to `shape` (N, H, W, 3), into an uncompressed .npz as
    arr_0: 50K images at 256px are 10 GB, which need not fit in memory. Written to a temporary
    file and renamed, so an interrupted write never leaves a truncated file behind."""
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
    with (zipfile.ZipFile(path + ".tmp", "w") as zf,
          zf.open("arr_0.npy", "w", force_zip64=True) as f):
        np.lib.format.write_array_header_1_0(f, header)  # the .npy format that np.save writes
        rows = 0
        for arr in arrays:
            f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
            rows += len(arr)
    if rows != shape[0]:  # a chunk of the wrong size (edited by hand?): write nothing
        os.remove(path + ".tmp")
        fail(f"{path} should hold {shape[0]} images, its chunks hold {rows}")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Routing statistics (DiT-MoE Sec. 3.3, Figs. 5-7; Race-DiT Fig. 6)
# ----------------------------------------------------------------------------

class RoutingStats:
    """Counts of expert choices of every MoE layer by class, patch position and sampling step.

    watch() wraps the model function to know the step and the labels; a forward pre-hook on
    each MoE layer re-runs its router on the layer's input. Nothing of this runs without
    --routing-stats. Counts are (L, X, E) with X the class, the position or the step (step 0 =
    the first, noisiest one); tokens[s] counts the tokens routed at step s, so counts / tokens is
    the number of experts per token (fixed K for token choice, variable for Expert Race).
    A resumed FID batch counts only the chunks sampled in this run.
    """

    def __init__(self, net, num_steps):
        self.layers = [i for i, block in enumerate(net.blocks) if hasattr(block, "moe")]
        cfg = net.cfg
        L = len(self.layers)
        self.top_k = cfg.top_k
        zeros = partial(torch.zeros, dtype=torch.long, device=net.pos_embed.device)
        self.counts = {"class": zeros(L, cfg.num_classes, cfg.num_experts),
                       "position": zeros(L, cfg.num_tokens, cfg.num_experts),
                       "step": zeros(L, num_steps, cfg.num_experts)}
        self.tokens = zeros(num_steps)
        self.labels = None  # set by watch(), per batch
        self.step = -1      # advanced by every model call: one per sampling step in our samplers
        self.handles = [net.blocks[i].moe.register_forward_pre_hook(partial(self.hook, l))
                        for l, i in enumerate(self.layers)]

    def watch(self, model_fn, labels):
        self.labels = labels
        self.step = -1

        def counted(x, t):
            self.step += 1
            return model_fn(x, t)
        return counted

    def hook(self, layer, moe, inputs):
        x = inputs[0]  # (N or 2N, T, D): the conditional half first when CFG doubles the batch
        N = len(self.labels)
        T = x.shape[1]
        # Route the whole batch with the layer's own (inference) rule; count the conditional images
        # only, and not race's unselected candidates (expert id E): with weight 0 rather than by
        # boolean indexing, which would wait for the GPU to know how many remain.
        token, expert = moe.route(x)[:2]
        keep = ((token < N * T) & (expert < moe.num_experts)).long()
        token = token.clamp(max=N * T - 1)
        expert = expert.clamp(max=moe.num_experts - 1)
        self.counts["class"][layer].index_put_((self.labels[token // T], expert), keep,
                                               accumulate=True)
        self.counts["position"][layer].index_put_((token % T, expert), keep, accumulate=True)
        self.counts["step"][layer, self.step].index_add_(0, expert, keep)
        if layer == 0:
            self.tokens[self.step] += N * T

    def finish(self, prefix, rank, world):
        """Remove the hooks, sum the counts over processes; rank 0 writes <prefix>-routing.npz, the
        three heatmaps and, with several experts per token possible (race), the
        experts-per-token plot."""
        for handle in self.handles:
            handle.remove()
        if world > 1:
            for c in [*self.counts.values(), self.tokens]:
                dist.all_reduce(c)
        if rank != 0:
            return
        counts = {k: v.cpu().numpy() for k, v in self.counts.items()}
        tokens = self.tokens.cpu().numpy()
        per_token = counts["step"].sum(-1) / np.maximum(tokens, 1)  # (L, S) experts per token
        np.savez(prefix + "-routing.npz", layers=np.array(self.layers), top_k=self.top_k,
                 tokens=tokens, experts_per_token=per_token,
                 **{f"by_{k}": v for k, v in counts.items()})
        rows = {"class": "class", "position": "patch position (row-major)",
                "step": "sampling step (0 = noise)"}
        for view, label in rows.items():
            heatmap(counts[view], self.layers, f"{prefix}-routing-{view}.png", label)
        line_plot(per_token, self.layers, f"{prefix}-routing-experts-per-token.png")
        print(f"wrote {prefix}-routing.npz and "
              f"{prefix}-routing-{{class,position,step,experts-per-token}}.png")


# colours of a cell: an expert's share of a row relative to even use (share x E), one fixed scale
RED = np.array((178, 24, 43), dtype=float)
WHITE = np.array((255, 255, 255), dtype=float)
BLUE = np.array((8, 48, 107), dtype=float)
GREY = np.array((200,) * 3, dtype=float)


def share_colours(counts):
    """counts (L, X, E) -> RGB (L, X, E, 3) on a fixed scale shared by every figure: a cell is an
    expert's share of its row's assignments times E, so 1 is even use (white), 0 never (red),
    2 or more twice the even share (dark blue); rows never sampled are grey."""
    total = counts.sum(-1, keepdims=True)  # (L, X, 1)
    relative = counts / np.maximum(total, 1) * counts.shape[-1]
    low = np.clip(relative, 0, 1)[..., None]
    high = np.clip(relative - 1, 0, 1)[..., None]
    rgb = np.where(relative[..., None] < 1, RED + (WHITE - RED) * low,
                   WHITE + (BLUE - WHITE) * high)
    rgb[np.broadcast_to(total == 0, relative.shape)] = GREY
    return rgb.round().astype(np.uint8)


def heatmap(counts, layers, path, row_label):
    """counts (L, X, E) -> one PNG, a panel per layer side by side: rows = X (labelled on the left),
    columns = experts, colours as share_colours; the legend sits under the panels."""
    rgb = share_colours(counts)
    L, X, E, _ = rgb.shape
    font = ImageFont.load_default()
    cw = 12                # cell width, pixels
    ch = max(2, 256 // X)  # cell height: short axes get taller cells, to stay readable
    gap = 12               # between panels
    left = 44              # margins: row ticks on the left, layer names on top
    top = 36
    width = left + L * (E * cw + gap)
    legend = ["colour: expert's share of the row x E:", "red 0 (never), white 1 (even), blue >= 2",
              "grey: no samples"]
    img = Image.new("RGB", (max(width, 260), top + X * ch + 20 + 12 * len(legend)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), f"rows: {row_label}, columns: experts", fill="black", font=font)
    for x in sorted({0, X // 2, X - 1}):  # row ticks
        draw.text((4, top + x * ch + max(ch // 2 - 5, 0)), str(x), fill="black", font=font)
    for l in range(L):
        x0 = left + l * (E * cw + gap)
        img.paste(Image.fromarray(rgb[l]).resize((E * cw, X * ch), Image.NEAREST), (x0, top))
        draw.text((x0, top - 14), f"L{layers[l]}", fill="black", font=font)
    for i, line in enumerate(legend):
        draw.text((4, top + X * ch + 6 + 12 * i), line, fill="black", font=font)
    img.save(path)


def line_plot(per_token, layers, path, size=(420, 260), pad=40):
    """Experts per token (L, S) against the sampling step (Race-DiT Fig. 6), a line per layer."""
    L, S = per_token.shape
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w = size[0] - 2 * pad
    h = size[1] - 2 * pad
    top = max(per_token.max() * 1.1, 1e-6)
    to_xy = lambda s, v: (pad + w * s / max(S - 1, 1), pad + h * (1 - v / top))
    draw.rectangle((pad, pad, pad + w, pad + h), outline="black")
    for l in range(L):
        shade = tuple(int(c) for c in WHITE + (BLUE - WHITE) * (0.3 + 0.7 * l / max(L - 1, 1)))
        draw.line([to_xy(s, per_token[l, s]) for s in range(S)], fill=shade, width=2)
    draw.text((pad, 8), f"experts per token by sampling step, layers {layers[0]} (light) .. "
                        f"{layers[-1]} (dark)", fill="black")
    draw.text((pad - 30, pad - 6), f"{top:.2f}", fill="black")
    draw.text((pad - 30, pad + h - 6), "0", fill="black")
    draw.text((pad, pad + h + 6), "step 0 (noise)", fill="black")
    draw.text((pad + w - 60, pad + h + 6), f"step {S - 1}", fill="black")
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
    grid = (images.reshape(rows, n // rows, h, w, 3).transpose(0, 2, 1, 3, 4)
            .reshape(rows * h, -1, 3))
    Image.fromarray(grid).save(path)


def run_grid(draw, classes, per_class, batch_size, out, settings, stats):
    """Columns = classes, rows = per_class images; writes <out>.png and <out>.json. draw(indices,
    labels) samples one batch: sample_images with the run's settings."""
    labels = classes * per_class  # row r holds one image of every class
    starts = range(0, len(labels), batch_size)
    images = np.concatenate([draw(list(range(s, min(s + batch_size, len(labels)))),
                                  labels[s: s + batch_size], progress=True) for s in starts])
    prefix = os.path.splitext(out)[0]
    write_grid(images, per_class, prefix + ".png")
    with open(prefix + ".json", "w") as f:
        json.dump(settings | {"classes": classes}, f, indent=2)
    print(f"wrote {prefix}.png and {prefix}.json")
    if stats is not None:
        stats.finish(prefix, rank=0, world=1)


def run_fid(draw, num_samples, num_classes, batch_size, prefix, settings, rank, world, stats):
    """Chunk c holds images c*B .. (c+1)*B - 1; process r samples chunks r, r + world, ... and skips
    those already on disk; rank 0 assembles <prefix>.npz in global image order."""
    settings = {k: v for k, v in settings.items() if k not in ("classes", "per_class")}
    # resuming: the chunks on disk must come from these settings
    if os.path.exists(prefix + ".json"):
        with open(prefix + ".json") as f:
            if json.load(f) != settings:
                fail(f"{prefix} holds samples made with other settings (see {prefix}.json); "
                     "resume with the same command, or use another --sample-dir")
    if world > 1:
        dist.barrier()  # every rank has read the old settings before rank 0 rewrites them
    os.makedirs(prefix, exist_ok=True)
    if rank == 0:
        with open(prefix + ".json", "w") as f:
            json.dump(settings, f, indent=2)
    num_chunks = math.ceil(num_samples / batch_size)
    chunk = lambda c: os.path.join(prefix, f"chunk{c:05d}.npz")
    for c in tqdm(range(rank, num_chunks, world), disable=rank != 0, desc="chunks"):
        if os.path.exists(chunk(c)):
            continue  # written by an interrupted earlier run
        indices = list(range(c * batch_size, min(num_samples, (c + 1) * batch_size)))
        images = draw(indices, [i % num_classes for i in indices])
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

def settle_for(cfg, args, fid):
    """Check args against this checkpoint before any work (class labels, routing statistics,
    sampler) and fill in the defaults left unset (steps, sampler, guidance scale). Returns the
    checkpoint's objective."""
    if not fid and any(not 0 <= c < cfg.num_classes for c in args.classes or []):
        fail(f"class labels must be in 0..{cfg.num_classes - 1} for this model, got {args.classes}")
    obj = create_objective(cfg.objective)
    args.num_sampling_steps = args.num_sampling_steps or obj.default_steps
    if cfg.objective == "ddpm":
        try:  # the respaced schedule, made now: a count no sampler can run is refused here
            obj.schedule(args.num_sampling_steps)
        except ValueError as e:
            fail(f"--num-sampling-steps {args.num_sampling_steps}: {e}")
    args.sampler = args.sampler or obj.samplers[0]
    if args.sampler not in obj.samplers:
        fail(f"sampler {args.sampler!r} does not fit this {cfg.objective} checkpoint; "
             f"valid: {', '.join(obj.samplers)}")
    if args.cfg_scale is None:
        args.cfg_scale = 1.5 if fid else 4.0
    if args.routing_stats and not cfg.num_experts:
        fail("--routing-stats needs an MoE model; this checkpoint is a dense DiT")
    return obj


def main(argv=None):
    args = parse_args(argv)
    fid = args.num_fid_samples > 0
    launch.writable_dir(args.sample_dir if fid else os.path.dirname(args.out) or ".")
    rank, world, device = launch.setup(args.device)
    if world > 1 and not fid:
        fail("torchrun is for FID batches (--num-fid-samples); sample grids with plain python")
    bf16 = launch.bf16_default(device, args.precision)
    try:
        net = load_model(args.ckpt, device, torch.bfloat16 if bf16 else torch.float32)
    except CheckpointError as e:
        fail(e)
    cfg = net.cfg
    obj = settle_for(cfg, args, fid)
    stats = RoutingStats(net, args.num_sampling_steps) if args.routing_stats else None
    try:
        vae = load_vae(args.vae, device) if cfg.latent_space else None  # pixel models skip the VAE
    except DataError as e:
        fail(e)

    # Every setting that decides the images goes into a JSON next to them.
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "sample_dir", "routing_stats", "device")}
    settings |= {"model": dataclasses.asdict(cfg), "vae": args.vae if vae is not None else None}
    # --legacy-cfg: the official DDPM path guides channels 0-2 only, its rectified-flow path all
    guided_channels = 3 if args.legacy_cfg and cfg.objective == "ddpm" else None
    draw = partial(sample_images, net, obj, seed=args.seed, cfg_scale=args.cfg_scale,
                   guided_channels=guided_channels, sampler=args.sampler,
                   num_steps=args.num_sampling_steps, bf16=bf16, vae=vae, stats=stats)
    if rank == 0:
        print(f"{args.ckpt}: {cfg.objective}, {args.sampler} {args.num_sampling_steps} steps, "
              f"cfg {args.cfg_scale}, {'bf16' if bf16 else 'fp32'}, "
              f"{world} process(es) on {device}")
    try:
        if fid:
            name = os.path.splitext(os.path.basename(args.ckpt))[0]
            prefix = os.path.join(args.sample_dir,
                                  f"{name}-{args.sampler}{args.num_sampling_steps}"
                                  f"-cfg{args.cfg_scale}{'-legacy' if args.legacy_cfg else ''}"
                                  f"-seed{args.seed}")
            run_fid(draw, args.num_fid_samples, cfg.num_classes, args.batch_size, prefix, settings,
                    rank, world, stats)
        else:
            num_classes = cfg.num_classes
            classes = args.classes or (DIT_CLASSES if num_classes == 1000
                                       else list(range(num_classes)))
            run_grid(draw, classes, args.per_class, args.batch_size, args.out, settings, stats)
    except FloatingPointError as e:
        fail(e)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
