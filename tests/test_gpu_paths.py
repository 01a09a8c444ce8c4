"""A training step and a sampling step on the GPU path, traced without a GPU: no host sync.

The CPU build of torch runs ops on fake CUDA tensors with CUDA's shape and dtype checks (it
refuses, e.g., an fp32 grouped GEMM), and tests/sync_count.py records what would make the host
wait: copies between devices, .item(), data-dependent shapes. What the CPU build cannot do:
autograd on fake CUDA tensors aborts the process (no CUDA device guard is linked), so the forward
runs on fake CUDA, and the whole step with its backward, gradient clipping, optimizer and EMA
runs on fake CPU tensors (every .item() or data-dependent shape is seen on any device) and on
the meta device (device crossings are seen; fused AdamW has no meta kernel, so AdamW's foreach
form stands in there). The real GPU tier: tests marked cuda, `python -m pytest -m cuda`.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

import sample
import train
from diffusion import create_objective
from model import DiT, DiTConfig
from moe import ROUTERS
from sync_count import FakeCudaBindings, RecordOps, pretend_cuda_autocast, pretend_gpu

SMALL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_experts=4, top_k=2, input_size=8,
             in_channels=4, num_classes=10)
GPUS = [("H100", (9, 0)), ("A100", (8, 0))]


@pytest.fixture(params=GPUS, ids=[name for name, _ in GPUS])
def gpu(request, monkeypatch):
    """A fake GPU of this compute capability, with bf16 autocast; its capability."""
    capability = request.param[1]
    pretend_gpu(monkeypatch, capability)
    pretend_cuda_autocast(monkeypatch)
    return capability


def to_fake_cuda(net, weights=torch.float32):
    """net's tensors as fake CUDA ones (inside FakeTensorMode): parameters in `weights` but the
    routers fp32, as checkpoint.load_model makes them for bf16 sampling; buffers keep their dtype."""
    params = {id(p): name for name, p in net.named_parameters()}
    for module_name, module in net.named_modules():
        for name, t in list(module._parameters.items()):
            if t is not None:
                dtype = torch.float32 if ".moe.router" in f"{module_name}.{name}" else weights
                module._parameters[name] = torch.nn.Parameter(torch.empty(t.shape, dtype=dtype, device="cuda"),
                                                              requires_grad=False)
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device="cuda")
    assert params  # (the model had parameters)
    return net


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("objective", ["ddpm", "rf"])
def test_training_forward_and_loss_on_fake_cuda(gpu, router, objective):
    # train.training_loss under bf16 autocast, as train.py runs it on a GPU, PLR on
    net = DiT(DiTConfig(**SMALL, router=router, objective=objective, layer_reg=0.1)).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        obj = create_objective(objective)  # its schedule tables fake too
        to_fake_cuda(net)
        x0 = torch.empty(4, 4, 8, 8, device="cuda")
        y = torch.zeros(4, dtype=torch.long, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), FakeCudaBindings():
            train.training_loss(net, obj, x0, y, 0.1)  # the first call moves the schedule tables
            with RecordOps() as rec:
                loss, terms = train.training_loss(net, obj, x0, y, 0.1)
    assert rec.events == [], rec.report()  # (host_outputs: FakeCudaBindings labels tensors CPU in calls)
    assert ("moe::grouped_mm" in rec.ops) == (gpu == (9, 0) and router != "expert")
    assert loss.device.type == "cuda" and terms["load"].shape == (2, 4) and "layer_reg" in terms


class ForeachAdamW(torch.optim.AdamW):
    """Stands in for fused AdamW on meta, which has no fused kernel: the same step over lists,
    without the fused kernel's on-device skip (found_inf), and not recorded (this form reads its
    step counters on the host; the fused kernel, recorded on fake CPU above, does not)."""

    def step(self):
        self.found_inf = None
        with _disable_current_modes():
            return super().step()


def train_step_on(device, fused, router):
    """Two train.train_step calls (2 micro-batches, clipping, AdamW, EMA) on `device`, the second
    recorded."""
    cfg = DiTConfig(**SMALL, router=router, layer_reg=0.1)
    with torch.device(device):
        net = DiT(cfg).train()
        ema = DiT(cfg).requires_grad_(False)
        x = torch.randn(4, 4, 8, 8)
        y = torch.zeros(4, dtype=torch.long)
    opt = (torch.optim.AdamW if fused else ForeachAdamW)(net.parameters(), lr=1e-4, fused=fused or None)
    recipe = train.Recipe(accum=2, seed=0, rank=0, world=1, layer_reg=0.1, clip_grad=1.0, ema_decay=0.99,
                          device_type="cpu", bf16=False)  # (autocast, off, has no meta device type)
    obj = create_objective("ddpm")
    train.train_step(net, net, ema, opt, obj, x, y, lambda v: v, 0, recipe)  # optimizer state made
    with RecordOps() as rec:
        stats = train.train_step(net, net, ema, opt, obj, x, y, lambda v: v, 1, recipe)
    return rec, stats


@pytest.mark.parametrize("router", ROUTERS)
def test_whole_training_step_on_fake_cpu_reads_nothing_back(router):
    # fused AdamW as train.py uses it; the step's non-finite guard rides on the device (found_inf)
    with FakeTensorMode():
        rec, stats = train_step_on("cpu", fused=True, router=router)
    assert rec.events == [], rec.report()
    assert "_fused_adamw_" in " ".join(rec.ops) and stats["skipped"].shape == ()


@pytest.mark.parametrize("router", ROUTERS)
def test_whole_training_step_on_meta_stays_on_the_device(router):
    rec, stats = train_step_on("meta", fused=False, router=router)
    assert rec.events == [], rec.report()
    assert rec.host_outputs == [], rec.host_outputs
    assert stats["loss"].device.type == "meta"


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("objective", ["ddpm", "rf"])
def test_guided_sampling_steps_on_fake_cuda_with_routing_stats(gpu, router, objective):
    # sample.sample_images' model calls and sampler steps in bf16 (weights bf16, routers fp32),
    # with --routing-stats counting; the noise comes from the host in non-blocking copies
    net = DiT(DiTConfig(**SMALL, router=router, objective=objective)).eval()
    stats = sample.RoutingStats(net, 3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        obj = create_objective(objective)  # its schedule tables fake too
        to_fake_cuda(net, torch.bfloat16)
        stats.counts = {k: torch.zeros(v.shape, dtype=v.dtype, device="cuda") for k, v in stats.counts.items()}
        stats.tokens = torch.zeros(3, dtype=torch.long, device="cuda")
        randn = sample.per_sample_randn([0, 1])
        with torch.no_grad(), FakeCudaBindings():
            noise = randn(torch.empty(2, 4, 8, 8, device="cuda"))
            y = torch.tensor([1, 2]).to(noise.device)
            model_fn = stats.watch(sample.guided_model(net, y, 4.0, bf16=True), y)
            obj.sample(model_fn, noise, num_steps=3, randn=randn)  # the first call moves the tables
            model_fn = stats.watch(sample.guided_model(net, y, 4.0, bf16=True), y)
            with RecordOps() as rec:
                out = obj.sample(model_fn, noise, num_steps=3, randn=randn)
    assert rec.events == [], rec.report()
    if objective == "ddpm":  # ancestral steps add noise (rectified flow's Euler steps do not)
        assert rec.async_copies, "the noise is drawn on the host and copied without blocking"
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert ("moe::grouped_mm" in rec.ops) == (gpu == (9, 0) and router != "expert")
