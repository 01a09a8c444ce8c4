"""Test helpers: the official DiT-MoE layout (per-expert nn.Linear) written out from its key names
and shapes, independently of checkpoint.py's converter."""
import re

import torch
import torch.nn.functional as F

import model


def to_official(sd, qk_norm):
    """Our state_dict -> the official DiT-MoE layout (its key names and shapes): the inverse of
    checkpoint.from_official, written separately so the tests can check the converter against it."""
    out = {}
    for key, v in sd.items():
        if qk_norm:
            key = key.replace("attn.qkv.", "attn.Wqkv.").replace("attn.proj.", "attn.out_proj.")
        m = re.fullmatch(r"(blocks\.\d+\.moe)\.(router\.weight|shared\.gate_up\.weight|shared\.down\.weight|w_gate_up|w_down)", key)
        if m is None:
            out[key] = v
            continue
        moe, name = m[1], m[2]
        if name == "router.weight":
            out[f"{moe}.gate.weight"] = v
        elif name == "shared.gate_up.weight":
            out[f"{moe}.shared_experts.gate_proj.weight"], out[f"{moe}.shared_experts.up_proj.weight"] = v.chunk(2)
        elif name == "shared.down.weight":
            out[f"{moe}.shared_experts.down_proj.weight"] = v
        elif name == "w_gate_up":  # (E, D, 2H) -> per expert gate_proj, up_proj (H, D)
            for e, w in enumerate(v):
                gate, up = w.T.chunk(2)
                out[f"{moe}.experts.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{moe}.experts.{e}.up_proj.weight"] = up.contiguous()
        else:  # w_down (E, H, D) -> per expert down_proj (D, H)
            for e, w in enumerate(v):
                out[f"{moe}.experts.{e}.down_proj.weight"] = w.T.contiguous()
    return out


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


def swiglu(x, gate, up, down):
    """The official MoeMLP written out: down_proj(silu(gate_proj(x)) * up_proj(x))."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
