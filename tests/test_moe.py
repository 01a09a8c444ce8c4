"""
Tests of moe.py: the grouped GEMM op, the fast MoE layer against a slow per-expert
loop, the routing weights, the Eq. 5 balance loss, and torch.compile.

Run: python -m pytest -q tests/test_moe.py
"""
import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from moe import ROUTERS, MoE, SwiGLU, grouped_mm, grouped_mm_is_fast
from sync_count import FakeCudaBindings, RecordOps, pretend_gpu


# ----------------------------------------------------------------------------
# Slow, obviously-correct references
# ----------------------------------------------------------------------------

def reference_moe(m, x):
    """The MoE layer written the slow way, as the official code does it: copy each
    token once per slot, run each expert on the slots that chose it (boolean mask),
    weight and sum over slots, add the shared expert. Also returns the balance loss."""
    N, T, D = x.shape
    E, H, K = m.w_down.shape[0], m.w_down.shape[1], m.top_k
    x = x.reshape(N * T, D)
    scores = torch.softmax(x @ m.router.weight.T, dim=-1)  # (NT, E)
    weight, expert = torch.topk(scores, K, dim=-1)  # (NT, K)
    slots = x.repeat_interleave(K, dim=0)  # (NT*K, D), token t's slots are rows tK .. tK+K-1
    out = torch.zeros_like(slots)
    for e in range(E):
        mask = expert.flatten() == e
        if mask.any():
            xe = slots[mask]
            gate, up = xe @ m.w_gate_up[e, :, :H], xe @ m.w_gate_up[e, :, H:]
            out[mask] = (F.silu(gate) * up) @ m.w_down[e]
    y = (out.view(N * T, K, D) * weight[..., None]).sum(dim=1)
    if m.shared is not None:
        Hs = m.shared.down.weight.shape[1]
        Wg, Wu = m.shared.gate_up.weight[:Hs], m.shared.gate_up.weight[Hs:]
        y = y + (F.silu(x @ Wg.T) * (x @ Wu.T)) @ m.shared.down.weight.T
    share = torch.stack([(expert == e).sum() for e in range(E)]).to(scores.dtype) / (N * T * K)
    balance = m.balance_alpha * (E * share * scores.mean(dim=0)).sum()
    return y.view(N, T, D), balance


def make_moe(seed=0, empty=False, **kw):
    """A small layer and an input; with empty=True experts 1 and 3 can never be
    chosen (x[..., 0] > 0 and their router weight on that coordinate is very negative)."""
    torch.manual_seed(seed)
    args = dict(dim=16, num_experts=4, top_k=2, hidden=32, shared_hidden=24)
    args.update(kw)
    m = MoE(**args)
    x = torch.randn(2, 12, args["dim"])
    if empty:
        x[..., 0] = x[..., 0].abs() + 1
        with torch.no_grad():
            m.router.weight[[1, 3], 0] = -30.0
    return m, x.requires_grad_()


def grads(m, x, y, balance, g):
    """Gradients of (y * g).sum() + balance w.r.t. x and every parameter."""
    params = [x] + list(m.parameters())
    return torch.autograd.grad((y * g).sum() + balance, params)

# ----------------------------------------------------------------------------
# The grouped GEMM op
# ----------------------------------------------------------------------------

def test_grouped_mm_matches_loop_with_empty_group():
    torch.manual_seed(0)
    counts = [3, 0, 5, 2]
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    a = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(4, 8, 16, requires_grad=True)
    g = torch.randn(10, 16)
    ends = np.cumsum(counts)
    starts = ends - counts
    ref = torch.cat([a[s:t] @ b[e] for e, (s, t) in enumerate(zip(starts, ends))])
    out = grouped_mm(a, b, offs)
    # 1e-5: float32 sums of 8-16 products in whatever order the library takes (worst case
    # ~k eps |a||b| ~ 1e-5 here); exact zeros are checked exactly below
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ga, gb = torch.autograd.grad((out * g).sum(), (a, b))
    ra, rb = torch.autograd.grad((ref * g).sum(), (a, b))
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)
    assert gb[1].abs().max() == 0  # the empty group gets an exact zero gradient
    # .sum() hands backward a stride-0 gradient, which the raw kernel rejects
    ga1, gb1 = torch.autograd.grad(grouped_mm(a, b, offs).sum(), (a, b))
    ra1, rb1 = torch.autograd.grad(sum((a[s:t] @ b[e]).sum() for e, (s, t) in enumerate(zip(starts, ends))), (a, b))
    torch.testing.assert_close(ga1, ra1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb1, rb1, rtol=1e-5, atol=1e-5)

def test_grouped_mm_ragged_zeroes_rows_past_the_last_offset():
    # Race inference: offs[-1] = 6 < 9 rows. F.grouped_mm ignores the tail (its docs, and here
    # with NaN there) but leaves those output rows uninitialised; ragged=True zeroes them.
    torch.manual_seed(0)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    a = torch.randn(9, 8)
    a[6:] = float("nan")
    a.requires_grad_()
    b = torch.randn(3, 8, 16, requires_grad=True)
    out = grouped_mm(a, b, offs, True)
    ref = torch.cat([a[:2] @ b[0], a[2:6] @ b[2]])
    torch.testing.assert_close(out[:6], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[6:], torch.zeros(3, 16))
    g = torch.randn(9, 16)
    ga, gb = torch.autograd.grad((out * g).sum(), (a, b))
    ra, rb = torch.autograd.grad((ref * g[:6]).sum(), (a, b))
    torch.testing.assert_close(ga[:6], ra[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)
    assert torch.equal(ga[6:], torch.zeros(3, 8))  # no garbage flows back to the unselected rows

def poison_kernel(monkeypatch):
    """Make F.grouped_mm leave memory as the CUDA kernels may: NaN in the output rows past offs[-1]
    (never written, pytorch/pytorch#193633) and in the empty groups' weight-gradient slices
    (non-zero on sm100, pytorch/pytorch#172439). Returns the list of calls it saw."""
    real = F.grouped_mm
    calls = []

    def kernel(a, b, *, offs):
        out = real(a, b, offs=offs).clone()
        if b.dim() == 3:  # (A, Q) rows
            out[offs[-1]:] = float("nan")
        else:  # (E, P, Q) weight gradient
            out[torch.diff(offs, prepend=offs.new_zeros(1)) == 0] = float("nan")
        calls.append(b.dim())
        return out
    monkeypatch.setattr(F, "grouped_mm", kernel)
    return calls


def test_grouped_mm_is_exact_over_poisoned_kernel_memory(monkeypatch):
    calls = poison_kernel(monkeypatch)
    torch.manual_seed(0)
    counts = [3, 0, 5, 2, 0]  # two empty groups; rows 10 and 11 are past offs[-1] (ragged)
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    a = torch.randn(12, 8, requires_grad=True)
    b = torch.randn(5, 8, 16, requires_grad=True)
    g = torch.randn(12, 16)
    ends = np.cumsum(counts)
    ref = torch.cat([a[t - c:t] @ b[e] for e, (c, t) in enumerate(zip(counts, ends))] + [a[10:] @ b[0] * 0])
    out = grouped_mm(a, b, offs, True)
    ga, gb = torch.autograd.grad((out * g).sum(), (a, b))
    ra, rb = torch.autograd.grad((ref * g).sum(), (a, b))
    assert sorted(calls) == [2, 3, 3]  # forward, input gradient, weight gradient: all poisoned
    for got, expect in [(out, ref), (ga, ra), (gb, rb)]:
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[10:], torch.zeros(2, 16)) and torch.equal(ga[10:], torch.zeros(2, 8))
    assert torch.equal(gb[[1, 4]], torch.zeros(2, 8, 16))  # exactly zero, not NaN or leftovers


def test_moe_is_exact_over_poisoned_kernel_memory(monkeypatch):
    # Experts 1 and 3 get no tokens: their weight gradients must be exact zeros, not NaN.
    calls = poison_kernel(monkeypatch)
    m, x = make_moe(empty=True)
    y, aux = m(x)
    y_ref, balance_ref = reference_moe(m, x)
    assert aux["load"][1] == 0 and aux["load"][3] == 0 and calls
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    got = grads(m, x, y, aux["router_loss"], g)
    for a, b in zip(got, grads(m, x, y_ref, balance_ref, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name in ["w_gate_up", "w_down"]:
        grad = got[names.index(name)]
        assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]]))

# ----------------------------------------------------------------------------
# The layer against the reference loop
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["grouped", "padded"])
@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("shared_hidden", [24, 0])
def test_moe_matches_reference(empty, shared_hidden, dispatch):
    # The padded dispatch also runs in float64, where it must match the loop to rounding (1e-12).
    m, x = make_moe(empty=empty, shared_hidden=shared_hidden, dispatch=dispatch)
    tol = dict(rtol=1e-5, atol=1e-6)
    if dispatch == "padded":
        m, x = m.double(), x.detach().double().requires_grad_()
        tol = dict(rtol=1e-12, atol=1e-12)
    m.train()
    y, aux = m(x)
    y_ref, balance_ref = reference_moe(m, x)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(aux["router_loss"], balance_ref, rtol=1e-6, atol=1e-8)
    if empty:
        assert aux["load"][1] == 0 and aux["load"][3] == 0
    g = torch.randn_like(y)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    expected = {"x", "router.weight", "w_gate_up", "w_down"}
    if shared_hidden:
        expected |= {"shared.gate_up.weight", "shared.down.weight"}
    assert set(names) == expected
    for name, a, b in zip(names, grads(m, x, y, aux["router_loss"], g), grads(m, x, y_ref, balance_ref, g)):
        torch.testing.assert_close(a, b, **tol, msg=lambda s: f"{name}: {s}")


def test_stride_zero_gradient_backward():
    m, x = make_moe()
    y, aux = m(x)
    y.sum().backward()  # must not trip the kernel's stride check
    y_ref, _ = reference_moe(m, x)
    x_grad = x.grad.clone()
    x.grad = None
    y_ref.sum().backward()
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------
# Routing and the balance loss
# ----------------------------------------------------------------------------

def hand_case():
    """Two tokens whose softmax scores over E = 4 experts are exactly p and q:
    x_t is the t-th unit vector and the router's column t holds log-probabilities."""
    m = MoE(dim=8, num_experts=4, top_k=2, hidden=8, shared_hidden=0)
    p, q = [0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, 0] = torch.tensor(p).log()
        m.router.weight[:, 1] = torch.tensor(q).log()
    x = torch.eye(8)[:2]  # (NT, D) = (2, 8)
    return m, x


def test_balance_loss_hand_worked():
    m, x = hand_case()
    # top-2: token 0 -> experts 0, 1; token 1 -> experts 0, 2. Of the 4 assignments
    # expert 0 got 2, experts 1 and 2 one each: f = 4 * [2, 1, 1, 0] / 4 = [2, 1, 1, 0].
    # P = mean of p and q = [0.45, 0.2, 0.25, 0.1]; sum f P = 0.9 + 0.2 + 0.25 = 1.35.
    y, aux = m.train()(x[None])
    torch.testing.assert_close(aux["router_loss"], torch.tensor(0.05 * 1.35))
    torch.testing.assert_close(aux["load"], torch.tensor([2.0, 1.0, 1.0, 0.0]))
    token, expert, weight, _ = m.route(x[None])
    pairs = sorted(zip(token.tolist(), expert.tolist(), weight.tolist()))
    expect = [(0, 0, 0.4), (0, 1, 0.3), (1, 0, 0.5), (1, 2, 0.3)]
    for (t, e, w), (te, ee, we) in zip(pairs, expect):
        assert (t, e) == (te, ee) and w == pytest.approx(we, rel=1e-6)  # raw probabilities
    # eval mode and alpha = 0 give no loss
    assert m.eval()(x[None])[1]["router_loss"] == 0
    m.train().balance_alpha = 0.0
    assert m(x[None])[1]["router_loss"] == 0


def test_balance_loss_and_routing_against_numpy():
    m, x = make_moe(seed=1, num_experts=8, top_k=3, balance_alpha=0.01)
    m.train()
    _, aux = m(x)
    xs = x.detach().reshape(-1, 16).double().numpy()
    logits = xs @ m.router.weight.detach().double().numpy().T
    s = np.exp(logits - logits.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    top = np.argsort(-s, axis=1)[:, :3]
    counts = np.bincount(top.ravel(), minlength=8)
    f = 8 * counts / top.size
    np.testing.assert_allclose(aux["load"].numpy(), counts)
    np.testing.assert_allclose(aux["router_loss"].item(), 0.01 * (f * s.mean(0)).sum(), rtol=1e-5)
    assert aux["load"].sum() == 2 * 12 * 3
    # weights are the raw top-k probabilities, not renormalised to sum 1
    token, expert, weight, _ = m.route(x.detach())
    np.testing.assert_allclose(weight.detach().numpy(), s[token.numpy(), expert.numpy()], rtol=1e-5)
    assert (np.sort(expert.view(-1, 3).numpy(), 1) == np.sort(top, 1)).all()


@pytest.mark.parametrize("dispatch", ["grouped", "padded"])
def test_autocast_runs_experts_in_bfloat16(dispatch):
    for shared_hidden in (24, 0):
        m, x = make_moe(shared_hidden=shared_hidden, dispatch=dispatch)
        y32, _ = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = m(x)
        assert y.dtype == torch.bfloat16
        assert (y.float() - y32).abs().max() <= 2e-2 * y32.abs().max()
        y.float().sum().backward()
        assert m.w_gate_up.grad.dtype == torch.float32 and m.w_gate_up.grad.abs().max() > 0


def test_swiglu():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 12)
    x = torch.randn(3, 5, 8)
    Wg, Wu = mlp.gate_up.weight[:12], mlp.gate_up.weight[12:]
    expect = (F.silu(x @ Wg.T) * (x @ Wu.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expect)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown router"):
        MoE(16, router="tokens")
    with pytest.raises(ValueError, match="multiples of 8"):
        MoE(12)
    with pytest.raises(ValueError, match="top_k"):
        MoE(16, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown dispatch"):
        MoE(16, dispatch="dense")

# ----------------------------------------------------------------------------
# The choice of dispatch
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("capability, dtype, fast", [
    ((9, 0), torch.bfloat16, True),     # H100, H200: CUTLASS
    ((10, 0), torch.bfloat16, True),    # B200: CUTLASS
    ((9, 0), torch.float32, False),     # any other dtype takes the fallback (offs.cpu(), mm per group)
    ((9, 0), torch.float16, False),
    ((8, 0), torch.bfloat16, False),    # A100
    ((8, 9), torch.bfloat16, False),    # L4, RTX 4090
    ((12, 0), torch.bfloat16, False),   # RTX 5090: not in the kernel's list
])
def test_grouped_mm_is_fast_by_capability_and_dtype(monkeypatch, capability, dtype, fast):
    queries = pretend_gpu(monkeypatch, capability)
    assert grouped_mm_is_fast(torch.device("cuda", 0), dtype) == fast
    assert grouped_mm_is_fast(torch.device("cuda", 0), dtype) == fast
    assert queries in ([], [0])  # asked at most once (not for other dtypes), then cached
    assert grouped_mm_is_fast(torch.device("cpu"), dtype)  # no device to wait for
    assert not grouped_mm_is_fast(torch.device("meta"), dtype)


def test_dispatch_choice_compiles(monkeypatch):
    # torch.compile(fullgraph=True) must trace the capability query as a constant, not break on it.
    pretend_gpu(monkeypatch, (9, 0))

    def f(x):
        return x * 2 if grouped_mm_is_fast(torch.device("cuda", 0), torch.bfloat16) else x
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(torch.ones(3)), torch.full((3,), 2.0))
    torch._dynamo.reset()

# ----------------------------------------------------------------------------
# No host sync on a GPU, shown without one
# ----------------------------------------------------------------------------
# FakeTensorMode makes "cuda" tensors on this CPU build of torch and runs each op's meta
# function with CUDA semantics; CountSyncs (tests/sync_count.py) records copies between devices,
# .item(), nonzero and other data-dependent shapes. Two limits of a CPU build, and what we do:
# - Python bindings that take a CUDA device guard before dispatch (x[i], x[:, None], .to(dtype),
#   .float(), .contiguous()) refuse fake CUDA tensors: FakeCudaBindings runs those with the
#   tensors labelled CPU for the call (device changes and mixed devices are not relabelled).
# - Autograd aborts the process (not an exception) as soon as it records an op on fake CUDA
#   (each graph node asks the CUDA device guard for the current stream), autocast's cast of a
#   weight that requires grad included. So the forward runs with frozen weights, and the backward
#   runs on the meta device, which shows device crossings and reads but not CUDA's meta checks.

@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gpu, capability", [("H100", (9, 0)), ("A100", (8, 0))])
@pytest.mark.parametrize("precision", ["autocast", "bf16 weights", "fp32"])
def test_forward_on_fake_cuda_has_no_host_sync(monkeypatch, router, gpu, capability, precision):
    pretend_gpu(monkeypatch, capability)
    # torch.autocast("cuda") checks for a device, then autocast runs on fake CUDA tensors as on one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    # the grouped GEMM only where its CUTLASS kernel runs: bf16 on sm90; expert choice never
    grouped = capability == (9, 0) and precision != "fp32" and router != "expert"
    m = MoE(64, num_experts=4, top_k=2, router=router)  # built on CPU: fake CUDA has no RNG
    m.requires_grad_(False)  # autocast's cast of a weight that requires grad records it too
    with FakeTensorMode():
        m._apply(lambda t: torch.empty(t.shape, dtype=dtype if t.dim() else t.dtype, device="cuda"))
        x = torch.empty(2, 16, 64, dtype=dtype, device="cuda")
        for training in (True, False):
            m.train(training)
            amp = torch.autocast("cuda", torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
            with torch.no_grad(), amp, FakeCudaBindings(), RecordOps() as rec:
                y, aux = m(x)
            assert rec.events == [], rec.report()
            assert ("moe::grouped_mm" in rec.ops) == grouped, (gpu, precision)
            assert y.device.type == "cuda" and aux["load"].device.type == "cuda"
            assert y.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
            if router != "expert" and not grouped:
                # What the old code ran everywhere: the grouped GEMM. Here PyTorch's
                # _grouped_mm_fallback copies offs to the host (aten/src/ATen/native/
                # GroupedMMUtils.h), inside the kernel where no fake tensor can see it.
                m.dispatch = "grouped"
                with torch.no_grad(), amp, FakeCudaBindings(), RecordOps() as rec:
                    m(x)
                m.dispatch = "auto"
                assert "moe::grouped_mm" in rec.ops


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("dispatch", ["grouped", "padded"])
def test_backward_on_meta_has_no_host_sync(router, dispatch):
    # The whole forward + backward (autograd cannot run on fake CUDA here, see above), bf16 weights.
    m = MoE(64, num_experts=4, top_k=2, router=router, dispatch=dispatch).to("meta", torch.bfloat16)
    x = torch.empty(2, 16, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    for training in (True, False):
        m.train(training)
        with RecordOps() as rec:
            y, aux = m(x)
            loss = y.float().square().mean() + aux["router_loss"]
            grads = torch.autograd.grad(loss, [x, *m.parameters()])
        assert rec.events == [], rec.report()
        assert rec.host_outputs == []  # nothing made on the host per step
        assert ("moe::grouped_mm" in rec.ops) == (dispatch == "grouped" and router != "expert")
        assert [g.shape for g in grads] == [x.shape] + [p.shape for p in m.parameters()]

# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["auto", "padded"])  # auto: grouped on CPU, chosen while tracing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_matches_eager(dtype, dispatch):
    m, x = make_moe(seed=2, empty=True, dispatch=dispatch)
    m = m.to(dtype).train()
    x = x.detach().to(dtype).requires_grad_()
    g = torch.randn(x.shape, dtype=dtype)
    y, aux = m(x)
    expect = grads(m, x, y, aux["router_loss"], g)
    torch._dynamo.reset()
    y_c, aux_c = torch.compile(m, fullgraph=True)(x)
    got = grads(m, x, y_c, aux_c["router_loss"], g)
    # bfloat16: compiled code rounds at other places than eager, so compare with
    # an error bound relative to each tensor's scale
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(aux_c["load"], aux["load"])
    for a, b in zip([y_c, aux_c["router_loss"], *got], [y, aux["router_loss"], *expect]):
        assert a.dtype == b.dtype and (a - b).abs().max() <= tol * b.abs().max()
    torch._dynamo.reset()

# ----------------------------------------------------------------------------
# GPU tier (python -m pytest -m cuda tests/test_moe.py tests/test_routers.py)
# ----------------------------------------------------------------------------
# bfloat16 keeps 8 significant bits: a GEMM that accumulates in float32 rounds each output to
# within 2^-9 of its value, and a layer chains about five such roundings (the two GEMMs, the
# SwiGLU product, the weighting, the shared expert's sum). The bounds are relative to each
# tensor's largest entry: 2^-7 for one GEMM, 3e-2 for the layer; a wrong row, weight or expert
# is an error of order 1.

def needs_gpu(test):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


def max_error(a, b):
    """Largest |a - b| relative to the largest |b|, compared on the CPU in float32."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


@needs_gpu
def test_gpu_grouped_mm_matches_loop_in_bf16():
    torch.manual_seed(0)
    counts = [96, 0, 160, 32, 0, 64]  # two empty groups, then 48 rows past offs[-1] (ragged)
    ends = np.cumsum(counts)
    A = int(ends[-1]) + 48
    a32, b32, g32 = torch.randn(A, 64), torch.randn(6, 64, 128), torch.randn(A, 128)
    a = a32.cuda().bfloat16().requires_grad_()
    b = b32.cuda().bfloat16().requires_grad_()
    # Leave NaN in the blocks the caching allocator hands out next, as freed activations do
    # (pytorch/pytorch#193633): the kernel's unwritten rows and groups must not show it.
    poison = [torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)
              for shape in [(A, 128), (A, 64), (6, 64, 128)] for _ in range(4)]
    del poison
    out = grouped_mm(a, b, torch.tensor(ends, dtype=torch.int32, device="cuda"), True)
    ga, gb = torch.autograd.grad((out.float() * g32.cuda()).sum(), (a, b))
    # the reference: a loop of float32 matmuls on the same bf16-rounded inputs
    ar, br = a.detach().float().cpu().requires_grad_(), b.detach().float().cpu().requires_grad_()
    ref = torch.cat([ar[t - c:t] @ br[e] for e, (c, t) in enumerate(zip(counts, ends))])
    ra, rb = torch.autograd.grad((ref * g32[:ends[-1]]).sum(), (ar, br))
    assert max_error(out[:ends[-1]], ref) <= 2 ** -7
    assert max_error(ga, ra) <= 2 ** -7 and max_error(gb, rb) <= 2 ** -7
    assert not out[ends[-1]:].any() and not ga[ends[-1]:].any()  # exact zeros, no NaN
    assert not gb[[1, 4]].any()  # empty groups: exactly zero (pytorch/pytorch#172439)


@needs_gpu
@pytest.mark.parametrize("dispatch", ["grouped", "padded"])
def test_gpu_layer_matches_reference_in_bf16(monkeypatch, dispatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 routing as on CPU
    m, x = make_moe(empty=True, dispatch=dispatch)
    y_ref, balance_ref = reference_moe(m, x)
    g = torch.randn_like(y_ref)
    expect = grads(m, x, y_ref, balance_ref, g)
    m_gpu = copy.deepcopy(m).cuda()
    x_gpu = x.detach().cuda().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):  # as train.py trains on a GPU
        y, aux = m_gpu(x_gpu)
    got = grads(m_gpu, x_gpu, y.float(), aux["router_loss"], g.cuda())
    assert y.dtype == torch.bfloat16 and max_error(y, y_ref) <= 3e-2
    assert torch.equal(aux["load"].cpu(), m(x)[1]["load"])
    for a, b in zip(got, expect):
        assert max_error(a, b) <= 3e-2
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name in ["w_gate_up", "w_down"]:  # empty experts: exactly zero
        assert not got[names.index(name)][[1, 3]].any()


@needs_gpu
@pytest.mark.parametrize("router", ROUTERS)
def test_gpu_layer_step_syncs_nothing(router):
    # torch.cuda.set_sync_debug_mode("error") raises on any host sync, e.g. the grouped GEMM
    # fallback's offs.cpu(), .item() or a pageable copy.
    torch.manual_seed(0)
    m = MoE(64, num_experts=4, top_k=2, router=router).cuda()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    fast = torch.cuda.get_device_capability()[0] in (9, 10)  # the grouped GEMM's CUTLASS kernel

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            assert m.dispatch_for(x) == ("grouped" if fast else "padded")
            y, aux = m(x)
        (y.float().square().mean() + aux["router_loss"]).backward()
    for training in (True, False):
        m.train(training)
        step()  # warm-up: library handles and allocator blocks
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
