"""
Speed of the pieces that matter, measured in one run so the ratios hold on a noisy machine.

    python bench.py                 # full table on this machine (CPU: ~10 minutes)
    python bench.py --quick         # small shapes, seconds (what the test runs)
    python bench.py --json out.json
    python bench.py --only moe      # one section: moe, model (training step, sampling), frechet

1. MoE layer forward+backward at S/2-8E2A shapes (8 images x 256 tokens, D = 384, E = 8,
   K = 2, shared expert) against a dense SwiGLU of the same active FLOPs (hidden K*4D + 2D:
   the physical limit of a dropless MoE, 1.00x) and against a per-expert loop with boolean
   masks (the official implementation's approach), float32 and bfloat16, eager and compiled;
   and the padded dispatch (moe.py: what GPUs without a fast grouped GEMM run) against the
   grouped one, with its FLOPs relative to the grouped dispatch's.
2. A full training step (forward, backward, AdamW), eager and compiled, set up as train.py sets
   it up: images/s and achieved GFLOP/s as a share of this machine's large-matmul throughput.
3. Sampling: images/s of 250-step DDPM with classifier-free guidance.
4. The Frechet distance at d = 2048: evaluate.py's Cholesky route against scipy.linalg.sqrtm.
Variants are interleaved round by round and each row reports the median over rounds.
"""
import launch  # noqa: I001  first import: the OpenMP wait policy must be set before torch loads

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffusion import create_objective
from model import count, create_model
from moe import EXPERT_RATIO, SHARED_RATIO, MoE, SwiGLU


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, rounds, device):
    """Time each fn once per round, in turn; median seconds per fn."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (and compilation)
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_tflops(device, dtype, n, rounds):
    """This machine's large-matmul throughput (the ceiling for a training step)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = interleaved({"mm": lambda: a @ b}, rounds, device)["mm"]
    return 2 * n ** 3 / t / 1e12


# ----------------------------------------------------------------------------
# 1. The MoE layer
# ----------------------------------------------------------------------------

def loop_moe(layer, x):
    """The official approach: one boolean mask (a host sync) per expert, per-expert matmuls."""
    xf = x.flatten(0, 1)
    scores = F.linear(xf.float(), layer.router.weight.float()).softmax(-1)
    weight, idx = scores.topk(layer.top_k, dim=-1)
    y = layer.shared(xf)
    H = layer.w_down.shape[1]
    for e in range(layer.num_experts):
        token, slot = (idx == e).nonzero(as_tuple=True)
        h = xf[token] @ layer.w_gate_up[e]
        h = (F.silu(h[:, :H]) * h[:, H:]) @ layer.w_down[e]
        y = y.index_add(0, token, h * weight[token, slot, None].to(h.dtype))
    return y.view_as(x)


def bench_moe_layer(args, device):
    N, T, D, E, K = (8, 256, 384, 8, 2) if not args.quick else (2, 64, 64, 4, 2)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        moe = MoE(D, E, K).to(device, dtype)
        padded = copy.deepcopy(moe)
        padded.dispatch = "padded"
        # the same active FLOPs per token
        dense = SwiGLU(D, (K * EXPERT_RATIO + SHARED_RATIO) * D).to(device, dtype)
        x = torch.randn(N, T, D, device=device, dtype=dtype, requires_grad=True)

        # Forward + backward of a scalar loss; each variant computes y (N, T, D) its own way. The
        # gradients are returned, not accumulated into .grad: a training step after zero_grad
        # does that.
        def step(forward, net, inputs=lambda: x):
            def run():
                x_in = inputs()
                return torch.autograd.grad(forward(x_in).float().square().mean(),
                                           [x_in, *net.parameters()])
            return run
        moe_c = torch.compile(moe, fullgraph=True)
        dense_c = torch.compile(dense, fullgraph=True)
        # The same x every call repeats the routing; in training it changes every step, and with it
        # the group sizes: "moe, new routing" draws another x (same statistics) for each call.
        fresh = [torch.randn_like(x).requires_grad_() for _ in range(args.rounds + 1)]
        fns = {"moe": step(lambda x: moe(x)[0], moe), "dense": step(dense, dense),
               "loop": step(lambda x: loop_moe(moe, x), moe),
               "moe, new routing": step(lambda x: moe(x)[0], moe, inputs=fresh.pop),
               "moe padded": step(lambda x: padded(x)[0], padded)}
        if args.compile:
            padded_c = torch.compile(padded, fullgraph=True)
            fns["moe compiled"] = step(lambda x: moe_c(x)[0], moe)
            fns["dense compiled"] = step(dense_c, dense)
            fns["moe padded compiled"] = step(lambda x: padded_c(x)[0], padded)
        t = interleaved(fns, args.rounds, device)
        name = str(dtype).removeprefix("torch.")
        dispatch = moe.dispatch_for(x)  # what "moe" runs here
        # padded: every expert on every token, E/K times the routed FLOPs, the shared expert as is
        flops = (E * EXPERT_RATIO + SHARED_RATIO) / (K * EXPERT_RATIO + SHARED_RATIO)
        for variant, base in [("moe", "dense"), ("moe, new routing", "dense"), ("loop", "dense"),
                              ("moe compiled", "dense compiled"), ("moe padded", "moe"),
                              ("moe padded compiled", "moe compiled")]:
            if variant in t:
                versus = f"{t[variant] / t[base]:.2f}x {base}"
                if variant.startswith("moe padded"):
                    versus += f" ({dispatch}), {flops:.2f}x its FLOPs"
                rows.append([f"MoE layer {name}", variant, f"{t[variant] * 1e3:.1f} ms", versus])
    return rows


# ----------------------------------------------------------------------------
# 2-3. Training step and sampling
# ----------------------------------------------------------------------------

def bench_model(args, device, peak_tflops):
    rows = []
    names = ["T/2-4E2A"] if args.quick else ["T/2-4E2A", "S/2-8E2A"]
    for name in names:
        overrides = dict(input_size=8, num_classes=10) if args.quick else {}
        net = create_model(name, **overrides).to(device)
        cfg = net.cfg
        batch = 4 if args.quick else 8
        # fused AdamW, as train.py builds it
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0, fused=True)
        obj = create_objective(cfg.objective)
        x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

        def train_step(forward):
            t, x_t, noise = obj.training_inputs(x0)
            with autocast:
                out, aux = forward(x_t, t, y, return_aux=True)
            loss = (obj.training_losses(out.float(), x0, x_t, t, noise)["loss"].mean()
                    + aux["router_loss"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fns = {"eager": lambda: train_step(net)}
        if args.compile:  # what train.py --compile does
            compiled = torch.compile(net)
            fns["compiled"] = lambda: train_step(compiled)
        for variant, sec in interleaved(fns, args.rounds, device).items():
            # DiT counts a multiply-add as one FLOP;
            # a training step is ~3 forward passes, 2 FLOPs each.
            tflops = 3 * 2 * count(cfg)[2] * 1e9 * batch / sec / 1e12
            rows.append([f"train step {name}", f"batch {batch} {variant}",
                         f"{batch / sec:.2f} img/s",
                         f"{tflops:.2f} TFLOP/s = {tflops / peak_tflops:.0%} of matmul"])

        # Sampling: a few guided DDPM steps timed, the 250-step cost extrapolated from them.
        net.eval()
        steps = 2 if args.quick else 5
        z = torch.randn_like(x0).repeat(2, 1, 1, 1)
        yy = torch.cat([y, torch.full_like(y, cfg.num_classes)])
        fn = lambda xt, tt: net.forward_with_cfg(xt, tt, yy, 4.0)
        sampler = create_objective("ddpm")
        with torch.no_grad(), autocast:
            sec = interleaved({"s": lambda: sampler.sample(fn, z, num_steps=steps)},
                              max(args.rounds // 2, 1), device)["s"]
        rows.append([f"sampling {name}", "DDPM 250 + CFG",
                     f"{batch / (sec / steps * 250):.3f} img/s", f"from {steps}-step runs"])
    return rows


# ----------------------------------------------------------------------------
# 4. The Frechet distance
# ----------------------------------------------------------------------------

def bench_frechet(args):
    import scipy.linalg
    from evaluate import frechet_distance
    d = 256 if args.quick else 2048
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((d + 500, d)) @ rng.standard_normal((d, d)) / d for _ in range(2)]
    mu = [f.mean(0) for f in feats]
    sigma = [np.cov(f, rowvar=False) for f in feats]

    def with_sqrtm():
        covmean = scipy.linalg.sqrtm(sigma[0] @ sigma[1]).real
        diff = mu[0] - mu[1]
        return diff @ diff + np.trace(sigma[0]) + np.trace(sigma[1]) - 2 * np.trace(covmean)
    t = interleaved({"ours": lambda: frechet_distance(mu[0], sigma[0], mu[1], sigma[1]),
                     "sqrtm": with_sqrtm}, 1 if not args.quick else 2, torch.device("cpu"))
    gap = abs(frechet_distance(mu[0], sigma[0], mu[1], sigma[1]) - with_sqrtm())
    return [[f"Frechet d={d}", "ours (Cholesky)", f"{t['ours']:.2f} s",
             f"{t['sqrtm'] / t['ours']:.1f}x faster"],
            [f"Frechet d={d}", "scipy sqrtm", f"{t['sqrtm']:.2f} s", f"|difference| {gap:.1e}"]]


def available_device(name):
    """torch.device(name) if this machine has it; else exit with one line."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # unknown name; not compiled in or not present
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        launch.fail(f"--device {name}: not available on this machine ({reason})")
    return device


SECTIONS = ("moe", "model", "frechet")


def main(argv=None):
    p = launch.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds (seconds)")
    p.add_argument("--rounds", type=launch.positive_int, default=None,
                   help="timed rounds per variant (default 10, quick 2)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile variants")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--only", choices=SECTIONS, action="append", default=None,
                   help="run only this section (repeatable; default: all)")
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 10)
    sections = args.only or SECTIONS
    device = available_device(args.device)
    if device.type == "cpu":
        launch.keep_freed_memory()  # as train.py does on CPU
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_tflops(device, dtype, 512 if args.quick else 4096, args.rounds)
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    rows = [["matmul", f"{str(dtype).removeprefix('torch.')} large", f"{peak:.3f} TFLOP/s", name]]
    if "moe" in sections:
        rows += bench_moe_layer(args, device)
    if "model" in sections:
        rows += bench_model(args, device, peak)
    if "frechet" in sections:
        rows += bench_frechet(args)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
