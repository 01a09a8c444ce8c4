"""model.py: sizes, building blocks against hand computations, guidance, compile, init."""
import math

import pytest
import torch
import torch.nn.functional as F

import model
from model import DiTConfig, DiT

# A small official-style config: every code path of the big ones, in milliseconds.
SMALL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, num_experts=4, top_k=2,
             input_size=8, in_channels=4, num_classes=10)


def patchify(x, p):
    """(N, C, H, W) -> (N, T, p*p*C) by slicing, one patch at a time, in the (row, col, p, p, C)
    order of the linear heads."""
    h = x.shape[-1] // p
    return torch.stack([x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).flatten(1)
                        for i in range(h) for j in range(h)], dim=1)


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


@pytest.mark.parametrize("router", ["race", "token"])
def test_per_layer_regularisation_is_the_papers_router_mlp(router):
    # Race-DiT's PLR: the router is a two-layer MLP on the MoE input h: a = GELU(W1 h + b1); the
    # gating head reads a (E logits) and so does a target head (the patch's p*p*C target values).
    net = random_net(layer_reg=0.1, router=router)
    if router == "race":
        for block in net.blocks:
            block.moe.threshold.fill_(0.0)
    inputs = []  # each MoE layer's input h, captured by hooks
    for block in net.blocks:
        block.moe.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    out, aux = net(x, t, y, return_aux=True)
    preds = aux["layer_preds"]
    assert preds.shape == (2, 3, 4, 8, 8)  # (L, N, C, H, W): C, not the 2C of the output
    for l, (block, h) in enumerate(zip(net.blocks, inputs)):
        moe = block.moe
        hidden = F.gelu(h @ moe.router_mlp[0].weight.T + moe.router_mlp[0].bias)  # (N, T, D)
        logits = hidden @ moe.router.weight.T  # (N, T, E): both heads read the same hidden layer
        target = hidden @ moe.target_head.weight.T + moe.target_head.bias  # (N, T, p*p*C)
        torch.testing.assert_close(patchify(preds[l], 2), target, atol=1e-5, rtol=1e-5)
        token, expert, weight, _ = moe.route(h)
        if router == "token":
            want = logits.reshape(-1, 4).softmax(-1).topk(2, dim=-1)
            torch.testing.assert_close(weight, want.values.flatten(), atol=1e-6, rtol=1e-5)
            assert torch.equal(expert, want.indices.flatten())
        else:  # race at inference: the logits themselves are the gates of the pairs above 0
            torch.testing.assert_close(weight, logits.flatten(), atol=1e-6, rtol=1e-5)
    # without PLR the router is one Linear and the layout is the official one
    plain = DiT(DiTConfig(**(SMALL | dict(router=router))))
    keys = set(plain.state_dict())
    assert not any("router_mlp" in k or "target_head" in k for k in keys)
    assert keys < set(net.state_dict()) and "layer_preds" not in plain(x, t, y, return_aux=True)[1]
    # freshly initialised, the target heads pass gradient into the blocks and the router MLP
    fresh = DiT(DiTConfig(**(SMALL | dict(layer_reg=0.1, router=router))))
    fresh(x, t, y, return_aux=True)[1]["layer_preds"][0].square().mean().backward()
    assert fresh.blocks[0].adaLN_modulation[-1].weight.grad.abs().max() > 0
    assert fresh.blocks[0].moe.router_mlp[0].weight.grad.abs().max() > 0


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
