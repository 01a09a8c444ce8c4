"""Run by tests/test_scale.py under torchrun (2 processes, gloo, CPU): one bf16 training step of
the same network and micro-batches as DDP under autocast and as train.py shards it (FSDP2), and
as the old sharded recipe did it (bf16 inputs cast by FSDP2, no autocast). Rank 0 prints the
relative difference of the losses and of all gradients (one vector) against DDP's, and the dtypes
of the residual stream (a block's input) and of t where the t-embedder receives it, as JSON."""
import launch  # noqa: I001  first import

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import train
from diffusion import create_objective
from model import create_model


def one_step(recipe, objective_name):
    torch.manual_seed(0)
    net = create_model("T/2-4E2A", input_size=8, in_channels=4, num_classes=10, objective=objective_name)
    with torch.no_grad():  # every weight random: the zero-initialised gates would hide the blocks
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    autocast = True
    if recipe == "ddp":
        model = DDP(net)
    elif recipe == "sharded":
        train.shard(net, bf16=True, node_size=dist.get_world_size(), device=torch.device("cpu"))
        model = net
    else:  # the old recipe: FSDP2 casts the forward inputs (x, t, y) to bf16, autocast off
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in net.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
        model = net
        autocast = False
    dtypes = {}

    def record(name):
        def hook(module, args):  # returns None: the arguments pass unchanged
            dtypes.setdefault(name, str(args[0].dtype).removeprefix("torch."))
        return hook
    net.blocks[1].register_forward_pre_hook(record("block input"))
    net.t_embedder.register_forward_pre_hook(record("t"))
    objective = create_objective(objective_name)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    torch.manual_seed(2 + dist.get_rank())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = train.training_loss(model, objective, x0, y, layer_reg=0)
    loss.backward()
    losses = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss.detach().float())
    grads = {}
    for name, p in net.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = grad.float()  # (the same order of parameters in every recipe)
    return torch.stack(losses), torch.cat([g.flatten() for g in grads.values()]), dtypes


def main():
    _, _, _ = launch.setup("cpu")
    objective_name = sys.argv[1]
    ref_loss, ref_grads, ref_dtypes = one_step("ddp", objective_name)
    out = {"ddp": {"dtypes": ref_dtypes}}
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    for recipe in ("sharded", "old"):
        loss, grads, dtypes = one_step(recipe, objective_name)
        out[recipe] = {"loss": rel(loss, ref_loss), "grads": rel(grads, ref_grads), "dtypes": dtypes}
    if dist.get_rank() == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
