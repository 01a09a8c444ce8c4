"""checkpoint.py: the official DiT-MoE and DiT layouts, loading for sampling, bad checkpoints,
upcycling into an MoE (--init-from)."""
import math

import pytest
import torch
import torch.nn.functional as F

import checkpoint
from checkpoint import CheckpointError
from model import DiT, DiTConfig
from official_layout import official_state_dict, swiglu, to_official

# A small official-style config: every code path of the big ones, in milliseconds.
SMALL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_experts=4, top_k=2,
             input_size=8, in_channels=4, num_classes=10)


# ----------------------------------------------------------------------------
# Official checkpoints: conversion and loading
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_official_layout_loads_and_round_trips(tmp_path, qk_norm):
    # Without qk_norm the file does not tell the number of heads: 64-wide heads are assumed.
    cfg = DiTConfig(**(SMALL | dict(num_heads=4 if qk_norm else 1)), qk_norm=qk_norm,
                    objective="rf" if qk_norm else "ddpm")
    sd = official_state_dict(cfg, qk_norm)
    ours = checkpoint.from_official(sd)
    net = DiT(cfg)
    result = net.load_state_dict(ours, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    back = to_official(ours, qk_norm)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    again = checkpoint.from_official(to_official(net.state_dict(), qk_norm))
    assert all(torch.equal(again[k], v) for k, v in net.state_dict().items())
    # Every container the official loader accepts, with the architecture read off the file.
    for i, wrap in enumerate([lambda s: {"ema": s}, lambda s: {"model": s}, lambda s: s]):
        torch.save(wrap(sd), tmp_path / f"{i}.pt")
        loaded = checkpoint.load_model(tmp_path / f"{i}.pt")
        assert loaded.cfg == cfg and not loaded.training
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.items())


def test_converted_moe_computes_the_official_function():
    # The official SparseMoeBlock written out by hand from the official tensors: softmax router,
    # top-2 raw probabilities as weights, SwiGLU experts, plus the shared expert.
    cfg = DiTConfig(**SMALL)
    sd = official_state_dict(cfg)
    net = DiT(cfg)
    net.load_state_dict(checkpoint.from_official(sd))
    x = torch.randn(2, 16, 64)
    b = "blocks.1.moe."
    scores = (x.flatten(0, 1) @ sd[b + "gate.weight"].T).softmax(-1)
    weight, idx = scores.topk(2, dim=-1)
    expect = torch.zeros(32, 64)
    for n, xn in enumerate(x.flatten(0, 1)):
        for w, e in zip(weight[n], idx[n]):
            e = int(e)
            expect[n] += w * swiglu(xn, *(sd[f"{b}experts.{e}.{m}_proj.weight"] for m in ("gate", "up", "down")))
    expect += swiglu(x.flatten(0, 1), *(sd[f"{b}shared_experts.{m}_proj.weight"] for m in ("gate", "up", "down")))
    y, _ = net.blocks[1].moe(x)
    torch.testing.assert_close(y.flatten(0, 1), expect, atol=1e-5, rtol=1e-4)


def test_converted_qk_norm_attention_computes_the_official_function():
    cfg = DiTConfig(**SMALL, qk_norm=True)
    sd = official_state_dict(cfg, qk_norm=True)
    net = DiT(cfg)
    net.load_state_dict(checkpoint.from_official(sd))
    x = torch.randn(2, 16, 64)
    b, H, hd = "blocks.0.attn.", 4, 16
    qkv = (x @ sd[b + "Wqkv.weight"].T + sd[b + "Wqkv.bias"]).view(2, 16, 3, H, hd)
    ln = lambda t, n: F.layer_norm(t, (hd,), sd[b + n + ".weight"], sd[b + n + ".bias"], eps=1e-6)
    q, k, v = ln(qkv[:, :, 0], "q_norm"), ln(qkv[:, :, 1], "k_norm"), qkv[:, :, 2]  # (N, T, H, hd)
    att = torch.einsum("nthd,nshd->nhts", q, k).div(math.sqrt(hd)).softmax(-1)
    out = torch.einsum("nhts,nshd->nthd", att, v).reshape(2, 16, 64)
    expect = out @ sd[b + "out_proj.weight"].T + sd[b + "out_proj.bias"]
    torch.testing.assert_close(net.blocks[0].attn(x), expect, atol=1e-5, rtol=1e-4)


def test_load_our_checkpoint_prefers_ema(tmp_path):
    cfg = DiTConfig(**SMALL)
    a, b = DiT(cfg).state_dict(), official_state_dict(cfg, gen=torch.Generator().manual_seed(1))
    torch.save({"config": vars(cfg), "model": a, "ema": checkpoint.from_official(b)}, tmp_path / "c.pt")
    net = checkpoint.load_model(tmp_path / "c.pt")
    assert torch.equal(net.blocks[0].moe.w_down, checkpoint.from_official(b)["blocks.0.moe.w_down"])


def test_race_checkpoint_keeps_thresholds_and_heads(tmp_path):
    cfg = DiTConfig(**SMALL, router="race", layer_reg=0.1)
    sd = DiT(cfg).state_dict()
    sd["blocks.1.moe.threshold"] = torch.tensor(0.25)  # what training left behind
    torch.save({"config": vars(cfg), "ema": sd}, tmp_path / "race.pt")
    net = checkpoint.load_model(tmp_path / "race.pt")
    assert net.blocks[1].moe.threshold == 0.25 and net.blocks[0].moe.threshold.isnan()
    assert torch.equal(net.blocks[1].moe.target_head.weight, sd["blocks.1.moe.target_head.weight"])
    assert torch.equal(net.blocks[0].moe.router_mlp[0].bias, sd["blocks.0.moe.router_mlp.0.bias"])


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load_model(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        checkpoint.load_model(tmp_path / "text.pt")
    torch.save({"ema": {"foo": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a DiT"):
        checkpoint.load_model(tmp_path / "foreign.pt")
    cfg = DiTConfig(**SMALL)
    sd = DiT(cfg).state_dict()
    sd["blocks.0.moe.w_down"] = torch.zeros(4, 100, 64)
    torch.save({"config": vars(cfg), "ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: blocks.0.moe.w_down \(4, 100, 64\)"):
        checkpoint.load_model(tmp_path / "bad.pt")




def test_missing_or_malformed_parts_are_one_line(tmp_path):
    cfg = DiTConfig(**SMALL)
    cases = {"pos_embed": "missing pos_embed", "y_embedder.embedding_table.weight": "missing y_embedder",
             "blocks.1.moe.experts.2.up_proj.weight": "lacks blocks.1.moe.experts.2.up_proj.weight",
             "blocks.0.moe.shared_experts.gate_proj.weight": "lacks blocks.0.moe.shared_experts.gate_proj.weight"}
    for key, message in cases.items():
        sd = official_state_dict(cfg)
        del sd[key]
        torch.save({"ema": sd}, tmp_path / "cut.pt")
        with pytest.raises(CheckpointError, match=message) as e:
            checkpoint.load_model(tmp_path / "cut.pt")
        assert "\n" not in str(e.value)
    for bad, message in [({"config": "S/2", "ema": {}}, "its config is a str"),
                         ({"config": vars(cfg), "ema": None, "model": None}, "no ema or model"),
                         ([1, 2], "holds a list")]:
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load_model(tmp_path / "bad.pt")


def test_load_in_bf16_halves_the_weights_keeps_routers_and_buffers_fp32(tmp_path):
    cfg = DiTConfig(**SMALL, router="race", layer_reg=0.1)
    net = DiT(cfg)
    torch.save({"config": vars(cfg), "ema": net.state_dict()}, tmp_path / "c.pt")
    half = checkpoint.load_model(tmp_path / "c.pt", dtype=torch.bfloat16)
    for (name, p), q in zip(half.named_parameters(), net.parameters()):
        routing = ".moe.router" in name  # the gating head and PLR's router MLP decide in fp32
        assert p.dtype == (torch.float32 if routing else torch.bfloat16), name
        assert torch.equal(p, q if routing else q.bfloat16())
    assert sum(p.numel() for n, p in half.named_parameters() if ".moe.router" in n) < 0.05 * sum(
        p.numel() for p in half.parameters())
    assert half.pos_embed.dtype == torch.float32 and half.blocks[0].moe.threshold.dtype == torch.float32


# ----------------------------------------------------------------------------
# DiT's released checkpoints (facebookresearch/DiT: a raw state_dict of the dense model)
# ----------------------------------------------------------------------------

def dit_state_dict(depth=2, D=64, p=2, C=4, size=8, classes=10, gen=None):
    """A state_dict in DiT's key layout, written out from its names and shapes (DiT's models.py:
    timm Attention qkv/proj, Mlp fc1/fc2 of width 4D, learned sigma), random values."""
    g = gen or torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    T = (size // p) ** 2
    sd = {"pos_embed": r(1, T, D), "x_embedder.proj.weight": r(D, C, p, p), "x_embedder.proj.bias": r(D),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(classes + 1, D),
          "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
          "final_layer.linear.weight": r(p * p * 2 * C, D), "final_layer.linear.bias": r(p * p * 2 * C)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
               b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
               b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
               b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D),
               b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D)}
    return sd


def dit_forward(sd, x, t, y, depth=2, heads=1, p=2):
    """DiT's forward written out from the state_dict: patchify conv + position table, c = t + y
    embeddings, adaLN-Zero blocks (attention, GELU-tanh MLP), final layer, DiT's unpatchify
    einsum nhwpqc -> nchpwq."""
    lin = lambda h, k: h @ sd[k + ".weight"].T + sd[k + ".bias"]
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)
    mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    N, T, D = h.shape
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    emb = torch.cat([torch.cos(t[:, None].float() * freqs), torch.sin(t[:, None].float() * freqs)], 1)
    c = lin(F.silu(lin(emb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    for i in range(depth):
        b = f"blocks.{i}."
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, 1)
        q, k, v = lin(mod(ln(h), s1, sc1), b + "attn.qkv").view(N, T, 3, heads, D // heads).unbind(2)
        att = torch.einsum("nthd,nshd->nhts", q, k).div(math.sqrt(D // heads)).softmax(-1)
        a = torch.einsum("nhts,nshd->nthd", att, v).reshape(N, T, D)
        h = h + g1[:, None] * lin(a, b + "attn.proj")
        m = lin(F.gelu(lin(mod(ln(h), s2, sc2), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g2[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    h = lin(mod(ln(h), shift, scale), "final_layer.linear")  # (N, T, p*p*2C)
    w = math.isqrt(T)
    h = h.reshape(N, w, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(N, -1, w * p, w * p)


def test_dit_checkpoint_loads_and_computes_what_dit_computes(tmp_path):
    sd = dit_state_dict()
    torch.save(sd, tmp_path / "DiT-tiny.pt")  # DiT releases a raw state_dict
    net = checkpoint.load_model(tmp_path / "DiT-tiny.pt")
    cfg = net.cfg
    assert (cfg.num_experts, cfg.mlp_ratio, cfg.learn_sigma, cfg.objective) == (0, 4.0, True, "ddpm")
    assert (cfg.depth, cfg.hidden_size, cfg.num_classes, cfg.input_size, cfg.qk_norm) == (2, 64, 10, 8, False)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3]), torch.tensor([1, 10, 7])
    with torch.no_grad():
        out = net(x, t, y)
        want = dit_forward(sd, x, t, y)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
        # learned sigma: channels 0-3 are epsilon, 4-7 the variance interpolation v
        assert out.shape == (3, 8, 8, 8)
        # DiT's forward_with_cfg guides channels 0-2 (its eps[:, :3]); ours with guided_channels=3 too
        both = net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]),
                                    4.0, guided_channels=3)
        cond, uncond = want, dit_forward(sd, x, t, torch.full_like(y, 10))
        torch.testing.assert_close(both[:3, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]),
                                   atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(both[:3, 3:], cond[:, 3:], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# Upcycling: a new run from trained weights (train.py --init-from)
# ----------------------------------------------------------------------------

def trained(cfg, seed):
    """A network with every weight random (the zero-initialised ones too), as after training."""
    torch.manual_seed(seed)
    net = DiT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net


def test_upcycling_a_one_expert_model_copies_its_expert_into_every_expert(tmp_path):
    source = trained(DiTConfig(**(SMALL | dict(num_experts=1, top_k=1))), seed=1)
    torch.save({"config": vars(source.cfg), "ema": source.state_dict()}, tmp_path / "one.pt")
    torch.manual_seed(2)
    target = DiT(DiTConfig(**SMALL))
    message = checkpoint.init_from(target, tmp_path / "one.pt")
    assert "upcycled into 4 experts" in message and "moe.router.weight x2" in message
    src = source.state_dict()
    for key, value in target.state_dict().items():
        if key.endswith(("w_gate_up", "w_down")):
            assert torch.equal(value, src[key].expand_as(value))  # (1, ...) -> (4, ...), bit for bit
        elif key.endswith("router.weight"):
            assert value.shape == (4, 64) and 0.015 < value.std() < 0.025  # N(0, 0.02), the official init
        else:
            assert torch.equal(value, src[key]), key  # attention, embedders, adaLN, shared expert, final
    # With identical experts the MoE is shared(x) + (sum of the token's top-k raw softmax weights)
    # times the source's expert: DiT-MoE weights are not renormalised.
    moe, one = target.blocks[1].moe.eval(), source.blocks[1].moe.eval()
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        y, _ = moe(x)
        weights = (x @ moe.router.weight.T).softmax(-1).topk(2, dim=-1).values.sum(-1, keepdim=True)  # (N, T, 1)
        w_gu, w_d = one.w_gate_up[0], one.w_down[0]
        gate, up = (x @ w_gu).chunk(2, -1)
        expert = (F.silu(gate) * up) @ w_d
        want = one.shared(x) + weights * expert
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)


def test_upcycling_from_dense_dit_keeps_fresh_experts_and_says_so(tmp_path):
    torch.save(dit_state_dict(), tmp_path / "DiT.pt")
    torch.manual_seed(2)
    target = DiT(DiTConfig(**(SMALL | dict(num_heads=1))))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    message = checkpoint.init_from(target, tmp_path / "DiT.pt")
    dit = dit_state_dict()
    for key, value in target.state_dict().items():
        if ".moe." in key:
            assert torch.equal(value, before[key]), key  # experts, router, shared expert: as initialised
        elif key != "pos_embed":
            assert torch.equal(value, dit[key]), key
    assert "0 upcycled" in message and "moe.w_gate_up x2" in message and "moe.router.weight x2" in message


def test_upcycling_refuses_other_widths_depths_and_patches(tmp_path):
    torch.save(dit_state_dict(D=128), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="its hidden_size is 128, this model's is 64"):
        checkpoint.init_from(DiT(DiTConfig(**SMALL)), tmp_path / "wide.pt")
    torch.save(dit_state_dict(depth=3), tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match="its depth is 3"):
        checkpoint.init_from(DiT(DiTConfig(**SMALL)), tmp_path / "deep.pt")
