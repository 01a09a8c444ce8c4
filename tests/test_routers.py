"""
Tests of the expert-choice (EC-DiT) and Expert Race (Race-DiT) routers of moe.py: each
against a slow reference loop (outputs and gradients), their selection counts, the race
threshold EMA, batch independence at inference, the router similarity loss, the balance
measures, and torch.compile.

Run: python -m pytest -q tests/test_routers.py
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe import RACE_MOMENTUM, MoE, assignment_mask, combination_usage, max_violation


# ----------------------------------------------------------------------------
# Slow, obviously-correct references
# ----------------------------------------------------------------------------

def swiglu(x, w_gate_up, w_down):
    H = w_down.shape[0]
    return (F.silu(x @ w_gate_up[:, :H]) * (x @ w_gate_up[:, H:])) @ w_down


def reference_output(m, x, pairs):
    """Shared expert on every token, plus w * expert_e(x[n, t]) for each (n, t, e, w), one at a time."""
    N, T, _ = x.shape
    shared = m.shared if m.shared is not None else torch.zeros_like
    rows = [[shared(x[n, t]) for t in range(T)] for n in range(N)]
    for n, t, e, w in pairs:
        rows[n][t] = rows[n][t] + w * swiglu(x[n, t], m.w_gate_up[e], m.w_down[e])
    return torch.stack([torch.stack(r) for r in rows])


def reference_expert_choice(m, x):
    """Per image, per expert: sort the T softmax scores, take the top C tokens."""
    N, T, D = x.shape
    E = m.num_experts
    C = math.ceil(m.capacity_factor * T * m.top_k / E)
    scores = torch.softmax(x @ m.router.weight.T, dim=-1)  # (N, T, E)
    pairs = []
    for n in range(N):
        for e in range(E):
            ranked = sorted(range(T), key=lambda t: -scores[n, t, e].item())
            pairs += [(n, t, e, scores[n, t, e]) for t in ranked[:C]]
    return reference_output(m, x, pairs), pairs


def reference_race(m, x, training):
    """Training: flatten the N*T*E logits, sort, take the top N*T*K. Eval: every logit > threshold.
    Also the similarity loss, from torch.corrcoef."""
    N, T, D = x.shape
    E = m.num_experts
    s = x @ m.router.weight.T  # (N, T, E), identity gating: the logit is the weight
    flat = [(s[n, t, e].item(), n, t, e) for n in range(N) for t in range(T) for e in range(E)]
    if training:
        chosen = sorted(flat, reverse=True)[:N * T * m.top_k]
    else:
        chosen = [c for c in flat if c[0] > m.threshold.item()]
    pairs = [(n, t, e, s[n, t, e]) for _, n, t, e in chosen]
    corr = torch.corrcoef(s.reshape(-1, E).T)  # (E, E)
    off = ~torch.eye(E, dtype=torch.bool)
    loss = m.similarity_beta * corr[off].square().mean() if training else s.new_zeros(())
    return reference_output(m, x, pairs), loss, pairs


def make(router, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = MoE(**(dict(dim=16, num_experts=4, top_k=2, hidden=32, shared_hidden=24, router=router) | kw))
    with torch.no_grad():
        m.router.weight.mul_(4)  # decisive, as after training: expert counts per token spread out
    return m.to(dtype), torch.randn(2, 12, 16, dtype=dtype).requires_grad_()


# The padded dispatch also runs in float64: there it must match the loops to rounding.
DISPATCH_TOLERANCES = [("grouped", torch.float32, 1e-5, 1e-6), ("padded", torch.float64, 1e-12, 1e-12)]


def grads(m, x, y, loss, g):
    return torch.autograd.grad((y * g).sum() + loss, [x] + list(m.parameters()))


def assert_same_grads(m, x, y, loss, y_ref, loss_ref, rtol=1e-5, atol=1e-6):
    g = torch.randn_like(y)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads(m, x, y, loss, g), grads(m, x, y_ref, loss_ref, g)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s: f"{name}: {s}")

# ----------------------------------------------------------------------------
# Expert choice
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_factor, top_k", [(1.0, 2), (0.7, 2), (1.0, 1)])
def test_expert_choice_matches_reference(capacity_factor, top_k):
    m, x = make("expert", capacity_factor=capacity_factor, top_k=top_k)
    m.train()
    y, aux = m(x)
    y_ref, pairs = reference_expert_choice(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert aux["router_loss"] == 0
    assert_same_grads(m, x, y, aux["router_loss"], y_ref, 0.0)
    # every expert takes exactly C = ceil(f * 12 * K / 4) tokens of each image
    C = math.ceil(capacity_factor * 3 * top_k)
    token, expert, weight, _ = m.route(x)
    per_image = torch.zeros(2, 4, dtype=torch.long)
    per_image.index_put_((token // 12, expert), torch.tensor(1), accumulate=True)
    assert torch.all(per_image == C) and torch.all(aux["load"] == 2 * C)
    assert sorted(zip(token.tolist(), expert.tolist())) == sorted((n * 12 + t, e) for n, t, e, _ in pairs)
    # tokens get a variable number of experts; with K = 1 there are as many slots as tokens,
    # so a token with two experts leaves another with none
    per_token = torch.bincount(token, minlength=24)
    assert per_token.min() < top_k < per_token.max() and (top_k == 2 or per_token.min() == 0)

# ----------------------------------------------------------------------------
# Expert Race
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch, dtype, rtol, atol", DISPATCH_TOLERANCES)
def test_race_training_matches_reference(dispatch, dtype, rtol, atol):
    m, x = make("race", dispatch=dispatch, dtype=dtype)
    m.train()
    y, aux = m(x)
    y_ref, loss_ref, pairs = reference_race(m, x, training=True)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(aux["router_loss"], loss_ref, rtol=1e-4, atol=1e-8)
    assert aux["router_loss"] > 0
    assert aux["load"].sum() == 2 * 12 * 2 and len(pairs) == 2 * 12 * 2  # exactly N*T*K pairs
    # The two correlation formulas differ: they round differently in float32 (1e-4 relative), and
    # ours adds 1e-6 to the standard deviation (1e-6 relative, what float64 shows).
    loose = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-9)
    assert_same_grads(m, x, y, aux["router_loss"], y_ref, loss_ref, **loose)


def test_race_threshold_ema_by_hand():
    m, x = make("race")
    m.train()
    assert m.threshold.isnan()  # no batch seen yet
    kth = []
    for step in range(2):
        x = torch.randn(3, 5, 16)
        m(x)
        logits = np.sort((x.reshape(-1, 16) @ m.router.weight.T).detach().double().numpy().ravel())[::-1]
        kth.append(logits[3 * 5 * 2 - 1])  # the smallest of the N*T*K winners
    expect = RACE_MOMENTUM * kth[0] + (1 - RACE_MOMENTUM) * kth[1]  # the first batch set it to kth[0]
    assert m.threshold.item() == pytest.approx(expect, rel=1e-6)
    m.eval()(x)
    m.train().route(x)
    assert m.threshold.item() == pytest.approx(expect, rel=1e-6)  # only a training forward moves it


@pytest.mark.parametrize("dispatch, dtype, rtol, atol", DISPATCH_TOLERANCES)
def test_race_inference_matches_reference(dispatch, dtype, rtol, atol):
    m, x = make("race", dispatch=dispatch, dtype=dtype)
    with torch.no_grad():
        m.threshold.fill_(0.3)
    m.eval()
    y, aux = m(x)
    y_ref, _, pairs = reference_race(m, x, training=False)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    assert aux["router_loss"] == 0 and aux["load"].sum() == len(pairs)
    # gradients too: the unselected candidates' rows must not leak garbage into x or the weights
    assert_same_grads(m, x, y, 0.0, y_ref, 0.0, rtol=rtol, atol=atol)


@pytest.mark.parametrize("router, dispatch", [("expert", "auto"), ("race", "grouped"), ("race", "padded")])
def test_inference_is_batch_independent(router, dispatch):
    m, x = make(router, top_k=1 if router == "expert" else 2, dispatch=dispatch)  # K = 1: tokens with no expert
    x = x.detach()
    if router == "race":
        with torch.no_grad():
            m.threshold.fill_(0.5)
    m.eval()
    token, expert, _, _ = m.route(x)
    used = assignment_mask(token, expert, 24, 4).sum(dim=1)  # experts per token
    assert used.min() == 0 and used.max() >= 2  # some tokens get no routed expert at all
    alone = torch.cat([m(x[n:n + 1])[0] for n in range(2)])
    # the same numbers up to float32 sums taken in another order (other row counts): 1e-5
    torch.testing.assert_close(m(x)[0], alone, rtol=1e-5, atol=1e-5)


def test_similarity_loss_by_hand():
    # Columns 0 and 1 are the same up to scale and shift (correlation 1); column 2 is
    # uncorrelated with both. Off-diagonal C: (0,1) = (1,0) = 1, the other four 0: mean 2/6.
    s = torch.tensor([[1.0, 3.0, 1.0], [-1.0, -1.0, 1.0], [1.0, 3.0, -1.0], [-1.0, -1.0, -1.0]])
    m = MoE(8, num_experts=3, top_k=1, router="race", similarity_beta=0.5)
    torch.testing.assert_close(m.similarity_loss(s), torch.tensor(0.5 / 3))
    # random logits against numpy's correlation matrix
    s = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 7.0)
    c = np.corrcoef(s.double().numpy().T)
    expect = 0.5 * (c[~np.eye(6, dtype=bool)] ** 2).mean()
    m = MoE(8, num_experts=6, top_k=2, router="race", similarity_beta=0.5)
    assert m.similarity_loss(s).item() == pytest.approx(expect, rel=1e-5)

# ----------------------------------------------------------------------------
# Balance measures
# ----------------------------------------------------------------------------

def test_max_violation_by_hand():
    # layer 0: loads 4, 2, 2, 0, mean 2: 4 / 2 - 1 = 1; layer 1: perfectly even
    counts = torch.tensor([[4, 2, 2, 0], [3, 3, 3, 3]])
    torch.testing.assert_close(max_violation(counts), torch.tensor([1.0, 0.0]))


def test_combination_usage_by_hand():
    # 5 tokens use experts {0, 1}, 3 use {2, 3}, 2 use {0, 2}, one {0, 1, 2}, one {3} alone:
    # pair counts (0,1) 6, (2,3) 3, (0,2) 3, (1,2) 1, (0,3) 0, (1,3) 0 of 13; sorted and summed
    # 6/13, 9/13, 12/13 = 0.923 stay below 0.95, 13/13 does not: 3 of the 6 pairs, 0.5.
    sets = [{0, 1}] * 5 + [{2, 3}] * 3 + [{0, 2}] * 2 + [{0, 1, 2}, {3}]
    token = torch.tensor([t for t, s in enumerate(sets) for _ in s] + [0, 5])
    expert = torch.tensor([e for s in sets for e in sorted(s)] + [4, 4])  # id 4 = E: unselected
    mask = assignment_mask(token, expert, len(sets), 4)
    assert mask.tolist() == [[e in s for e in range(4)] for s in sets]
    torch.testing.assert_close(combination_usage(mask), torch.tensor(0.5))
    # one pair only: 1 / 6 pairs carry all of it, and its cumulative sum is 1, not < 0.95
    assert combination_usage(mask[:5]) == 0

# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("router, dispatch", [("expert", "auto"), ("race", "grouped"), ("race", "padded")])
def test_compile_fullgraph_matches_eager(router, dispatch):
    m, x = make(router, seed=3, dispatch=dispatch)
    m.train()
    g = torch.randn(x.shape)
    y, aux = m(x)
    expect = grads(m, x, y, aux["router_loss"], g)
    if router == "race":
        threshold = m.threshold.clone()
        m.threshold.fill_(float("nan"))  # the compiled step starts from the same state
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    y_c, aux_c = compiled(x)
    got = grads(m, x, y_c, aux_c["router_loss"], g)
    torch.testing.assert_close(aux_c["load"], aux["load"])
    for a, b in zip([y_c, aux_c["router_loss"], *got], [y, aux["router_loss"], *expect]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if router == "race":
        torch.testing.assert_close(m.threshold, threshold)
        m.eval()  # the inference rule compiles too (ragged rows, no host sync)
        torch.testing.assert_close(compiled(x)[0], m(x)[0], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_race_threshold_stays_float32_under_a_bfloat16_cast():
    # Module.to(bfloat16) used to cast the threshold buffer too; torch.lerp(bf16, fp32) then failed.
    m, x = make("race")
    with torch.no_grad():
        m.threshold.fill_(0.3)
    m = m.to(torch.bfloat16)
    assert m.threshold.dtype == torch.float32 and m.threshold.item() == pytest.approx(0.3, rel=1e-7)
    assert m.w_gate_up.dtype == torch.bfloat16
    x = x.detach().to(torch.bfloat16)
    m.eval()
    y, _ = m(x)  # inference: pairs with a float32 logit above the float32 threshold
    y_ref, _, _ = reference_race(copy.deepcopy(m).float(), x.float(), training=False)  # in float32
    assert y.dtype == torch.bfloat16 and (y.float() - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()
    m.train()
    with torch.no_grad():
        m.threshold.fill_(float("nan"))
    expect = None  # a NaN threshold is replaced by the first batch's smallest winner
    for _ in range(2):
        m(x)
        logits = (x.float().reshape(-1, 16) @ m.router.weight.float().T).flatten().double()
        kth = logits.sort(descending=True).values[2 * 12 * 2 - 1].item()  # the smallest winner
        expect = kth if expect is None else RACE_MOMENTUM * expect + (1 - RACE_MOMENTUM) * kth
    assert m.threshold.dtype == torch.float32 and m.threshold.item() == pytest.approx(expect, rel=1e-6)

# ----------------------------------------------------------------------------
# GPU tier (python -m pytest -m cuda tests/test_routers.py)
# ----------------------------------------------------------------------------
# As in test_moe.py: bf16 keeps 8 significant bits and a layer chains about five roundings of
# 2^-9; 3e-2 of each tensor's largest entry, against errors of order 1 for a wrong pair.

def needs_gpu(test):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


def max_error(a, b):
    a, b = a.detach().float().cpu(), torch.as_tensor(b).detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


@needs_gpu
@pytest.mark.parametrize("router, dispatch", [("expert", "auto"), ("race", "grouped"), ("race", "padded")])
def test_gpu_router_matches_reference_in_bf16(monkeypatch, router, dispatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 routing as on CPU
    m, x = make(router, dispatch=dispatch)
    m_gpu = copy.deepcopy(m).cuda()
    x_gpu = x.detach().cuda().requires_grad_()
    for training in (True, False):
        if router == "race" and not training:
            m.threshold.fill_(0.3)
            m_gpu.threshold.fill_(0.3)
        m.train(training)
        m_gpu.train(training)
        if router == "expert":
            y_ref, _ = reference_expert_choice(m, x)
            loss_ref = torch.zeros(())
        else:
            y_ref, loss_ref, _ = reference_race(m, x, training)
        with torch.autocast("cuda", torch.bfloat16):
            y, aux = m_gpu(x_gpu)
        assert y.dtype == torch.bfloat16 and max_error(y, y_ref) <= 3e-2
        assert aux["router_loss"].item() == pytest.approx(loss_ref.item(), rel=1e-4, abs=1e-8)  # float32
        g = torch.randn(y_ref.shape)
        for a, b in zip(grads(m_gpu, x_gpu, y.float(), aux["router_loss"], g.cuda()),
                        grads(m, x, y_ref, loss_ref, g)):
            assert max_error(a, b) <= 3e-2
