"""model.py: sizes, official checkpoint layout, conversion, guidance, compile."""
import math

import pytest
import torch
import torch.nn.functional as F

import model
from model import DiTConfig, DiT, CheckpointError
from official_layout import to_official

# A small official-style config: every code path of the big ones, in milliseconds.
SMALL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_experts=4, top_k=2,
             input_size=8, in_channels=4, num_classes=10)


def official_state_dict(cfg, qk_norm=False, gen=None):
    """An official DiT-MoE state_dict written out from its key names and shapes, random values."""
    g = gen or torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    D, p, C, E = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_experts
    T = (cfg.input_size // p) ** 2
    sd = {"pos_embed": model.sincos_2d(D, cfg.input_size // p)[None],
          "x_embedder.proj.weight": r(D, C, p, p), "x_embedder.proj.bias": r(D),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(cfg.num_classes + 1, D),
          "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
          "final_layer.linear.weight": r(p * p * 2 * C, D), "final_layer.linear.bias": r(p * p * 2 * C)}
    assert sd["pos_embed"].shape == (1, T, D)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        if qk_norm:
            sd |= {b + "attn.Wqkv.weight": r(3 * D, D), b + "attn.Wqkv.bias": r(3 * D),
                   b + "attn.q_norm.weight": 1 + r(D // cfg.num_heads), b + "attn.q_norm.bias": r(D // cfg.num_heads),
                   b + "attn.k_norm.weight": 1 + r(D // cfg.num_heads), b + "attn.k_norm.bias": r(D // cfg.num_heads),
                   b + "attn.out_proj.weight": r(D, D), b + "attn.out_proj.bias": r(D)}
        else:
            sd |= {b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
                   b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D)}
        sd[b + "moe.gate.weight"] = r(E, D)
        for e in range(E):
            sd |= {f"{b}moe.experts.{e}.gate_proj.weight": r(4 * D, D),
                   f"{b}moe.experts.{e}.up_proj.weight": r(4 * D, D),
                   f"{b}moe.experts.{e}.down_proj.weight": r(D, 4 * D)}
        sd |= {b + "moe.shared_experts.gate_proj.weight": r(2 * D, D),
               b + "moe.shared_experts.up_proj.weight": r(2 * D, D),
               b + "moe.shared_experts.down_proj.weight": r(D, 2 * D),
               b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D)}
    return sd


def patchify(x, p):
    """(N, C, H, W) -> (N, T, p*p*C) by slicing, one patch at a time, in the (row, col, p, p, C)
    order of the linear heads."""
    h = x.shape[-1] // p
    return torch.stack([x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).flatten(1)
                        for i in range(h) for j in range(h)], dim=1)


def swiglu(x, gate, up, down):
    """The official MoeMLP written out: down_proj(silu(gate_proj(x)) * up_proj(x))."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


# ----------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,total,active", [
    ("S/2-8E2A", 199e6, 72e6), ("S/2-16E2A", 369e6, None), ("B/2-8E2A", 796e6, 286e6),
    ("XL/2-8E2A", 4.17e9, 1.49e9), ("G/2-16E2A", 16.50e9, 3.18e9), ("XL/2", 675e6, 675e6)])
def test_parameter_counts_match_official(name, total, active):
    # Counts of the official code's models (DiT-XL/2 675M from the DiT paper), built on meta.
    n_total, n_active, _ = model.count(model.config_from_name(name))
    assert abs(n_total / total - 1) < 0.005
    if active:
        assert abs(n_active / active - 1) < 0.005


def test_gflops_of_dense_dit_match_dit_paper():
    # DiT paper Table 4: S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64 GFLOPs.
    for name, g in [("S/2", 6.06), ("B/2", 23.01), ("L/2", 80.71), ("XL/2", 118.64)]:
        assert abs(model.count(model.config_from_name(name))[2] - g) < 0.02 * g


def test_registry_defaults_and_unknown_name():
    cfg = model.config_from_name("XL/2-8E2A")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.num_experts, cfg.top_k) == (28, 1152, 16, 8, 2)
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes) == (32, 4, 1000)
    assert model.config_from_name("S/4-8E2A", num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="valid: S/2-8E2A"):
        model.create_model("S/3-8E2A")
    with pytest.raises(ValueError, match="unknown model"):
        model.create_model("G/4-16E2A")  # the paper's size table has no G at patch 4


# ----------------------------------------------------------------------------
# Building blocks against hand computations
# ----------------------------------------------------------------------------

def test_position_table_by_hand():
    D, grid = 8, 3
    table = model.sincos_2d(D, grid)  # token index = row * grid + col
    row, col = 2, 1
    w = [1 / 10000 ** (i / 2) for i in range(2)]  # D/4 = 2 frequencies per axis
    expect = ([math.sin(col * f) for f in w] + [math.cos(col * f) for f in w]
              + [math.sin(row * f) for f in w] + [math.cos(row * f) for f in w])
    torch.testing.assert_close(table[row * grid + col], torch.tensor(expect), atol=1e-6, rtol=0)


def test_timestep_embedding_by_hand():
    t = torch.tensor([0.0, 3.0])
    f = [1.0, math.exp(-math.log(10000) / 2)]
    expect = [[1, 1, 0, 0], [math.cos(3 * f[0]), math.cos(3 * f[1]), math.sin(3 * f[0]), math.sin(3 * f[1])]]
    torch.testing.assert_close(model.timestep_embedding(t, dim=4), torch.tensor(expect), atol=1e-6, rtol=0)


def test_unpatchify_inverts_patchify():
    net = DiT(DiTConfig(**SMALL, learn_sigma=False))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(net.unpatchify(patchify(x, 2)), x)


def test_adaln_zero_init_gives_zero_output():
    net = DiT(DiTConfig(**SMALL))
    out = net(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10]))
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0


# ----------------------------------------------------------------------------
# Official checkpoints: conversion and loading
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_official_layout_loads_and_round_trips(tmp_path, qk_norm):
    # Without qk_norm the file does not tell the number of heads: 64-wide heads are assumed.
    cfg = DiTConfig(**(SMALL | dict(num_heads=4 if qk_norm else 1)), qk_norm=qk_norm,
                    objective="rf" if qk_norm else "ddpm")
    sd = official_state_dict(cfg, qk_norm)
    ours = model.from_official(sd)
    net = DiT(cfg)
    result = net.load_state_dict(ours, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    back = to_official(ours, qk_norm)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    again = model.from_official(to_official(net.state_dict(), qk_norm))
    assert all(torch.equal(again[k], v) for k, v in net.state_dict().items())
    # Every container the official loader accepts, with the architecture read off the file.
    for i, wrap in enumerate([lambda s: {"ema": s}, lambda s: {"model": s}, lambda s: s]):
        torch.save(wrap(sd), tmp_path / f"{i}.pt")
        loaded = model.load(tmp_path / f"{i}.pt")
        assert loaded.cfg == cfg and not loaded.training
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.items())


def test_converted_moe_computes_the_official_function():
    # The official SparseMoeBlock written out by hand from the official tensors: softmax router,
    # top-2 raw probabilities as weights, SwiGLU experts, plus the shared expert.
    cfg = DiTConfig(**SMALL)
    sd = official_state_dict(cfg)
    net = DiT(cfg)
    net.load_state_dict(model.from_official(sd))
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
    net.load_state_dict(model.from_official(sd))
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
    torch.save({"config": vars(cfg), "model": a, "ema": model.from_official(b)}, tmp_path / "c.pt")
    net = model.load(tmp_path / "c.pt")
    assert torch.equal(net.blocks[0].moe.w_down, model.from_official(b)["blocks.0.moe.w_down"])


def test_race_checkpoint_keeps_thresholds_and_heads(tmp_path):
    cfg = DiTConfig(**SMALL, router="race", layer_reg=0.1)
    sd = DiT(cfg).state_dict()
    sd["blocks.1.moe.threshold"] = torch.tensor(0.25)  # what training left behind
    torch.save({"config": vars(cfg), "ema": sd}, tmp_path / "race.pt")
    net = model.load(tmp_path / "race.pt")
    assert net.blocks[1].moe.threshold == 0.25 and net.blocks[0].moe.threshold.isnan()
    assert torch.equal(net.layer_heads[1][1].weight, sd["layer_heads.1.1.weight"])


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        model.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        model.load(tmp_path / "text.pt")
    torch.save({"ema": {"foo": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a DiT"):
        model.load(tmp_path / "foreign.pt")
    cfg = DiTConfig(**SMALL)
    sd = DiT(cfg).state_dict()
    sd["blocks.0.moe.w_down"] = torch.zeros(4, 100, 64)
    torch.save({"config": vars(cfg), "ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: blocks.0.moe.w_down \(4, 100, 64\)"):
        model.load(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------

def random_net(**kw):
    torch.manual_seed(0)
    net = DiT(DiTConfig(**(SMALL | kw)))
    with torch.no_grad():  # leave the zero init so every path carries signal
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_cfg_scale_one_is_conditional_and_channels_guided():
    net = random_net()
    z, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 10, 10]), torch.tensor([1, 2, 3])
    x2, t2, y2 = torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    cond, uncond = net(z, t, y), net(z, t, torch.full_like(y, 10))
    torch.testing.assert_close(net.forward_with_cfg(x2, t2, y2, 1.0)[:3], cond, atol=1e-5, rtol=1e-5)
    out = net.forward_with_cfg(x2, t2, y2, 4.0)[:3]
    expect = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out[:, :4], expect[:, :4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)  # variance: conditional
    legacy = net.forward_with_cfg(x2, t2, y2, 4.0, guided_channels=3)[:3]
    torch.testing.assert_close(legacy[:, :3], expect[:, :3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(legacy[:, 3], cond[:, 3], atol=1e-5, rtol=1e-5)  # 4th channel unguided


@pytest.mark.parametrize("router", ["token", "expert", "race"])
def test_sample_does_not_depend_on_batch_mates(router):
    net = random_net(router=router)
    for block in net.blocks if router == "race" else []:
        block.moe.threshold.fill_(0.0)  # as if trained: a pair runs iff its logit > 0
    x, t, y = torch.randn(5, 4, 8, 8), torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,))
    alone = torch.cat([net(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(net(x, t, y), alone, atol=1e-5, rtol=1e-5)


def test_aux_outputs_and_gradient_checkpointing():
    net = random_net().train()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])
    torch.manual_seed(1)
    out, aux = net(x, t, y, return_aux=True)
    assert aux["load"].shape == (2, 4) and torch.all(aux["load"].sum(1) == 3 * 16 * 2)
    (out.square().mean() + aux["router_loss"]).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.grad_checkpointing = True
    torch.manual_seed(1)  # same label dropout
    out2, aux2 = net(x, t, y, return_aux=True)
    (out2.square().mean() + aux2["router_loss"]).backward()
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_experts", [4, 0])
def test_layer_heads_predict_the_target_from_each_block(num_experts):
    net = random_net(layer_reg=0.1, num_experts=num_experts)
    plain = DiT(DiTConfig(**(SMALL | dict(num_experts=num_experts))))
    assert not any("layer_heads" in k for k in plain.state_dict())  # official layouts stay as they are
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("layer_heads.")})
    hidden = []  # each block's output, captured by hooks
    for block in net.blocks:
        block.register_forward_hook(lambda mod, args, out: hidden.append(out[0]))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    out, aux = net(x, t, y, return_aux=True)
    preds = aux["layer_preds"]
    assert preds.shape == (2, 3, 4, 8, 8)  # (L, N, C, H, W): C, not the 2C of the output
    for l, h in enumerate(hidden):
        lin = net.layer_heads[l][1]
        expect = F.layer_norm(h, (64,), eps=1e-6) @ lin.weight.T + lin.bias  # (N, T, p*p*C)
        torch.testing.assert_close(patchify(preds[l], 2), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, plain.eval()(x, t, y), atol=1e-6, rtol=1e-6)  # the output is unchanged
    assert "layer_preds" not in plain(x, t, y, return_aux=True)[1]
    # Freshly initialised, the heads already pass gradient into the blocks (a zero head would not).
    fresh = DiT(DiTConfig(**(SMALL | dict(num_experts=num_experts, layer_reg=0.1))))
    fresh(x, t, y, return_aux=True)[1]["layer_preds"][0].square().mean().backward()
    assert fresh.blocks[0].adaLN_modulation[-1].weight.grad.abs().max() > 0


def test_dense_size_has_dit_layout():
    net = model.create_model("S/2", input_size=8, num_classes=10)
    keys = net.state_dict().keys()
    assert "blocks.0.mlp.fc1.weight" in keys and not any(".moe." in k for k in keys)
    out, aux = net(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]), return_aux=True)
    assert out.shape == (2, 8, 8, 8) and aux["router_loss"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_compiles_fullgraph(dtype):
    torch._dynamo.reset()
    net = random_net(depth=1).train().to(dtype)
    x, t, y = torch.randn(2, 4, 8, 8, dtype=dtype), torch.tensor([3, 900]), torch.tensor([1, 2])
    net.y_embedder.dropout_prob = 0.0  # no label dropout: eager and compiled see the same labels
    compiled = torch.compile(net, fullgraph=True)

    def run(f):
        net.zero_grad()
        out, aux = f(x, t, y, return_aux=True)
        (out.float().square().mean() + aux["router_loss"]).backward()
        return out, [p.grad.clone() for p in net.parameters()]

    (out_e, g_e), (out_c, g_c) = run(net), run(compiled)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_c, out_e, **tol)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, **tol)


def test_initialisation_follows_the_official_code():
    # Router: nn.Linear's default U(-1/sqrt(D), 1/sqrt(D)); every expert projection (H x D):
    # Xavier U(-b, b) with b = sqrt(6 / (D + H)); adaLN and the output layer start at zero.
    torch.manual_seed(0)
    net = DiT(DiTConfig(**SMALL))
    moe, D = net.blocks[0].moe, 64
    bound = lambda w, b: abs(w.abs().max().item() / b - 1) < 0.02
    assert bound(moe.router.weight, 1 / math.sqrt(D))
    assert bound(moe.w_gate_up, math.sqrt(6 / (D + 4 * D))) and bound(moe.w_down, math.sqrt(6 / (D + 4 * D)))
    assert bound(moe.shared.gate_up.weight, math.sqrt(6 / (D + 2 * D)))
    assert bound(net.blocks[0].attn.qkv.weight, math.sqrt(6 / (D + 3 * D)))  # DiT's Xavier
    assert torch.count_nonzero(net.blocks[0].adaLN_modulation[-1].weight) == 0
