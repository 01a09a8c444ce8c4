r"""
Train DiT-MoE: a single process (CPU or one GPU), or torchrun over any number of
GPUs and nodes, data-parallel (DDP) or sharded with FSDP2 when weights, gradients,
AdamW state and EMA would not fit on one GPU.

    # the demo: the tiny MoE on the 8x8 digits that ship with scikit-learn (CPU, ~5 minutes)
    python train.py
    python sample.py --ckpt results/latest/ema.pt

    # ImageNet 256, the paper's recipe (AdamW 1e-4 constant, no weight decay, EMA 0.9999,
    # batch 1024). Encode the images once into latent shards, both flips kept, then train:
    torchrun --nproc_per_node=8 train.py --extract-latents --data-path /data/imagenet/train \
        --latents-path /data/in256
    torchrun --nproc_per_node=8 train.py --model S/2-8E2A --latents-path /data/in256 --global-batch-size 1024 \
        --lr 1e-4 --ema-decay 0.9999 --max-steps 500000 --ckpt-every 50000
    # (or encode on the fly with --data-path /data/imagenet/train --image-size 256 instead of --latents-path)

    # two nodes of 8 GPUs: the same command on each node, NODE = 0 or 1, HOST = node 0's address
    torchrun --nnodes=2 --node_rank=$NODE --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HOST:29500 \
        train.py --model XL/2-8E2A --objective rf --latents-path /data/in256 --global-batch-size 1024 ...

    # continue a run: the same flags plus the run folder (its newest checkpoint) or a checkpoint file
    python train.py --resume results/latest

Randomness: the draws of a micro-batch (t, noise, label dropout, flips) are seeded by
(global seed, step, micro-batch index), and micro-batch g always holds the same
images. A run depends on its number of micro-batches per step, not on how they are
spread over processes, and it resumes exactly without saving RNG states.

Tests: python -m pytest -q tests/test_train.py
"""
import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import re
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from data import VAE, extract_latents, fail, setup_data
from diffusion import OBJECTIVES, create_objective
from model import DiT, DiTConfig, config_from_name
from moe import ROUTERS, max_violation

# ----------------------------------------------------------------------------
# Distribution, EMA, seeds
# ----------------------------------------------------------------------------

def keep_freed_memory():
    """CPU training on Linux: glibc returns every freed block over 32 MB to the OS, and the next step
    faults it back in page by page (~200k faults per S/2-8E2A step, 15-20% of its time). Raising the
    mmap and trim thresholds (mallopt codes -3 and -1) keeps those blocks for reuse."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give memory back only past 1 GB free at the top


def setup_distributed():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process."""
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    # the device comes from the LOCAL rank: the global rank names no GPU on the second node
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    if "RANK" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, max(world, 1), device


def shard(net, bf16):
    # FSDP2: each block is one all-gather unit (its full weights exist only while it runs); the root
    # holds embedders and final layer. Master weights stay fp32; with bf16 the gathered copies and
    # the compute are bf16, gradients are reduced in fp32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in net.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)


@torch.no_grad()
def update_ema(ema, model, decay):
    # ema <- decay * ema + (1 - decay) * model over parameters only (the fixed position table is a
    # buffer). Sharded, each rank updates its own shards: the same arithmetic, element by element.
    local = lambda net: [p.to_local() if isinstance(p, DTensor) else p for p in net.parameters()]
    torch._foreach_lerp_(local(ema), local(model), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):  # running statistics (race thresholds): copied
        b_ema.copy_(b)


def memory_estimate(n_params, world, sharded):
    # fp32 bytes per parameter: weights 4, gradients 4, AdamW moments 8, EMA 4 (activations excluded)
    return {k: b * n_params / (world if sharded else 1) / 1e9
            for k, b in (("weights", 4), ("grads", 4), ("AdamW", 8), ("EMA", 4))}


def summarize(sums, load, world, steps, seconds, args, device):
    """The log record: loss means over the steps since the last one and all processes (one
    all-reduce), speed, peak memory, and each layer's smallest and largest share of assignments."""
    flat = torch.cat([torch.stack(list(sums.values())), load.flatten()])
    if world > 1:
        dist.all_reduce(flat)
    flat = flat.cpu() / world
    share = flat[len(sums):].view(load.shape)  # (L, E)
    share = share / share.sum(1, keepdim=True).clamp(min=1)
    return dict(zip(sums, (flat[:len(sums)] / steps).tolist()), steps_per_s=steps / seconds,
                images_per_s=steps * args.global_batch_size / seconds,
                peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # Linux: KiB
                load_min=share.min(1).values.tolist() if share.numel() else [],
                load_max=share.max(1).values.tolist() if share.numel() else [],
                maxvio=max_violation(share).mean().item() if share.numel() else 0.0)  # Race-DiT's MaxVio


def micro_seed(seed, step, micro):
    """Seed of one micro-batch's draws: independent streams for every (seed, step, micro)."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------
# Checkpoints and the results folder
# ----------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to path.tmp, fsync, rename over path: a crash mid-write leaves the old file intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir, rank, model, ema, opt, step, epoch, cfg, args):
    # Collective when sharded: every rank gathers full tensors, rank 0 writes plain dicts that load
    # with weights_only=True and resume in either mode (optimizer state is keyed by parameter name).
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, opt_sd = get_state_dict(model, opt, options=full)
    ema_sd = get_model_state_dict(ema, options=full)
    if rank != 0:
        return None
    common = {"config": dataclasses.asdict(cfg), "step": step, "args": vars(args)}
    path = run_dir / "checkpoints" / f"{step:07d}.pt"
    save_atomic({"model": model_sd, "ema": ema_sd, "opt": opt_sd, "epoch": epoch, **common}, path)
    save_atomic({"ema": ema_sd, **common}, run_dir / "ema.pt")  # what sample.py and model.load take
    return path


def read_checkpoint(path, cfg):
    """A training checkpoint (file, or run folder -> its newest) checked against this run's config.
    Memory-mapped: every rank reads only the pages it needs."""
    path = Path(path)
    if path.is_dir():
        path = max((path / "checkpoints").glob("*.pt"), default=path / "checkpoints")
    if not path.is_file():
        fail(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "opt" not in ckpt:
        fail(f"{path} is not a training checkpoint of train.py (pass checkpoints/NNNNNNN.pt, not ema.pt)")
    diff = [f"{k} {ckpt['config'].get(k)} vs {v}" for k, v in dataclasses.asdict(cfg).items()
            if ckpt["config"].get(k) != v]
    if diff:
        fail(f"{path} is a {ckpt['args']['model']} checkpoint that does not fit this run "
             f"(checkpoint vs this run: {', '.join(diff)})")
    return path.resolve(), ckpt


def new_run_dir(results, model_name):
    """results/NNN-<model>/checkpoints with NNN one past the highest there, as DiT names runs."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for d in results.iterdir() if (m := re.match(r"(\d+)-", d.name))]
    run = results / f"{max(taken, default=-1) + 1:03d}-{model_name.replace('/', '-')}"
    (run / "checkpoints").mkdir(parents=True)
    return run


def point_latest(run):
    # results/latest -> this run, swapped atomically (sample.py --ckpt results/latest/ema.pt)
    tmp = run.parent / "latest.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run.name, tmp)
    os.replace(tmp, run.parent / "latest")


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def main(args):
    # Setup distributed
    rank, world, device = setup_distributed()
    cuda, accum = device.type == "cuda", args.grad_accum  # micro-batches per process and step
    if args.global_batch_size % (world * accum):
        fail(f"--global-batch-size {args.global_batch_size} does not split into "
             f"{world} processes x {accum} micro-batches")
    local_batch, bf16 = args.global_batch_size // world, cuda and not args.fp32
    if args.extract_latents:
        return extract_latents(args, rank, world, device)
    log = print if rank == 0 else lambda *a: None

    # Data: rank r takes samples r, r + world, ... of each epoch's permutation (seeded by the epoch)
    data, encode, data_fields = setup_data(args, device)  # data_fields: input size, channels, classes
    # the class table never has fewer rows than the data has classes
    data_fields["num_classes"] = max(data_fields["num_classes"], args.num_classes or 0)
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=args.global_seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        fail(f"{len(data)} images are fewer than one global batch of {args.global_batch_size}")
    total_steps = min(args.max_steps or float("inf"), (args.epochs or float("inf")) * steps_per_epoch)
    if total_steps == float("inf"):
        fail("set --max-steps or --epochs")

    # Model, EMA, optimizer
    fields = dict(objective=args.objective, router=args.router, **data_fields) | args.set
    cfg = config_from_name(args.model, **fields)
    ckpt_path, ckpt = read_checkpoint(args.resume, cfg) if args.resume else (None, None)
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank
    model = DiT(cfg)
    model.grad_checkpointing = args.grad_checkpointing
    with torch.device("meta"):  # the EMA gets storage after sharding: never a second full copy
        ema = DiT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if cuda else float("inf")
    # shard when weights, gradients, AdamW and EMA would fill more than 90% of a GPU under DDP
    ddp_bytes = sum(memory_estimate(n_params, world=1, sharded=False).values()) * 1e9
    sharded = args.sharded or (world > 1 and ddp_bytes > 0.9 * gpu_bytes)
    if sharded and world == 1:
        fail("--sharded needs several processes: launch with torchrun --nproc_per_node=N")
    if sharded:
        shard(model, bf16)
        shard(ema, bf16)
    model.to(device)
    ema.to_empty(device=device).requires_grad_(False).load_state_dict(model.state_dict())
    # fused: one pass over weights, gradients and moments (on CPU 5x faster than the per-op default)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    step, run_dir = 0, None
    if ckpt:  # the same run continues: its folder, its log, its step
        set_state_dict(model, opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["opt"],
                       options=StateDictOptions(full_state_dict=True))
        set_model_state_dict(ema, ckpt["ema"], options=StateDictOptions(full_state_dict=True))
        step, run_dir = ckpt["step"], ckpt_path.parent.parent
    ddp = None
    if world > 1 and not sharded:  # every expert weight is used in every forward: no find_unused_parameters
        ddp = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
    forward = torch.compile(ddp or model) if args.compile else ddp or model
    objective = create_objective(cfg.objective)  # --set objective=... included
    if rank == 0:
        run_dir = run_dir or new_run_dir(args.results_dir, args.model)
        point_latest(run_dir)
    mem = memory_estimate(n_params, world, sharded)
    log(f"{args.model}: {n_params / 1e6:.2f}M parameters, {cfg.num_classes} classes, input {cfg.in_channels}x"
        f"{cfg.input_size}x{cfg.input_size} {'latents' if cfg.latent_space else 'pixels'}, {len(data)} images")
    log(f"batch: global {args.global_batch_size} = {world} processes x {accum} micro-batches x "
        f"{local_batch // accum}; {steps_per_epoch} steps/epoch; steps {step} -> {total_steps}")
    mode = "sharded" if sharded else "DDP" if world > 1 else "single process"
    log(f"memory per {'GPU' if cuda else 'process'}, {mode} "
        f"(activations excluded): " + " + ".join(f"{k} {v:.2f}" for k, v in mem.items())
        + f" = {sum(mem.values()):.2f} GB")
    log(f"results: {run_dir}")

    # Training loop
    model.train()  # label dropout on; the EMA never runs here
    # bf16: autocast with DDP; FSDP2 casts the gathered weights itself (its MixedPrecisionPolicy)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not sharded)
    sums, load, t_start, s_start = {}, 0, time.time(), step
    thresholds = [mod.threshold for mod in model.modules() if hasattr(mod, "threshold")]
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        order = list(sampler)[(step - epoch * steps_per_epoch) * local_batch: steps_per_epoch * local_batch]
        loader = DataLoader(data, local_batch, sampler=order, drop_last=True, pin_memory=cuda,
                            num_workers=0 if isinstance(data, TensorDataset) else args.num_workers)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for m in range(accum):
                # Micro-batch g = rank + world * m holds samples g, g + world * accum, ... of the step's
                # global batch: the same images and draws however the micro-batches are spread.
                torch.manual_seed(micro_seed(args.global_seed, step, rank + world * m))
                x0, ym = encode(x[m::accum]), y[m::accum]
                t, x_t, noise = objective.training_inputs(x0)
                last = m == accum - 1  # gradients are reduced over processes once, in the last backward
                if sharded:
                    model.set_requires_gradient_sync(last)
                with ddp.no_sync() if ddp and not last else contextlib.nullcontext():
                    with amp:
                        out, aux = forward(x_t, t, ym, return_aux=True)
                    terms = objective.training_losses(out.float(), x0, x_t, t, noise)
                    loss = terms["loss"].mean() + aux["router_loss"]
                    if cfg.layer_reg:  # Race-DiT per-layer regularisation: every block predicts the target
                        err = aux["layer_preds"].float() - objective.target(x0, noise)  # (L, N, C, H, W)
                        terms["layer_reg"] = err.square().mean(dim=(0, 2, 3, 4))       # (N,)
                        loss = loss + cfg.layer_reg * terms["layer_reg"].mean()
                    # the router losses take the same 1/accum scaling as the diffusion loss
                    (loss / accum).backward()
                for k in sorted(terms, key=lambda k: k != "loss"):  # the same order on every rank
                    sums[k] = sums.get(k, 0) + terms[k].detach().mean() / accum
                sums["router_loss"] = sums.get("router_loss", 0) + aux["router_loss"].detach() / accum
                load = load + aux["load"]  # (L, E) assignments per expert
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()  # once per global batch, however many micro-batches made it
            opt.zero_grad(set_to_none=True)
            if world > 1 and thresholds:  # each rank's race thresholds saw its own batches: average them
                flat = torch.stack(thresholds)
                dist.all_reduce(flat)
                torch._foreach_copy_(thresholds, list(flat.div_(world).unbind()))
            update_ema(ema, model, args.ema_decay)
            step += 1
            bar.update()
            save = step % args.ckpt_every == 0 or step == total_steps
            if step % args.log_every == 0 or save:
                # Checked before every checkpoint: a non-finite loss never reaches one.
                rec = summarize(sums, load, world, step - s_start, time.time() - t_start, args, device)
                if not np.isfinite([rec[k] for k in sums]).all():
                    bar.close()  # before the message, so the bar does not draw over it
                    fail(f"non-finite loss in steps {s_start + 1}-{step} "
                         f"({', '.join(f'{k} {rec[k]}' for k in sums)}); last good checkpoint: {ckpt_path}")
                if rank == 0:
                    share = (f", expert share {min(rec['load_min']):.2f}-{max(rec['load_max']):.2f}"
                             if cfg.num_experts else "")
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                             if isinstance(v, float)) + share)
                    with open(run_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(dict(step=step, **rec)) + "\n")
                if save:
                    ckpt_path = save_checkpoint(run_dir, rank, model, ema, opt, step,
                                                step // steps_per_epoch, cfg, args) or ckpt_path
                sums, load, t_start, s_start = {}, 0, time.time(), step
            if step == total_steps:
                break
    bar.close()
    log(f"done at step {step}; EMA weights: {run_dir}/ema.pt")


def parse_args(argv=None):
    # Defaults are the CPU demo that `python train.py` runs; where the paper differs, the help says so.
    p = argparse.ArgumentParser(description="Train DiT-MoE; the module docstring has the commands.")
    add = p.add_argument
    add("--model", default="T/2-4E2A",
        help="size from model.py's registry (paper: S/2-8E2A ... G/2-16E2A; T is the tiny demo size)")
    add("--router", choices=ROUTERS, default=DiTConfig.router,
        help="token choice (DiT-MoE), expert choice (EC-DiT) or Expert Race (Race-DiT); see moe.py")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override a DiTConfig field, e.g. --set layer_reg=0.1 (Race-DiT) --set capacity_factor=1.25")
    add("--objective", choices=OBJECTIVES, default=DiTConfig.objective,
        help="DDPM with learned sigma (paper; the official S, B) or rectified flow (the official XL, G)")
    add("--data-path", help="image folder, one sub-folder per class (ImageNet layout); unset: built-in digits")
    add("--latents-path", help="latent shards from --extract-latents: training without the VAE")
    add("--extract-latents", action="store_true",
        help="encode --data-path into shards at --latents-path (posterior mean and std, both flips), then exit")
    add("--image-size", type=int, default=256, help="center-crop size of --data-path images (paper: 256, 512)")
    add("--vae", default=VAE,
        help="diffusers AutoencoderKL, hub name or local folder (paper: sd-vae-ft-ema)")
    add("--num-classes", type=int, help="class-table size, if more than the classes in the data")
    add("--num-workers", type=int, default=4, help="data-loading processes per GPU for folders and shards")
    add("--results-dir", default="results",
        help="runs go to RESULTS_DIR/NNN-<model>; RESULTS_DIR/latest links the newest")
    add("--global-batch-size", type=int, default=128,
        help="images per optimizer step over all processes (paper: 1024)")
    add("--grad-accum", type=int, default=1, help="micro-batches per process and optimizer step")
    add("--lr", type=float, default=1e-3,
        help="AdamW learning rate, constant (paper: 1e-4; the tiny demo model learns faster at 1e-3)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    add("--ema-decay", type=float, default=0.995,
        help="EMA decay per step (paper: 0.9999; 0.995 averages ~200 steps, right for a short run)")
    add("--clip-grad", type=float, help="clip the global gradient norm to this (paper: no clipping)")
    add("--max-steps", type=int, default=1200, help="optimizer steps to train to (paper: 500K to 7M)")
    add("--epochs", type=int, help="or stop after this many epochs, whichever comes first")
    add("--global-seed", type=int, default=0, help="seed of the initial weights, the data order and the noise")
    add("--log-every", type=int, default=100, help="steps between log lines and log.jsonl records")
    add("--ckpt-every", type=int, default=1000, help="steps between checkpoints (DiT: 50000)")
    add("--resume", help="run folder (its newest checkpoint) or checkpoint file to continue; same flags")
    add("--sharded", action="store_true",
        help="FSDP2: shard weights, grads, AdamW and EMA (automatic when DDP would not fit the GPU)")
    add("--fp32", action="store_true",
        help="compute in fp32 on GPU, matmuls in TF32 (default: bf16; CPU is always fp32)")
    add("--grad-checkpointing", action="store_true", help="recompute block activations in the backward pass")
    add("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    defaults = DiTConfig()
    overrides = {}
    for item in args.set:  # FIELD=VALUE, the value parsed as the type of the field's default
        key, _, value = item.partition("=")
        if not hasattr(defaults, key):
            fail(f"--set {item}: unknown config field {key!r}; fields: {', '.join(vars(defaults))}")
        default = getattr(defaults, key)
        kind = int if default is None else type(default)  # the only None default is shared_hidden
        try:
            if default is None and value.lower() == "none":
                overrides[key] = None
            else:
                overrides[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
        except ValueError:
            fail(f"--set {item}: {value!r} is not {'an' if kind is int else 'a'} {kind.__name__}")
    args.set = overrides
    try:
        config_from_name(args.model, **overrides)
    except (ValueError, TypeError) as e:
        fail(e)
    if args.extract_latents and not (args.data_path and args.latents_path):
        fail("--extract-latents needs --data-path (images) and --latents-path (output folder)")
    if args.data_path and not Path(args.data_path).is_dir():
        fail(f"data path {args.data_path} is not a folder")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
