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
    torchrun --nproc_per_node=8 train.py --model XL/2-8E2A --set objective=rf \
        --latents-path /data/in256 --global-batch-size 1024 --lr 1e-4 --ema-decay 0.9999 \
        --max-steps 500000 --ckpt-every 50000

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
from launch import (fail, fail_if_any, nonnegative_float, nonnegative_int, positive_float,
                    positive_int, ranged)
from model import DiT, DiTBlock, DiTConfig, config_from_name, count
from moe import grouped_mm_is_fast, max_violation

# ----------------------------------------------------------------------------
# Memory: what a run needs per GPU, and a plan that fits
# ----------------------------------------------------------------------------

TRACED = {}  # saved_bytes' answers by (config, images, bf16, dispatch): the plan asks repeatedly


def saved_bytes(cfg, images, bf16, dispatch="grouped"):
    """Bytes autograd keeps for the backward of one block on `images` images, traced on fake
    tensors (no memory, well under a second for G/2): what a step holds per block, parameters
    excluded. Under bf16 autocast it includes the bf16 weight copies the matmuls save. dispatch:
    the MoE dispatch the GPU will run (moe.py: "padded" keeps E/K times the routed activations)."""
    key = (dataclasses.astuple(cfg), images, bf16, dispatch)
    if key in TRACED:
        return TRACED[key]
    seen = {}
    with FakeTensorMode():
        block = DiTBlock(cfg)
        if hasattr(block, "moe"):
            block.moe.dispatch = dispatch
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
    TRACED[key] = sum(seen.values())
    return TRACED[key]


def gpu_memory_gb(device):
    """The GPU's memory in GB; a CPU run is not limited here."""
    if device.type != "cuda":
        return math.inf
    return torch.cuda.get_device_properties(device).total_memory / 1e9


def gpu_dispatch(device, bf16):
    """The MoE dispatch "auto" picks on this device: grouped where PyTorch's grouped GEMM is fast
    and sync-free (CPU; bf16 on H100/H200/B200), else padded."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return "grouped" if grouped_mm_is_fast(device, dtype) else "padded"


def memory_estimate(cfg, micro_batch, world, node_size, bf16, sharded, checkpointing,
                    dispatch="grouped"):
    """GB per GPU of a training step, by part. Weights, gradients, AdamW moments and EMA are fp32
    (4 + 4 + 8 + 4 bytes a parameter), sharded over a node's GPUs with FSDP2. DDP's gradient
    buckets are views of the gradients (gradient_as_bucket_view): no second copy."""
    n_params = count(cfg)[0]
    shards = node_size if sharded else 1
    one_image = saved_bytes(cfg, 1, bf16, dispatch)
    per_block = saved_bytes(cfg, 2, bf16, dispatch) - one_image  # one image's activations
    weight_copies = one_image - per_block  # autocast's bf16 weights, per block
    if sharded:  # FSDP2 gathers bf16 weights itself, two blocks at a time (one prefetched)
        weight_copies = 2 * 2 * n_params / cfg.depth
    blocks_kept = 1 if checkpointing else cfg.depth  # checkpointing keeps one block's, recomputed
    inputs = cfg.depth * 4 * cfg.num_tokens * cfg.hidden_size * micro_batch if checkpointing else 0
    gb = {"weights": 4 * n_params / shards, "grads": 4 * n_params / shards,
          "AdamW": 8 * n_params / shards, "EMA": 4 * n_params / shards,
          "activations": blocks_kept * per_block * micro_batch + inputs,
          "bf16 weights": weight_copies * (1 if sharded else blocks_kept),
          # the transient peak of one block's backward
          "backward of a block": per_block * micro_batch}
    return {k: v / 1e9 for k, v in gb.items()}


def plan(cfg, local_batch, accum, world, node_size, gpu_gb, bf16, force_sharded,
         force_checkpointing, dispatch="grouped"):
    """(sharded, checkpointing, estimate): the first of DDP, DDP + checkpointing, sharded, sharded +
    checkpointing whose estimate fits 90% of the GPU (gpu_gb; inf on CPU), among those the flags
    allow; else a refusal that names the --grad-accum that would fit."""
    if force_sharded and world == 1:
        fail("--sharded needs several processes: launch with torchrun --nproc_per_node=N")
    budget = 0.9 * gpu_gb
    options = [(s, c) for s in (False, True) for c in (False, True)
               if (s or not force_sharded) and (c or not force_checkpointing)
               and (world > 1 or not s)]
    for sharded, checkpointing in options:
        est = memory_estimate(cfg, local_batch // accum, world, node_size, bf16, sharded,
                              checkpointing, dispatch)
        if sum(est.values()) <= budget:
            return sharded, checkpointing, est
    for more in (2, 4, 8, 16, 32, 64, 128):
        micro_batch = local_batch // (accum * more)
        est = memory_estimate(cfg, max(micro_batch, 1), world, node_size, bf16, world > 1, True,
                              dispatch)
        if micro_batch >= 1 and sum(est.values()) <= budget:
            fail(f"{local_batch // accum} images per GPU and micro-batch do not fit "
                 f"{gpu_gb:.0f} GB even {'sharded and ' if world > 1 else ''}"
                 f"with --grad-checkpointing: add --grad-accum {accum * more}")
    fail(f"this model does not fit {gpu_gb:.0f} GB per GPU even at 1 image per micro-batch: "
         "use more GPUs")


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
        mesh = init_device_mesh(device.type, (world // node_size, node_size),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)
    half = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                reduce_dtype=torch.float32, cast_forward_inputs=False)
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
    # running statistics (race thresholds): copied
    for b_ema, b in zip(ema.buffers(), model.buffers()):
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
    rectified-flow velocity loss), the router losses of every MoE layer (DiT-MoE's balance loss,
    Eq. 5, or Race-DiT's similarity loss), and Race-DiT's per-layer regularisation: each layer's
    prediction of the diffusion target, its L2 error weighted by layer_reg.
    Returns the loss and its terms, with "load": (L, E) assignments per expert."""
    t, x_t, noise = objective.training_inputs(x0)
    out, aux = model(x_t, t, y, return_aux=True)
    terms = objective.training_losses(out.float(), x0, x_t, t, noise)  # each (N,)
    terms = {k: v.mean() for k, v in terms.items()}
    loss = terms["loss"] + aux["router_loss"]
    if layer_reg:
        err = aux["layer_preds"].float() - objective.target(x0, noise)  # (L, N, C, H, W)
        terms["layer_reg"] = err.square().mean()
        loss = loss + layer_reg * terms["layer_reg"]
    return loss, terms | {"router_loss": aux["router_loss"], "load": aux["load"]}


@dataclasses.dataclass
class Recipe:
    """What a training step needs besides the model: flags, this process's place, numerics."""
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
    whose gradient sync is switched. Returns the step's terms, on the device."""
    stats = {}
    # Accumulate gradients; reduce them over processes in the last micro-batch's backward.
    for m in range(recipe.accum):
        set_grad_sync(wrapper, m == recipe.accum - 1)
        torch.manual_seed(micro_seed(recipe.seed, step, recipe.rank + recipe.world * m))
        x0 = encode(x[m::recipe.accum])
        with torch.autocast(recipe.device_type, dtype=torch.bfloat16, enabled=recipe.bf16):
            loss, terms = training_loss(model, objective, x0, y[m::recipe.accum], recipe.layer_reg)
        (loss / recipe.accum).backward()  # the router losses take the same 1/accum
        for k, v in terms.items():
            stats[k] = stats.get(k, 0) + v.detach() / recipe.accum
    # Update the weights (skipped on the device if the gradients are not finite), then the EMA.
    net = unwrap(wrapper)
    stats["skipped"] = clip_and_step(net, opt, recipe.clip_grad)
    average_thresholds(net, recipe.world)
    update_ema(ema, net, recipe.ema_decay)
    return stats


def clip_and_step(model, opt, clip_grad):
    """Clip the global gradient norm, then AdamW. A non-finite norm makes the fused kernel skip
    the update on the device (GradScaler's found_inf), with no host sync; returns 1.0 if so."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    opt.found_inf = (~norm.isfinite()).float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt.found_inf


def unwrap(wrapper):
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
# A run: its folder, its state, its log and checkpoints
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What a training run carries from step to step."""
    model: torch.nn.Module     # the network as it is called: compiled and/or DDP
    wrapper: torch.nn.Module   # the DDP or FSDP2 module whose gradient sync is switched
    net: DiT                   # the network itself: gradients, EMA, checkpoints
    ema: DiT
    opt: torch.optim.Optimizer
    sharded: bool
    folder: Path
    step: int
    last_good: Path | None     # the newest checkpoint on disk (every one written is finite)
    sums: dict = dataclasses.field(default_factory=dict)  # step terms since the last log line
    since: int = 0             # the step of the last log line
    clock: float = 0.0         # and its time


def new_run_folder(results, model_name):
    """results/NNN-<model>/checkpoints with NNN one past the highest there, as DiT names runs."""
    results = Path(results)
    taken = [int(m[1]) for d in results.iterdir() if (m := re.match(r"(\d+)-", d.name))]
    folder = results / f"{max(taken, default=-1) + 1:03d}-{model_name.replace('/', '-')}"
    (folder / "checkpoints").mkdir(parents=True)
    return folder


def point_latest(folder):
    # results/latest -> this run, swapped atomically (sample.py --ckpt results/latest/ema.pt);
    # called once the run has a checkpoint, so latest never names a run without an ema.pt
    tmp = folder.parent / "latest.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(folder.name, tmp)
    os.replace(tmp, folder.parent / "latest")


def trim_log(folder, step):
    """A resumed run redoes the steps after its checkpoint: drop their old log records."""
    log = folder / "log.jsonl"
    if log.exists():
        keep = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in keep))


def summarize(sums, net, steps, seconds, images_per_step, world, device):
    """The log record of the steps since the last one: loss terms averaged over steps and
    processes, each layer's expert load, skipped updates, non-finite weights, speed and peak
    memory. One all-reduce and one copy to the host: the only host syncs of the training loop."""
    terms = {k: v for k, v in sums.items() if k not in ("load", "skipped")}
    load = sums["load"]  # (L, E) assignments per expert, summed over steps
    local = [p.to_local() if isinstance(p, DTensor) else p for p in net.parameters()]
    bad_weights = torch.stack([(~p.isfinite()).any() for p in local]).sum().float()
    counts = [sums["skipped"][None], bad_weights[None]]
    flat = torch.cat([torch.stack(list(terms.values())), load.flatten(), *counts])
    if world > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()
    rec = dict(zip(terms, (flat[:len(terms)] / (steps * world)).tolist()))
    rec["skipped"] = round(flat[-2].item() / world)  # every process skips the same steps
    rec["non_finite_weights"] = bool(flat[-1] > 0)
    share = flat[len(terms):-2].view(load.shape)
    # (L, E): an expert's share of its layer
    share = share / share.sum(1, keepdim=True).clamp(min=1)
    if share.numel():
        rec["load_min"] = share.min(1).values.tolist()
        rec["load_max"] = share.max(1).values.tolist()
        rec["maxvio"] = max_violation(share).mean().item()  # Race-DiT's MaxVio
    rec["steps_per_s"] = steps / seconds
    rec["images_per_s"] = steps * images_per_step / seconds
    if device.type == "cuda":
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        rec["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    return rec


def check_finite(rec, run, bar):
    """Stop before any checkpoint holds non-finite numbers. The message names the newest good
    checkpoint."""
    losses = [f"{k} {v}" for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    problems = [f"loss ({', '.join(losses)})"] if losses else []
    if rec["skipped"]:
        problems.append(f"gradients ({rec['skipped']} update(s) skipped)")
    if rec["non_finite_weights"]:
        problems.append("weights")
    if problems:
        bar.close()  # before the message, so the bar does not draw over it
        fail(f"non-finite {', '.join(problems)} in steps {run.since + 1}-{run.step}; "
             f"nothing saved; last good checkpoint: {run.last_good}")


def log_progress(run, bar, rank, images_per_step, world, device, num_experts):
    """The log line and log.jsonl record of the steps since the last one, after the finite check."""
    seconds = time.time() - run.clock
    rec = summarize(run.sums, run.net, run.step - run.since, seconds, images_per_step, world,
                    device)
    check_finite(rec, run, bar)
    reset_meter(run)
    if rank != 0:
        return
    shown = [f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float)]
    if "load_min" in rec:
        low = min(rec["load_min"])
        high = max(rec["load_max"])
        shown.append(f"expert load {low:.2f}-{high:.2f} (even: {1 / num_experts:.2f})")
    bar.write(f"step {run.step}: " + ", ".join(shown))
    with open(run.folder / "log.jsonl", "a") as f:
        f.write(json.dumps(dict(step=run.step, **rec)) + "\n")


def reset_meter(run):
    run.sums = {}
    run.since = run.step
    run.clock = time.time()


def save(run, cfg, args, epoch):
    """A checkpoint and ema.pt, old ones pruned, latest pointed here; a full disk ends the run
    with one line, the last good checkpoint kept."""
    info = {"step": run.step, "epoch": epoch, "config": dataclasses.asdict(cfg), "args": vars(args)}
    try:
        run.last_good = checkpoint.save(run.folder, run.net, run.ema, run.opt, info, run.sharded)
    except OSError as e:
        why = "disk full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        fail(f"{why} writing the checkpoint of step {run.step} in {run.folder}; "
             f"last good checkpoint: {run.last_good}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        checkpoint.prune(run.folder, args.keep_last)
        point_latest(run.folder)


# ----------------------------------------------------------------------------
# Setting a run up
# ----------------------------------------------------------------------------

def build_config(args, data_fields):
    """The model config: the registry entry, the data's shape, then --set; checked on its own
    and against the data before anything is built."""
    try:
        cfg = config_from_name(args.model, **(data_fields | args.set))
    except ValueError as e:
        fail(e)
    error = cfg.check()
    if error:
        fail(error)
    for name in ("input_size", "in_channels", "latent_space"):
        if getattr(cfg, name) != data_fields[name]:
            fail(f"--set {name}={getattr(cfg, name)} does not fit the data: "
                 f"its {name} is {data_fields[name]}")
    if cfg.num_classes < data_fields["num_classes"]:
        fail(f"--set num_classes={cfg.num_classes} is fewer than the "
             f"{data_fields['num_classes']} classes in the data")
    return cfg


def find_resume(path, cfg, log):
    """The newest finite checkpoint of a run folder, or the file or sharded folder given, checked
    against this run's config. Every rank looks: on node-local disks one node may lack it."""
    found, error = checkpoint.find(path, note=log)
    if found is not None:
        info = checkpoint.read_info(found)
        diff = [f"{k} {info['config'].get(k)} vs {v}" for k, v in dataclasses.asdict(cfg).items()
                if info["config"].get(k) != v]
        if diff:
            error = (f"{found} is a {info['args']['model']} checkpoint that does not fit this run "
                     f"(checkpoint vs this run: {', '.join(diff)})")
    fail_if_any(error)
    return found.resolve()


def build_run(cfg, args, device, bf16, node_size, sharded, checkpointing, resume_from, log):
    """Model, EMA and AdamW, sharded or DDP-wrapped as planned; a resumed run's state and folder
    (a new --lr or --weight-decay applies from here on), else a new folder. Collective."""
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank
    net = DiT(cfg)
    if args.init_from and not resume_from:
        try:
            log(checkpoint.init_from(net, args.init_from))
        except checkpoint.CheckpointError as e:
            fail(e)
    net.grad_checkpointing = checkpointing
    with torch.device("meta"):  # the EMA gets storage after sharding: never a second full copy
        ema = DiT(cfg)
    if sharded:
        shard(net, bf16, node_size, device)
        shard(ema, bf16, node_size, device)
    net.to(device)
    ema.to_empty(device=device).requires_grad_(False).load_state_dict(net.state_dict())
    # fused: one pass over weights, gradients and moments (on CPU 5x faster than the per-op default)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=True)
    wrapper = net
    # DDP: every expert is used in every step, so no unused parameters to look for
    if dist.is_initialized() and not sharded:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapper = DDP(net, device_ids=device_ids, forward_sync_buffers=False,
                      gradient_as_bucket_view=True)
    model = torch.compile(wrapper) if args.compile else wrapper
    run = Run(model, wrapper, net, ema, opt, sharded, folder=None, step=0, last_good=None)
    if resume_from:
        continue_run(run, resume_from, args, log)
    run.folder = shared_run_folder(run, args)
    reset_meter(run)
    return run


def continue_run(run, path, args, log):
    """The same run continues: its step, its weights and optimizer state, its folder."""
    info = checkpoint.resume(path, run.net, run.ema, run.opt)
    run.step = info["step"]
    run.folder = path.parent.parent
    run.last_good = path
    for key in ("lr", "weight_decay"):  # this command's values, recorded in its checkpoints
        for group in run.opt.param_groups:
            group[key] = getattr(args, key)
        if info["args"][key] != getattr(args, key):
            log(f"--{key.replace('_', '-')} changed from {info['args'][key]} "
                f"to {getattr(args, key)}")
    checkpoint.export_ema(run.folder, run.ema, info | {"args": vars(args)}, run.sharded)  # may lag


def shared_run_folder(run, args):
    """Rank 0 names the folder (new, or the resumed one, cleaned of a killed write's leftovers and
    of log records past the checkpoint) and tells every rank: sharded checkpoints are
    written by all."""
    folder = run.folder
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        folder = folder or new_run_folder(args.results_dir, args.model)
        checkpoint.remove_partial(folder)
        trim_log(folder, run.step)
    if dist.is_initialized():
        shared = [folder]
        dist.broadcast_object_list(shared)
        folder = shared[0]
    return folder


def load_data(args, device):
    """(dataset, encode, data_fields); a data error of any rank (a node whose disk lacks the
    shards) stops every rank."""
    try:
        found = setup_data(args.data_path, args.latents_path, args.image_size, args.vae, device,
                           args.digits)
        error = None
    except DataError as e:
        found = None
        error = str(e)
    fail_if_any(error)
    return found


def batches(data, sampler, step, total_steps, local_batch, device, num_workers):
    """This process's batches (x, y) on the device from `step` to total_steps: rank r takes
    samples r, r + world, ... of each epoch's permutation (seeded by the epoch)."""
    steps_per_epoch = len(sampler) // local_batch
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        order = list(sampler)[(step - epoch * steps_per_epoch) * local_batch:
                              steps_per_epoch * local_batch]
        workers = 0 if isinstance(data, TensorDataset) else num_workers
        loader = DataLoader(data, local_batch, sampler=order, drop_last=True, num_workers=workers,
                            pin_memory=device.type == "cuda")
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            step += 1
            if step == total_steps:
                return


def describe(cfg, args, data, run, plan_, world, node_size, bf16, steps_per_epoch, total_steps,
             log):
    """What the run is, before step 1: sizes, batch, the memory plan per GPU."""
    sharded, checkpointing, mem = plan_
    mode = "HSDP across nodes" if sharded and world > node_size else "sharded" if sharded \
        else "DDP" if world > 1 else "single process"
    mode += (f", {'bf16' if bf16 else 'fp32'}"
             + (", gradient checkpointing" if checkpointing else ""))
    n_params = count(cfg)[0]
    kind = "latents" if cfg.latent_space else "pixels"
    log(f"{args.model}: {n_params / 1e6:.2f}M parameters, {cfg.num_classes} classes, "
        f"input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size} {kind}, {len(data)} images")
    log(f"batch: global {args.global_batch_size} = {world} processes x {args.grad_accum} "
        f"micro-batches x {args.global_batch_size // world // args.grad_accum}; "
        f"{steps_per_epoch} steps/epoch; steps {run.step} -> {total_steps}")
    log(f"memory per process, {mode}: " + " + ".join(f"{k} {v:.2f}" for k, v in mem.items())
        + f" = {sum(mem.values()):.2f} GB")
    # Eq. 5 at perfect balance: f_i = 1, sum_i P_i = 1
    if cfg.num_experts and cfg.router == "token":
        log(f"router_loss at perfect balance: {cfg.depth * cfg.balance_alpha:.4f} "
            f"({cfg.depth} layers x alpha {cfg.balance_alpha}), its floor")
    log(f"results: {run.folder}")


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def main(args):
    # Processes, devices, number format.
    rank, world, device = launch.setup(args.device)
    node_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # GPUs per node under torchrun
    bf16 = launch.bf16_default(device, args.precision)
    if args.global_batch_size % (world * args.grad_accum):
        fail(f"--global-batch-size {args.global_batch_size} does not split into "
             f"{world} processes x {args.grad_accum} micro-batches")
    local_batch = args.global_batch_size // world
    if args.extract_latents:
        return extract_latents(args.data_path, args.latents_path, args.image_size, args.vae,
                               local_batch, args.num_workers, rank, world, device)
    log = print if rank == 0 else lambda *a: None

    # Data, and the model config that fits it.
    data, encode, data_fields = load_data(args, device)
    cfg = build_config(args, data_fields)
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=args.global_seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        fail(f"{len(data)} images are fewer than one global batch of {args.global_batch_size}")
    total_steps = min(args.max_steps or math.inf, (args.epochs or math.inf) * steps_per_epoch)

    # Model, EMA and AdamW, planned to fit the GPU; or the resumed run's.
    resume_from = find_resume(args.resume, cfg, log) if args.resume else None
    planned = plan(cfg, local_batch, args.grad_accum, world, node_size, gpu_memory_gb(device), bf16,
                   args.sharded, args.grad_checkpointing, gpu_dispatch(device, bf16))
    run = build_run(cfg, args, device, bf16, node_size, *planned[:2], resume_from, log)
    describe(cfg, args, data, run, planned, world, node_size, bf16, steps_per_epoch, total_steps,
             log)

    # Train: a step, a log line now and then (the only host syncs), a checkpoint now and then.
    recipe = Recipe(args.grad_accum, args.global_seed, rank, world, cfg.layer_reg, args.clip_grad,
                    args.ema_decay, device.type, bf16)
    objective = create_objective(cfg.objective)
    run.net.train()  # label dropout on; the EMA never runs here
    bar = tqdm(total=total_steps, initial=run.step, disable=rank != 0, dynamic_ncols=True)
    try:
        for x, y in batches(data, sampler, run.step, total_steps, local_batch, device,
                            args.num_workers):
            stats = train_step(run.model, run.wrapper, run.ema, run.opt, objective, x, y, encode,
                               run.step, recipe)
            run.sums = {k: run.sums.get(k, 0) + v for k, v in stats.items()}
            run.step += 1
            bar.update()
            save_now = run.step % args.ckpt_every == 0 or run.step == total_steps
            if run.step % args.log_every == 0 or save_now:
                log_progress(run, bar, rank, args.global_batch_size, world, device, cfg.num_experts)
            if save_now:
                save(run, cfg, args, run.step // steps_per_epoch)
    except KeyboardInterrupt:
        bar.close()
        fail(f"interrupted at step {run.step}; last good checkpoint: {run.last_good}", alone=True)
    except DataError as e:  # a file this process could not read; from a loader worker the message
        bar.close()         # comes after the worker's traceback: its last line
        fail(str(e).strip().splitlines()[-1].split("DataError: ")[-1], alone=True)
    bar.close()
    log(f"done at step {run.step}; EMA weights: {run.folder}/ema.pt")


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def parse_set(items):
    """--set FIELD=VALUE pairs as {field: value}, each value parsed as its DiTConfig field's
    type."""
    types = {f.name: f.type for f in dataclasses.fields(DiTConfig)}
    words = {int: "an int", float: "a number", bool: "true or false", str: "a string",
             int | None: "an int or none"}
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            fail(f"--set {item}: unknown config field {key!r}; fields: {', '.join(types)}")
        kind = types[key]
        try:
            if kind is bool:
                overrides[key] = {"1": True, "true": True,
                                  "0": False, "false": False}[value.lower()]
            elif kind == int | None:  # shared_hidden: a width, or none for the default 2D
                overrides[key] = None if value.lower() == "none" else int(value)
            else:
                overrides[key] = kind(value)
        except (ValueError, KeyError):
            fail(f"--set {item}: {value!r} is not {words[kind]}")
    return overrides


def parse_args(argv=None):
    # Defaults are the CPU demo that `python train.py` runs; where the paper differs, the help
    # says so. One group of flags per concern, each in its own function below.
    p = launch.Parser(description="Train DiT-MoE; the module docstring has the commands.")
    add_model_and_data_flags(p.add_argument_group("model and data"))
    add_optimization_flags(p.add_argument_group("optimization"))
    add_run_flags(p.add_argument_group("the run"))
    args = p.parse_args(argv)
    args.set = parse_set(args.set)
    if args.extract_latents and not (args.data_path and args.latents_path):
        fail("--extract-latents needs --data-path (images) and --latents-path (output folder)")
    if args.data_path and not Path(args.data_path).is_dir():
        fail(f"data path {args.data_path} is not a folder")
    if args.resume and args.init_from:
        fail("--resume continues a run, --init-from starts a new one from weights: "
             "pass one of them")
    try:
        config_from_name(args.model, **args.set)
    except (ValueError, TypeError) as e:
        fail(e)
    if not args.extract_latents:
        launch.writable_dir(args.results_dir)
    return args


def add_model_and_data_flags(group):
    add = group.add_argument
    add("--model", default="T/2-4E2A",
        help="size from model.py's registry (paper: S/2-8E2A ... G/2-16E2A; "
             "T is the tiny demo size)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override a DiTConfig field (model.py), e.g. --set router=race "
             "(token | expert | race), --set objective=rf (ddpm | rf), "
             "--set layer_reg=0.1 (Race-DiT)")
    add("--data-path",
        help="image folder, one sub-folder per class (ImageNet layout); unset: built-in digits")
    add("--latents-path", help="latent shards from --extract-latents: training without the VAE")
    add("--extract-latents", action="store_true",
        help="encode --data-path into shards at --latents-path (posterior mean and std, "
             "both flips), then exit")
    add("--image-size", type=positive_int, default=256,
        help="center-crop size of --data-path images (paper: 256)")
    add("--vae", default=VAE,
        help="diffusers AutoencoderKL, hub name or local folder (paper: sd-vae-ft-ema)")
    add("--digits", choices=("all", "train"), default="all",
        help="built-in digits: all 1,797, or all but every 5th, held out for evaluation "
             "(compare.py)")
    add("--num-workers", type=nonnegative_int, default=4,
        help="data-loading processes per GPU (folders, shards)")


def add_optimization_flags(group):
    add = group.add_argument
    add("--global-batch-size", type=positive_int, default=128,
        help="images per optimizer step over all processes (paper: 1024)")
    add("--grad-accum", type=positive_int, default=1,
        help="micro-batches per process and optimizer step")
    add("--lr", type=positive_float, default=1e-3,
        help="AdamW learning rate, constant (paper: 1e-4; the tiny demo model learns faster "
             "at 1e-3)")
    add("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay (paper: 0)")
    add("--ema-decay", type=ranged(float, 0, 1, high_open=True), default=0.995,
        help="EMA decay per step, in [0, 1) (paper: 0.9999; 0.995 averages ~200 steps, "
             "right for a short run)")
    add("--clip-grad", type=positive_float,
        help="clip the global gradient norm to this (paper: no clipping)")
    add("--max-steps", type=positive_int, default=1200,
        help="optimizer steps to train to (paper: 500K to 7M)")
    add("--epochs", type=positive_int, help="or stop after this many epochs, whichever comes first")
    add("--global-seed", type=nonnegative_int, default=0,
        help="seed of the initial weights, data order and noise")


def add_run_flags(group):
    add = group.add_argument
    add("--results-dir", default="results",
        help="runs go to RESULTS_DIR/NNN-<model>; RESULTS_DIR/latest links "
             "the newest run with a checkpoint")
    add("--log-every", type=positive_int, default=100,
        help="steps between log lines and log.jsonl records")
    add("--ckpt-every", type=positive_int, default=300,
        help="steps between checkpoints (DiT: 50000; the demo: a quarter of its 1,200 steps)")
    add("--keep-last", type=nonnegative_int, default=0,
        help="keep only the newest N checkpoints (0: keep all, as DiT; each holds weights, EMA "
             "and AdamW: 16 bytes a parameter)")
    add("--resume",
        help="run folder (its newest finite checkpoint) or checkpoint to continue; same flags")
    add("--init-from",
        help="a trained checkpoint (ours, official DiT-MoE or DiT) to start a NEW run from: "
             "matching tensors are copied, experts upcycled from a 1-expert or dense model")
    launch.add_device_flags(group, "compute in bf16 (autocast) or fp32; default bf16 on GPU, "
                                   "fp32 on CPU; fp32 matmuls use TF32 on GPU")
    add("--sharded", action="store_true",
        help="force FSDP2 sharding (chosen by itself when DDP would not fit)")
    add("--grad-checkpointing", action="store_true",
        help="force recomputing block activations in backward (chosen by itself when they "
             "would not fit)")
    add("--compile", action="store_true", help="torch.compile the model")


if __name__ == "__main__":
    try:
        main(parse_args())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
