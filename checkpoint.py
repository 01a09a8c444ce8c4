"""
Checkpoint files: the one module that writes and reads them.

Ours, written by train.py into a run folder:
    checkpoints/NNNNNNN.pt  {"model", "ema", "opt", "step", "epoch", "config", "args"},
                            one process or DDP
    checkpoints/NNNNNNN/    the same as torch.distributed.checkpoint shards, sharded runs
                            (+ train_state.json)
    ema.pt                  {"ema", "config", "step", "args"}: what sample.py reads
Every write goes to a temporary name and is renamed into place, so a crash never leaves a
half-written checkpoint under a final name. "config" is model.DiTConfig as a dict; "opt" is keyed
by parameter name, so a checkpoint resumes sharded or not, on any number of processes.

Theirs, read only: the official DiT-MoE files ({"ema": sd}, {"model": sd} or a raw state_dict,
one nn.Linear per expert) and facebookresearch/DiT's released dense models (raw state_dict).

    net = load_model("ema.pt", device="cuda", dtype=torch.bfloat16)  # any of the above
    python checkpoint.py results/latest  # ema.pt from the newest checkpoint

Tests: python -m pytest -q tests/test_checkpoint.py
"""
import launch  # noqa: I001  first import: the OpenMP wait policy must be set before torch loads

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from model import SIZES, DiT, DiTConfig
from moe import SHARED_RATIO


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line for the user."""


# ----------------------------------------------------------------------------
# Writing (train.py)
# ----------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to path.tmp, fsync, rename over path: a crash mid-write leaves the old file
    intact, an interrupted or failed write (disk full) removes its partial file and raises."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partial(run_dir):
    """Leftovers of a write that was killed: *.tmp files and folders."""
    for tmp in list(run_dir.glob("*.tmp")) + list(run_dir.glob("checkpoints/*.tmp")):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def save(run_dir, model, ema, opt, info, sharded):
    """Collective: a checkpoint of step info["step"], then ema.pt. info: step, epoch, config, args.
    Sharded runs write each rank's shards in parallel (torch.distributed.checkpoint); the others
    have the full weights on every rank, and rank 0 writes one file. Returns the checkpoint's
    path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = run_dir / "checkpoints" / f"{info['step']:07d}"
    if sharded:
        model_sd, opt_sd = get_state_dict(model, opt)
        tmp = final.with_name(final.name + ".tmp")
        dcp.save({"model": model_sd, "ema": get_model_state_dict(ema), "opt": opt_sd},
                 checkpoint_id=tmp, no_dist=not dist.is_initialized())
        if rank == 0:  # dcp.save returned on every rank: all shards are written
            (tmp / "train_state.json").write_text(json.dumps(info))
            os.replace(tmp, final)
    else:
        final = final.with_suffix(".pt")
        if rank == 0:
            model_sd, opt_sd = get_state_dict(model, opt)
            save_atomic({"model": model_sd, "ema": ema.state_dict(), "opt": opt_sd, **info}, final)
    export_ema(run_dir, ema, info, sharded)
    return final


def export_ema(run_dir, ema, info, sharded):
    """Collective: RUN/ema.pt, the EMA alone, gathered to rank 0 when sharded (66 GB for G/2-16E2A,
    hence launch.COLLECTIVE_TIMEOUT)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ema_sd = get_model_state_dict(ema, options=full) if sharded else ema.state_dict()
    if rank == 0:
        save_ema(run_dir / "ema.pt", ema_sd, info)
    if dist.is_initialized():
        dist.barrier()


def save_ema(path, ema_sd, info):
    """The sampling checkpoint: {"ema", "config", "step", "args"}."""
    save_atomic({"ema": ema_sd, **{k: info[k] for k in ("config", "step", "args")}}, Path(path))


def checkpoints(run_dir):
    """The run's checkpoints (files and sharded folders), oldest first."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("*")
             if re.fullmatch(r"\d{7}(\.pt)?", p.name)]
    return sorted(found, key=lambda p: p.name[:7])


def prune(run_dir, keep_last):
    """Delete all but the newest keep_last checkpoints (0: keep all)."""
    for path in checkpoints(run_dir)[:-keep_last] if keep_last else []:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ----------------------------------------------------------------------------
# Resuming (train.py)
# ----------------------------------------------------------------------------

def read_info(path):
    """step, epoch, config and args of a training checkpoint (file or sharded folder)."""
    path = Path(path)
    if path.is_dir():
        return json.loads((path / "train_state.json").read_text())
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "opt" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of train.py "
                              "(pass a run folder or checkpoints/NNNNNNN.pt, not ema.pt)")
    return {k: ckpt[k] for k in ("step", "epoch", "config", "args")}


def is_finite(path):
    """Every weight of a checkpoint file finite (a sharded folder is only ever written finite)."""
    if Path(path).is_dir():
        return True
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return all(v.isfinite().all() for part in ("model", "ema") for v in ckpt[part].values()
               if v.is_floating_point())


def newest_finite(run_dir, note=print):
    """The newest checkpoint of a run folder whose weights are finite; older runs of this code
    could save non-finite ones, which are skipped with a note."""
    for path in reversed(checkpoints(run_dir)):
        if is_finite(path):
            return path
        note(f"skipping {path}: non-finite weights")
    return None


def find(path, note=print):
    """(checkpoint, None) or (None, why not): a run folder's newest finite checkpoint, or the
    checkpoint file or sharded folder given, if its weights are finite."""
    path = Path(path)
    try:
        if (path / "checkpoints").is_dir():
            found = newest_finite(path, note)
            if found is None:
                return None, f"no finite checkpoint in {path / 'checkpoints'}"
            return found, None
        if not path.exists():
            return None, f"no checkpoint at {path}"
        if not is_finite(path):
            return None, f"{path} holds non-finite weights; resume from an earlier checkpoint"
        read_info(path)
        return path, None
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:
        return None, f"cannot read checkpoint {path} ({e})"


def resume(path, model, ema, opt):
    """Load a training checkpoint (file or sharded folder) into model, ema and opt, sharded or not.
    Collective in a distributed run. Returns its info (step, epoch, config, args)."""
    path = Path(path)
    if path.is_dir():  # each rank reads the pieces of its own shards, whatever the old world size
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "ema": get_model_state_dict(ema), "opt": opt_sd}
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["opt"])
        set_model_state_dict(ema, state["ema"])
        return read_info(path)
    # every rank maps the file
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    full = StateDictOptions(full_state_dict=True)
    set_state_dict(model, opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["opt"],
                   options=full)
    set_model_state_dict(ema, ckpt["ema"], options=full)
    return {k: ckpt[k] for k in ("step", "epoch", "config", "args")}


# ----------------------------------------------------------------------------
# The official DiT-MoE layout and DiT's
# ----------------------------------------------------------------------------

REQUIRED = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight")


def from_official(sd):
    """Official DiT-MoE state_dict (per-expert nn.Linear) -> ours (stacked experts). Lossless.
    DiT's dense state_dicts are already in our layout and pass through unchanged."""
    out = {}
    for key, v in sd.items():
        key = key.replace("attn.Wqkv.", "attn.qkv.").replace("attn.out_proj.", "attn.proj.")
        key = key.replace("moe.gate.weight", "moe.router.weight")
        m = re.match(r"(blocks\.\d+\.moe)\.(experts\.\d+|shared_experts)\."
                     r"(gate|up|down)_proj\.weight", key)
        if m is None:
            out[key] = v
        elif m[2] == "shared_experts" and m[3] != "down":  # [gate; up] fused along the output dim
            out[f"{m[1]}.shared.gate_up.weight"] = torch.cat(
                [expert_weight(sd, m[1] + ".shared_experts", p) for p in ("gate", "up")])
        elif m[2] == "shared_experts":
            out[f"{m[1]}.shared.down.weight"] = v
    # Routed experts: (H, D) Linear weights -> w_gate_up (E, D, 2H) and w_down (E, H, D).
    for prefix in sorted({k.split(".experts.")[0] for k in sd if ".moe.experts." in k}):
        E = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(f"{prefix}.experts."))
        experts = [f"{prefix}.experts.{e}" for e in range(E)]
        gate_up = [torch.cat([expert_weight(sd, e, "gate"), expert_weight(sd, e, "up")]).T
                   for e in experts]
        out[f"{prefix}.w_gate_up"] = torch.stack(gate_up)
        out[f"{prefix}.w_down"] = torch.stack([expert_weight(sd, e, "down").T for e in experts])
    return out


def expert_weight(sd, prefix, proj):
    key = f"{prefix}.{proj}_proj.weight"
    if key not in sd:
        raise CheckpointError(f"official checkpoint lacks {key}")
    return sd[key]


def config_from_state_dict(sd):
    """Architecture of an official DiT-MoE or a DiT state_dict, read off its key names and shapes.
    Official MoE files are all top-2 (8E2A, 16E2A)."""
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        found = "no DiT keys" if len(missing) == len(REQUIRED) else f"missing {', '.join(missing)}"
        raise CheckpointError(f"not a DiT / DiT-MoE checkpoint ({found})")
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    experts = len({k.split(".")[4] for k in sd if k.startswith("blocks.0.moe.experts.")})
    # None: dense DiT or no shared expert
    shared = sd.get("blocks.0.moe.shared_experts.gate_proj.weight")
    mlp = sd.get("blocks.0.mlp.fc1.weight")  # dense DiT: GELU MLP of width mlp_ratio * D
    qk_norm = "blocks.0.attn.Wqkv.weight" in sd
    if qk_norm:  # the per-head LayerNorm reveals the head width
        heads = D // sd["blocks.0.attn.q_norm.weight"].shape[0]
    else:        # the paper's sizes, else DiT's head width of 64
        heads = ({D_: h for name, (_, D_, h, _) in SIZES.items() if name != "T"}
                 .get(D, max(D // 64, 1)))
    return DiTConfig(
        depth=depth, hidden_size=D, num_heads=heads, patch_size=p, num_experts=experts,
        top_k=2 if experts else 0,
        mlp_ratio=mlp.shape[0] / D if mlp is not None else DiTConfig.mlp_ratio,
        shared_hidden=(None if shared is None or shared.shape[0] == SHARED_RATIO * D
                       else shared.shape[0]),
        input_size=math.isqrt(sd["pos_embed"].shape[1]) * p, in_channels=C,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, qk_norm=qk_norm,
        learn_sigma=sd["final_layer.linear.weight"].shape[0] == p * p * 2 * C,
        objective="rf" if qk_norm else "ddpm")  # the released XL/G are RF-trained, S/B and DiT DDPM


# ----------------------------------------------------------------------------
# Reading for sampling, and for starting a new run from old weights
# ----------------------------------------------------------------------------

def read_weights(path):
    """(config, state_dict in our layout) of any checkpoint we read: ours (its EMA), ema.pt,
    official DiT-MoE or DiT files. Memory-mapped: a 33 GB G/2 file is paged in as it is used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder: pass its ema.pt "
                              f"(python checkpoint.py {path} writes one)") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state_dict")
    if "config" in ckpt:  # ours: plain dict with the config, EMA weights preferred
        cfg = ckpt["config"]
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: its config is a {type(cfg).__name__}, not a dict")
        fields = {f.name for f in dataclasses.fields(DiTConfig)}
        if not set(cfg) <= fields:
            raise CheckpointError(f"{path} has unknown config fields {sorted(set(cfg) - fields)}")
        sd = weights_of(ckpt)
        if sd is ckpt:
            raise CheckpointError(f"{path} has a config but no weights "
                                  "(no ema or model state_dict)")
        return DiTConfig(**cfg), sd
    sd = weights_of(ckpt)
    return config_from_state_dict(sd), from_official(sd)


def weights_of(ckpt):
    """The state_dict of a checkpoint: its "ema", else its "model", else the checkpoint itself, as
    the official loader reads them."""
    return next((ckpt[k] for k in ("ema", "model") if isinstance(ckpt.get(k), dict) and ckpt[k]),
                ckpt)


def load_weights(net, sd, source, device, dtype=torch.float32):
    """Fill a meta-device net from sd on device, parameters in dtype, with a one-line error naming
    the offending keys. The routers (routing is decided in float32) and the buffers (the race
    thresholds, the position table) stay float32."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        show = lambda ks: ", ".join(ks[:3]) + (f" (+{len(ks) - 3} more)" if len(ks) > 3 else "")
        parts = [f"{what}: {show(ks)}" for what, ks in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                 if ks]
        raise CheckpointError(f"{source} does not fit {net.cfg}: " + "; ".join(parts))
    lowered = {k for k in dict(net.named_parameters()) if ".moe.router" not in k}
    # official XL/G files are fp16; assign=True takes these tensors as the parameters
    net.load_state_dict({k: v.to(device, dtype if k in lowered else torch.float32)
                         for k, v in sd.items()}, assign=True)


def load_model(path, device="cpu", dtype=torch.float32):
    """Network in eval mode from any checkpoint read_weights reads, parameters in dtype."""
    cfg, sd = read_weights(path)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        net = DiT(cfg)
    load_weights(net, sd, path, device, dtype)
    return net.eval()


def init_from(net, path):
    """Start a new run from trained weights (sparse upcycling, Komatsuzaki et al. 2023, as the
    official upcycle.py does): every tensor whose name and shape match is copied; the routed
    experts of a 1-expert source are copied into all E experts, without noise (the router's
    different choices per token break the symmetry in training; the upcycled model starts as the
    source's function, its routed part scaled by the sum of each token's top-k router weights),
    and a router whose shape changed starts from N(0, 0.02) as in the official code. A dense DiT
    (GELU MLPs) gives attention, embedders, adaLN and final layer; experts and router stay fresh.
    Returns a one-line account of what was copied."""
    src_cfg, sd = read_weights(path)
    for name in ("hidden_size", "depth", "patch_size"):
        if getattr(src_cfg, name) != getattr(net.cfg, name):
            raise CheckpointError(f"--init-from {path}: its {name} is {getattr(src_cfg, name)}, "
                                  f"this model's is {getattr(net.cfg, name)}")
    copied = []
    upcycled = []
    fresh = []
    with torch.no_grad():
        for key, own in net.state_dict().items():
            src = sd.get(key)
            if src is not None and src.shape == own.shape:
                own.copy_(src)
                copied.append(key)
            elif (key.endswith(("w_gate_up", "w_down")) and src is not None
                  and src.shape == (1, *own.shape[1:])):
                own.copy_(src.expand_as(own))  # (1, D, 2H) -> (E, D, 2H): one expert becomes E
                upcycled.append(key)
            elif key.endswith("router.weight") and src is not None:
                own.normal_(0, 0.02)
                fresh.append(key)
            else:
                fresh.append(key)
    parts = [f"{len(copied)} tensors copied",
             f"{len(upcycled)} upcycled into {net.cfg.num_experts} experts",
             f"{len(fresh)} fresh" + (f" ({summarize_keys(fresh)})" if fresh else "")]
    return f"--init-from {path}: " + ", ".join(parts)


def summarize_keys(keys):
    """block.N.part.weight names grouped by part: 'moe.w_gate_up x4, moe.router.weight x4'."""
    parts = {}
    for key in keys:
        part = re.sub(r"^blocks\.\d+\.", "", key)
        parts[part] = parts.get(part, 0) + 1
    return ", ".join(f"{part} x{n}" if n > 1 else part for part, n in parts.items())


def export_command(argv=None):
    """python checkpoint.py RUN_OR_CHECKPOINT: RUN/ema.pt from a run's newest finite checkpoint (or
    the one given), read in one process, e.g. after a sharded run was stopped before its ema.pt."""
    p = launch.Parser(description=export_command.__doc__)
    p.add_argument("path", help="run folder, or one checkpoint (file or sharded folder) "
                                "in its checkpoints/")
    path = Path(p.parse_args(argv).path)
    src, error = find(path)
    if error:
        launch.fail(f"cannot export the EMA of {path}: {error}")
    try:
        info = read_info(src)
        if src.is_dir():  # one process reads every rank's shards into full tensors
            with torch.device("meta"):
                ema = DiT(DiTConfig(**info["config"]))
            state = {"ema": {k: torch.empty_like(v, device="cpu")
                             for k, v in ema.state_dict().items()}}
            dcp.load(state, checkpoint_id=src, no_dist=True)
        else:
            state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        save_ema(src.parent.parent / "ema.pt", state["ema"], info)
    except (CheckpointError, OSError, RuntimeError, KeyError) as e:
        launch.fail(f"cannot export the EMA of {path}: {e}")
    print(f"wrote {src.parent.parent / 'ema.pt'} from {src}")


if __name__ == "__main__":
    export_command()
