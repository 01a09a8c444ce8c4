r"""
Train DiT-MoE: a single process (CPU or one GPU), or torchrun over any number of GPUs and
nodes. Before step 1 the run is planned to fit the GPU: DDP when weights, gradients, AdamW, EMA
and activations fit, else FSDP2 sharding (HSDP across nodes) and gradient checkpointing, else a
refusal that names the flags that would fit. bf16 autocast on GPUs, fp32 on CPUs.

    # the demo: the tiny MoE on the 8x8 digits that ship with scikit-learn (CPU, ~5 minutes)
    python train.py
    python sample.py --ckpt results/latest/ema.pt

    # ImageNet 256, the paper's recipe (AdamW 1e-4 constant, no weight decay, EMA 0.9999,
    # batch 1024). Encode the images once into latent shards, both flips kept, then train:
    torchrun --nproc_per_node=8 train.py --extract-latents --data-path /data/imagenet/train \
        --latents-path /data/in256
    torchrun --nproc_per_node=8 train.py --model S/2-8E2A --latents-path /data/in256 \
        --global-batch-size 1024 --lr 1e-4 --ema-decay 0.9999 --max-steps 500000 --ckpt-every 50000
    # XL/2-8E2A on 8 x 80 GB: the plan shards it and checkpoints activations by itself
    torchrun --nproc_per_node=8 train.py --model XL/2-8E2A --set objective=rf --latents-path /data/in256 \
        --global-batch-size 1024 --lr 1e-4 --ema-decay 0.9999 --max-steps 500000 --ckpt-every 50000

    # two nodes of 8 GPUs (a filesystem both see; HOST = node 0's address, NODE = 0 or 1)
    torchrun --nnodes=2 --node_rank=$NODE --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=$HOST:29500 train.py --model G/2-16E2A ...

    # continue a run (same flags; a new --lr or --weight-decay applies from here on, logged)
    python train.py --resume results/latest
    # start a new run from trained weights (sparse upcycling: a dense or 1-expert model's
    # expert copied into every expert)
    python train.py --model T/2-4E2A --init-from results/000-T-2-1E1A/ema.pt

Randomness: the draws of a micro-batch (t, noise, label dropout, flips) are seeded by
(global seed, step, micro-batch index), and micro-batch g always holds the same images.
A run depends on its number of micro-batches per step, not on how they are spread over
processes, and it resumes exactly without saving RNG states.

Tests: python -m pytest -q tests/test_train.py tests/test_bad_input.py
"""
import launch  # noqa: I001  first import: the OpenMP wait policy must be set before torch loads

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

import checkpoint
from data import VAE, DataError, extract_latents, setup_data
from diffusion import create_objective
from launch import fail, fail_if_any, nonnegative_float, nonnegative_int, positive_float, positive_int, ranged
from model import DiT, DiTBlock, DiTConfig, config_from_name
from moe import max_violation

# ----------------------------------------------------------------------------
# Memory: what a run needs per GPU, and a plan that fits
# ----------------------------------------------------------------------------

def saved_bytes(cfg, images, bf16):
    """Bytes autograd keeps for the backward of one block on `images` images, traced on fake
    tensors (no memory, well under a second for G/2): what a step holds per block, parameters
    excluded. Under bf16 autocast it includes the bf16 weight copies the matmuls save."""
    seen = {}
    with FakeTensorMode():
        block = DiTBlock(cfg)
        params = {p.untyped_storage()._cdata for p in block.parameters()}
        x = torch.randn(images, cfg.num_tokens, cfg.hidden_size, requires_grad=True)  # (N, T, D)
        c = torch.randn(images, cfg.hidden_size)

        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in params:
                seen[storage._cdata] = storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                block(x, c)
    return sum(seen.values())


def memory_estimate(cfg, micro_batch, world, node_size, bf16, sharded, checkpointing):
    """GB per GPU of a training step, by part. Weights, gradients, AdamW moments and EMA are fp32
    (4 + 4 + 8 + 4 bytes a parameter), sharded over a node's GPUs with FSDP2. DDP's gradient
    buckets are views of the gradients (gradient_as_bucket_view): no second copy."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in DiT(cfg).parameters())
    shards = node_size if sharded else 1
    per_block = saved_bytes(cfg, 2, bf16) - saved_bytes(cfg, 1, bf16)  # one image's activations
    weight_copies = saved_bytes(cfg, 1, bf16) - per_block  # autocast's bf16 weights, per block
    if sharded:  # FSDP2 gathers bf16 weights itself, two blocks at a time (one prefetched)
        weight_copies = 2 * 2 * n_params / cfg.depth
    blocks_kept = 1 if checkpointing else cfg.depth  # checkpointing keeps one block's, recomputed
    inputs = cfg.depth * 4 * cfg.num_tokens * cfg.hidden_size * micro_batch if checkpointing else 0
    gb = {"weights": 4 * n_params / shards, "grads": 4 * n_params / shards, "AdamW": 8 * n_params / shards,
          "EMA": 4 * n_params / shards,
          "activations": blocks_kept * per_block * micro_batch + inputs,
          "bf16 weights": weight_copies * (1 if sharded else blocks_kept),
          "backward of a block": per_block * micro_batch}  # the transient peak of one block's backward
    return {k: v / 1e9 for k, v in gb.items()}


def plan(cfg, local_batch, accum, world, node_size, gpu_gb, bf16, force_sharded, force_checkpointing):
    """(sharded, checkpointing, estimate): the first of DDP, DDP + checkpointing, sharded, sharded +
    checkpointing whose estimate fits 90% of the GPU (gpu_gb; inf on CPU), among those the flags
    allow; else a refusal that names the --grad-accum that would fit."""
    budget = 0.9 * gpu_gb
    options = [(s, c) for s in (False, True) for c in (False, True)
               if (s or not force_sharded) and (c or not force_checkpointing) and (world > 1 or not s)]
    for sharded, checkpointing in options:
        est = memory_estimate(cfg, local_batch // accum, world, node_size, bf16, sharded, checkpointing)
        if sum(est.values()) <= budget:
            return sharded, checkpointing, est
    for more in (2, 4, 8, 16, 32, 64, 128):
        micro_batch = local_batch // (accum * more)
        est = memory_estimate(cfg, max(micro_batch, 1), world, node_size, bf16, world > 1, True)
        if micro_batch >= 1 and sum(est.values()) <= budget:
            fail(f"{local_batch // accum} images per GPU and micro-batch do not fit {gpu_gb:.0f} GB even "
                 f"{'sharded and ' if world > 1 else ''}with --grad-checkpointing: "
                 f"add --grad-accum {accum * more}")
    fail(f"this model does not fit {gpu_gb:.0f} GB per GPU even at 1 image per micro-batch: use more GPUs")


# ----------------------------------------------------------------------------
# Distribution, EMA, seeds
# ----------------------------------------------------------------------------

def shard(net, bf16, node_size, device):
    """FSDP2: each block is one all-gather unit, the root holds embedders and final layer. Sharded
    within a node; across nodes (HSDP) each node holds a replica, so the per-block all-gathers
    stay on the node's fast links and only gradients cross nodes. The same numerics as DDP under
    autocast: master weights fp32, gradients reduced in fp32, inputs not cast (the residual stream
    and t stay fp32, autocast picks each op's dtype); with bf16 a block's weights are gathered in
    bf16, rounded as autocast rounds them for its matmuls, while the routers (routing is decided
    in fp32) and the root's embedders and final layer (not all cast by autocast) stay fp32."""
    world = dist.get_world_size()
    if world > node_size:
        mesh = init_device_mesh(device.type, (world // node_size, node_size), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    half = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)
    for block in net.blocks:
        for router in ("router", "router_mlp") if hasattr(block, "moe") else ():
            if getattr(block.moe, router) is not None:
                fully_shard(getattr(block.moe, router), mesh=mesh, mp_policy=fp32)
        fully_shard(block, mesh=mesh, mp_policy=half)
    fully_shard(net, mesh=mesh, mp_policy=fp32)
    return mesh


@torch.no_grad()
def update_ema(ema, model, decay):
    # ema <- decay * ema + (1 - decay) * model over parameters only (the fixed position table is a
    # buffer). Sharded, each rank updates its own shards: the same arithmetic, element by element.
    local = lambda net: [p.to_local() if isinstance(p, DTensor) else p for p in net.parameters()]
    torch._foreach_lerp_(local(ema), local(model), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):  # running statistics (race thresholds): copied
        b_ema.copy_(b)


def micro_seed(seed, step, micro):
    """Seed of one micro-batch's draws: independent streams for every (seed, step, micro)."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0])


def set_grad_sync(model, sync):
    """Reduce gradients over processes in this backward (the last micro-batch's) or not."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync  # nanoGPT's switch; DDP's no_sync() sets the same
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)


# ----------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------

def training_loss(model, objective, x0, y, layer_reg):
    """The whole objective of one micro-batch: the diffusion loss (DDPM's hybrid mse + vb, or the
    rectified-flow velocity loss), the router losses of every MoE layer (DiT-MoE's balance loss
    or Race-DiT's similarity loss), and Race-DiT's per-layer regularisation: every block's head
    predicts the diffusion target, weighted by layer_reg. Returns (loss, per-term means)."""
    t, x_t, noise = objective.training_inputs(x0)
    out, aux = model(x_t, t, y, return_aux=True)
    terms = objective.training_losses(out.float(), x0, x_t, t, noise)  # each (N,)
    terms = {k: v.mean() for k, v in terms.items()}
    terms["router_loss"] = aux["router_loss"]
    loss = terms["loss"] + aux["router_loss"]
    if layer_reg:
        err = aux["layer_preds"].float() - objective.target(x0, noise)  # (L, N, C, H, W)
        terms["layer_reg"] = err.square().mean()
        loss = loss + layer_reg * terms["layer_reg"]
    return loss, terms, aux["load"]


@dataclasses.dataclass
class Recipe:
    """What a training step needs besides the model: the flags, this process's place, the numerics."""
    accum: int                # micro-batches per process and step
    seed: int
    rank: int
    world: int
    layer_reg: float          # Race-DiT per-layer regularisation weight (0: off)
    clip_grad: float | None   # None: no clipping (the paper)
    ema_decay: float
    device_type: str
    bf16: bool


def train_step(model, wrapper, ema, opt, objective, x, y, encode, step, recipe):
    """One optimizer step on this process's share x, y of the global batch, with no host sync.
    model: the network as it is called (compiled and/or DDP); wrapper: the DDP or FSDP2 module
    whose gradient sync is switched. Non-finite gradients skip the update on the device (fused
    AdamW's found_inf); the skips are counted and checked at the next log line."""
    stats = {}
    # Accumulate gradients over the micro-batches; reduce them over processes in the last one.
    for m in range(recipe.accum):
        set_grad_sync(wrapper, m == recipe.accum - 1)
        torch.manual_seed(micro_seed(recipe.seed, step, recipe.rank + recipe.world * m))
        x0 = encode(x[m::recipe.accum])
        with torch.autocast(recipe.device_type, dtype=torch.bfloat16, enabled=recipe.bf16):
            loss, terms, load = training_loss(model, objective, x0, y[m::recipe.accum], recipe.layer_reg)
        (loss / recipe.accum).backward()  # router losses take the same 1/accum as the diffusion loss
        terms["load"] = load
        for k, v in terms.items():
            stats[k] = stats.get(k, 0) + v.detach() / recipe.accum
    # Update the weights, unless the gradients are not finite.
    raw_model = ema_source(wrapper)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), recipe.clip_grad or math.inf)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    stats["skipped"] = (~grad_norm.isfinite()).float()
    opt.found_inf = stats["skipped"]  # GradScaler's hook into fused AdamW: the kernel skips when 1
    opt.step()
    opt.zero_grad(set_to_none=True)
    average_thresholds(raw_model, recipe.world)
    update_ema(ema, raw_model, recipe.ema_decay)
    return stats


def ema_source(wrapper):
    """The network itself, under DDP's wrapper or not."""
    return wrapper.module if isinstance(wrapper, DDP) else wrapper


def average_thresholds(model, world):
    """Race thresholds saw each process's own batches: average them over processes."""
    thresholds = [b for name, b in model.named_buffers() if name.endswith("threshold")]
    if world > 1 and thresholds:
        flat = torch.stack(thresholds)
        dist.all_reduce(flat)
        torch._foreach_copy_(thresholds, list(flat.div_(world).unbind()))


# ----------------------------------------------------------------------------
# Logging and the results folder
# ----------------------------------------------------------------------------

def summarize(sums, model, steps, seconds, images_per_step, world, device):
    """The log record of the steps since the last one: loss terms averaged over steps and processes,
    each layer's expert load, skipped updates, non-finite weights, speed and peak memory. One
    all-reduce and one copy to the host: the only host syncs of the training loop."""
    terms = {k: v for k, v in sums.items() if k not in ("load", "skipped")}
    load = sums["load"]  # (L, E) assignments per expert, summed over steps
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    bad_weights = torch.stack([(~p.isfinite()).any() for p in local]).sum().float()
    flat = torch.cat([torch.stack(list(terms.values())), load.flatten(), sums["skipped"][None], bad_weights[None]])
    if world > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()
    rec = dict(zip(terms, (flat[:len(terms)] / (steps * world)).tolist()))
    rec["skipped"] = round(flat[-2].item() / world)  # every process skips the same steps
    rec["non_finite_weights"] = bool(flat[-1] > 0)
    frac = flat[len(terms):-2].view(load.shape)
    frac = frac / frac.sum(1, keepdim=True).clamp(min=1)  # (L, E): each expert's share of its layer
    if frac.numel():
        rec["load_min"] = frac.min(1).values.tolist()
        rec["load_max"] = frac.max(1).values.tolist()
        rec["maxvio"] = max_violation(frac).mean().item()  # Race-DiT's MaxVio
    rec["steps_per_s"] = steps / seconds
    rec["images_per_s"] = steps * images_per_step / seconds
    if device.type == "cuda":
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        rec["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    return rec


def new_run_dir(results, model_name):
    """results/NNN-<model>/checkpoints with NNN one past the highest there, as DiT names runs."""
    results = Path(results)
    taken = [int(m[1]) for d in results.iterdir() if (m := re.match(r"(\d+)-", d.name))]
    run = results / f"{max(taken, default=-1) + 1:03d}-{model_name.replace('/', '-')}"
    (run / "checkpoints").mkdir(parents=True)
    return run


def point_latest(run):
    # results/latest -> this run, swapped atomically (sample.py --ckpt results/latest/ema.pt);
    # called once the run has a checkpoint, so latest never names a run without an ema.pt
    tmp = run.parent / "latest.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run.name, tmp)
    os.replace(tmp, run.parent / "latest")


def trim_log(run_dir, step):
    """A resumed run redoes the steps after its checkpoint: drop their old log records."""
    log = run_dir / "log.jsonl"
    if log.exists():
        keep = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in keep))


def log_line(step, rec, num_experts):
    """One line for the terminal: losses, the range of the experts' shares of their layer, speed."""
    shown = [f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float) and k != "skipped"]
    if "load_min" in rec:
        shown.append(f"expert load {min(rec['load_min']):.2f}-{max(rec['load_max']):.2f} (even: {1 / num_experts:.2f})")
    return f"step {step}: " + ", ".join(shown)


def save(run_dir, raw_model, ema, opt, step, epoch, cfg, args, sharded, last_good):
    """A checkpoint and ema.pt; a full disk ends the run with one line, the last good one kept."""
    info = {"step": step, "epoch": epoch, "config": dataclasses.asdict(cfg), "args": vars(args)}
    try:
        path = checkpoint.save(run_dir, raw_model, ema, opt, info, sharded)
    except OSError as e:
        why = "disk full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        fail(f"{why} writing the checkpoint of step {step} in {run_dir}; last good checkpoint: {last_good}")
    checkpoint.prune(run_dir, args.keep_last)
    return path


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def build_config(args, data_fields):
    """The model config: the registry entry, the data's shape, then --set; checked on its own
    and against the data before anything is built."""
    fields = data_fields | args.set
    try:
        cfg = config_from_name(args.model, **fields)
    except ValueError as e:
        fail(e)
    error = cfg.check()
    if error:
        fail(error)
    for name in ("input_size", "in_channels", "latent_space"):
        if getattr(cfg, name) != data_fields[name]:
            fail(f"--set {name}={getattr(cfg, name)} does not fit the data: its {name} is {data_fields[name]}")
    if cfg.num_classes < data_fields["num_classes"]:
        fail(f"--set num_classes={cfg.num_classes} is fewer than the {data_fields['num_classes']} classes "
             "in the data")
    return cfg


def main(args):
    # Setup: processes, devices, numerics
    rank, world, device = launch.setup(args.device)
    node_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # GPUs per node under torchrun
    if args.global_batch_size % (world * args.grad_accum):
        fail(f"--global-batch-size {args.global_batch_size} does not split into "
             f"{world} processes x {args.grad_accum} micro-batches")
    bf16 = launch.bf16_default(device, args.precision)
    if args.extract_latents:
        return extract_latents(args, rank, world, device)
    log = print if rank == 0 else lambda *a: None

    # Data: rank r takes samples r, r + world, ... of each epoch's permutation (seeded by the epoch)
    try:
        data, encode, data_fields = setup_data(args, device)
        error = None
    except DataError as e:  # a node whose disk lacks the data stops every rank, not only itself
        error = str(e)
    fail_if_any(error)
    cfg = build_config(args, data_fields)
    local_batch = args.global_batch_size // world
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=args.global_seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        fail(f"{len(data)} images are fewer than one global batch of {args.global_batch_size}")
    total_steps = min(args.max_steps or math.inf, (args.epochs or math.inf) * steps_per_epoch)

    # Where the run continues from, or starts from
    resume_from = None
    if args.resume:
        resume_from, error = find_resume(args.resume, cfg, log)
        fail_if_any(error)
    if args.sharded and world == 1:
        fail("--sharded needs several processes: launch with torchrun --nproc_per_node=N")
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else math.inf
    sharded, checkpointing, mem = plan(cfg, local_batch, args.grad_accum, world, node_size, gpu_gb, bf16,
                                       args.sharded, args.grad_checkpointing)

    # Model, EMA, optimizer
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank
    raw_model = DiT(cfg)
    n_params = sum(p.numel() for p in raw_model.parameters())
    if args.init_from and not resume_from:
        try:
            log(checkpoint.init_from(raw_model, args.init_from))
        except checkpoint.CheckpointError as e:
            fail(e)
    raw_model.grad_checkpointing = checkpointing
    with torch.device("meta"):  # the EMA gets storage after sharding: never a second full copy
        ema = DiT(cfg)
    if sharded:
        shard(raw_model, bf16, node_size, device)
        shard(ema, bf16, node_size, device)
    raw_model.to(device)
    ema.to_empty(device=device).requires_grad_(False).load_state_dict(raw_model.state_dict())
    # fused: one pass over weights, gradients and moments (on CPU 5x faster than the per-op default)
    opt = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    step = 0
    run_dir = None
    last_good = None
    if resume_from:  # the same run continues: its folder, its log, its step
        info = checkpoint.resume(resume_from, raw_model, ema, opt)
        step = info["step"]
        run_dir = resume_from.parent.parent
        last_good = resume_from
        for key in ("lr", "weight_decay"):  # this command's values apply from here on
            for group in opt.param_groups:
                group[key] = getattr(args, key)
            if info["args"][key] != getattr(args, key):
                log(f"--{key.replace('_', '-')} changed from {info['args'][key]} to {getattr(args, key)}")
        checkpoint.export_ema(run_dir, ema, info | {"args": vars(args)}, sharded)  # ema.pt may lag
    wrapper = raw_model
    if world > 1 and not sharded:  # every expert weight is used in every forward: no find_unused_parameters
        wrapper = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                      forward_sync_buffers=False, gradient_as_bucket_view=True)
    model = torch.compile(wrapper) if args.compile else wrapper
    objective = create_objective(cfg.objective)
    if rank == 0:
        run_dir = run_dir or new_run_dir(args.results_dir, args.model)
        checkpoint.remove_partial(run_dir)  # *.tmp of a killed write
        trim_log(run_dir, step)
    if world > 1:  # rank 0 named the run folder; sharded checkpoints are written by every rank
        shared = [run_dir]
        dist.broadcast_object_list(shared)
        run_dir = shared[0]
    mode = "sharded (HSDP across nodes)" if sharded and world > node_size else "sharded" if sharded \
        else "DDP" if world > 1 else "single process"
    log(f"{args.model}: {n_params / 1e6:.2f}M parameters, {cfg.num_classes} classes, input {cfg.in_channels}x"
        f"{cfg.input_size}x{cfg.input_size} {'latents' if cfg.latent_space else 'pixels'}, {len(data)} images")
    log(f"batch: global {args.global_batch_size} = {world} processes x {args.grad_accum} micro-batches x "
        f"{local_batch // args.grad_accum}; {steps_per_epoch} steps/epoch; steps {step} -> {total_steps}")
    log(f"memory per {'GPU' if device.type == 'cuda' else 'process'}, {mode}, {'bf16' if bf16 else 'fp32'}"
        f"{', gradient checkpointing' if checkpointing else ''}: "
        + " + ".join(f"{k} {v:.2f}" for k, v in mem.items()) + f" = {sum(mem.values()):.2f} GB")
    if cfg.num_experts and cfg.router == "token":  # Eq. 5 at perfect balance: f_i = 1, sum_i P_i = 1
        log(f"router_loss at perfect balance: {cfg.depth * cfg.balance_alpha:.4f} "
            f"({cfg.depth} layers x alpha {cfg.balance_alpha}), its floor")
    log(f"results: {run_dir}")

    # Training loop
    recipe = Recipe(args.grad_accum, args.global_seed, rank, world, cfg.layer_reg, args.clip_grad,
                    args.ema_decay, device.type, bf16)
    raw_model.train()  # label dropout on; the EMA never runs here
    sums = {}
    since = step
    t_start = time.time()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch)
            order = list(sampler)[(step - epoch * steps_per_epoch) * local_batch: steps_per_epoch * local_batch]
            loader = DataLoader(data, local_batch, sampler=order, drop_last=True, pin_memory=device.type == "cuda",
                                num_workers=0 if isinstance(data, TensorDataset) else args.num_workers)
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                stats = train_step(model, wrapper, ema, opt, objective, x, y, encode, step, recipe)
                sums = {k: sums.get(k, 0) + v for k, v in stats.items()}
                step += 1
                bar.update()
                save_now = step % args.ckpt_every == 0 or step == total_steps
                if step % args.log_every == 0 or save_now:
                    rec = summarize(sums, raw_model, step - since, time.time() - t_start,
                                    args.global_batch_size, world, device)
                    check_finite(rec, since, step, last_good, bar)
                    if rank == 0:
                        bar.write(log_line(step, rec, cfg.num_experts))
                        with open(run_dir / "log.jsonl", "a") as f:
                            f.write(json.dumps(dict(step=step, **rec)) + "\n")
                    sums = {}
                    since = step
                    t_start = time.time()
                if save_now:
                    last_good = save(run_dir, raw_model, ema, opt, step, step // steps_per_epoch, cfg, args,
                                     sharded, last_good)
                    if rank == 0:
                        point_latest(run_dir)
                if step == total_steps:
                    break
    except KeyboardInterrupt:
        bar.close()
        fail(f"interrupted at step {step}; last good checkpoint: {last_good}", alone=True)
    except DataError as e:  # a file this process could not read; from a loader worker, the message
        bar.close()         # comes after the worker's traceback: keep its last line
        fail(str(e).strip().splitlines()[-1].split("DataError: ")[-1], alone=True)
    bar.close()
    log(f"done at step {step}; EMA weights: {run_dir}/ema.pt")


def check_finite(rec, since, step, last_good, bar):
    """Stop before any checkpoint holds non-finite numbers; the message names the newest good one."""
    losses = [f"{k} {v}" for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    problems = [f"loss ({', '.join(losses)})"] if losses else []
    if rec["skipped"]:
        problems.append(f"gradients ({rec['skipped']} update(s) skipped)")
    if rec["non_finite_weights"]:
        problems.append("weights")
    if problems:
        bar.close()  # before the message, so the bar does not draw over it
        fail(f"non-finite {', '.join(problems)} in steps {since + 1}-{step}; nothing saved; "
             f"last good checkpoint: {last_good}")


def find_resume(path, cfg, log):
    """(checkpoint, error): the newest finite checkpoint of a run folder, or the file or sharded
    folder given, checked against this run's config. Every rank looks: on node-local disks one
    node may lack it."""
    path = Path(path)
    try:
        if (path / "checkpoints").is_dir():
            found = checkpoint.newest_finite(path, note=log)
            if found is None:
                return None, f"no finite checkpoint in {path / 'checkpoints'}"
            path = found
        elif not path.exists():
            return None, f"no checkpoint at {path}"
        elif not checkpoint.is_finite(path):
            return None, f"{path} holds non-finite weights; resume from an earlier checkpoint"
        info = checkpoint.read_info(path)
    except (checkpoint.CheckpointError, OSError, RuntimeError, ValueError) as e:
        return None, f"cannot read checkpoint {path} ({e})"
    diff = [f"{k} {info['config'].get(k)} vs {v}" for k, v in dataclasses.asdict(cfg).items()
            if info["config"].get(k) != v]
    if diff:
        return None, (f"{path} is a {info['args']['model']} checkpoint that does not fit this run "
                      f"(checkpoint vs this run: {', '.join(diff)})")
    return path.resolve(), None


def parse_set(items):
    """--set FIELD=VALUE pairs -> {field: value}, each value parsed as its DiTConfig field's type."""
    types = {f.name: f.type for f in dataclasses.fields(DiTConfig)}
    words = {int: "an int", float: "a number", bool: "true or false", str: "a string", int | None: "an int or none"}
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            fail(f"--set {item}: unknown config field {key!r}; fields: {', '.join(types)}")
        kind = types[key]
        try:
            if kind is bool:
                overrides[key] = {"1": True, "true": True, "0": False, "false": False}[value.lower()]
            elif kind == int | None:  # shared_hidden: a width, or none for the default 2D
                overrides[key] = None if value.lower() == "none" else int(value)
            else:
                overrides[key] = kind(value)
        except (ValueError, KeyError):
            fail(f"--set {item}: {value!r} is not {words[kind]}")
    return overrides


def parse_args(argv=None):
    # Defaults are the CPU demo that `python train.py` runs; where the paper differs, the help says so.
    p = launch.Parser(description="Train DiT-MoE; the module docstring has the commands.")
    add = p.add_argument
    add("--model", default="T/2-4E2A",
        help="size from model.py's registry (paper: S/2-8E2A ... G/2-16E2A; T is the tiny demo size)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override a DiTConfig field (model.py), e.g. --set router=race (token | expert | race), "
             "--set objective=rf (ddpm | rf), --set layer_reg=0.1 (Race-DiT)")
    add("--data-path", help="image folder, one sub-folder per class (ImageNet layout); unset: built-in digits")
    add("--latents-path", help="latent shards from --extract-latents: training without the VAE")
    add("--extract-latents", action="store_true",
        help="encode --data-path into shards at --latents-path (posterior mean and std, both flips), then exit")
    add("--image-size", type=positive_int, default=256, help="center-crop size of --data-path images (paper: 256)")
    add("--vae", default=VAE, help="diffusers AutoencoderKL, hub name or local folder (paper: sd-vae-ft-ema)")
    add("--num-workers", type=nonnegative_int, default=4, help="data-loading processes per GPU (folders, shards)")
    add("--results-dir", default="results", help="runs go to RESULTS_DIR/NNN-<model>; RESULTS_DIR/latest links "
                                                 "the newest run with a checkpoint")
    add("--global-batch-size", type=positive_int, default=128,
        help="images per optimizer step over all processes (paper: 1024)")
    add("--grad-accum", type=positive_int, default=1, help="micro-batches per process and optimizer step")
    add("--lr", type=positive_float, default=1e-3,
        help="AdamW learning rate, constant (paper: 1e-4; the tiny demo model learns faster at 1e-3)")
    add("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay (paper: 0)")
    add("--ema-decay", type=ranged(float, 0, 1, high_open=True), default=0.995,
        help="EMA decay per step, in [0, 1) (paper: 0.9999; 0.995 averages ~200 steps, right for a short run)")
    add("--clip-grad", type=positive_float, help="clip the global gradient norm to this (paper: no clipping)")
    add("--max-steps", type=positive_int, default=1200, help="optimizer steps to train to (paper: 500K to 7M)")
    add("--epochs", type=positive_int, help="or stop after this many epochs, whichever comes first")
    add("--global-seed", type=nonnegative_int, default=0, help="seed of the initial weights, data order and noise")
    add("--log-every", type=positive_int, default=100, help="steps between log lines and log.jsonl records")
    add("--ckpt-every", type=positive_int, default=300,
        help="steps between checkpoints (DiT: 50000; the demo: ~75 s of its ~5 minutes)")
    add("--keep-last", type=nonnegative_int, default=0,
        help="keep only the newest N checkpoints (0: keep all, as DiT; each holds weights, EMA and AdamW: "
             "16 bytes a parameter)")
    add("--resume", help="run folder (its newest finite checkpoint) or checkpoint to continue; same flags")
    add("--init-from", help="a trained checkpoint (ours, official DiT-MoE or DiT) to start a NEW run from: "
                            "matching tensors are copied, experts upcycled from a 1-expert or dense model")
    add("--device", default="auto", help="auto (a GPU when there is one), cuda or cpu")
    add("--precision", choices=("bf16", "fp32"), help="compute in bf16 (autocast) or fp32; default bf16 on GPU, "
                                                     "fp32 on CPU; fp32 matmuls use TF32 on GPU")
    add("--sharded", action="store_true", help="force FSDP2 sharding (chosen by itself when DDP would not fit)")
    add("--grad-checkpointing", action="store_true",
        help="force recomputing block activations in backward (chosen by itself when they would not fit)")
    add("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    args.set = parse_set(args.set)
    if args.extract_latents and not (args.data_path and args.latents_path):
        fail("--extract-latents needs --data-path (images) and --latents-path (output folder)")
    if args.data_path and not Path(args.data_path).is_dir():
        fail(f"data path {args.data_path} is not a folder")
    if args.resume and args.init_from:
        fail("--resume continues a run, --init-from starts a new one from weights: pass one of them")
    try:
        config_from_name(args.model, **args.set)
    except (ValueError, TypeError) as e:
        fail(e)
    if not args.extract_latents:
        launch.writable_dir(args.results_dir)
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
