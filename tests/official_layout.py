"""Test helper: our checkpoint layout written out in the official one (per-expert nn.Linear)."""
import re


def to_official(sd, qk_norm):
    """Our state_dict -> the official DiT-MoE layout (its key names and shapes): the inverse of
    model.from_official, written separately so the tests can check the converter against it."""
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
